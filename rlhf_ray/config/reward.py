"""models.reward: where PPO's scores come from (also the reward config of rlhf_ray.evaluate and rlhf_ray.rm_eval)."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, model_validator

from rlhf_ray.config.errors import require
from rlhf_ray.config.sections import StrictSection


# models.reward.judge.parse when none is given: the verdict's last match of the mode's rule
DEFAULT_PARSE = {"pointwise": r"Rating:\s*(\d+)", "pairwise": r"Preferred:\s*\[?([AB])\b"}


class JudgeConfig(StrictSection):
    """models.reward.judge: an LLM (models.reward.model) that reads a judging prompt and writes a verdict
    (rlhf_ray.rewards.judge; the rules in docs/reward-models.md)."""
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise", description="'pointwise': the judge rates the response alone, score = its rating; 'pairwise': it "
                                 "compares the response with the prompt's reference answer (data.label_field), score "
                                 "= P(response preferred) in [0, 1], averaged over both orders (both_orders).")
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
        if self.parse is not None:
            try:
                groups = re.compile(self.parse).groups
            except re.error as err:
                require(False, "parse", f"{self.parse!r} is not a regular expression: {err}")
            require(groups == 1, "parse", f"{self.parse!r} must have exactly one group, the rating (pointwise) "
                                                f"or A/B (pairwise); it has {groups}")
        return self

    @property
    def compares_with_reference(self) -> bool:
        """Each sample is scored against a reference answer (``RewardSample.label``): a pairwise judge."""
        return self.kind == "judge" and self.judge.mode == "pairwise"

    @property
    def loads_model(self) -> bool:
        """The reward actors load ``model`` themselves (an RM or a judge): it is resolved before the run, and the
        role computes with threads, memory and GPUs of its own."""
        return self.kind in ("model", "judge")

    @property
    def parse_rule(self) -> str:
        return self.parse or DEFAULT_PARSE[self.mode]


class RewardConfig(StrictSection):
    kind: Literal["model", "function", "http", "serve", "judge"] = Field(
        "model", description="Reward backend (rlhf_ray.rewards.backends): 'model': a frozen HF sequence-classification RM "
                             "in the reward actors; 'function': a Python callable; 'http': a remote endpoint speaking "
                             "the rlhf-ray/reward/v1 JSON schema (rlhf_ray.rewards.http); 'serve': an RM deployed as a "
                             "shared Ray Serve application (python -m rlhf_ray.rm serve); 'judge': an LLM in the reward "
                             "actors (vLLM) that writes a verdict on each response (models.reward.judge).")
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
        None, description="kind='serve': name of the Ray Serve RM application (python -m rlhf_ray.rm list). The run "
                          "must join that cluster: ray.address or RAY_ADDRESS.")
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
        require(self.normalize != "stored" or self.kind in ("model", "serve"), "normalize",
                f"'stored' needs an RM with saved statistics (models.reward.kind='model' or 'serve', not "
                f"'{self.kind}'); use 'running' or 'none'")
        return self

    @property
    def compares_with_reference(self) -> bool:
        """Each sample is scored against a reference answer (``RewardSample.label``): a pairwise judge."""
        return self.kind == "judge" and self.judge.mode == "pairwise"

    @property
    def loads_model(self) -> bool:
        """The reward actors load ``model`` themselves (an RM or a judge): it is resolved before the run, and the
        role computes with threads, memory and GPUs of its own."""
        return self.kind in ("model", "judge")
