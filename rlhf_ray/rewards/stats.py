"""What a reward backend reports next to its scores (per-component means, cache hits, unparsed verdicts): the path by
which reward-side figures reach a step's metrics.

A backend records into its ``RewardStats`` while it scores; the reward actor hands them over with the scores of each
call (``RewardBackend.take_stats``: returned and reset); the driver merges the parts of every reward actor and every
scoring round of a step and logs ``RewardStats.metrics()`` under ``reward/``. Two kinds of figure merge correctly
across parts:

    totals  summed           (counts: samples a component scored, cache hits, unparsed verdicts)
    means   sum / count      (a mean over every sample of the step, whichever actor scored it; a rate is a mean of
                              0/1 indicators, e.g. the cache's hit rate)

Imports nothing else of the project.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RewardStats:
    totals: dict[str, float] = field(default_factory=dict)
    means: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (sum of values, how many)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add_values(self, name: str, values) -> None:
        """Values (a tensor or a list of numbers) that ``name``'s mean is over; none: nothing recorded."""
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        if values.numel():
            total, count = self.means.get(name, (0.0, 0))
            self.means[name] = (total + values.sum().item(), count + values.numel())

    def merge(self, other: "RewardStats | None") -> "RewardStats":
        """``self`` with ``other``'s figures added (in place; returned for chaining)."""
        if other is not None:
            for name, value in other.totals.items():
                self.add_total(name, value)
            for name, (total, count) in other.means.items():
                mine = self.means.get(name, (0.0, 0))
                self.means[name] = (mine[0] + total, mine[1] + count)
        return self

    def prefixed(self, prefix: str) -> "RewardStats":
        """The same figures, each name preceded by ``prefix`` (a composite's component name and '/')."""
        return RewardStats({prefix + k: v for k, v in self.totals.items()},
                           {prefix + k: v for k, v in self.means.items()})

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """{prefix + name: total or mean}; a mean over no values is left out."""
        out = {prefix + name: value for name, value in self.totals.items()}
        out.update({prefix + name: total / count for name, (total, count) in self.means.items() if count})
        return out

    @staticmethod
    def merged(parts) -> "RewardStats":
        out = RewardStats()
        for part in parts:
            out.merge(part)
        return out
