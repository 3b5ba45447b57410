"""models.reward: where PPO's scores come from (also the reward config of rlhf_ray.evaluate and rlhf_ray.rm_eval)."""
from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

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


# models.reward.judge.parse when none is given: the verdict's last match of the mode's rule
DEFAULT_PARSE = {"pointwise": r"Rating:\s*(\d+)", "pairwise": r"Preferred:\s*\[?([AB])\b"}


class JudgeConfig(StrictSection):
    """models.reward.judge: an LLM (models.reward.model) that reads a judging prompt and writes a verdict
    (rlhf_ray.rewards.judge; the rules in docs/reward-models.md)."""
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise", description="'pointwise': the judge rates the response alone, score = its rating; 'pairwise': it "
                                 "compares the response with the prompt's reference answer (data.label_field, or "
                                 "the baseline policy's answer: `baseline`), score = P(response preferred) in [0, 1], "
                                 "averaged over both orders (both_orders).")
    baseline: Optional[str] = Field(
        None, description="Pairwise: a policy (hub name, local path, 'tiny:'/'real:' spec) whose answer to each prompt "
                          "is the reference, instead of data.label_field — e.g. the initial SFT policy, making the "
                          "score a win rate against it. Its answers are generated greedily by a second vLLM engine "
                          "in the judge's process, once per prompt, from the prompt as the policy saw it (so a "
                          "policy of the same chat format). null: the data's reference answers.")
    baseline_max_tokens: int = Field(256, gt=0, description="Pairwise with `baseline`: the most tokens of a baseline "
                                                            "answer.")
    template: Optional[str] = Field(
        None, description="The judging prompt, a Jinja template: a shipped name ('pointwise_helpfulness', "
                          "'pairwise_preference'), a file path, or the template itself (text holding '{{'). null: "
                          "the mode's shipped template. Variables: question (the last user turn), conversation (the "
                          "prompt's turns as 'Role: text' lines), messages, prompt, response, reference, answer_a, "
                          "answer_b, rating_min, rating_max.")
    parse: Optional[str] = Field(
        None, description="Regular expression with one group that finds the verdict in the judge's text (its last "
                          "match counts): an integer rating (pointwise) or A / B (pairwise). null: "
                          "'Rating:\\s*(\\d+)' (pointwise), 'Preferred:\\s*\\[?([AB])\\b' (pairwise).")
    rating_min: int = Field(1, description="Pointwise: the lowest rating; a rating outside [rating_min, rating_max] "
                                           "does not parse.")
    rating_max: int = Field(5, description="Pointwise: the highest rating.")
    unparsed_score: float = Field(
        0.0, description="The score of a verdict that does not parse (or of a judging prompt longer than "
                         "models.reward.max_length, which is not judged); such verdicts are counted "
                         "(reward/judge_unparsed), never dropped. Pairwise: the value of that one order's verdict.")
    max_tokens: int = Field(64, gt=0, description="Verdict tokens the judge may write.")
    temperature: float = Field(
        0.0, ge=0, description="The judge's sampling temperature; 0: greedy. Above 0 each judging prompt is sampled "
                               "with a seed of its own text, so the same prompt gets the same verdict.")
    score: Literal["parsed", "expected"] = Field(
        "parsed", description="'parsed': the rating (or preference) the verdict states; 'expected': its expectation "
                              "under the judge's probabilities of the rating tokens at the position where the verdict "
                              "states it (vLLM's top-k logprobs there, renormalised over the rating tokens; needs "
                              "every rating to be one token — single digits are in most tokenizers).")
    top_logprobs: int = Field(20, ge=1, le=20, description="score='expected': how many of the most likely tokens "
                                                           "vLLM returns at each verdict position (at most 20, "
                                                           "vLLM's default max_logprobs).")
    both_orders: bool = Field(
        True, description="Pairwise: judge each pair twice, the response first (A) and second (B), and average — "
                          "against the judge's position bias; false: once, the response as A.")
    reply_prefix: Optional[str] = Field(
        None, description="Text the judge's reply starts with, written for it after the judging prompt (e.g. "
                          "'Rating:' or 'Preferred:'): a small judge then states its verdict at once instead of "
                          "echoing the format. The rule reads prefix + the judge's text. null: none.")
    chat_template: bool = Field(
        True, description="Wrap the judging prompt as one user turn in the judge tokenizer's chat template (when it "
                          "has one); false: the rendered text as it is (a base model as judge).")

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        require(self.rating_max > self.rating_min, "rating_max",
                f"{self.rating_max} must be above rating_min={self.rating_min}")
        require(self.baseline is None or self.mode == "pairwise", "baseline",
                "a baseline policy's answers are what a pairwise judge compares with: set mode=pairwise")
        if self.parse is not None:
            try:
                groups = re.compile(self.parse).groups
            except re.error as err:
                require(False, "parse", f"{self.parse!r} is not a regular expression: {err}")
            require(groups == 1, "parse", f"{self.parse!r} must have exactly one group, the rating (pointwise) "
                                                f"or A/B (pairwise); it has {groups}")
        return self

    @property
    def parse_rule(self) -> str:
        return self.parse or DEFAULT_PARSE[self.mode]


class RewardConfig(StrictSection):
    is_component: ClassVar[bool] = False  # a composite's component (RewardComponent)
    kind: Literal["model", "function", "http", "serve", "judge", "composite"] = Field(
        "model", description="Reward backend (rlhf_ray.rewards.backends): 'model': a frozen HF sequence-classification RM "
                             "in the reward actors; 'function': a Python callable; 'http': a remote endpoint speaking "
                             "the rlhf-ray/reward/v1 JSON schema (rlhf_ray.rewards.http); 'serve': an RM deployed as a "
                             "shared Ray Serve application (python -m rlhf_ray.rm serve); 'judge': an LLM in the reward "
                             "actors (vLLM) that writes a verdict on each response (models.reward.judge); 'composite': "
                             "the weighted sum of `components`, each a reward of any other kind "
                             "(rlhf_ray.rewards.composite).")
    model: Optional[str] = Field(
        None, description="kind='model': the RM (hub name, local path or 'tiny:reward'); kind='judge': the judge, a "
                          "causal LM (hub name, local path, 'tiny:policy', 'real:smollm2-135m'). Required for both.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="kind='judge': the judge's prompt, verdict "
                                                                        "rule and sampling.")
    function: Optional[str] = Field(
        None, description="'module:function' taking (prompt: str, response: str) -> float. Required when kind='function'.")
    function_kwargs: dict = Field(
        default_factory=dict, description="Extra keyword arguments for the reward function (e.g. {char: 'e'}).")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How (prompt, response) text is rendered for the RM: Tulu chat format or the RM tokenizer's own chat template.")
    max_length: int = Field(1024, gt=0, description="RM input tokens; longer inputs keep their end (the response). "
                                                    "kind='judge': the longest judging prompt (longer ones are not "
                                                    "judged: judge.unparsed_score, counted).")
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
    components: list["RewardComponent"] = Field(
        default_factory=list, description="kind='composite': the rewards summed, each a reward config of any kind but "
                                          "composite (its keys as here) plus `name` (metric names: reward/<name>/…), "
                                          "`weight` (default 1) and an optional `route: {field: COLUMN, equals: VALUE "
                                          "or [VALUES]}` (it scores only the prompts whose data column has that value; "
                                          "without a route it scores every prompt). A sample's score: Σ weight × "
                                          "(normalised) score over the components that score it; a sample no component "
                                          "scores is an error naming its column values.")
    cache: Literal["off", "disk"] = Field(
        "off", description="Score cache (rlhf_ray.rewards.cache): 'disk': raw scores kept in an SQLite file "
                           "(`cache_path`) by backend identity + conversation + response, shared by every run and "
                           "evaluation that reaches the file; a hit returns the raw score first computed. Backends "
                           "without a declared identity (an HTTP endpoint with no version in GET <base>/info, a Serve "
                           "app with none) are not cached (logged once). In a composite it is the default of its "
                           "components, each cached on its own. 'off': every sample is scored.")
    cache_path: Optional[str] = Field(
        None, description="cache='disk': the SQLite file (default ~/.cache/rlhf_ray/reward_scores.sqlite; for a "
                          "composite's component: the composite's); on a cluster of several nodes, a path on a "
                          "filesystem they share.")
    clip: Optional[float] = Field(
        None, gt=0, description="Clamp normalised scores to ±clip; null disables. Applied after normalize (and before "
                                "ppo.reward_clip, which clamps what comes out of here).")

    @model_validator(mode="after")
    def _check_backend(self) -> "RewardConfig":
        # what each kind needs besides `kind`; the model of kind='model' is checked where a run needs one
        # (ModelsConfig), since RewardConfig() alone is the section's default
        require(self.kind != "composite" or not self.is_component, "kind",
                "a component cannot itself be a composite: list its parts instead")
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
        require(self.kind != "composite" or self.components, "components",
                "must list at least one reward when models.reward.kind='composite'")
        require(self.kind == "composite" or not self.components, "components",
                f"is for models.reward.kind='composite', not '{self.kind}'")
        names = [c.name for c in self.components]
        require(len(set(names)) == len(names), "components",
                f"names must differ: {sorted({n for n in names if names.count(n) > 1})} given twice")
        return self

    @property
    def compares_with_reference(self) -> bool:
        """Each sample is scored against the data's reference answer (``RewardSample.label``): a pairwise judge
        without a baseline policy (judge.baseline), or a composite with one among its components."""
        if self.kind == "composite":
            return any(c.compares_with_reference for c in self.components)
        return self.kind == "judge" and self.judge.mode == "pairwise" and self.judge.baseline is None

    @property
    def loads_model(self) -> bool:
        """The reward actors load ``model`` themselves (an RM or a judge): it is resolved before the run, and the
        role computes with threads, memory and GPUs of its own."""
        return self.kind in ("model", "judge")

    @property
    def hosts_model(self) -> bool:
        """The reward actor holds a model in this process, its own (``loads_model``) or a composite component's: it
        computes with torch (or vLLM) threads, not as light work."""
        return self.loads_model or any(c.loads_model for c in self.components)

    def route_fields(self) -> list[str]:
        """The data columns the components route by (each prompt carries their values to the reward)."""
        return sorted({c.route.field for c in self.components if c.route is not None})


COMPONENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it goes into metric names (reward/<name>/raw_mean)


class RouteConfig(StrictSection):
    """Which prompts a composite's component scores: those whose data column ``field`` holds a value in ``equals``."""
    field: str = Field(description="The prompt data's column (e.g. task, or source for a mixture of data sets).")
    equals: Union[str, list[str]] = Field(
        description="The value, or a list of values, of that column (compared as text) that the component scores.")

    @field_validator("equals", mode="before")
    @classmethod
    def _as_text(cls, value):
        # YAML reads `equals: 3` or `equals: true` as a number or a bool; a data column's value is compared as text
        if isinstance(value, (int, float, bool)):
            return str(value)
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float, bool)) else v for v in value]
        return value

    def values(self) -> set[str]:
        return {self.equals} if isinstance(self.equals, str) else set(self.equals)


class RewardComponent(RewardConfig):
    """One reward of a composite (models.reward.components): a reward config of any kind but composite, named,
    weighted and optionally routed."""
    is_component: ClassVar[bool] = True
    name: str = Field(description="The component's name in metrics (reward/<name>/raw_mean, …) and errors.")
    weight: float = Field(1.0, description="Its factor in the sum (negative: a penalty).")
    route: Optional[RouteConfig] = Field(
        None, description="Score only the prompts whose data column has one of these values; null: every prompt.")
    cache: Optional[Literal["off", "disk"]] = Field(
        None, description="The component's score cache (see models.reward.cache); null: the composite's.")

    @model_validator(mode="after")
    def _check_component(self) -> "RewardComponent":
        require(COMPONENT_NAME.fullmatch(self.name), "name",
                f"{self.name!r}: use letters, digits, '_', '-' or '.' (it is part of metric names)")
        require(self.normalize != "running", "normalize",
                f"'running' is not available for a component ({self.name!r}): its statistics would live in the reward "
                "actor, not in checkpoints; use 'stored' (an RM's saved statistics) or 'none', and set "
                "models.reward.normalize=running on the composite for the sum")
        require(abs(self.weight) < float("inf"), "weight", "must be finite")
        return self


RewardConfig.model_rebuild()
