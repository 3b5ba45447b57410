"""Weights in buckets: the unit every transport moves.

A bucket is a list of whole tensors (HF names, the engine's dtype) whose bytes add up to about
``weights.bucket_mb``; a tensor larger than that goes alone. The layout — names, dtypes, shapes and byte offsets
in the bucket — is fixed by the model, so it is computed once from the learner's parameters and travels to the
engines as a small Python object, while the bytes go by the transport.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from rlhf_ray.runtime.devices import DTYPES

ALIGN = 64  # bytes: every tensor starts on a cache line, so views into a bucket are aligned for the kernels


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the bucket's start

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Bucket:
    slots: tuple[Slot, ...]
    nbytes: int


def plan_buckets(tensors: Iterable[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> list[Bucket]:
    """``(name, dtype, shape)`` in send order -> buckets of about ``bucket_bytes`` each (a larger tensor alone)."""
    buckets, slots, offset = [], [], 0
    for name, dtype, shape in tensors:
        slot = Slot(name, dtype, tuple(int(s) for s in shape), 0)
        if slots and offset + slot.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), offset))
            slots, offset = [], 0
        slots.append(Slot(slot.name, slot.dtype, slot.shape, offset))
        offset = _aligned(offset + slot.nbytes)
    if slots:
        buckets.append(Bucket(tuple(slots), offset))
    return buckets


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack_into(buffer: torch.Tensor, bucket: Bucket, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy ``tensors`` (in the bucket's order, already in its dtypes) into the uint8 ``buffer``; returns it."""
    for slot, tensor in zip(bucket.slots, tensors, strict=True):
        view = buffer[slot.offset:slot.offset + slot.nbytes].view(DTYPES[slot.dtype]).view(slot.shape)
        view.copy_(tensor)
    return buffer


def unpack(buffer: torch.Tensor, bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into the uint8 ``buffer`` (no copy): the buffer must outlive their use."""
    for slot in bucket.slots:
        yield slot.name, buffer[slot.offset:slot.offset + slot.nbytes].view(DTYPES[slot.dtype]).view(slot.shape)


def total_bytes(buckets: list[Bucket]) -> int:
    return sum(sum(slot.nbytes for slot in b.slots) for b in buckets)
