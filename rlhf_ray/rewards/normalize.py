"""Raw reward scores -> what PPO sees: ``models.reward.normalize`` (none / stored / running) and ``clip``, applied on
the driver (rlhf_ray.drivers.ppo) with the stored statistics from ``RewardActor.stored_statistics()``."""
from __future__ import annotations

import math

import torch

from rlhf_ray.rewards.base import REWARD_STATS_FILE, check_stats

NORMALIZE_MODES = ("none", "stored", "running")
MIN_STD = 1e-8  # the running std of identical scores is 0: they normalise to 0, not to nan


class ScoreNormalizer:
    """Raw scores -> (scores - mean) / std, then clamped to ±clip. ``mode`` picks the statistics: 'none' (0, 1),
    'stored' (the RM's saved ones), 'running' (every score seen so far in the run, this batch included).

    The running statistics (count, mean, M2; Chan/Welford batch merge, in float64) are updated in every mode, so
    the state always describes the run's scores and a resumed run may switch modes. ``state_dict`` is JSON-able."""

    def __init__(self, mode: str = "none", stored: dict | None = None, clip: float | None = None):
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"models.reward.normalize={mode!r}: use one of {NORMALIZE_MODES}")
        if mode == "stored" and stored is None:
            raise ValueError("models.reward.normalize='stored' needs the RM's stored statistics "
                             f"({REWARD_STATS_FILE}); use models.reward.normalize=running or none")
        self.mode, self.clip = mode, clip
        self.stored = check_stats(stored, "the stored reward statistics") if stored is not None else None
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """[B] -> [B], same dtype."""
        self.update(scores)
        mean, std = self.statistics()
        out = (scores.double() - mean) / max(std, MIN_STD)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out.to(scores.dtype)

    def update(self, scores: torch.Tensor) -> None:
        x = scores.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def statistics(self) -> tuple[float, float]:
        """(mean, std) that ``mode`` divides by."""
        return _STATISTICS[self.mode](self)

    def running_statistics(self) -> tuple[float, float]:
        return self.mean, math.sqrt(self.m2 / self.count) if self.count else 1.0

    def state_dict(self) -> dict:
        return {"mode": self.mode, "clip": self.clip, "stored": self.stored,
                "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        """Restore the running statistics (mode, clip and stored statistics come from the config, as now)."""
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


_STATISTICS = {
    "none": lambda n: (0.0, 1.0),
    "stored": lambda n: (n.stored["mean"], n.stored["std"]),
    "running": ScoreNormalizer.running_statistics,
}
