"""``weights.transport: object_store`` (and ``files``, which starts the same way) — buckets put once into Ray's object
store by learner rank 0, read by every engine through their object refs.

A bucket is stored as ``(Bucket layout, [one uint8 numpy array per tensor])``: Ray serialises numpy arrays out of
band, so each tensor is copied once, into shared memory, and an engine on the same node reads it in place (a
read-only view, no copy) — against three copies for pickled torch tensors (Ray's zero-copy torch option is off by
default). An engine on another node pulls the objects; all of them are requested at once so that the pulls run
in parallel while the first bucket loads.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch

from rlhf_ray.runtime.devices import DTYPES
from rlhf_ray.weights.buckets import Bucket
from rlhf_ray.weights.transport import Transport


def put_bucket(bucket: Bucket, tensors: list[torch.Tensor]):
    """One bucket into the object store; returns its ref. ``tensors`` are full, contiguous CPU tensors in the
    bucket's dtypes."""
    import ray

    arrays = [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors]
    return ray.put((bucket, arrays))


def read_buckets(refs: list, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every bucket behind ``refs``, viewing the object store's memory where it can."""
    import ray

    ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)  # start pulling every bucket now
    for ref in refs:
        bucket, arrays = ray.get(ref, timeout=timeout_s)
        yield from tensors_of(bucket, arrays)


def tensors_of(bucket: Bucket, arrays: list) -> Iterator[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():  # the object store's arrays are read-only; vLLM only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for slot, array in zip(bucket.slots, arrays, strict=True):
            yield slot.name, torch.from_numpy(array).view(DTYPES[slot.dtype]).view(slot.shape)


def put_buckets(buckets: list[Bucket], tensors) -> list:
    """Every bucket into the object store, taking ``tensors`` in the buckets' order; returns their refs."""
    stream = iter(tensors)
    return [put_bucket(bucket, [next(stream) for _ in bucket.slots]) for bucket in buckets]


class ObjectStoreTransport(Transport):
    name = "object_store"

    def publish(self, buckets, tensors, group=None, config=None):
        return put_buckets(buckets, tensors)

    def load(self, llm, payload, timeout_s):
        from rlhf_ray.weights.engine import load_into_engine

        # an in-process engine: the generator of tensors goes to the worker as it is
        return llm.collective_rpc(load_into_engine, kwargs={"weights": read_buckets(payload, timeout_s)})[0]

    @classmethod
    def refuses(cls, cfg):
        if not cfg.in_process_engines:
            return ("'object_store' needs in-process CPU engines (no GPUs, tensor_parallel_size 1): its buckets are "
                    "read in the actor's own process; with engines in other processes use 'collective', 'files' or "
                    "'auto'")
        return None
