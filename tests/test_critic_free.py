"""Critic-free RL pieces outside the engines: loss aggregation, clip-higher, importance weights, overlong shaping,
the non-EOS penalty's modes, with_advantages per estimator, group ids and dynamic sampling (a fake scorer)."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhf_ray.algorithms.ppo_math import (aggregate_loss, importance_weights, overlong_penalty, policy_loss,
                                          shape_rewards)
from rlhf_ray.config import MAX_SAMPLES_PER_PROMPT, PPOConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.drivers.ppo import PPOTrainer
from rlhf_ray.drivers.rollout import group_ids, refill_prompts, sampling_seeds, with_advantages

MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
LOSS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 8.0, 99.0, 99.0]])  # 99: masked


def test_loss_aggregations_by_hand():
    assert float(aggregate_loss(LOSS, MASK, "token_mean")) == pytest.approx((12 + 12) / 6)
    assert float(aggregate_loss(LOSS, MASK, "seq_mean_token_mean")) == pytest.approx((12 / 4 + 12 / 2) / 2)
    assert float(aggregate_loss(LOSS, MASK, "seq_mean_token_sum", max_tokens=8)) == pytest.approx((12 / 8 + 12 / 8) / 2)
    # global units: a micro-batch's share of a mean over 4 sequences / 12 tokens
    assert float(aggregate_loss(LOSS, MASK, "seq_mean_token_mean", num_units=4)) == pytest.approx(9 / 4)
    assert float(aggregate_loss(LOSS, MASK, "token_mean", num_units=12)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate_loss(LOSS, MASK, "seq_mean_token_sum")


def test_clip_higher_lets_a_positive_advantage_raise_the_ratio_further():
    old = torch.zeros(1, 1)
    logprobs = torch.full((1, 1), math.log(1.25), requires_grad=True)  # ratio 1.25
    adv, mask = torch.ones(1, 1), torch.ones(1, 1)
    symmetric, _ = policy_loss(logprobs, old, adv, mask, 0.2)
    higher, _ = policy_loss(logprobs, old, adv, mask, 0.2, clip_range_high=0.28)
    assert float(symmetric.detach()) == pytest.approx(-1.2) and float(higher.detach()) == pytest.approx(-1.25)
    (grad,) = torch.autograd.grad(higher, logprobs)
    assert float(grad) != 0  # inside [0.8, 1.28]: still learning
    # the lower clip is unchanged: a negative advantage at ratio 0.7 is clipped at 0.8 either way
    low = torch.full((1, 1), math.log(0.7))
    assert float(policy_loss(low, old, -adv, mask, 0.2, clip_range_high=0.28)[0]) == pytest.approx(0.8)


def test_importance_weights_are_one_when_sampler_and_learner_agree_and_capped_when_not():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    for mode in ("tis", "mis"):
        w, stats = importance_weights(lp, lp.clone(), mask, mode, cap=2.0)
        assert torch.equal(w, mask) and float(stats["mismatch_kl"]) == 0 and float(stats["clipped_fraction"]) == 0
    sampler = torch.log(torch.tensor([[0.5, 0.05, 0.5, 0.01]]))  # w = 1, 5, 0.25, (masked: 90)
    tis, stats = importance_weights(lp, sampler, mask, "tis", cap=2.0)
    mis, _ = importance_weights(lp, sampler, mask, "mis", cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([[1.0, 2.0, 0.25, 0.0]]))
    torch.testing.assert_close(mis, torch.tensor([[1.0, 0.0, 0.25, 0.0]]))
    assert float(stats["weight_max"]) == pytest.approx(5.0) and float(stats["clipped_fraction"]) == pytest.approx(1 / 3)
    assert float(stats["weight_mean"]) == pytest.approx((1 + 5 + 0.25) / 3)
    k3 = [w - 1 - math.log(w) for w in (1.0, 5.0, 0.25)]
    assert float(stats["mismatch_kl"]) == pytest.approx(sum(k3) / 3)
    # the weights scale each token's policy loss, and carry no gradient of their own
    logprobs = torch.zeros(1, 4, requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 4), torch.ones(1, 4), mask, 0.2, is_weights=tis)
    assert float(loss.detach()) == pytest.approx(-(1 + 2 + 0.25) / 3)


def test_overlong_penalty_is_zero_then_linear_to_the_cap():
    lengths = torch.tensor([10, 12, 14, 16])
    assert overlong_penalty(lengths, max_tokens=16, buffer=4, penalty=1.0).tolist() == [0.0, 0.0, -0.5, -1.0]


def test_non_eos_penalty_replaces_or_subtracts():
    scores, kl, mask = torch.tensor([-3.5, -3.5, 2.0]), torch.zeros(3, 2), torch.ones(3, 2)
    eos = torch.tensor([True, False, False])
    _, replaced = shape_rewards(scores, kl, mask, 0.0, eos, -1.0)
    _, subtracted = shape_rewards(scores, kl, mask, 0.0, eos, -1.0, non_eos_mode="subtract")
    assert replaced.tolist() == [-3.5, -1.0, -1.0]       # a cut answer outscores a finished one: the SmolLM2 trap
    assert subtracted.tolist() == [-3.5, -4.5, 1.0]      # a cut answer always loses against its own score


def rollout(scores: list[float], groups: list[int], eos: list[bool] | None = None) -> RolloutBatch:
    n = len(scores)
    batch = RolloutBatch.from_samples([[5]] * n, [[1, 2, 3]] * n, [[-1.0, -1.0, -1.0]] * n,
                                      ["stop" if e else "length" for e in (eos or [True] * n)], [[]] * n, [""] * n,
                                      [""] * n, pad_token_id=0)
    return batch.with_(scores=torch.tensor(scores), ref_logprobs=batch.gen_logprobs - 0.1,
                       old_logprobs=batch.gen_logprobs, group_ids=torch.tensor(groups))


def test_with_advantages_per_estimator():
    batch = rollout([1.0, 0.0, 3.0, 3.0], [0, 0, 1, 1])
    grpo, stats = with_advantages(batch, PPOConfig(advantage="grpo", kl_coef=0.0))
    # group 0: mean 0.5, unbiased std sqrt(0.5) → ±0.5/sqrt(0.5); group 1: equal scores → 0
    assert grpo.advantages[:, 0].tolist() == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0, 0], rel=1e-4)
    assert grpo.returns is None and grpo.is_weights is None and "value/mean" not in stats
    assert stats["advantage/zero_fraction"] == 0.5   # the second prompt's samples scored the same
    rloo, _ = with_advantages(batch, PPOConfig(advantage="rloo", kl_coef=0.0))
    assert rloo.advantages[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    # kl_in=loss: the rewards carry no KL; kl_in=reward: −β·k1 per token (k1 = 0.1 here)
    in_loss, _ = with_advantages(batch, PPOConfig(advantage="grpo", kl_in="loss", kl_estimator="k3"))
    in_reward, _ = with_advantages(batch, PPOConfig(advantage="grpo", kl_coef=0.5))
    assert in_loss.rewards.sum(-1).tolist() == [1.0, 0.0, 3.0, 3.0]
    assert in_reward.rewards.sum(-1).tolist() == pytest.approx([1 - 0.15, -0.15, 3 - 0.15, 3 - 0.15])
    # the critic-free estimators are not whitened again; TIS weights appear when asked for
    tis, stats = with_advantages(batch, PPOConfig(advantage="grpo"), is_correction="tis")
    assert torch.equal(tis.is_weights, batch.response_mask) and stats["is/weight_mean"] == 1.0


def test_group_ids_follow_the_generation_order_and_refills_are_seeded():
    assert group_ids(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert group_ids(2, 3, start=8).tolist() == [8, 8, 8, 9, 9, 9]
    assert refill_prompts(1, 5, 1, 4, 50) == refill_prompts(1, 5, 1, 4, 50) != refill_prompts(1, 5, 2, 4, 50)
    assert len(set(refill_prompts(1, 5, 1, 10, 10))) == 10
    first, later = sampling_seeds(0, 3, 4), sampling_seeds(0, 3, 4, start=4)
    assert not set(first) & set(later) and first + later == sampling_seeds(0, 3, 8)


def test_sampling_seeds_leave_room_for_each_prompts_samples_across_large_steps():
    """Prompt seeds are 1024 apart or more over 3 steps of 3000 prompts and two run seeds (seeds laid out as
    step·2^20 + prompt·1024 repeated from the 1025th prompt of a step on), and every one is a valid torch seed."""
    seeds = sorted(s for run_seed in (0, 1) for step in (1, 2, 3) for s in sampling_seeds(run_seed, step, 3000))
    assert min(b - a for a, b in zip(seeds, seeds[1:])) >= MAX_SAMPLES_PER_PROMPT
    assert 0 <= seeds[0] and seeds[-1] + MAX_SAMPLES_PER_PROMPT <= 2**63
    assert sampling_seeds(0, 1, 5) == sampling_seeds(0, 1, 5) != sampling_seeds(1, 1, 5)


class FakeRoles:
    """Generation and reward: prompt p's samples all score the same when p is even, differ when p is odd."""

    def __init__(self, n: int):
        self.n, self.generated, self.rewards = n, [], ["reward-0", "reward-1"]

    def generate(self, prompts, seeds):
        self.generated.append(list(prompts))
        rows = len(prompts) * self.n
        return RolloutBatch.from_samples([[5]] * rows, [[1, 2]] * rows, [[-1.0, -1.0]] * rows, ["stop"] * rows,
                                         [[]] * rows, [str(p) for p in prompts for _ in range(self.n)], [""] * rows,
                                         0), 0.5

    def score(self, batch, roles):
        prompts = [int(t) for t in batch.prompt_texts]
        scores = [float(p % 2) * k for p, k in zip(prompts, [0, 1] * (len(prompts) // 2))]
        return {"scores": torch.tensor(scores)}, {"reward": 0.25}


def dynamic_driver(prompts: list[int], rollout_batch_size: int, rounds: int, n: int = 2):
    from types import SimpleNamespace

    driver = PPOTrainer.__new__(PPOTrainer)  # the method under test reads only these
    driver.cfg = SimpleNamespace(seed=0, ppo=SimpleNamespace(rollout_batch_size=rollout_batch_size,
                                                              dynamic_sampling_rounds=rounds),
                                 generation=SimpleNamespace(n_samples_per_prompt=n))
    driver.dataset = SimpleNamespace(prompts=prompts)
    driver.roles = FakeRoles(n)
    return driver


def test_dynamic_sampling_keeps_the_batch_size_and_only_informative_groups():
    driver = dynamic_driver(prompts=list(range(40)), rollout_batch_size=4, rounds=5)
    first = driver.roles.generate([0, 1, 2, 3], None)[0].with_(group_ids=group_ids(4, 2))
    batch, seconds, stats, extra_s = driver._informative_groups(0, first, {}, threading.Event())
    assert len(batch) == 4 * 2 and len(batch.group_ids.unique()) == 4
    assert all(int(t) % 2 == 1 for t in batch.prompt_texts)  # every kept group's samples differ
    assert stats["sampling/filled_with_equal"] == 0 and stats["sampling/rounds"] >= 1
    assert seconds["reward"] == 0.25 * (1 + stats["sampling/rounds"]) and extra_s == 0.5 * stats["sampling/rounds"]
    assert batch.scores is not None and len(batch.scores) == 8
    assert all(len(prompts) % 2 == 0 for prompts in driver.roles.generated)  # equal shares for the 2 reward actors


def test_dynamic_sampling_fills_up_with_equal_groups_when_the_rounds_run_out():
    driver = dynamic_driver(prompts=[0, 2, 4, 6, 8, 10], rollout_batch_size=2, rounds=2)  # every group scores the same
    first = driver.roles.generate([0, 2], None)[0].with_(group_ids=group_ids(2, 2))
    batch, _, stats, _ = driver._informative_groups(3, first, {}, None)
    assert len(batch) == 4 and stats["sampling/rounds"] == 2 and stats["sampling/filled_with_equal"] == 2
    assert stats["sampling/kept_fraction"] == 0.0


def test_a_replacing_non_eos_penalty_above_most_finished_scores_is_in_the_metrics_for_its_alarm():
    """score/cut_pays (rlhf_ray.run.alarms' penalty_pays) and the median it is measured against; the responses'
    reference log-prob per token (reward_vs_reference)."""
    finished_low = rollout([-3.5, -3.2, -4.0, -0.5], [0, 0, 1, 1], eos=[True, True, True, False])  # SmolLM2's trap
    replacing = PPOConfig(advantage="grpo", non_eos_penalty=-1.0, kl_coef=0.0)
    _, stats = with_advantages(finished_low, replacing)
    assert stats["score/finished_median"] == -3.5 and stats["score/cut_pays"] == 1.0
    assert stats["ref/logprob_mean"] == pytest.approx(-1.1)
    assert with_advantages(rollout([0.5, 0.9], [0, 0]), replacing)[1]["score/cut_pays"] == 0.0  # finished score higher
    for ppo, batch in ((replacing.model_copy(update={"non_eos_penalty_mode": "subtract"}), finished_low),
                       (replacing.model_copy(update={"non_eos_penalty": None}), finished_low),
                       (replacing, rollout([1.0], [0], eos=[False]))):                      # nothing finished
        assert "score/cut_pays" not in with_advantages(batch, ppo)[1]
