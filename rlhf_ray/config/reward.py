"""models.reward: where PPO's scores come from (also the reward config of rlhf_ray.evaluate and rlhf_ray.rm_eval)."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, model_validator

from rlhf_ray.config.errors import ConfigKeyError, require
from rlhf_ray.config.sections import StrictSection

# A Serve RM is named NAME@VERSION (rlhf_ray.rm serve deploys the Serve application "NAME@vN" at route /NAME/vN).
# Versions are numbered, v1, v2, …, so that "latest" (the highest number deployed) needs no other record; a bare
# NAME means NAME@latest. The characters are those a URL path segment takes as they are.
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
VERSION = re.compile(r"v([1-9][0-9]*)")
LATEST = "latest"


def parse_app(value: str) -> tuple[str, str]:
    """'NAME', 'NAME@latest' or 'NAME@vN' -> (NAME, 'latest' | 'vN'); anything else: ValueError saying the form."""
    name, sep, version = value.partition("@")
    version = version if sep else LATEST
    if not APP_NAME.fullmatch(name) or not (version == LATEST or VERSION.fullmatch(version)):
        raise ValueError(f"{value!r} is not NAME, NAME@latest or NAME@vN (NAME: letters, digits, '.', '_', '-'; "
                         "N: 1, 2, …), e.g. helpful@v2")
    return name, version


class RewardConfig(StrictSection):
    kind: Literal["model", "function", "http", "serve"] = Field(
        "model", description="Reward backend (rlhf_ray.rewards.backends): 'model': a frozen HF sequence-classification RM "
                             "in the reward actors; 'function': a Python callable; 'http': a remote endpoint speaking "
                             "the rlhf-ray/reward/v1 JSON schema (rlhf_ray.rewards.http); 'serve': an RM deployed as a "
                             "shared Ray Serve application (python -m rlhf_ray.rm serve).")
    model: Optional[str] = Field(
        None, description="RM hub name, local path or 'tiny:reward'. Required when kind='model'.")
    function: Optional[str] = Field(
        None, description="'module:function' taking (prompt: str, response: str) -> float. Required when kind='function'.")
    function_kwargs: dict = Field(
        default_factory=dict, description="Extra keyword arguments for the reward function (e.g. {char: 'e'}).")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How (prompt, response) text is rendered for the RM: Tulu chat format or the RM tokenizer's own chat template.")
    max_length: int = Field(1024, gt=0, description="RM input tokens; longer inputs keep their end (the response).")
    batch_size: int = Field(
        8, gt=0, description="Sequences per RM forward pass (kind='model'); samples per request (kind='http').")
    url: Optional[str] = Field(
        None, description="kind='http': the endpoint samples are POSTed to (http:// or https://), e.g. "
                          "http://127.0.0.1:8001/ or a Serve RM's http://127.0.0.1:8000/NAME.")
    timeout_s: float = Field(
        60.0, gt=0, description="kind='http': seconds one request may take; kind='serve': seconds one scoring call "
                                "may take. A slow answer is an error naming the endpoint (not retried).")
    retries: int = Field(
        3, ge=0, description="kind='http': retries of a request after a connection error or HTTP 429/500/502/503/504.")
    backoff_s: float = Field(
        0.5, ge=0, description="kind='http': exponential back-off between retries (urllib3: the first retry at once, the "
                              "n-th after backoff_s × 2^(n-1) seconds; a Retry-After header is honoured).")
    outage_s: float = Field(
        300.0, ge=0, description="kind='http': how long an outage of the endpoint is ridden out. When a request still "
                                 "fails after its `retries` (a connection error, HTTP 429/500/502/503/504), it is tried "
                                 "again with back-off (up to 10 s and outage_s / 10 apart) until the endpoint has been "
                                 "unreachable for this long, and the driver's console says so once a minute; then the "
                                 "run stops, checkpointing its finished steps (checkpoint.on_error). 0: stop after "
                                 "`retries`. outage_s + timeout_s must fit in timeouts.score_s.")
    token_env: Optional[str] = Field(
        None, description="kind='http': name of an environment variable holding a bearer token, sent as "
                          "'Authorization: Bearer …' (the token itself never goes into the config). It must be set "
                          "where the reward actors run (the driver's environment for a Ray the run starts itself).")
    app: Optional[str] = Field(
        None, description="kind='serve': the Serve RM as NAME@vN (a version), NAME@latest or NAME (= NAME@latest), as "
                          "python -m rlhf_ray.rm list shows them. A run resolves latest once, when it starts, records "
                          "the version it got in its config.yaml, and keeps it for the whole run, resumes included. "
                          "The run must join that cluster: ray.address or RAY_ADDRESS.")
    normalize: Literal["none", "stored", "running"] = Field(
        "none", description="Score normalisation before PPO: 'stored': (score - mean) / std with the statistics saved "
                            "with the RM (<RM dir>/reward_stats.json, written by RM training; kind='model' or "
                            "'serve'); 'running': with the running mean/std of every score seen so far in the run "
                            "(kept in checkpoints); 'none': raw scores.")
    clip: Optional[float] = Field(
        None, gt=0, description="Clamp normalised scores to ±clip; null disables. Applied after normalize (and before "
                                "ppo.reward_clip, which clamps what comes out of here).")

    @model_validator(mode="after")
    def _check_backend(self) -> "RewardConfig":
        # what each kind needs besides `kind`; the model of kind='model' is checked where a run needs one
        # (ModelsConfig), since RewardConfig() alone is the section's default
        require(self.kind != "function" or (self.function and ":" in self.function), "function",
                "must be 'module:function' when models.reward.kind='function'")
        require(self.kind != "http" or (self.url or "").startswith(("http://", "https://")), "url",
                "must be an http:// or https:// URL when models.reward.kind='http' (e.g. http://127.0.0.1:8001/)")
        require(self.kind != "serve" or self.app, "app", "is required when models.reward.kind='serve': the Serve "
                                                        "application's name (python -m rlhf_ray.rm list shows them)")
        if self.kind == "serve":
            try:
                parse_app(self.app)
            except ValueError as err:
                raise ConfigKeyError("app", str(err)) from None
        require(self.normalize != "stored" or self.kind in ("model", "serve"), "normalize",
                f"'stored' needs an RM with saved statistics (models.reward.kind='model' or 'serve', not "
                f"'{self.kind}'); use 'running' or 'none'")
        return self
