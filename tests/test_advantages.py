"""Advantage estimators (rlhf_ray.algorithms.advantages) against hand-computed examples."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.advantages import (ADVANTAGE_ESTIMATORS, AdvantageInputs, discounted_returns,
                                            get_advantage_estimator, group_mean_std)

# two prompts × 3 samples; sequence rewards 1, 2, 6 | 0, 0, 3 (placed at the last valid token)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
SCORES = [1.0, 2.0, 6.0, 0.0, 0.0, 3.0]
GROUPS = torch.tensor([7, 7, 7, 2, 2, 2])


def inputs(**kw) -> AdvantageInputs:
    rewards = torch.zeros(6, 3)
    for i, s in enumerate(SCORES):
        rewards[i, int(MASK[i].sum()) - 1] = s
    return AdvantageInputs(rewards=rewards, mask=MASK, group_ids=GROUPS, **kw)


def sequence_values(adv: torch.Tensor) -> list[float]:
    """Each row's advantage (the same on all its valid tokens), checked to be 0 on the masked ones."""
    assert torch.all(adv[MASK == 0] == 0)
    rows = [adv[i, MASK[i].bool()] for i in range(len(adv))]
    assert all(torch.allclose(r, r[0].expand_as(r)) for r in rows)
    return [float(r[0]) for r in rows]


def test_grpo_is_the_group_z_score():
    adv, returns = ADVANTAGE_ESTIMATORS["grpo"].compute(inputs())
    # group 1: mean 3, unbiased std sqrt(((−2)² + (−1)² + 3²)/2) = sqrt(7); group 2: mean 1, std sqrt(3)
    expected = [-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7), -1 / math.sqrt(3), -1 / math.sqrt(3),
                2 / math.sqrt(3)]
    assert sequence_values(adv) == pytest.approx(expected, rel=1e-5) and returns is None


def test_dr_grpo_drops_the_std_and_rloo_leaves_one_out():
    dr, _ = ADVANTAGE_ESTIMATORS["dr_grpo"].compute(inputs())
    assert sequence_values(dr) == pytest.approx([-2, -1, 3, -1, -1, 2])
    rloo, _ = ADVANTAGE_ESTIMATORS["rloo"].compute(inputs())
    # sample 0: 1 − (2 + 6)/2 = −3; sample 5: 3 − 0 = 3
    assert sequence_values(rloo) == pytest.approx([-3, -1.5, 4.5, -1.5, -1.5, 3])


def test_a_group_with_equal_rewards_has_no_advantage():
    rewards = torch.zeros(6, 3)
    rewards[:, 0] = 0.5  # every sample of both prompts earns the same
    flat = AdvantageInputs(rewards=rewards, mask=MASK, group_ids=GROUPS)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv, _ = ADVANTAGE_ESTIMATORS[name].compute(flat)
        assert torch.all(adv == 0), name


def test_rloo_needs_two_samples_per_prompt():
    x = inputs()
    with pytest.raises(ValueError, match="at least 2 samples"):
        ADVANTAGE_ESTIMATORS["rloo"].compute(AdvantageInputs(x.rewards, MASK, torch.arange(6)))


def test_reinforce_pp_whitens_discounted_token_returns_over_the_batch():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    returns = discounted_returns(rewards, mask, 0.5)
    assert returns.flatten().tolist() == pytest.approx([0.1 + 0.5 * (-0.2 + 0.5), -0.2 + 0.5, 1.0, 1.0, 2.0, 0.0])
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"].compute(AdvantageInputs(rewards, mask, torch.tensor([0, 1]),
                                                                          gamma=0.5))
    valid = returns[mask.bool()]
    expected = (valid - valid.mean()) / valid.std()
    assert adv[mask.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-5) and adv[1, 2] == 0


def test_reinforce_pp_baseline_whitens_the_group_centred_rewards_per_token():
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"].compute(inputs())
    centred = torch.tensor([-2.0, -1, 3, -1, -1, 2])
    tokens = centred.repeat_interleave(MASK.sum(-1).long())  # each sequence's value on each of its tokens
    expected = (tokens - tokens.mean()) / tokens.std()
    assert adv[MASK.bool()].tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_gae_is_the_critics_estimator():
    estimator = get_advantage_estimator("gae")
    assert estimator.needs_critic and not estimator.grouped
    with pytest.raises(ValueError, match="critic's values"):
        estimator.compute(inputs())
    adv, returns = estimator.compute(inputs(values=torch.zeros(6, 3), gamma=1.0, lam=1.0))
    assert sequence_values(adv) == pytest.approx(SCORES) and torch.equal(returns, adv)  # V = 0, γ = λ = 1: A = R


def test_the_registry_knows_which_need_a_critic_and_groups():
    assert list(ADVANTAGE_ESTIMATORS) == ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.grouped] == ["grpo", "dr_grpo", "rloo",
                                                                         "reinforce_pp_baseline"]
    with pytest.raises(ValueError, match="known: gae, grpo"):
        get_advantage_estimator("ppo2")


def test_group_statistics_with_unordered_ids():
    mean, std, count = group_mean_std(torch.tensor([1.0, 5.0, 3.0, 4.0]), torch.tensor([9, 1, 9, 4]))
    assert mean.tolist() == [2.0, 5.0, 2.0, 4.0] and count.tolist() == [2, 1, 2, 1]
    assert std.tolist() == pytest.approx([math.sqrt(2), 0, math.sqrt(2), 0])
