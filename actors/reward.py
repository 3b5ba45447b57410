"""Reward role: hosts one reward backend (rlhf_ray.rewards.backends, picked by models.reward.kind) in a Ray actor."""
from __future__ import annotations

import torch

from actors.common import Role, computes
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.backends import build_backend
from rlhf_ray.rewards.base import RewardSample


class RewardActor(Role):
    """A rollout batch in, one score per sequence out, from whichever backend the config names: an RM loaded here
    (``model_path``, resolved by the driver), a function, an HTTP endpoint or a shared Ray Serve RM."""

    def __init__(self, reward: dict, model_path: str | None, dtype: str = "float32", num_gpus: float = 0.0,
                 log_file: str | None = None):
        super().__init__(log_file)
        self.cfg = RewardConfig(**reward)
        self.backend = build_backend(self.cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus)

    @computes("score")
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """One scalar per (prompt, response). [B] float32"""
        return self.backend.score(samples_of(batch)).float()

    def stored_statistics(self) -> dict | None:
        """The RM's saved score statistics (reward_stats.json: mean, std, count, source) for
        ``models.reward.normalize='stored'``, or None where the backend has none."""
        return self.backend.stored_statistics()


def samples_of(batch: RolloutBatch) -> list[RewardSample]:
    return [RewardSample.of(messages, prompt, response)
            for messages, prompt, response in zip(batch.prompt_messages, batch.prompt_texts, batch.response_texts)]
