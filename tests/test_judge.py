"""The LLM judge (models.reward.kind=judge) without an engine: judging prompts from templates, verdict rules, the
expected rating from top-k logprobs, the count of verdicts that fail to parse, the config's one-line errors, what it
records for the step metrics (RewardStats), its cache identity, and a judge as a composite's component. A tiny judge end to end: tests/test_reward_swap.py."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.config import ConfigError, RewardConfig, build_config
from rlhf_ray.config.reward import DEFAULT_PARSE, JudgeConfig
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.judge import (JudgeBackend, choice_key, expected_value, find_choice, judging_prompts,
                                    judge_identity, load_template, read_verdict, record_verdicts,
                                    template_source, token_at)
from rlhf_ray.rewards.stats import RewardStats
from tests.conftest import ROOT, tiny_config

SAMPLE = RewardSample.of([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
                         "<|user|>\nName a colour.\n<|assistant|>\n", "Blue.", label="Red.")
POINTWISE = JudgeConfig()
PAIRWISE = JudgeConfig(mode="pairwise")


# ------------------------------------------------------------------------------------------------ templates

def test_shipped_pointwise_template_shows_the_conversation_the_response_and_the_range():
    [prompt] = judging_prompts(load_template(None, "pointwise"), SAMPLE, POINTWISE)
    assert "System: Be brief.\nUser: Name a colour." in prompt.text and "[Answer]\nBlue.\n" in prompt.text
    assert "from 1 (useless or wrong) to 5 (excellent)" in prompt.text and '"Rating: " followed by' in prompt.text
    assert prompt.choices == {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "5": 5.0}


def test_pairwise_judges_both_orders_with_the_choices_swapped():
    first, second = judging_prompts(load_template(None, "pairwise"), SAMPLE, PAIRWISE)
    assert "[Answer A]\nBlue.\n" in first.text and "[Answer B]\nRed.\n" in first.text
    assert "[Answer A]\nRed.\n" in second.text and "[Answer B]\nBlue.\n" in second.text
    assert first.choices == {"A": 1.0, "B": 0.0} and second.choices == {"A": 0.0, "B": 1.0}
    assert len(judging_prompts(load_template(None, "pairwise"), SAMPLE, JudgeConfig(mode="pairwise",
                                                                                     both_orders=False))) == 1
    with pytest.raises(ValueError, match="data.label_field"):
        judging_prompts(load_template(None, "pairwise"), RewardSample.of([], "", "x"), PAIRWISE)


def test_a_users_template_inline_or_in_a_file(tmp_path):
    inline = "Q: {{ question }} A: {{ response }} ({{ rating_min }}-{{ rating_max }})"
    assert judging_prompts(load_template(inline, "pointwise"), SAMPLE, POINTWISE)[0].text == \
        "Q: Name a colour. A: Blue. (1-5)"
    (tmp_path / "mine.jinja").write_text("{{ prompt }}|{{ reference }}")
    assert judging_prompts(load_template(str(tmp_path / "mine.jinja"), "pointwise"), SAMPLE, POINTWISE)[0].text == \
        SAMPLE.prompt + "|Red."
    with pytest.raises(ValueError, match="neither a shipped template .*pairwise_preference, pointwise_helpfulness"):
        template_source("no_such_template", "pointwise")
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_template("{{ response ", "pointwise")
    with pytest.raises(Exception, match="answer_c"):  # StrictUndefined: a misspelt variable fails, not renders ''
        judging_prompts(load_template("{{ answer_c }}", "pointwise"), SAMPLE, POINTWISE)


# ------------------------------------------------------------------------------------------------ verdict rules

@pytest.mark.parametrize("verdict, mode, found", [
    ("Rating: 4\nClear and right.", "pointwise", "4"),
    ("rating: 4", "pointwise", None),                         # the rule is case-sensitive
    ("Rating: 9", "pointwise", None),                         # out of range: does not parse
    ("Rating: 2 ... on reflection, Rating: 3", "pointwise", "3"),  # the last match counts
    ("Rating:05", "pointwise", "5"),                          # leading zeros
    ("I cannot rate this.", "pointwise", None),
    ("", "pointwise", None),
    ("Preferred: B. It names a colour.", "pairwise", "B"),
    ("Preferred: [A]", "pairwise", "A"),
    ("Preferred: AB", "pairwise", None),                      # not a whole A or B
    ("Preferred: C", "pairwise", None),
])
def test_default_rules_parse_good_verdicts_and_refuse_the_rest(verdict, mode, found):
    choices = {"A": 1.0, "B": 0.0} if mode == "pairwise" else {str(r): float(r) for r in range(1, 6)}
    match = find_choice(verdict, re.compile(DEFAULT_PARSE[mode]), choices)
    assert (choice_key(match.group(1)) if match else None) == found


def test_expected_rating_from_top_logprobs_renormalised_over_the_rating_tokens():
    choices = {str(r): float(r) for r in range(1, 6)}
    top = [("4", math.log(0.5)), (" 4", math.log(0.1)), ("5", math.log(0.2)), ("the", math.log(0.15)),
           ("9", math.log(0.05))]
    assert expected_value(top, choices) == pytest.approx((0.6 * 4 + 0.2 * 5) / 0.8)
    assert expected_value([("the", -0.1)], choices) is None
    assert expected_value([("A", math.log(0.3)), ("B", math.log(0.1))], {"A": 0.0, "B": 1.0}) == pytest.approx(0.25)
    assert token_at(["Rating", ":", " 4"], 8) == 2 and token_at(["ab"], 5) is None


def completion(tokens: list[str], tops: list[dict[str, float]] | None = None):
    """A vLLM CompletionOutput's shape: text, token_ids, and per position {token id: Logprob}."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + [t for top in tops or [] for t in top]))}
    logprobs = None
    if tops is not None:
        logprobs = [{vocab[t]: SimpleNamespace(logprob=lp, decoded_token=t) for t, lp in {tok: 0.0, **top}.items()}
                    for tok, top in zip(tokens, tops)]
    return SimpleNamespace(text="".join(tokens), token_ids=[vocab[t] for t in tokens], logprobs=logprobs)


def test_read_verdict_parsed_expected_and_fallback():
    rule, choices = re.compile(DEFAULT_PARSE["pointwise"]), {str(r): float(r) for r in range(1, 6)}
    expected = JudgeConfig(score="expected", unparsed_score=-1.0)
    out = completion(["Rating", ":", " 4", "."], [{}, {}, {" 4": math.log(0.75), " 2": math.log(0.25)}, {}])
    assert read_verdict(out, rule, choices, POINTWISE).value == 4.0
    verdict = read_verdict(out, rule, choices, expected)
    assert verdict.value == pytest.approx(0.75 * 4 + 0.25 * 2) and verdict.parsed and not verdict.expected_fallback
    glued = completion(["Rating", ":4", "."], [{}, {":4": 0.0}, {}])  # the rating is not a token of its own
    assert read_verdict(glued, rule, choices, expected) == read_verdict(glued, rule, choices, expected).__class__(
        4.0, parsed=True, expected_fallback=True)
    unparsed = read_verdict(completion(["no", " idea"], [{}, {}]), rule, choices, expected)
    assert (unparsed.value, unparsed.parsed) == (-1.0, False)
    # judge.reply_prefix: the judge's reply starts after 'Rating:'; the rule reads both, the logprobs are its own
    prefixed = JudgeConfig(score="expected", reply_prefix="Rating:")
    out = completion([" 2", "."], [{" 2": math.log(0.5), " 3": math.log(0.5)}, {}])
    assert read_verdict(out, rule, choices, prefixed).value == pytest.approx(2.5)
    assert read_verdict(completion(["no"], [{}]), rule, choices, prefixed).parsed is False


# ------------------------------------------------------------------------------------------------ the count

class FakeLLM:
    """vLLM's LLM.generate as the judge calls it: one canned completion per judging prompt, in order."""

    def __init__(self, texts: list[str]):
        self.texts, self.calls = list(texts), []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        return [SimpleNamespace(outputs=[completion([self.texts.pop(0)])]) for _ in prompts]


def fake_judge(judge: JudgeConfig, texts: list[str], max_length: int = 1024) -> JudgeBackend:
    backend = JudgeBackend.__new__(JudgeBackend)
    backend.cfg = RewardConfig(kind="judge", model="tiny:policy", max_length=max_length, judge=judge)
    backend.judge, backend.rule = judge, re.compile(judge.parse_rule)
    backend.template, backend.stats = load_template(judge.template, judge.mode), RewardStats()
    backend.llm, backend.baseline = FakeLLM(texts), None
    backend.encode = lambda text: list(range(len(text.split())))  # a token per word
    return backend


def test_unparsed_verdicts_are_scored_and_counted_never_dropped():
    backend = fake_judge(JudgeConfig(unparsed_score=-2.0), ["Rating: 5", "rubbish", "Rating: 7", "Rating: 1"])
    samples = [RewardSample.of([{"role": "user", "content": "Hi"}], "Hi", r) for r in "abcd"]
    assert backend.score(samples).tolist() == [5.0, -2.0, -2.0, 1.0]
    assert backend.take_stats().metrics() == {"reward/judge_unparsed": 0.5, "reward/judge_overlong": 0.0}
    assert backend.take_stats().metrics() == {}  # handed over once
    assert backend.describe() == "judge tiny:policy"  # how errors (a composite's component that fails) name it


def test_pairwise_score_is_the_mean_preference_over_both_orders():
    # sample 0: preferred as A, then as B (1, 1); sample 1: the reference both times (0, 0); sample 2: position-biased
    # "A" twice (1, 0); sample 3: one verdict unparsed (1, unparsed_score 0.5)
    backend = fake_judge(JudgeConfig(mode="pairwise", unparsed_score=0.5),
                         ["Preferred: A", "Preferred: B", "Preferred: B", "Preferred: A", "Preferred: A",
                          "Preferred: A", "Preferred: A", "no"])
    samples = [RewardSample.of([{"role": "user", "content": "Hi"}], "Hi", r, label="ref") for r in "abcd"]
    assert backend.score(samples).tolist() == [1.0, 0.0, 0.5, 0.75]
    assert backend.take_stats().means["judge_unparsed"] == (0.5, 4)  # a share per sample: 0, 0, 0, 1/2


def test_pairwise_against_a_baseline_policy_judges_its_answer_and_counts_a_prompt_it_cannot_answer():
    """judge.baseline: the baseline's answer to each sample's prompt is the reference in both orders; a prompt too
    long for the baseline (None) is not judged: unparsed_score, counted as overlong."""
    backend = fake_judge(JudgeConfig(mode="pairwise", baseline="/sft", unparsed_score=0.25,
                                     template="{{ answer_a }} vs {{ answer_b }}"),
                         ["Preferred: A", "Preferred: B", "Preferred: B", "Preferred: B"])
    asked = []
    backend.baseline = lambda prompts: asked.append(prompts) or [{"p1": "sft-1", "p2": "sft-2"}.get(p) for p in prompts]
    samples = [RewardSample.of([{"role": "user", "content": "q"}], prompt, response)
               for prompt, response in [("p1", "x"), ("p2", "y"), ("long", "z")]]
    encoded = []
    backend.encode = lambda text: encoded.append(text) or list(range(len(text.split())))
    assert backend.score(samples).tolist() == [1.0, 0.5, 0.25]
    assert asked == [["p1", "p2", "long"]]
    assert encoded[:4] == ["x vs sft-1", "sft-1 vs x", "y vs sft-2", "sft-2 vs y"]
    assert len(backend.llm.calls[0][0]) == 4  # the unanswered prompt's two judging prompts never reach the engine
    assert [s.label for s in samples] == [None, None, None]  # the caller's samples are left as they are
    assert backend.take_stats().metrics() == {"reward/judge_unparsed": 1 / 3, "reward/judge_overlong": 1 / 3}


def test_a_judging_prompt_over_max_length_is_not_judged_but_counted():
    backend = fake_judge(JudgeConfig(unparsed_score=0.0, template="{{ response }}"), ["Rating: 3"], max_length=3)
    samples = [RewardSample.of([], "", "short answer"), RewardSample.of([], "", "a much longer answer here")]
    assert backend.score(samples).tolist() == [3.0, 0.0]
    assert len(backend.llm.calls[0][0]) == 1  # only the one that fits went to the engine
    assert backend.take_stats().metrics() == {"reward/judge_unparsed": 0.5, "reward/judge_overlong": 0.5}


def test_verdict_shares_merge_across_calls_actors_and_components():
    # two scoring calls (dynamic sampling's rounds, or two reward actors): every sample counts once in the step's mean
    first, second = RewardStats(), RewardStats()
    record_verdicts(first, [[SimpleNamespace(parsed=False, overlong=False, expected_fallback=True)]],
                    JudgeConfig(score="expected"))
    ok = SimpleNamespace(parsed=True, overlong=False, expected_fallback=False)
    record_verdicts(second, [[ok], [ok], [ok]], JudgeConfig(score="expected"))
    step = RewardStats.merged([first, second]).metrics()
    assert step == {"reward/judge_unparsed": 0.25, "reward/judge_overlong": 0.0, "reward/judge_expected_fallback": 0.25}
    assert "judge_expected_fallback" not in RewardStats().means  # score=parsed records no fallback
    record_verdicts(second, [[ok]], JudgeConfig())
    assert second.means["judge_expected_fallback"] == (0.0, 3)
    # in a composite, under the component's name
    assert first.prefixed("judge/").metrics()["reward/judge/judge_unparsed"] == 1.0


def test_cache_identity_is_the_judge_files_section_length_and_dtype(tiny_cache):
    from rlhf_ray.models.specs import resolve_model

    path = resolve_model("tiny:policy", tiny_cache)
    cfg = RewardConfig(kind="judge", model="tiny:policy", max_length=256)
    identity = judge_identity(cfg, path, "float32")
    assert identity["path"] == path and identity["files"] and identity["max_length"] == 256
    assert identity["judge"] == cfg.judge.model_dump(mode="json") and "Rating" in identity["template"]
    assert identity == judge_identity(cfg, path, "float32")
    for other in (judge_identity(cfg, path, "bfloat16"), judge_identity(cfg.model_copy(update={"max_length": 128}),
                                                                        path, "float32"),
                  judge_identity(RewardConfig(kind="judge", model="tiny:policy", max_length=256,
                                              judge={"temperature": 1.0}), path, "float32")):
        assert other != identity
    assert judge_identity(cfg, str(tiny_cache / "nowhere"), "float32") is None  # no files: not cached
    # against a baseline policy: its files too
    pairwise = cfg.model_copy(update={"judge": JudgeConfig(mode="pairwise", baseline=path)})
    assert judge_identity(pairwise, path, "float32")["baseline_files"] == identity["files"]
    tied = resolve_model("tiny:policy-tied", tiny_cache)
    other = cfg.model_copy(update={"judge": JudgeConfig(mode="pairwise", baseline=tied)})
    assert judge_identity(other, path, "float32")["baseline_files"] != identity["files"]
    nowhere = cfg.model_copy(update={"judge": JudgeConfig(mode="pairwise", baseline=str(tiny_cache / "nowhere"))})
    assert judge_identity(nowhere, path, "float32") is None


def test_a_judge_is_a_composite_component():
    components = [{"name": "rm", "kind": "function", "function": "rlhf_ray.rewards:char_frequency"},
                  {"name": "judge", "kind": "judge", "model": "tiny:policy", "weight": 0.5,
                   "judge": {"mode": "pairwise"}, "route": {"field": "task", "equals": "chat"}}]
    cfg = tiny_config(ROOT, None, "models.reward.kind=composite", f"models.reward.components={json.dumps(components)}",
                      "models.value_init=policy", "data.label_field=answer")
    judge = cfg.models.reward.components[1]
    assert judge.kind == "judge" and judge.loads_model and judge.judge.mode == "pairwise" and judge.weight == 0.5
    reward = cfg.models.reward
    assert reward.compares_with_reference and reward.hosts_model and not reward.loads_model
    from rlhf_ray.rewards.composite import model_components, other_models, with_resolved_models

    assert model_components(reward) == [judge]
    assert with_resolved_models(reward, lambda spec: "/resolved/" + spec).components[1].model == "/resolved/tiny:policy"
    # a pairwise judge against a baseline policy needs no reference answers; its baseline is resolved with the models
    with_baseline = [components[0], {**components[1], "judge": {"mode": "pairwise", "baseline": "tiny:policy-tied"}}]
    reward = tiny_config(ROOT, None, "models.reward.kind=composite", "models.value_init=policy",
                         f"models.reward.components={json.dumps(with_baseline)}").models.reward
    assert not reward.compares_with_reference
    assert other_models(reward) == {"tiny:policy": "models.reward.components[judge].model",
                                    "tiny:policy-tied": "models.reward.components[judge].judge.baseline"}
    resolved = with_resolved_models(reward, lambda spec: "/resolved/" + spec).components[1]
    assert (resolved.model, resolved.judge.baseline) == ("/resolved/tiny:policy", "/resolved/tiny:policy-tied")
    alone = RewardConfig(kind="judge", model="tiny:policy", judge={"mode": "pairwise", "baseline": "tiny:policy"})
    assert other_models(alone) == {"tiny:policy": "models.reward.judge.baseline"}  # its own model: models.reward.model
    assert with_resolved_models(alone, lambda spec: "/r/" + spec).judge.baseline == "/r/tiny:policy"
    # a pairwise judge among the components needs the reference answers as much as a judge alone
    with pytest.raises(ConfigError, match="data.label_field"):
        tiny_config(ROOT, None, "models.reward.kind=composite", f"models.reward.components={json.dumps(components)}",
                    "models.value_init=policy")
    with pytest.raises(ConfigError, match="components.*judge.rating_max|rating_max"):
        build_config({"kind": "composite", "components": [{**components[1], "judge": {"rating_max": 0}}]},
                     RewardConfig)


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides, key, why", [
    (["models.reward.kind=judge", "models.reward.model=null"], "models.reward.model", "causal LM"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.rating_max=1"],
     "models.reward.judge.rating_max", "must be above rating_min=1"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.parse=Rating"],
     "models.reward.judge.parse", "exactly one group"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.parse=(a"],
     "models.reward.judge.parse", "not a regular expression"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.mode=pairwise",
      "models.value_init=policy"], "data.label_field", "reference answer"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.baseline=tiny:policy",
      "models.value_init=policy"], "models.reward.judge.baseline", "mode=pairwise"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.score=mean"],
     "models.reward.judge.score", "parsed"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.reward.judge.top_logprobs=50"],
     "models.reward.judge.top_logprobs", "20"),
    (["models.reward.kind=judge", "models.reward.model=tiny:policy"], "models.value_init", "needs a reward model"),
])
def test_bad_judge_configs_get_one_line_naming_the_key(tmp_path, overrides, key, why):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, None, *overrides)
    message = str(err.value)
    assert key in message and why in message and "\n" not in message.strip(), message


def test_a_judge_config_loads_its_model_and_asks_for_what_it_needs(tmp_path):
    cfg = tiny_config(tmp_path, None, "models.reward.kind=judge", "models.reward.model=tiny:policy",
                      "models.value_init=policy", "models.reward.judge.mode=pairwise", "data.label_field=answer")
    reward = cfg.models.reward
    assert reward.loads_model and reward.compares_with_reference and reward.judge.parse_rule == DEFAULT_PARSE["pairwise"]
    assert not build_config({"kind": "function", "function": "m:f"}, RewardConfig).loads_model


def test_preflight_renders_the_judging_prompt_and_checks_single_token_ratings(tiny_tokenizer):
    from rlhf_ray.run.preflight import PreflightError, check_judge

    messages = [{"role": "user", "content": "Name a colour."}]
    check_judge(RewardConfig(kind="judge", model="m", judge={"score": "expected"}), tiny_tokenizer, messages, None)
    with pytest.raises(PreflightError, match="judge.score=expected needs every choice to be one token"):
        check_judge(RewardConfig(kind="judge", model="m", judge={"score": "expected", "rating_max": 12}),
                    tiny_tokenizer, messages, None)
    with pytest.raises(PreflightError, match="judge.template cannot render.*answer_c"):
        check_judge(RewardConfig(kind="judge", model="m", judge={"template": "{{ answer_c }}"}), tiny_tokenizer,
                    messages, None)
    with pytest.raises(PreflightError, match="data.label_field"):
        check_judge(RewardConfig(kind="judge", model="m", judge={"mode": "pairwise"}), tiny_tokenizer, messages, None)


def test_evaluate_and_rm_eval_take_a_judge():
    from rlhf_ray.cli.evaluate import reward_config as evaluate_reward
    from rlhf_ray.cli.rm_eval import reward_config as rm_eval_reward

    cfg = evaluate_reward("judge=real:smollm2-135m", ["judge.score=expected", "judge.rating_max=9"], "tulu")
    assert (cfg.kind, cfg.model, cfg.judge.score, cfg.judge.rating_max) == ("judge", "real:smollm2-135m", "expected", 9)
    pairwise = rm_eval_reward("judge:tiny:policy", "tulu", 512, 8)
    assert (pairwise.kind, pairwise.model, pairwise.compares_with_reference) == ("judge", "tiny:policy", True)
    with pytest.raises(ValueError, match="judge.rating_max"):
        evaluate_reward("judge=tiny:policy", ["judge.rating_max=0"], "tulu")


def test_rm_eval_gives_a_pairwise_judge_the_other_response_as_reference():
    from rlhf_ray.cli.rm_eval import score_pairs

    seen = []
    backend = SimpleNamespace(cfg=RewardConfig(kind="judge", model="m", judge={"mode": "pairwise"}),
                              score=lambda samples: seen.extend(samples) or torch.tensor([1.0, 0.0]))
    pair = SimpleNamespace(prompt=[{"role": "user", "content": "Hi"}], chosen="good", rejected="bad", source="s")
    assert score_pairs(backend, [pair]).tolist() == [[1.0, 0.0]]
    assert [(s.response, s.label) for s in seen] == [("good", "bad"), ("bad", "good")]


def test_the_templates_ship_with_the_package():
    assert 'package_data={"rlhf_ray.rewards": ["templates/*.jinja"]}' in (ROOT / "setup.py").read_text()
    assert {p.stem for p in (ROOT / "rlhf_ray" / "rewards" / "templates").glob("*.jinja")} == {
        "pointwise_helpfulness", "pairwise_preference"}


def test_reports_name_what_a_pairwise_judge_compares_with():
    from rlhf_ray.evaluation.comparison import judge_label

    judge = {"kind": "judge", "model": "real:smollm2-135m"}
    assert judge_label(RewardConfig(**judge).model_dump()) == "judge real:smollm2-135m"
    assert judge_label(RewardConfig(**judge, judge={"mode": "pairwise"}).model_dump()).endswith(
        "(pairwise against the references)")
    assert judge_label(RewardConfig(**judge, judge={"mode": "pairwise", "baseline": "runs/sft"}).model_dump()).endswith(
        "(pairwise against runs/sft's answers)")
