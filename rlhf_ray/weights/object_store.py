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

from rlhf_ray.weights.buckets import Bucket
from rlhf_ray.models.modeling import DTYPES


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
