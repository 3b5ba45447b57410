"""A frozen model held by a group of N ranks, each keeping ~1/N of it: ZeRO-3 inference (``resources.<role>.sharded``).

Why ZeRO-3 rather than vLLM tensor parallelism for the reward and reference roles: each rank forwards its own
share of the rollout while the weights are gathered a layer at a time, so all N devices compute at once (a
``device_map`` spread keeps one busy at a time); it needs nothing but DeepSpeed, which the learner already uses,
on CPU (gloo) and GPU (NCCL) alike; and the forward is the plain Hugging Face model, so scores and reference
logprobs are the unsharded model's, bit for bit in fp32 — a vLLM pooling model computes with other kernels. The
cost is the all-gather of every layer per forward, which the N-fold batch parallelism pays for on fast links.

The ranks must make the same forward calls in the same order (the gathers are collectives): the roles give each
rank an equal share of the batch, cut into the same number of micro-batches.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from torch import nn

PERSISTENCE_ELEMENTS = 10_000  # parameters this small (norms, biases) stay whole on every rank: not worth a gather


def inference_config(dtype: str) -> dict:
    """DeepSpeed config of a ZeRO-3 engine that only runs forward passes."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE_ELEMENTS},
            "bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 2**31}


@contextmanager
def partitioned_loading(dtype: str):
    """While open, transformers' ``from_pretrained`` builds the model straight into ZeRO-3 partitions (every rank of
    the group loading together): no rank ever holds the whole model."""
    from transformers.integrations import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(inference_config(dtype))  # transformers looks for it through a weak reference
    try:
        yield config
    finally:
        del config


def load_sharded(load: Callable[[], nn.Module], dtype: str) -> nn.Module:
    """``load()`` (a ``from_pretrained`` call) as this rank's ZeRO-3 partition of the model, ready for forward passes
    (eval mode; the DeepSpeed engine is kept on the module as ``ds_engine``)."""
    from rlhf_ray.runtime.builds import import_deepspeed

    deepspeed = import_deepspeed()
    with partitioned_loading(dtype):
        model = load()
        engine, *_ = deepspeed.initialize(model=model, config=inference_config(dtype))
    module = engine.module.eval()
    module.ds_engine = engine  # the engine owns the partitioning hooks: keep it alive with the module
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def resident_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its partitions under ZeRO-3 (persistent small ones whole), else all."""
    total = 0
    for param in model.parameters():
        local = getattr(param, "ds_tensor", None)
        if local is None or getattr(param, "ds_persist", False):  # whole on this rank
            total += getattr(param, "ds_numel", param.numel()) * param.element_size()
        else:
            total += local.numel() * local.element_size()
    return total


def release_gathered(model: nn.Module) -> None:
    """After the last forward of a call: release parameters ZeRO-3 prefetched for a next forward that does not come
    (the ranks' next call may be a different sequence of modules)."""
    engine = getattr(model, "ds_engine", None)
    if engine is not None:
        engine.empty_partition_cache()
