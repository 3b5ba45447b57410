"""Reward backends: one call — samples in, one score per sample out — behind ``models.reward.kind``.

    model     a frozen HF sequence-classification RM in the reward actors, with its own tokenizer and template
              (rlhf_ray.rewards.model)
    function  a Python callable ``module:function(prompt, response, **function_kwargs) -> float``
    http      a remote endpoint speaking the versioned JSON schema of rlhf_ray.rewards.http
    serve     an RM deployed once as a Ray Serve application (rlhf_ray.rm), shared by any number of experiments
    judge     an LLM in the reward actors (vLLM) that writes a verdict from a judging prompt (rlhf_ray.rewards.judge)
    composite the weighted sum of several of the above, each routed to the prompts it scores (rlhf_ray.rewards.composite)

Every backend gets whole conversations (``RewardSample.messages``) as well as the rendered prompt and the
response text, so an RM never has to share the policy's tokenizer or chat template. A new kind is a new class in
``BACKENDS`` (plus its config keys in ``RewardConfig``); the reward actor (actors/reward.py) only hosts one. Any
backend may sit behind the score cache (rlhf_ray.rewards.cache: ``cache_identity``) and in a composite.

The shared pieces (``RewardSample``, ``RewardBackend``, stored statistics) are in rlhf_ray.rewards.base; score
normalisation in rlhf_ray.rewards.normalize.
"""
from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path

import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.base import REWARD_STATS_FILE, RewardBackend, RewardSample, load_function, missing_stats_message
from rlhf_ray.rewards.cache import function_identity, with_cache
from rlhf_ray.rewards.composite import CompositeBackend
from rlhf_ray.rewards.judge import JudgeBackend
from rlhf_ray.rewards.model import ModelBackend

# ----------------------------------------------------------------------------------------------- function

class FunctionBackend(RewardBackend):
    """``fn(prompt, response, **function_kwargs)`` per sample — with ``label=`` the prompt's reference answer where the
    data has labels (data.label_field); each result must be one finite number."""

    def __init__(self, cfg: RewardConfig, **resources):
        super().__init__(cfg, **resources)
        self.name = f"models.reward.function='{cfg.function}'"
        function = load_function(cfg.function)
        self.function = functools.partial(function, **cfg.function_kwargs)
        self.identity = function_identity(cfg.function, cfg.function_kwargs, function)

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        return torch.tensor([self._score_one(i, s) for i, s in enumerate(samples)], dtype=torch.float32)

    def cache_identity(self) -> dict:
        return self.identity

    def _score_one(self, i: int, sample: RewardSample) -> float:
        try:
            labelled = {} if sample.label is None else {"label": sample.label}
            result = self.function(sample.prompt, sample.response, **labelled)
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


# ----------------------------------------------------------------------------------------------- http

class HttpBackend(RewardBackend):
    """A remote v1 endpoint (rlhf_ray.rewards.http), at most ``batch_size`` samples per request."""

    def __init__(self, cfg: RewardConfig, **resources):
        import os

        from rlhf_ray.rewards.http import RewardClient

        super().__init__(cfg, **resources)
        headers = {}
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ValueError(f"models.reward.token_env={cfg.token_env!r}: that environment variable is not set "
                                 "where the reward actor runs; export it before starting the run (or the cluster)")
            headers["Authorization"] = f"Bearer {token}"
        self.client = RewardClient(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                                   headers=headers, outage_s=cfg.outage_s)
        # asked once, only where its scores may be cached: a version the endpoint declares (None: not cached)
        self.version = self.client.version() if cfg.cache != "off" else None

    def cache_identity(self) -> dict | None:
        return None if self.version is None else {"kind": "http", "url": self.cfg.url, "version": self.version}

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        size = self.cfg.batch_size
        scores = [score for start in range(0, len(samples), size)
                  for score in self.client.score([s.to_json() for s in samples[start:start + size]])]
        return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- serve

class ServeBackend(RewardBackend):
    """A version of an RM application on Ray Serve (``python -m rlhf_ray.rm serve NAME …``), called through its
    handle; the app batches requests from every experiment on the cluster (``@serve.batch``). ``models.reward.app``
    NAME@latest (or NAME) is resolved here, once: ``app`` is the Serve application this backend stays on
    (NAME@vN); a run resolves it before its reward actors start (rlhf_ray.drivers.ppo), so that they all agree."""

    def __init__(self, cfg: RewardConfig, **resources):
        from rlhf_ray.rewards.serve import app_handle, resolve

        super().__init__(cfg, **resources)
        self.app = resolve(cfg.app)
        self.handle = app_handle(self.app)
        self.identity = self._call("info")
        if cfg.normalize == "stored":
            self.stored_statistics()  # fail at start, not after a rollout

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        return torch.tensor(self._call("score", samples), dtype=torch.float32)

    def stored_statistics(self) -> dict | None:
        stats = self.identity["stored_statistics"]
        if stats is None and self.cfg.normalize == "stored":
            raise ValueError(missing_stats_message(Path(self.identity["model_path"]) / REWARD_STATS_FILE,
                                                   f"the Serve RM app '{self.app}'"))
        return stats

    def cache_identity(self) -> dict | None:
        version = self.identity.get("version")  # a versioned app declares one (python -m rlhf_ray.rm)
        # the fingerprint too: `rm serve --replace` may put another model under the same version
        return None if version is None else {"kind": "serve", "app": self.identity.get("app", self.cfg.app),
                                             "version": version, "fingerprint": self.identity.get("fingerprint")}

    def _call(self, method: str, *args):
        try:
            return getattr(self.handle, method).remote(*args).result(timeout_s=self.cfg.timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the Serve RM app '{self.app}' did not answer {method}() within "
                               f"{self.cfg.timeout_s:g} s (models.reward.timeout_s; `python -m rlhf_ray.rm list` "
                               "shows its status)") from None


BACKENDS: dict[str, type[RewardBackend]] = {"model": ModelBackend, "function": FunctionBackend, "http": HttpBackend,
                                            "serve": ServeBackend, "judge": JudgeBackend, "composite": CompositeBackend}


def build_backend(cfg: RewardConfig, *, model_path: str | None = None, dtype: str = "float32",
                  num_gpus: float = 0.0, sharded: bool = False, store=None) -> RewardBackend:
    """The backend ``cfg.kind`` names (``model_path``: the resolved RM or judge where ``cfg.loads_model``; ``sharded``:
    this process is one rank of a group holding the RM, kind='model' only), behind the score cache where ``cfg.cache``
    asks for it (``store``: the cache's store, default the one cfg.cache_path names). A composite builds its components
    here."""
    if sharded and cfg.kind != "model":
        raise ValueError(f"only a reward model can be sharded, not models.reward.kind={cfg.kind!r}")
    extra = {"sharded": True} if sharded else {"build": build_backend, "store": store} if cfg.kind == "composite" else {}
    backend = BACKENDS[cfg.kind](cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus, **extra)
    return backend if cfg.kind == "composite" else with_cache(backend, cfg, store)
