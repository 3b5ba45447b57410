"""A reward model as a Ray Serve application (``RewardModelServer``), shared by any number of experiments, and the
handle the ``serve`` backend calls it through. Deployed and managed with ``python -m rlhf_ray.rm`` (rlhf_ray.rm)."""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.versions import is_pinned, resolve_app, serve_app_name

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000


@serve.deployment
class RewardModelServer:
    """One replica: a frozen RM scoring batches that Serve gathers from every experiment's calls."""

    def __init__(self, *, app: str, version: str | None, fingerprint: str, model: str, model_path: str, template: str,
                 max_length: int, max_batch_size: int, batch_wait_s: float, dtype: str, num_cpus: float,
                 num_gpus: float, url: str):
        from rlhf_ray.config import RewardConfig
        from rlhf_ray.rewards.model import ModelBackend
        from rlhf_ray.runtime.devices import set_threads

        set_threads(num_cpus)
        cfg = RewardConfig(kind="model", model=model, template=template, max_length=max_length,
                           batch_size=max_batch_size)
        self.backend = ModelBackend(cfg, model_path=model_path, dtype=dtype, num_gpus=num_gpus)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_s)
        # "app", "version", "model_path", "fingerprint": what a score is keyed by elsewhere (keep these names)
        self.identity = {"app": app, "version": version, "serve_app": serve_app_name(app, version) if version else app,
                         "model": model, "model_path": model_path, "fingerprint": fingerprint, "template": template,
                         "max_length": max_length, "dtype": dtype, "num_cpus": num_cpus, "num_gpus": num_gpus,
                         "url": url, "pid": os.getpid(), "stored_statistics": self.backend.stored_statistics()}
        self.requests = self.samples = 0
        self.last_request = None  # time.monotonic() of the last score() call

    async def score(self, samples: list[RewardSample]) -> list[float]:
        """One score per sample, in order. Each sample joins a model batch on its own (``_score_batch``)."""
        self.last_request = time.monotonic()
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
        """The app's identity and counters: app (NAME), version ('vN'), serve_app, model, model_path, fingerprint
        (rlhf_ray.rewards.versions.model_fingerprint), pid, requests, samples, idle_s (seconds since this replica's
        last score call; None: never called), stored_statistics, …"""
        idle = None if self.last_request is None else time.monotonic() - self.last_request
        return {**self.identity, "requests": self.requests, "samples": self.samples, "idle_s": idle}


# ------------------------------------------------------------------------------------------------ handles

def deployed_apps() -> list[str]:
    """The names of the Serve applications on the cluster this process is connected to."""
    return list(serve.status().applications)


def resolve(spec: str) -> str:
    """``models.reward.app`` ('NAME', 'NAME@latest', 'NAME@vN') -> the Serve application it names now
    (rlhf_ray.rewards.versions.resolve_app); ValueError where there is none."""
    return resolve_app(spec, deployed_apps())


def app_handle(name: str):
    """The handle of Serve application ``name`` (as ``resolve`` gives it) on the cluster this process is connected
    to."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_app_handle(name)
    except RayServeException as err:
        raise ValueError(f"models.reward.app={name!r}: no such Ray Serve application on this cluster "
                         f"({str(err).splitlines()[0]}); deploy it with `python -m rlhf_ray.rm serve {name} "
                         "--model …`, and see `python -m rlhf_ray.rm list`") from None


# ------------------------------------------------------------------------------------------------ a run's version

def pin_reward_app(reward, pinned_by: str | None = None) -> dict:
    """Resolve ``reward.app`` (models.reward, kind='serve') once, as a run starts: NAME@latest or NAME becomes the
    version deployed now (NAME@vN), written back into ``reward.app`` so that the run's config.yaml, its checkpoints
    and every reward actor (restarted ones too) name that version. ``pinned_by``: the checkpoint a resumed run took
    its version from (``adopt_pinned_app``). Logs one line; returns the app's ``info()``."""
    # ray.serve logs through a handler of its own (not the run's console filter): its router's INFO lines stay out
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    spec = reward.app
    app = resolve(spec)
    identity = app_handle(app).info.remote().result(timeout_s=reward.timeout_s)
    reward.app = app
    source = (f"recorded in {pinned_by}" if pinned_by else f"resolved from {spec}" if spec != app else "pinned")
    log.info("reward: Serve RM '%s' (%s), model %s, fingerprint %s", app, source, identity.get("model"),
             str(identity.get("fingerprint"))[:12])
    return identity


def adopt_pinned_app(reward, saved: dict) -> bool:
    """A resumed run's NAME@latest (or NAME) becomes the version its checkpoint's config recorded (``saved``, the
    config as a dict), so that a newer latest does not change the RM halfway. Returns whether it did. A run that
    names a version keeps it (another version than the checkpoint's is a change of model the resume refuses)."""
    from rlhf_ray.config.reward import parse_app

    before = (saved.get("models") or {}).get("reward") or {}
    if reward.kind != "serve" or before.get("kind") != "serve" or is_pinned(reward.app):
        return False
    try:
        same = parse_app(before.get("app") or "")[0] == parse_app(reward.app)[0] and is_pinned(before["app"])
    except ValueError:  # an older run's app name outside today's form: compared as it is
        return False
    if same:
        reward.app = before["app"]
    return same


def check_same_model(identity: dict, recorded: dict | None, path) -> None:
    """On resume: the pinned version still serves the model the checkpoint's run scored with (``recorded``: its
    identity in the driver state), so a version removed and deployed again with another model is not taken for it."""
    if recorded and recorded.get("fingerprint") != identity.get("fingerprint"):
        raise ValueError(f"cannot resume from {path}: the Serve RM '{identity.get('serve_app')}' now serves another "
                         f"model ({identity.get('model_path')}, fingerprint {str(identity.get('fingerprint'))[:12]}) "
                         f"than the run scored with ({recorded.get('model_path')}, fingerprint "
                         f"{str(recorded.get('fingerprint'))[:12]}); serve that model as "
                         f"{identity.get('serve_app')} again (python -m "
                         f"rlhf_ray.rm serve {identity.get('app')} --version {identity.get('version')} --model "
                         f"{recorded.get('model_path')} --replace) to resume, or start a new run")


def recorded_identity(identity: dict) -> dict:
    """What a checkpoint keeps of the Serve RM the run scores with (``check_same_model`` compares it)."""
    return {key: identity.get(key) for key in ("app", "version", "serve_app", "model_path", "fingerprint")}
