"""What every reward backend shares: the sample it scores, the backend interface, loading a reward function by
name, and an RM's stored score statistics (``reward_stats.json``). Imported by the backends, the HTTP and Serve
apps, preflight and RM training alike; it imports none of them."""
from __future__ import annotations

import importlib
import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from rlhf_ray.config import RewardConfig

REWARD_STATS_FILE = "reward_stats.json"  # {"mean", "std", "count", "source"}, saved beside the RM by RM training


@dataclass(frozen=True)
class RewardSample:
    """One (prompt, response) to score. ``messages``: the prompt's turns + ``{"role": "assistant", "content":
    response}``; ``prompt``: the prompt text as the policy saw it; ``response``: the generated text; ``label``: the
    prompt's reference answer where the data has one (data.label_field)."""
    messages: list[dict]
    prompt: str
    response: str
    label: Optional[str] = None

    @classmethod
    def of(cls, prompt_messages: list[dict], prompt: str, response: str, label: Optional[str] = None) -> "RewardSample":
        return cls(messages=[*prompt_messages, {"role": "assistant", "content": response}], prompt=prompt,
                   response=response, label=label)

    def to_json(self) -> dict:
        """The sample as a v1 request carries it (rlhf_ray.rewards.http): ``label`` only where there is one."""
        out = asdict(self)
        if self.label is None:
            del out["label"]
        return out


class RewardBackend:
    """Samples in, one float32 score per sample out. ``stored_statistics``: the RM's saved score statistics
    (``REWARD_STATS_FILE``) when it has them, else None; with ``normalize='stored'`` their absence is an error."""

    def __init__(self, cfg: RewardConfig, *, model_path: str | None = None, dtype: str = "float32",
                 num_gpus: float = 0.0):
        self.cfg = cfg

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        raise NotImplementedError

    def details(self) -> dict[str, torch.Tensor]:
        """What the last ``score`` call found besides the scores, per sample: name -> [B] float32 (e.g. a judge's
        ``judge_unparsed``, the share of a sample's verdicts that did not parse). The reward actor returns them beside
        the scores; the driver logs each one's batch mean as the step metric ``reward/<name>``
        (``detail_metrics``). A backend of backends (a composite) names its parts' details ``<part>/<name>``."""
        return {}

    def stored_statistics(self) -> dict | None:
        return None


def detail_metrics(details: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Step metrics from the reward's per-sample details of one or more scoring calls: ``reward/<name>`` = the mean
    over every sample scored (a sample missing a name, because a call did not report it, is left out of its mean)."""
    joined: dict[str, list[torch.Tensor]] = {}
    for part in details:
        for name, values in part.items():
            joined.setdefault(name, []).append(values.float().flatten())
    return {f"reward/{name}": float(torch.cat(values).mean()) for name, values in joined.items()
            if sum(v.numel() for v in values)}


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
