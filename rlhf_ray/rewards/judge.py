"""The ``judge`` reward backend: an LLM (models.reward.model) served by vLLM in the reward actors reads a judging
prompt — a Jinja template (models.reward.judge.template) filled with the conversation — and writes a verdict, which a
rule (judge.parse, a regular expression) turns into a score.

    pointwise  one judging prompt per response; score = the rating it states, an integer in [rating_min, rating_max]
    pairwise   the response against the prompt's reference answer (data.label_field), or against a baseline
               policy's answer (judge.baseline: ``BaselineAnswers``): "A" or "B" preferred; score = P(response
               preferred), 1 or 0 per verdict, averaged over both orders (both_orders: the response as A, then as B —
               a judge's position bias cancels out in the mean)

Each judging prompt comes with its *choices*: the verdict texts the rule may find and what each is worth for this
response (pointwise {"1": 1.0, …}; pairwise with the response as B: {"A": 0.0, "B": 1.0}). A verdict whose last match
of the rule is not one of them (no match, a rating out of range) does not parse: it is worth judge.unparsed_score and
counted — per sample, the share of its verdicts that did not parse, recorded in the backend's stats
(rlhf_ray.rewards.stats) and logged as the step metric ``reward/judge_unparsed``, its mean over the samples the judge
scored in the step (behind the score cache: those it missed). A judging prompt longer than models.reward.max_length is
not judged and counts the same way (``judge_overlong`` as well).

With judge.score=expected the value is the expectation over the choices under the judge's own probabilities at the
token where the verdict states its choice (``expected_value``): E = Σ_c p(c)·v(c) / Σ_c p(c), p(c) summed over the
top-k tokens (vLLM's logprobs) whose text is c. Where that token is not the choice alone (a rating split over tokens,
or glued to its neighbours) the parsed value stands and ``judge_expected_fallback`` counts it.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.config.reward import JudgeConfig
from rlhf_ray.rewards.base import RewardBackend, RewardSample
from rlhf_ray.rewards.cache import model_fingerprint
from rlhf_ray.rewards.stats import RewardStats

TEMPLATES_DIR = Path(__file__).parent / "templates"
SHIPPED_TEMPLATES = {"pointwise": "pointwise_helpfulness", "pairwise": "pairwise_preference"}  # each mode's default


# ------------------------------------------------------------------------------------------------ template

def template_source(spec: str | None, mode: str) -> tuple[str, str]:
    """(Jinja source, what it is for messages) of models.reward.judge.template: a shipped name, the template itself
    (text holding '{{'), or a file path; None: the mode's shipped template."""
    spec = spec or SHIPPED_TEMPLATES[mode]
    if "{{" in spec:
        return spec, "the inline template"
    shipped = TEMPLATES_DIR / f"{spec}.jinja"
    if shipped.is_file():
        return shipped.read_text(), f"the shipped template '{spec}'"
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(), str(path)
    names = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
    raise ValueError(f"models.reward.judge.template={spec!r} is neither a shipped template ({', '.join(names)}), a file "
                     "nor a template (text with '{{ … }}')")


def load_template(spec: str | None, mode: str):
    """The judging prompt's Jinja template; an unknown variable in it is an error when it renders (StrictUndefined)."""
    import jinja2

    source, what = template_source(spec, mode)
    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"models.reward.judge.template ({what}) is not valid Jinja: {err} (line {err.lineno})") from None


def conversation_text(messages: list[dict]) -> str:
    """The prompt's turns as 'User: …' / 'Assistant: …' / 'System: …' lines, for a judge to read."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


@dataclass(frozen=True)
class JudgingPrompt:
    text: str
    choices: dict[str, float]  # verdict text -> what it is worth for the judged response


def judging_prompts(template, sample: RewardSample, judge: JudgeConfig) -> list[JudgingPrompt]:
    """The judging prompts of one sample: one (pointwise; pairwise with both_orders=false) or two (pairwise: the
    response as answer A, then as answer B)."""
    turns = sample.messages[:-1]  # the prompt's turns (the last message is the response)
    users = [m["content"] for m in turns if m["role"] == "user"]
    common = dict(messages=turns, conversation=conversation_text(turns), question=users[-1] if users else "",
                  prompt=sample.prompt, response=sample.response, reference=sample.label,
                  rating_min=judge.rating_min, rating_max=judge.rating_max)
    if judge.mode == "pointwise":
        choices = {str(r): float(r) for r in range(judge.rating_min, judge.rating_max + 1)}
        return [JudgingPrompt(template.render(**common, answer_a=sample.response, answer_b=None), choices)]
    if sample.label is None:
        raise ValueError("models.reward.judge.mode=pairwise needs each prompt's reference answer, and a sample has none: "
                         "set data.label_field to the data field that holds it, or judge.baseline to a policy that "
                         "answers")
    orders = [(sample.response, sample.label, {"A": 1.0, "B": 0.0})]
    if judge.both_orders:
        orders.append((sample.label, sample.response, {"A": 0.0, "B": 1.0}))
    return [JudgingPrompt(template.render(**common, answer_a=a, answer_b=b), choices) for a, b, choices in orders]


# ------------------------------------------------------------------------------------------------ verdicts

def choice_key(text: str) -> str:
    """A verdict's choice as the choices spell it: stripped, integers without leading zeros or '+'."""
    text = text.strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def find_choice(verdict: str, rule: re.Pattern, choices: dict[str, float]) -> re.Match | None:
    """The last match of ``rule`` in ``verdict`` if its group is one of ``choices``, else None (does not parse)."""
    matches = list(rule.finditer(verdict))
    if not matches or choice_key(matches[-1].group(1) or "") not in choices:
        return None
    return matches[-1]


def expected_value(top_logprobs: list[tuple[str, float]], choices: dict[str, float]) -> float | None:
    """E[v] = Σ_c p(c)·v(c) / Σ_c p(c) over the choices among one position's top-k tokens (text, logprob); p(c) sums
    the tokens whose text is c (e.g. '5' and ' 5'). None when no choice is among them."""
    mass: dict[str, float] = {}
    for text, logprob in top_logprobs:
        key = choice_key(text)
        if key in choices and math.isfinite(logprob):
            mass[key] = mass.get(key, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(p * choices[key] for key, p in mass.items()) / total


def token_at(token_texts: list[str], char: int) -> int | None:
    """The index of the token whose text covers character ``char`` of their concatenation."""
    end = 0
    for i, text in enumerate(token_texts):
        end += len(text)
        if char < end:
            return i
    return None


def check_single_token_choices(tokenizer, judge: JudgeConfig, choices: dict[str, float]) -> None:
    """judge.score='expected' reads each choice's probability off one token: each must be one token (alone or after a
    space) in the judge's tokenizer."""
    if judge.score != "expected":
        return
    split = [c for c in choices if all(len(tokenizer.encode(form, add_special_tokens=False)) != 1
                                       for form in (c, " " + c))]
    if split:
        raise ValueError(f"models.reward.judge.score=expected needs every choice to be one token of the judge's "
                         f"tokenizer, and {split} are not: narrow rating_min/rating_max to single digits or use "
                         "score=parsed")


@dataclass(frozen=True)
class Verdict:
    value: float
    parsed: bool
    overlong: bool = False
    expected_fallback: bool = False


def read_verdict(output, rule: re.Pattern, choices: dict[str, float], judge: JudgeConfig) -> Verdict:
    """One vLLM completion (``text``, ``token_ids``, ``logprobs``) -> its verdict under ``judge``: the rule reads
    judge.reply_prefix + the judge's text."""
    prefix = judge.reply_prefix or ""
    match = find_choice(prefix + output.text, rule, choices)
    if match is None:
        return Verdict(judge.unparsed_score, parsed=False)
    parsed = choices[choice_key(match.group(1))]
    if judge.score == "parsed":
        return Verdict(parsed, parsed=True)
    positions = output.logprobs or []
    texts = [position[token].decoded_token or "" for position, token in zip(positions, output.token_ids)]
    start = match.start(1) - len(prefix)  # in the judge's own text (a choice inside the prefix has no logprobs)
    index = token_at(texts, start) if start >= 0 and "".join(texts) == output.text else None
    if index is None or choice_key(texts[index]) != choice_key(match.group(1)):
        return Verdict(parsed, parsed=True, expected_fallback=True)
    expected = expected_value([(lp.decoded_token or "", lp.logprob) for lp in positions[index].values()], choices)
    return Verdict(parsed if expected is None else expected, parsed=True, expected_fallback=expected is None)


def record_verdicts(stats: RewardStats, verdicts: list[list[Verdict]], judge: JudgeConfig) -> None:
    """Into ``stats`` (rlhf_ray.rewards.stats), per sample, the share of its verdicts that did not parse
    (``judge_unparsed``), were not judged, being too long (``judge_overlong``), or kept the parsed value under
    score='expected' (``judge_expected_fallback``): means over every sample scored, the step metrics
    reward/judge_unparsed, … (reward/<component>/judge_unparsed in a composite)."""
    def share(flag) -> torch.Tensor:
        return torch.tensor([sum(flag(v) for v in vs) / len(vs) for vs in verdicts], dtype=torch.float32)

    stats.add_values("judge_unparsed", share(lambda v: not v.parsed))
    stats.add_values("judge_overlong", share(lambda v: v.overlong))
    if judge.score == "expected":
        stats.add_values("judge_expected_fallback", share(lambda v: v.expected_fallback))


def judge_identity(cfg: RewardConfig, path: str, dtype: str) -> dict | None:
    """What a judge's scores depend on besides the sample (the score cache's key, rlhf_ray.rewards.cache): its
    resolved ``path`` and a fingerprint of its files (as an RM's: ``model_fingerprint``), the whole judge section, the
    template's text (a file's text can change under its name), max_length and ``dtype``, and the baseline policy's
    files where its answers are the reference; None where some files cannot be fingerprinted (then no caching)."""
    fingerprint = model_fingerprint(path)
    baseline = {} if cfg.judge.baseline is None else {"baseline_files": model_fingerprint(cfg.judge.baseline)}
    if fingerprint is None or None in baseline.values():
        return None
    return {"kind": "judge", "path": path, "files": fingerprint, "judge": cfg.judge.model_dump(mode="json"),
            "template": template_source(cfg.judge.template, cfg.judge.mode)[0], "max_length": cfg.max_length,
            "dtype": dtype, **baseline}


class BaselineAnswers:
    """A baseline policy's answer to each prompt (judge.baseline, pairwise judging's reference): greedy, at most
    judge.baseline_max_tokens, from a vLLM engine of its own in this process, for the prompt text as the policy saw it
    (RewardSample.prompt, encoded with the baseline's tokenizer: its special tokens added unless the text holds them).
    Each prompt is answered once and kept (``answers``); a prompt over ``max_prompt_tokens`` gets none (None)."""

    def __init__(self, path: str, judge: JudgeConfig, max_prompt_tokens: int, dtype: str, num_gpus: float,
                 memory_share: float):
        from vllm import LLM

        from rlhf_ray.runtime.engines import engine_options

        max_model_len = max_prompt_tokens + judge.baseline_max_tokens
        self.llm = LLM(model=path, dtype=dtype, seed=0, enforce_eager=True, max_model_len=max_model_len,
                       gpu_memory_utilization=memory_share, **engine_options(num_gpus, max_model_len))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_prompt_tokens, self.max_tokens = max_prompt_tokens, judge.baseline_max_tokens
        self.answers: dict[str, str | None] = {}

    def __call__(self, prompts: list[str]) -> list[str | None]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        new = [p for p in dict.fromkeys(prompts) if p not in self.answers]
        ids = {p: self.encode(p) for p in new}
        fits = [p for p in new if len(ids[p]) <= self.max_prompt_tokens]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[p]) for p in fits],
                                    SamplingParams(max_tokens=self.max_tokens, temperature=0.0),
                                    use_tqdm=False) if fits else []
        self.answers.update(dict.fromkeys(new))
        self.answers.update({p: out.outputs[0].text for p, out in zip(fits, outputs)})
        return [self.answers[p] for p in prompts]

    def encode(self, text: str) -> list[int]:
        specials = self.tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. [BOS]; none for many tokenizers
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids[:len(specials)] == specials else specials + ids


# ------------------------------------------------------------------------------------------------ backend

class JudgeBackend(RewardBackend):
    """The judge LLM in this process (a vLLM engine set up as the generation role's: rlhf_ray.runtime.engines), every
    judging prompt of a batch in one ``generate``."""

    def __init__(self, cfg: RewardConfig, *, model_path: str, dtype: str = "float32", num_gpus: float = 0.0):
        from rlhf_ray.runtime.engines import GPU_MEMORY_UTILIZATION, engine_options, prepare_vllm_process

        super().__init__(cfg)
        self.judge = cfg.judge
        self.template = load_template(self.judge.template, self.judge.mode)
        self.rule = re.compile(self.judge.parse_rule)
        prepare_vllm_process(num_gpus, dtype, what="the judge", dtype_key="models.dtype")
        from vllm import LLM

        max_model_len = cfg.max_length + self.judge.max_tokens
        share = GPU_MEMORY_UTILIZATION / (2 if self.judge.baseline else 1)  # the baseline's engine takes the other half
        self.llm = LLM(model=model_path, dtype=dtype, seed=0, enforce_eager=True, max_model_len=max_model_len,
                       gpu_memory_utilization=share, max_logprobs=self.judge.top_logprobs,
                       **engine_options(num_gpus, max_model_len))
        self.baseline = BaselineAnswers(self.judge.baseline, self.judge, cfg.max_length, dtype, num_gpus, share) \
            if self.judge.baseline else None
        self.tokenizer = self.llm.get_tokenizer()
        choices = {str(r) for r in range(self.judge.rating_min, self.judge.rating_max + 1)} \
            if self.judge.mode == "pointwise" else {"A", "B"}
        check_single_token_choices(self.tokenizer, self.judge, dict.fromkeys(choices, 0.0))
        self.path, self.dtype = model_path, dtype

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        unanswered = set()  # samples whose prompt is too long for the baseline: judged as overlong
        if self.baseline is not None:
            answers = self.baseline([s.prompt for s in samples])
            unanswered = {i for i, a in enumerate(answers) if a is None}
            samples = [replace(s, label=a or "") for s, a in zip(samples, answers)]
        prompts = [judging_prompts(self.template, s, self.judge) for s in samples]
        flat = [p for ps in prompts for p in ps]
        owners = [i for i, ps in enumerate(prompts) for _ in ps]  # the sample of each judging prompt
        verdicts = iter(self.judge_all(flat, skip={j for j, i in enumerate(owners) if i in unanswered}))
        grouped = [[next(verdicts) for _ in ps] for ps in prompts]
        record_verdicts(self.stats, grouped, self.judge)
        return torch.tensor([sum(v.value for v in vs) / len(vs) for vs in grouped], dtype=torch.float32)

    def cache_identity(self) -> dict | None:
        return judge_identity(self.cfg, self.path, self.dtype)

    def judge_all(self, prompts: list[JudgingPrompt], skip: set[int] = frozenset()) -> list[Verdict]:
        """Every judging prompt's verdict; those over models.reward.max_length tokens (and those in ``skip``) are not
        judged: overlong."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [self.encode(p.text) for p in prompts]
        fits = [i for i, tokens in enumerate(ids) if len(tokens) <= self.cfg.max_length and i not in skip]
        judge = self.judge
        params = [SamplingParams(max_tokens=judge.max_tokens, temperature=judge.temperature,
                                 logprobs=judge.top_logprobs if judge.score == "expected" else None,
                                 seed=zlib.crc32(prompts[i].text.encode()) if judge.temperature > 0 else None)
                  for i in fits]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in fits], params,
                                    use_tqdm=False) if fits else []
        verdicts = [Verdict(judge.unparsed_score, parsed=False, overlong=True)] * len(prompts)
        for i, out in zip(fits, outputs):
            verdicts[i] = read_verdict(out.outputs[0], self.rule, prompts[i].choices, judge)
        self.last_outputs = {i: out.outputs[0].text for i, out in zip(fits, outputs)}  # for inspection (benchmarks)
        return verdicts

    def encode(self, text: str) -> list[int]:
        """The judging prompt's token ids: as one user turn in the judge's chat template when it has one."""
        tokenizer, prefix = self.tokenizer, self.judge.reply_prefix or ""
        if self.judge.chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
            return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]
        return tokenizer(text + prefix)["input_ids"]
