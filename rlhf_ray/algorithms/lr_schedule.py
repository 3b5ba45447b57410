"""The learning-rate schedule: a warmup, then linear, cosine or no decay (optimizer.schedule, optimizer.warmup_ratio).

    factor(s) = s / max(1, W)                                        for s < W (warmup from 0)
    linear:     max(0, (T − s) / max(1, T − W))
    cosine:     max(0, ½ · (1 + cos(π · p))),  p = (s − W) / max(1, T − W)
    constant:   1

with s the optimizer step, W the warmup steps and T the total. The formulas are transformers' ``get_scheduler``'s
('linear', 'cosine', 'constant_with_warmup'), float for float, and the scheduler is the same ``LambdaLR`` of a
``functools.partial``, so checkpoints of either load into the other. It is not called from there because
``transformers.optimization`` imports ``transformers.trainer_utils``, which imports PEFT: ~2.5 s of CPU at every learner's
start (tests/test_lr_schedule.py compares the two at every step).
"""
from __future__ import annotations

import math
from functools import partial

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The share of the peak learning rate at optimizer step ``step`` (module docstring)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        return max(0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """A torch ``LambdaLR`` of ``lr_factor`` for ``optimizer``."""
    from torch.optim.lr_scheduler import LambdaLR

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps,
                                       total_steps=total_steps))
