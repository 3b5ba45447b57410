"""Policy weights from the learner to the generation engines, after every update (``weights.transport``).

    transport     what a transport is (``Transport``): its halves in the learner, the engine and the driver, its
                  capabilities, its costs for the planner and the configurations it refuses
    sync          the driver's side: ``WeightSync`` (publish once, every engine loads), ``BroadcastSync`` (one
                  collective, its group re-formed after a lost engine)
    buckets       the layout every transport moves: whole tensors in the engine's dtype, ~weights.bucket_mb each
    object_store  buckets put once into Ray's object store, read in place by the engines
    files         the object store's buckets written by each engine as safetensors and reloaded by path
    collective    a pipelined broadcast over a process group of learner rank 0 and the engines (gloo / NCCL)
    adapter       a LoRA policy's adapters alone (megabytes) through the object store, loaded as a vLLM LoRA adapter
    engine        loading into vLLM exactly (every weight arrives; tied embeddings re-processed)

A transport is chosen once, by name (``choose_transport``), and made in every process that takes part
(``make_transport``). A new transport is one module with a ``Transport`` subclass and one entry in ``TRANSPORTS`` —
or none: ``weights.transport: package.module:Class`` names it where every role's process can import it.
"""
from __future__ import annotations

import importlib

from rlhf_ray.weights.transport import Transport

TRANSPORTS: dict[str, str] = {  # name -> "module:Class", imported when used
    "object_store": "rlhf_ray.weights.object_store:ObjectStoreTransport",
    "files": "rlhf_ray.weights.files:FilesTransport",
    "collective": "rlhf_ray.weights.collective:CollectiveTransport",
    "adapter": "rlhf_ray.weights.adapter:AdapterTransport",
}
AUTO = "auto"


def transport_class(name: str) -> type[Transport]:
    """The transport class ``name`` stands for: a name in ``TRANSPORTS`` or a ``module:Class``; a ValueError naming
    weights.transport otherwise."""
    target = TRANSPORTS.get(name, name)
    module, colon, attr = target.partition(":")
    if not (colon and module and attr):
        raise ValueError(f"weights.transport={name!r}: use one of {[AUTO, *sorted(TRANSPORTS)]} or a Transport "
                         "class as 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"weights.transport={name!r}: cannot import {target} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ValueError(f"weights.transport={name!r}: {target} is not a rlhf_ray.weights.Transport subclass")
    return cls


def check_transport_name(name: str) -> str:
    """``name`` if weights.transport may be it ('auto', a registered name, an importable ``module:Class``); a
    ValueError naming weights.transport otherwise. Registered names are checked without importing their module."""
    if name != AUTO and name not in TRANSPORTS:
        transport_class(name)
    return name


def make_transport(name: str) -> Transport:
    return transport_class(name)()


def choose_transport(cfg) -> tuple[str, str]:
    """(transport, why) for the experiment ``cfg``, with 'auto' decided by benchmarks/weight_sync.py: on one node the
    object store (one copy into shared memory, read in place) beat the gloo broadcast (a socket copy each way plus
    packing); engines whose workers are other processes cannot read the object store, and a broadcast (NCCL on GPUs)
    is the peers' fast path there."""
    name = cfg.weights.transport
    if name != AUTO:
        return name, "weights.transport"
    if cfg.in_process_engines:
        return "object_store", "in-process engines: the object store, read in place"
    if cfg.ppo.async_steps:
        return "files", "engines in other processes, overlapped (a replaced engine reloads the published weights)"
    if not cfg.same_devices_for_weights:
        return "files", "learner and engines on different kinds of device (one group cannot mix gloo and NCCL)"
    return "collective", "engines in other processes (GPUs or tensor_parallel_size > 1)"


def chosen_class(cfg) -> type[Transport]:
    """The class of the transport ``cfg`` runs with (what the planner prices)."""
    return transport_class(choose_transport(cfg)[0])


def transport_problem(cfg) -> str | None:
    """Why the configured weights.transport cannot serve ``cfg`` (None: it can, or it is 'auto')."""
    name = cfg.weights.transport
    return None if name == AUTO else transport_class(name).refuses(cfg)
