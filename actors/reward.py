"""Reward role: hosts one reward backend (rlhf_ray.rewards.backends, picked by models.reward.kind) in a Ray actor.

With ``resources.reward.sharded`` the role's actors hold one RM between them (rlhf_ray.models.sharding): each is
one rank of a ZeRO-3 group, and its backend is built in ``setup`` once the group exists."""
from __future__ import annotations

import torch

from rlhf_ray.actors.role import Role, computes, timed
from rlhf_ray.config import RewardConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.rewards.backends import build_backend
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.stats import RewardStats
from rlhf_ray.runtime.devices import device_for, require_cpu_bf16


class RewardActor(Role):
    """A rollout batch in, one score per sequence out, from whichever backend the config names: an RM or an LLM judge
    loaded here (``model_path``, resolved by the driver), a function, an HTTP endpoint or a shared Ray Serve RM."""

    def __init__(self, reward: dict, model_path: str | None, dtype: str = "float32", num_gpus: float = 0.0,
                 shard: tuple[int, int] | None = None, timeout_s: float = 600.0, log_file: str | None = None):
        super().__init__(log_file)
        self.cfg = RewardConfig(**reward)
        self.model_path, self.dtype, self.num_gpus = model_path, dtype, num_gpus
        self.shard, self.timeout_s = shard, timeout_s
        if device_for(num_gpus) == "cpu" and dtype == "bfloat16" and self.cfg.kind == "model":
            require_cpu_bf16("the reward model", "models.dtype")
        if shard is None:
            self.backend = build_backend(self.cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus)

    @timed
    def setup(self, master_addr: str, master_port: int) -> None:
        """Sharded: join the group and load this rank's partition of the RM (every rank together)."""
        rank, world = self.shard
        self.join_process_group(master_addr, master_port, rank, world, self.timeout_s, device_for(self.num_gpus))
        self.backend = build_backend(self.cfg, model_path=self.model_path, dtype=self.dtype, num_gpus=self.num_gpus,
                                     sharded=True)

    @computes("score")
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """One scalar per (prompt, response). [B] float32"""
        return self._scored(batch)[0]

    @computes("score")
    def scored(self, batch: RolloutBatch) -> tuple[torch.Tensor, RewardStats]:
        """``score`` and what the backend recorded while scoring (rlhf_ray.rewards.stats: per-component means, cache
        hits, …), which the driver logs under reward/."""
        return self._scored(batch)

    def _scored(self, batch: RolloutBatch) -> tuple[torch.Tensor, RewardStats]:
        scores = self.backend.score(samples_of(batch)).float()
        return scores, self.backend.take_stats()

    def stored_statistics(self) -> dict | None:
        """The RM's saved score statistics (reward_stats.json: mean, std, count, source) for
        ``models.reward.normalize='stored'``, or None where the backend has none."""
        return self.backend.stored_statistics()

    def resident_parameter_bytes(self) -> int:
        from rlhf_ray.models.sharding import resident_parameter_bytes

        return resident_parameter_bytes(self.backend.model)

    def shutdown(self) -> None:
        self.leave_process_group()


def samples_of(batch: RolloutBatch) -> list[RewardSample]:
    labels = batch.labels or [None] * len(batch)
    fields = batch.prompt_fields or [None] * len(batch)
    return [RewardSample.of(messages, prompt, response, label, routed) for messages, prompt, response, label, routed
            in zip(batch.prompt_messages, batch.prompt_texts, batch.response_texts, labels, fields)]
