"""Policy weights from the learner to the generation engines, after every update (``weights.transport``).

    buckets       the layout every transport moves: whole tensors in the engine's dtype, ~weights.bucket_mb each
    object_store  buckets put once into Ray's object store, read in place by the engines
    collective    a pipelined broadcast over a process group of learner rank 0 and the engines (gloo / NCCL)
    adapter       a LoRA policy's adapters alone (megabytes) through the object store, loaded as a vLLM LoRA adapter
    engine        loading into vLLM exactly (every weight arrives; tied embeddings re-processed)

A transport is a small class with the learner's half (``publish``, in learner rank 0, given the buckets and the
tensors in order) and the engine's half (``load``, in the generation actor, given what ``publish`` returned or,
for a broadcast, the layout). The driver's side — which calls go out together, recovery — is
``rlhf_ray.cluster.roles.Roles.sync_weights``. A new transport is a new class in ``TRANSPORTS`` plus its config
value.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import psutil
import torch

from rlhf_ray.weights.buckets import Bucket


class Transport:
    name = ""
    broadcast = False  # True: learner and engines take part in one collective (called together, a group first)
    adapter = False    # True: it carries a LoRA policy's adapters (and their config), not the weights

    def publish(self, buckets: list[Bucket], tensors: Iterable[torch.Tensor], group=None):
        """Learner rank 0: send one update; returns what every engine's ``load`` gets (None: the layout)."""
        raise NotImplementedError

    def load(self, llm, payload, timeout_s: float) -> dict:
        """Generation actor: take one update into the vLLM engine ``llm``; returns load_into_engine's report."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds in this process."""


class ObjectStoreTransport(Transport):
    name = "object_store"

    def publish(self, buckets, tensors, group=None):
        from rlhf_ray.weights.object_store import put_bucket

        stream = iter(tensors)
        return [put_bucket(bucket, [next(stream) for _ in bucket.slots]) for bucket in buckets]

    def load(self, llm, payload, timeout_s):
        from rlhf_ray.weights.engine import load_into_engine
        from rlhf_ray.weights.object_store import read_buckets

        # an in-process engine: the generator of tensors goes to the worker as it is
        return llm.collective_rpc(load_into_engine, kwargs={"weights": read_buckets(payload, timeout_s)})[0]


class FilesTransport(ObjectStoreTransport):
    """Published like ``object_store``; each engine writes the buckets as safetensors files (in RAM-backed /dev/shm
    where there is one) and its workers reload them by path — for engines whose workers are other processes."""
    name = "files"

    def load(self, llm, payload, timeout_s):
        from safetensors.torch import save_file

        from rlhf_ray.weights.engine import load_into_engine
        from rlhf_ray.weights.object_store import read_buckets

        tensors = dict(read_buckets(payload, timeout_s))
        if not hasattr(self, "directory"):
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            self.directory = weight_dir(size)
        for old in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, old))
        save_file(tensors, os.path.join(self.directory, "weights.safetensors"))
        return llm.collective_rpc(load_into_engine, kwargs={"directory": self.directory})[0]

    def close(self):
        if hasattr(self, "directory"):
            shutil.rmtree(self.directory, ignore_errors=True)


FILES_PREFIX = "rlhf_ray_weights_"


def weight_dir(size: int) -> str:
    """A directory of this process's own for weight files of ``size`` bytes: in RAM-backed /dev/shm where it has room
    for them (a container's is often 64 MiB), else in the temp dir."""
    root = tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size:
        root = "/dev/shm"
    remove_orphaned_weight_dirs(root)
    return tempfile.mkdtemp(prefix=f"{FILES_PREFIX}{os.getpid()}_", dir=root)


def remove_orphaned_weight_dirs(root: str) -> list[str]:
    """Weight files of engines that died without closing (killed, or lost with their node) stay in RAM-backed
    /dev/shm: remove those whose process is gone (the directory name carries its pid)."""
    removed = []
    for name in os.listdir(root):
        pid = name[len(FILES_PREFIX):].partition("_")[0]
        if name.startswith(FILES_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


class CollectiveTransport(Transport):
    name = "collective"
    broadcast = True

    def publish(self, buckets, tensors, group=None):
        from rlhf_ray.weights.collective import send

        if group is None:
            raise RuntimeError("weights.transport=collective: learner rank 0 has not joined the weight group")
        send(group, buckets, tensors)
        return None

    def load(self, llm, payload, timeout_s):
        from rlhf_ray.weights.collective import worker_receive

        return llm.collective_rpc(worker_receive, kwargs={"buckets": payload})[0]


class AdapterTransport(Transport):
    """A LoRA policy's adapters through the object store; each engine writes them as a PEFT adapter directory (in
    /dev/shm where it has room) and vLLM loads it as a new LoRA adapter, which the engine samples with from then on
    (``request``). The old adapter is dropped: each update gets a new adapter id, so no cached KV block of the old
    one is reused."""
    name = "adapter"
    adapter = True

    def __init__(self):
        self.request = None  # the vLLM LoRARequest of the adapter loaded last (None: the base model)

    def publish(self, buckets, tensors, group=None, config: dict | None = None):
        from rlhf_ray.weights.object_store import put_bucket

        if config is None:
            raise ValueError("weights.transport=adapter sends a LoRA adapter: its config is missing")
        stream = iter(tensors)
        return {"buckets": [put_bucket(bucket, [next(stream) for _ in bucket.slots]) for bucket in buckets],
                "config": config}

    def load(self, llm, payload, timeout_s):
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from rlhf_ray.weights.object_store import read_buckets

        tensors = {name: tensor.contiguous() for name, tensor in read_buckets(payload["buckets"], timeout_s)}
        if not hasattr(self, "directory"):
            self.directory = weight_dir(sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, os.path.join(self.directory, "adapter_model.safetensors"))
        with open(os.path.join(self.directory, "adapter_config.json"), "w") as f:
            json.dump(payload["config"], f)
        engine, version = llm.llm_engine, (self.request.lora_int_id + 1 if self.request is not None else 1)
        request = LoRARequest(lora_name=f"policy-{version}", lora_int_id=version, lora_path=self.directory)
        if not engine.add_lora(request):  # vLLM reads the files now: they may be overwritten by the next update
            raise RuntimeError(f"vLLM did not load the policy's LoRA adapter from {self.directory}")
        if self.request is not None:
            engine.remove_lora(self.request.lora_int_id)
        self.request = request
        return {"received": len(tensors), "loaded": len(tensors), "reprocessed": [], "adapter": request.lora_name}

    def close(self):
        if hasattr(self, "directory"):
            shutil.rmtree(self.directory, ignore_errors=True)


TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (ObjectStoreTransport, FilesTransport,
                                                               CollectiveTransport, AdapterTransport)}


def make_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ValueError(f"weights.transport={name!r}: use one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]()
