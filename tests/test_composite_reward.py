"""Composite rewards without Ray: weights, routing by a data column, per-component stats, one-line failures, configs."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.config import ConfigError, RewardConfig, build_config
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.rewards.backends import build_backend
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.composite import RewardComponentError, routed, weighted_sum
from rlhf_ray.rewards.functions import char_frequency, concise_answer
from rlhf_ray.rewards.stats import RewardStats
from tests.conftest import tiny_config

MATH = {"name": "math", "kind": "function", "function": "rlhf_ray.rewards:char_frequency",
        "function_kwargs": {"char": "4"}, "route": {"field": "task", "equals": "math"}}
CHAT = {"name": "chat", "kind": "function", "function": "rlhf_ray.rewards:concise_answer", "weight": 2.0,
        "function_kwargs": {"max_words": 2}, "route": {"field": "task", "equals": ["chat", "poem"]}}
LENGTH = {"name": "length", "kind": "function", "function": "rlhf_ray.rewards:char_frequency", "weight": -0.5}


def composite(*components, **keys) -> RewardConfig:
    return RewardConfig(kind="composite", components=list(components), **keys)


def sample(response: str, task: str | None) -> RewardSample:
    return RewardSample.of([{"role": "user", "content": "q"}], "<|user|>\nq\n<|assistant|>\n", response,
                           fields={"task": task})


def boom(prompt: str, response: str) -> float:
    raise ValueError("no answer\nin this response")


def test_weights_and_routing_sum_the_components_that_score_each_sample():
    backend = build_backend(composite(MATH, CHAT, LENGTH))
    samples = [sample("2+2=4", "math"), sample("one two three four", "chat"), sample("ode", "poem")]
    expected = [char_frequency("", "2+2=4", "4") - 0.5 * char_frequency("", "2+2=4"),
                2 * concise_answer("", "one two three four", 2) - 0.5 * char_frequency("", "one two three four"),
                2 * concise_answer("", "ode", 2) - 0.5 * char_frequency("", "ode")]
    torch.testing.assert_close(backend.score(samples), torch.tensor(expected))


def test_the_weighted_sum_counts_only_routed_components():
    normalised = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(weighted_sum(normalised, mask, torch.tensor([0.5, -1.0])), torch.tensor([-9.5, -20.0]))
    config = composite(MATH, CHAT, LENGTH)
    assert routed(config.components, [sample("x", "math"), sample("x", None)]).tolist() == [
        [True, False], [False, False], [True, True]]


def test_per_component_stats_reach_the_reward_role_s_answer():
    actor = RewardActor(composite(MATH, CHAT, {**LENGTH, "clip": 0.1}).model_dump(), None)
    batch = RolloutBatch.from_samples([[1]] * 3, [[2]] * 3, [[0.0]] * 3, ["stop"] * 3,
                                      [[{"role": "user", "content": "q"}]] * 3, ["q"] * 3, ["44", "hi", "e"],
                                      pad_token_id=0, prompt_fields=[{"task": "math"}, {"task": "chat"},
                                                                     {"task": "math"}])
    (scores, stats), _ = actor.scored(batch)
    metrics = stats.metrics()
    assert metrics["reward/math/count"] == 2 and metrics["reward/chat/count"] == 1 and metrics["reward/length/count"] == 3
    assert metrics["reward/math/raw_mean"] == pytest.approx(0.5)                      # '44': 1, 'e': 0
    assert metrics["reward/length/raw_mean"] == pytest.approx(1 / 3)                 # 'e' alone is all e
    assert metrics["reward/length/norm_mean"] == pytest.approx(0.1 / 3)              # clipped to 0.1
    torch.testing.assert_close(scores, torch.tensor([1.0, 2.0, -0.05]))
    assert actor.scored(batch)[0][1].metrics()["reward/math/count"] == 2             # taken: not counted twice


def test_stats_of_several_actors_merge_into_step_means():
    a, b = RewardStats(), RewardStats()
    a.add_values("math/raw_mean", [1.0, 2.0])
    a.add_total("math/count", 2)
    b.add_values("math/raw_mean", [6.0])
    b.add_total("math/count", 1)
    assert RewardStats.merged([a, b]).metrics() == {"reward/math/count": 3.0, "reward/math/raw_mean": 3.0}


def test_a_sample_no_component_scores_is_an_error_naming_its_value():
    backend = build_backend(composite(MATH, CHAT))
    with pytest.raises(ValueError, match=r"no component scores sample 1 \(task='essay'; routes: math: task in "
                                         r"\['math'\]; chat: task in \['chat', 'poem'\]\)"):
        backend.score([sample("4", "math"), sample("x", "essay")])


def test_a_failing_component_stops_with_one_line_naming_it():
    backend = build_backend(composite(MATH, {"name": "verifier", "kind": "function",
                                             "function": "tests.test_composite_reward:boom"}))
    with pytest.raises(RewardComponentError) as err:
        backend.score([sample("4", "math")])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("reward component 'verifier' (function tests.test_composite_reward:boom) raised "
                              "ValueError: models.reward.function='tests.test_composite_reward:boom' raised ValueError: "
                              "no answer in this response")
    with pytest.raises(RewardComponentError, match=r"reward component 'far' \(function\) cannot start: .*cannot be "
                                                   "imported"):
        build_backend(composite({"name": "far", "kind": "function", "function": "no_such_module:f"}))


@pytest.mark.parametrize("components, key, why", [
    ([], "models.reward.components", "at least one"),
    ([MATH, MATH], "models.reward.components", r"names must differ: \['math'\]"),
    ([{**MATH, "kind": "composite"}], "models.reward.components.0", "cannot itself be a composite"),
    ([{**MATH, "normalize": "running"}], "models.reward.components.0", "'running' is not available for a component"),
    ([{**MATH, "name": "a/b"}], "models.reward.components.0", "it is part of metric names"),
    ([{**MATH, "route": {"field": "task"}}], "models.reward.components.0.route.equals", "required key is missing"),
])
def test_bad_composites_are_one_line_errors_naming_the_key(tmp_path, components, key, why):
    with pytest.raises(ConfigError, match=rf"{key}.*{why}"):
        tiny_config(tmp_path, None, "models.reward.kind=composite", "models.value_init=policy",
                    f"models.reward.components={json.dumps(components)}")
    with pytest.raises(ConfigError, match="is for models.reward.kind='composite', not 'function'"):
        build_config({"kind": "function", "function": "a:b", "components": [MATH]}, RewardConfig)


def test_route_values_are_compared_as_text_and_columns_reach_the_samples(tmp_path, tiny_tokenizer):
    from actors.reward import samples_of
    from rlhf_ray.data.sources import load_prompts

    assert composite({**MATH, "route": {"field": "level", "equals": [3, True]}}).components[0].route.values() == {
        "3", "True"}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "task": task})
                              for i, task in enumerate(["math", "chat", None])) + "\n")
    data = tiny_config(tmp_path, None, f"data.prompts={path}").data
    prompts = load_prompts(data, tiny_tokenizer, ["task"]).prompts
    assert [p.fields for p in prompts] == [{"task": "math"}, {"task": "chat"}, {"task": None}]
    with pytest.raises(ValueError, match=r"route.field='topic' is not a column of .*mixed.jsonl"):
        load_prompts(data, tiny_tokenizer, ["topic"])
    batch = RolloutBatch.from_samples([p.token_ids for p in prompts], [[2]] * 3, [[0.0]] * 3, ["stop"] * 3,
                                      [p.messages for p in prompts], [p.text for p in prompts], ["a", "b", "c"],
                                      pad_token_id=0, prompt_fields=[p.fields for p in prompts])
    joined = RolloutBatch.concat([batch.select([2, 0]), batch.select([1])])
    assert [s.fields for s in samples_of(joined)] == [{"task": None}, {"task": "math"}, {"task": "chat"}]


def test_evaluate_and_rm_eval_take_a_composite_from_a_file(tmp_path):
    import yaml

    from rlhf_ray.cli.evaluate import reward_config as evaluate_reward
    from rlhf_ray.cli.rm_eval import reward_config as rm_eval_reward
    from rlhf_ray.evaluation.comparison import judge_label

    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({"kind": "composite", "components": [MATH, LENGTH]}))
    judge = evaluate_reward(f"config={path}", ["cache=disk"], "tulu")
    assert judge.kind == "composite" and judge.cache == "disk" and judge.components[1].weight == -0.5
    assert judge.route_fields() == ["task"] and judge_label(judge.model_dump()) == "composite of math, length"
    assert rm_eval_reward(f"config:{path}", "tulu", 256, 4).components[0].name == "math"
    path.write_text(yaml.safe_dump({"kind": "composite", "components": [{**MATH, "weight": "heavy"}]}))
    with pytest.raises(ValueError, match=rf"--reward config={path}: components.0.weight: Input should be a valid number"):
        evaluate_reward(f"config={path}", [], "tulu")


def test_each_component_is_checked_before_a_run_starts(tmp_path, tiny_cache, monkeypatch):
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.run.preflight import PreflightError, check_experiment

    components = [MATH, {"name": "remote", "kind": "serve", "app": "shared-rm"}]
    cfg = tiny_config(tmp_path, None, "models.reward.kind=composite", "models.value_init=policy",
                      f"models.reward.components={json.dumps(components)}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PreflightError, match=r"^reward component 'remote': models.reward.kind='serve' needs the Ray "
                                             "cluster where the app 'shared-rm' runs"):
        check_experiment(cfg, {})
    rm = resolve_model("tiny:reward", tiny_cache)
    stored = [{"name": "chat", "kind": "model", "model": "tiny:reward", "normalize": "stored"}]
    cfg = tiny_config(tmp_path, None, "models.reward.kind=composite", "models.value_init=policy",
                      f"models.reward.components={json.dumps(stored)}")
    with pytest.raises(PreflightError, match=r"^reward component 'chat': models.reward.normalize='stored' needs "
                                             rf"{rm}/reward_stats.json"):
        check_experiment(cfg, {}, {"tiny:reward": rm})
