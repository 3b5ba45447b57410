"""A reward model as a Ray Serve application (``RewardModelServer``), shared by any number of experiments, and the
handle the ``serve`` backend calls it through. Deployed and managed with ``python -m rlhf_ray.rm`` (rlhf_ray.rm)."""
from __future__ import annotations

import asyncio
import os

from ray import serve

from rlhf_ray.rewards.base import RewardSample

DEFAULT_HTTP_PORT = 8000


@serve.deployment
class RewardModelServer:
    """One replica: a frozen RM scoring batches that Serve gathers from every experiment's calls."""

    def __init__(self, *, app: str, model: str, model_path: str, template: str, max_length: int, max_batch_size: int,
                 batch_wait_s: float, dtype: str, num_cpus: float, num_gpus: float, url: str):
        from rlhf_ray.config import RewardConfig
        from rlhf_ray.rewards.model import ModelBackend
        from rlhf_ray.runtime.devices import set_threads

        set_threads(num_cpus)
        cfg = RewardConfig(kind="model", model=model, template=template, max_length=max_length,
                           batch_size=max_batch_size)
        self.backend = ModelBackend(cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.identity = {"app": app, "model": model, "model_path": model_path, "template": template,
                         "max_length": max_length, "url": url, "pid": os.getpid(),
                         "stored_statistics": self.backend.stored_statistics()}
        self.requests = self.samples = 0

    async def score(self, samples: list[RewardSample]) -> list[float]:
        """One score per sample, in order. Each sample joins a model batch on its own (``_score_batch``)."""
        self.requests += 1
        self.samples += len(samples)
        return list(await asyncio.gather(*(self._score_batch(sample) for sample in samples)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # replaced in __init__ by the CLI's values
    async def _score_batch(self, samples: list[RewardSample]) -> list[float]:
        # in a thread: the replica's event loop keeps taking calls (and health checks) while the model runs
        return (await asyncio.to_thread(self.backend.score, samples)).tolist()

    async def __call__(self, request):
        """HTTP: a v1 request in, a v1 response out (400 for a request that is not v1)."""
        from starlette.responses import JSONResponse

        from rlhf_ray.rewards.http import SCHEMA, parse_request

        try:
            samples = parse_request(await request.body())
        except ValueError as err:
            return JSONResponse({"schema": SCHEMA, "error": str(err)}, status_code=400)
        scores = await self.score([RewardSample(**{k: s[k] for k in ("messages", "prompt", "response")})
                                   for s in samples])
        return JSONResponse({"schema": SCHEMA, "scores": scores})

    async def info(self) -> dict:
        """The app's identity and counters: model, model_path, pid, requests, samples, stored_statistics, …"""
        return {**self.identity, "requests": self.requests, "samples": self.samples}


# ------------------------------------------------------------------------------------------------ handles

def app_handle(name: str):
    """The handle of Serve application ``name`` on the cluster this process is connected to."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_app_handle(name)
    except RayServeException as err:
        raise ValueError(f"models.reward.app={name!r}: no such Ray Serve application on this cluster "
                         f"({str(err).splitlines()[0]}); deploy it with `python -m rlhf_ray.rm serve {name} "
                         "--model …`, and see `python -m rlhf_ray.rm list`") from None
