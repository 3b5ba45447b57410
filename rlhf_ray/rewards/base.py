"""What every reward backend shares: the sample it scores, the backend interface, loading a reward function by
name, and an RM's stored score statistics (``reward_stats.json``). Imported by the backends, the HTTP and Serve
apps, preflight and RM training alike; it imports none of them."""
from __future__ import annotations

import importlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.stats import RewardStats

REWARD_STATS_FILE = "reward_stats.json"  # {"mean", "std", "count", "source"}, saved beside the RM by RM training


@dataclass(frozen=True)
class RewardSample:
    """One (prompt, response) to score. ``messages``: the prompt's turns + ``{"role": "assistant", "content":
    response}``; ``prompt``: the prompt text as the policy saw it; ``response``: the generated text; ``label``: the
    prompt's reference answer where the data has one (data.label_field); ``fields``: the prompt's values of the data
    columns a composite reward routes by ({column: value as text}), for routing only: no backend is sent them."""
    messages: list[dict]
    prompt: str
    response: str
    label: Optional[str] = None
    fields: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, prompt_messages: list[dict], prompt: str, response: str, label: Optional[str] = None,
           fields: Optional[dict] = None) -> "RewardSample":
        return cls(messages=[*prompt_messages, {"role": "assistant", "content": response}], prompt=prompt,
                   response=response, label=label, fields=dict(fields or {}))

    def to_json(self) -> dict:
        """The sample as a v1 request carries it (rlhf_ray.rewards.http): ``label`` only where there is one; what a
        score may depend on, so also the content of a score-cache key (rlhf_ray.rewards.cache)."""
        out = asdict(self)
        del out["fields"]
        if self.label is None:
            del out["label"]
        return out


class RewardBackend:
    """Samples in, one float32 score per sample out. ``stored_statistics``: the RM's saved score statistics
    (``REWARD_STATS_FILE``) when it has them, else None; with ``normalize='stored'`` their absence is an error.

    ``stats``: figures the backend records while it scores (rlhf_ray.rewards.stats), handed over with each call's
    scores by ``take_stats`` and logged per step under ``reward/``. ``cache_identity``: what, besides the sample,
    its scores depend on (JSON-able; a version where the backend has one), or None where that is not known: then
    its scores are never cached (rlhf_ray.rewards.cache)."""

    def __init__(self, cfg: RewardConfig, *, model_path: str | None = None, dtype: str = "float32",
                 num_gpus: float = 0.0):
        self.cfg = cfg
        self.stats = RewardStats()

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        raise NotImplementedError

    def stored_statistics(self) -> dict | None:
        return None

    def cache_identity(self) -> dict | None:
        return None

    def describe(self) -> str:
        """The backend in a few words, for errors: 'function rlhf_ray.rewards:char_frequency'."""
        what = {"model": self.cfg.model, "function": self.cfg.function, "http": self.cfg.url, "serve": self.cfg.app,
                "judge": self.cfg.model}
        return f"{self.cfg.kind} {what.get(self.cfg.kind) or ''}".strip()

    def take_stats(self) -> RewardStats:
        """The figures recorded since the last call (and a fresh record for the next)."""
        stats, self.stats = self.stats, RewardStats()
        return stats


def load_function(spec: str, key: str = "models.reward.function"):
    """'package.module:function' -> the callable, with a message that says what is wrong."""
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key}='{spec}' cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"{key}='{spec}' is not callable")
    return fn


# ----------------------------------------------------------------------------------------------- stored statistics

def reward_stats_path(model_path: str) -> Path | None:
    """Where an RM's ``REWARD_STATS_FILE`` is: in its directory, or for a hub name in the local HF cache."""
    if Path(model_path).expanduser().is_dir():
        return Path(model_path).expanduser() / REWARD_STATS_FILE
    try:
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(model_path, REWARD_STATS_FILE)
    except Exception:  # not a valid repo id either
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_reward_stats(model_path: str) -> dict | None:
    """The RM's saved score statistics ``{"mean", "std", "count", "source"}``, checked; None if it has none."""
    path = reward_stats_path(model_path)
    if path is None or not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as JSON: {err}") from None
    return check_stats(stats, str(path))


def check_stats(stats, where: str) -> dict:
    """``stats`` as a clean dict, or ValueError naming ``where``: mean finite, std finite and > 0, count ≥ 0."""
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), numbers.Real) and not isinstance(stats.get(k), bool) for k in ("mean", "std", "count"))
    if not ok or not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0
                      and stats["count"] >= 0):
        raise ValueError(f"{where} must hold {{'mean': finite, 'std': finite > 0, 'count': int, 'source': str}}, "
                         f"got {stats!r}")
    return {"mean": float(stats["mean"]), "std": float(stats["std"]), "count": int(stats["count"]),
            "source": str(stats.get("source", ""))}


def missing_stats_message(path, who: str) -> str:
    return (f"models.reward.normalize='stored' needs {path}, and {who} has none: train the RM with this project's RM "
            f"training (it writes {REWARD_STATS_FILE}: mean, std, count, source of its scores), or write that file "
            "yourself, or use models.reward.normalize=running")


def require_reward_stats(model_path: str, who: str) -> dict:
    stats = read_reward_stats(model_path)
    if stats is None:
        path = reward_stats_path(model_path) or f"{model_path}/{REWARD_STATS_FILE}"
        raise ValueError(missing_stats_message(path, who))
    return stats


def write_reward_stats(model_dir: str | Path, scores: torch.Tensor, source: str) -> dict:
    """Save the statistics of ``scores`` (an RM's scores on some data) beside the RM, as 'stored' reads them."""
    scores = scores.double().flatten()
    stats = check_stats({"mean": scores.mean().item(), "std": scores.std(unbiased=False).item(),
                         "count": scores.numel(), "source": source}, f"the statistics of {source}")
    (Path(model_dir) / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    return stats
