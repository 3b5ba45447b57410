"""Reward backends: one call — samples in, one score per sample out — behind ``models.reward.kind``.

    model     a frozen HF sequence-classification RM in the reward actors, with its own tokenizer and template
    function  a Python callable ``module:function(prompt, response, **function_kwargs) -> float``
    http      a remote endpoint speaking the versioned JSON schema of rlhf_ray.reward_http
    serve     an RM deployed once as a Ray Serve application (rlhf_ray.rm), shared by any number of experiments

Every backend gets whole conversations (``RewardSample.messages``) as well as the rendered prompt and the
response text, so an RM never has to share the policy's tokenizer or chat template. A new kind is a new class in
``BACKENDS`` (plus its config keys in ``RewardConfig``); the reward actor (actors/reward.py) only hosts one.

``ScoreNormalizer`` turns raw scores into what PPO sees (``models.reward.normalize`` / ``clip``); the trainer
applies it on the driver, with the stored statistics from ``RewardActor.stored_statistics()``.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_ray.config import RewardConfig

REWARD_STATS_FILE = "reward_stats.json"  # {"mean", "std", "count", "source"}, saved beside the RM by RM training


@dataclass(frozen=True)
class RewardSample:
    """One (prompt, response) to score. ``messages``: the prompt's turns + ``{"role": "assistant", "content":
    response}``; ``prompt``: the prompt text as the policy saw it; ``response``: the generated text."""
    messages: list[dict]
    prompt: str
    response: str

    @classmethod
    def of(cls, prompt_messages: list[dict], prompt: str, response: str) -> "RewardSample":
        return cls(messages=[*prompt_messages, {"role": "assistant", "content": response}], prompt=prompt,
                   response=response)

    def to_json(self) -> dict:
        return asdict(self)


class RewardBackend:
    """Samples in, one float32 score per sample out. ``stored_statistics``: the RM's saved score statistics
    (``REWARD_STATS_FILE``) when it has them, else None; with ``normalize='stored'`` their absence is an error."""

    def __init__(self, cfg: RewardConfig, *, model_path: str | None = None, dtype: str = "float32",
                 num_gpus: float = 0.0):
        self.cfg = cfg

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        raise NotImplementedError

    def stored_statistics(self) -> dict | None:
        return None


# ----------------------------------------------------------------------------------------------- function

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


class FunctionBackend(RewardBackend):
    """``fn(prompt, response, **function_kwargs)`` per sample; each result must be one finite number."""

    def __init__(self, cfg: RewardConfig, **resources):
        super().__init__(cfg, **resources)
        self.name = f"models.reward.function='{cfg.function}'"
        self.function = functools.partial(load_function(cfg.function), **cfg.function_kwargs)

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        return torch.tensor([self._score_one(i, s) for i, s in enumerate(samples)], dtype=torch.float32)

    def _score_one(self, i: int, sample: RewardSample) -> float:
        try:
            result = self.function(sample.prompt, sample.response)
        except Exception as err:
            raise ValueError(f"{self.name} raised {type(err).__name__}: {err} for sample {i} "
                             f"(response {sample.response[:80]!r})") from err
        if isinstance(result, bool) or not isinstance(result, numbers.Real) and not (
                isinstance(result, torch.Tensor) and result.numel() == 1):
            raise ValueError(f"{self.name} returned {result!r} ({type(result).__name__}) for sample {i}; it must "
                             "return one number")
        value = float(result)
        if not math.isfinite(value):
            raise ValueError(f"{self.name} returned {value} for sample {i} "
                             f"(response {sample.response[:80]!r}); rewards must be finite")
        return value


# ----------------------------------------------------------------------------------------------- model

class ModelBackend(RewardBackend):
    """A frozen sequence-classification RM with its own tokenizer, reading conversations through
    ``modeling.encode_conversations`` — the encoding RM training and evaluation use, so scores agree."""

    def __init__(self, cfg: RewardConfig, *, model_path: str, dtype: str = "float32", num_gpus: float = 0.0):
        from actors.common import device_for
        from rlhf_ray.modeling import load_reward_model, load_reward_tokenizer

        super().__init__(cfg)
        self.path = model_path
        if cfg.normalize == "stored":
            require_reward_stats(model_path, f"the reward model {cfg.model}")  # fail at start, not after a rollout
        self.tokenizer = load_reward_tokenizer(model_path)
        self.model = load_reward_model(model_path, dtype, num_gpus).eval()
        if num_gpus <= 1:
            self.model.to(device_for(num_gpus))
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # HF pools at the last non-pad token

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        from rlhf_ray.modeling import encode_conversations

        cfg, scores = self.cfg, []
        with torch.no_grad():
            for start in range(0, len(samples), cfg.batch_size):
                chunk = [s.messages for s in samples[start:start + cfg.batch_size]]
                enc = encode_conversations(self.tokenizer, chunk, cfg.template, cfg.max_length).to(self.model.device)
                scores.append(self.model(**enc).logits[:, 0].float().cpu())
        scores = torch.cat(scores) if scores else torch.zeros(0)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the reward model ({cfg.model}) scored {len(bad)} of {len(scores)} samples "
                             f"{scores[bad[0]].item()} (first: sample {bad[0]}, response "
                             f"{samples[bad[0]].response[:80]!r}); scores must be finite — check its weights "
                             "and models.dtype (float16 overflows)")
        return scores

    def stored_statistics(self) -> dict | None:
        if self.cfg.normalize == "stored":
            return require_reward_stats(self.path, f"the reward model {self.cfg.model}")
        return read_reward_stats(self.path)


# ----------------------------------------------------------------------------------------------- http

class HttpBackend(RewardBackend):
    """A remote v1 endpoint (rlhf_ray.reward_http), at most ``batch_size`` samples per request."""

    def __init__(self, cfg: RewardConfig, **resources):
        import os

        from rlhf_ray.reward_http import RewardClient

        super().__init__(cfg, **resources)
        headers = {}
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ValueError(f"models.reward.token_env={cfg.token_env!r}: that environment variable is not set "
                                 "where the reward actor runs; export it before starting the run (or the cluster)")
            headers["Authorization"] = f"Bearer {token}"
        self.client = RewardClient(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                                   headers=headers)

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        size = self.cfg.batch_size
        scores = [score for start in range(0, len(samples), size)
                  for score in self.client.score([s.to_json() for s in samples[start:start + size]])]
        return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- serve

class ServeBackend(RewardBackend):
    """An RM application on Ray Serve (``python -m rlhf_ray.rm serve NAME …``), called through its handle; the
    app batches requests from every experiment on the cluster (``@serve.batch``)."""

    def __init__(self, cfg: RewardConfig, **resources):
        from rlhf_ray.rm import app_handle

        super().__init__(cfg, **resources)
        self.handle = app_handle(cfg.app)
        self.identity = self._call("info")
        if cfg.normalize == "stored":
            self.stored_statistics()  # fail at start, not after a rollout

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        return torch.tensor(self._call("score", samples), dtype=torch.float32)

    def stored_statistics(self) -> dict | None:
        stats = self.identity["stored_statistics"]
        if stats is None and self.cfg.normalize == "stored":
            raise ValueError(missing_stats_message(Path(self.identity["model_path"]) / REWARD_STATS_FILE,
                                                   f"the Serve RM app '{self.cfg.app}'"))
        return stats

    def _call(self, method: str, *args):
        try:
            return getattr(self.handle, method).remote(*args).result(timeout_s=self.cfg.timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the Serve RM app '{self.cfg.app}' did not answer {method}() within "
                               f"{self.cfg.timeout_s:g} s (models.reward.timeout_s; `python -m rlhf_ray.rm list` "
                               "shows its status)") from None


BACKENDS: dict[str, type[RewardBackend]] = {"model": ModelBackend, "function": FunctionBackend, "http": HttpBackend,
                                            "serve": ServeBackend}


def build_backend(cfg: RewardConfig, *, model_path: str | None = None, dtype: str = "float32",
                  num_gpus: float = 0.0) -> RewardBackend:
    """The backend ``cfg.kind`` names (``model_path``: the resolved RM for kind='model')."""
    return BACKENDS[cfg.kind](cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus)


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


# ----------------------------------------------------------------------------------------------- normalisation

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
