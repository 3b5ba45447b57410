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

A transport is chosen once, by name (``choose_transport``: for 'auto' the cheapest that serves the run, priced by the
planner on its hardware, or the registry's cheapest-first order without prices), and made in every process that takes
part (``make_transport``). A new transport is one module with a ``Transport`` subclass and one entry in
``TRANSPORTS`` — or none: ``weights.transport: package.module:Class`` names it where every role's process can import
it.
"""
from __future__ import annotations

import importlib

from rlhf_ray.weights.transport import Transport

TRANSPORTS: dict[str, str] = {  # name -> "module:Class", imported when used; cheapest first (choose_transport)
    "object_store": "rlhf_ray.weights.object_store:ObjectStoreTransport",
    "collective": "rlhf_ray.weights.collective:CollectiveTransport",
    "files": "rlhf_ray.weights.files:FilesTransport",
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


def auto_candidates(cfg) -> list[str]:
    """The registered transports ``weights.transport=auto`` may pick for ``cfg``, in ``TRANSPORTS``' order: those that
    do not refuse it, adapters aside (vLLM's LoRA kernels tripled SmolLM2's generation time on CPU: a LoRA policy
    goes merged)."""
    classes = {name: transport_class(name) for name in TRANSPORTS}
    return [name for name, cls in classes.items() if not cls.adapter and cls.refuses(cfg) is None]


def choose_transport(cfg, prices: dict[str, float] | None = None) -> tuple[str, str]:
    """(transport, why) for the experiment ``cfg``: ``weights.transport``, or for 'auto' one of ``auto_candidates``.

    The one place that decides, for the planner and the trainer alike. With ``prices`` (seconds per sync by transport
    name: the planner's, rlhf_ray.planning.timing.transport_prices, on the hardware it plans) 'auto' is the cheapest
    candidate. Without (the trainer has no hardware model) it is the first candidate in ``TRANSPORTS``' order: the
    object store where the engines read it in place (it beat the gloo broadcast on one node:
    benchmarks/results/weight_sync.md), else a broadcast (on GPUs NCCL is hundreds of times faster than a trip through
    host memory), else files. That is the priced order on GPUs and for in-process engines; for CPU engines in other
    processes files measured faster than the gloo broadcast, which the plan (priced) takes and says; overlapped
    (ppo.async_steps) on GPUs, too, the broadcast is priced there and taken where cheapest."""
    name = cfg.weights.transport
    if name != AUTO:
        return name, "weights.transport"
    candidates = auto_candidates(cfg)
    if not candidates:
        raise ValueError("weights.transport=auto: no registered transport serves this run; name one that does")
    unable = [n for n in TRANSPORTS if n not in candidates and not transport_class(n).adapter]
    cannot = f"; {', '.join(unable)} cannot serve this run" if unable else ""
    priced = [n for n in candidates if prices and n in prices]
    if priced:
        best = min(priced, key=prices.get)
        others = ", ".join(f"{n} {prices[n]:.3g} s" for n in priced if n != best)
        return best, (f"auto: the cheapest, {prices[best]:.3g} s vs {others}" if others
                      else "auto: the only one that serves this run") + cannot
    return candidates[0], f"auto: the first of {', '.join(candidates)} (cheapest first){cannot}"


def chosen_class(cfg) -> type[Transport]:
    """The class of the transport ``cfg`` runs with (what the planner prices)."""
    return transport_class(choose_transport(cfg)[0])


def transport_problem(cfg) -> str | None:
    """Why the configured weights.transport cannot serve ``cfg`` (None: it can, or it is 'auto')."""
    name = cfg.weights.transport
    return None if name == AUTO else transport_class(name).refuses(cfg)
