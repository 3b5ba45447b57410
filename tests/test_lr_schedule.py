"""The learning-rate schedule equals transformers' get_scheduler float for float, and loads its checkpoints."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms.lr_schedule import lr_factor, lr_scheduler


def transformers_scheduler(optimizer, schedule: str, warmup: int, total: int):
    from transformers import get_scheduler

    # transformers' 'constant' ignores warmup; 'constant_with_warmup' honours it
    name = "constant_with_warmup" if schedule == "constant" and warmup else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 17), (3, 20), (5, 5), (7, 3)])
def test_every_step_equals_transformers_and_the_state_loads_both_ways(schedule, warmup, total):
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)

    ours, theirs = lr_scheduler(optimizer(), schedule, warmup, total), transformers_scheduler(optimizer(), schedule,
                                                                                             warmup, total)
    for _ in range(total + 3):  # past the end too
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()
    resumed = lr_scheduler(optimizer(), schedule, warmup, total)
    resumed.load_state_dict(theirs.state_dict())  # a checkpoint written with transformers' scheduler
    assert resumed.last_epoch == theirs.last_epoch and resumed.get_last_lr() == theirs.get_last_lr()


def test_an_unknown_schedule_is_one_line():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step': use one of linear, cosine, constant"):
        lr_factor(3, schedule="step", warmup_steps=0, total_steps=5)
