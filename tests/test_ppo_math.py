"""Hand-checked unit tests for rlhf_ray.algorithms.ppo_math (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.ppo_math import (entropy_from_logits, gae, kl_penalty, masked_mean, masked_sum, masked_var,
                                          masked_whiten, policy_loss, shape_rewards, token_aggregate, value_loss)

INF, NAN = float("inf"), float("nan")


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


# Row 0 has a hole (index 1), row 1 is all-masked, row 2 is short (2 of 4 tokens).
# Masked positions hold garbage (inf/nan) that must never leak into results.
X = [[1.0, INF, 3.0, 4.0], [NAN, 6.0, 7.0, 8.0], [9.0, 10.0, -INF, NAN]]
MASK = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]


# ---------------------------------------------------------------- masked stats


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_masked_sum_and_mean(mask_dtype):
    x, m = t(X), t(MASK, mask_dtype)
    close(masked_sum(x, m), 27.0)  # 1 + 3 + 4 + 9 + 10
    close(masked_mean(x, m), 5.4)  # 27 / 5
    close(masked_sum(x, m, dim=1), [8.0, 0.0, 19.0])  # 1+3+4, nothing, 9+10
    close(masked_mean(x, m, dim=1), [8.0 / 3.0, 0.0, 9.5])  # all-masked row -> 0
    close(masked_mean(x, m, dim=0), [5.0, 10.0, 3.0, 4.0])  # (1+9)/2, 10/1, 3/1, 4/1


def test_masked_mean_all_masked_is_zero_not_nan():
    assert masked_mean(t(X), torch.zeros(3, 4)).item() == 0.0
    assert masked_var(t(X), torch.zeros(3, 4)).item() == 0.0


def test_masked_var():
    x, m = t(X), t(MASK)
    # valid: 1, 3, 4, 9, 10; mean 5.4; deviations -4.4, -2.4, -1.4, 3.6, 4.6
    # squares: 19.36 + 5.76 + 1.96 + 12.96 + 21.16 = 61.2
    close(masked_var(x, m, unbiased=False), 12.24)  # 61.2 / 5
    close(masked_var(x, m), 15.3)  # 61.2 / 4
    # a single valid entry: no Bessel correction (n = 1), variance 0, not NaN
    close(masked_var(t([[5.0, 7.0]]), t([[1, 0]])), 0.0)


def test_masked_whiten():
    x = t([[1.0, 100.0, 3.0], [5.0, -7.0, 0.0]])
    m = t([[1, 0, 1], [1, 0, 0]])
    # valid 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    close(masked_whiten(x, m, eps=0.0), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_whiten(x, m), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # shift_mean=False: add the mean 3 back on valid tokens, masked stay 0
    close(masked_whiten(x, m, shift_mean=False, eps=0.0), [[2.0, 0.0, 3.0], [4.0, 0.0, 0.0]])


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    lp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    # log r = ref - lp = [-1, 1]
    close(kl_penalty(lp, ref, "k1"), [1.0, -1.0])  # lp - ref
    close(kl_penalty(lp, ref, "k2"), [0.5, 0.5])  # 0.5 * (+-1)^2
    # k3 = exp(log r) - 1 - log r: e^-1 - 1 + 1 = 0.36787944; e - 1 - 1 = 0.71828183
    close(kl_penalty(lp, ref, "k3"), [0.36787944, 0.71828183])
    same = kl_penalty(lp, lp, "k3")
    assert torch.equal(same, torch.zeros(2))


def test_kl_bad_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


# ---------------------------------------------------------------- reward shaping

SCORES = [2.0, -3.0, 5.0, 1.0]
KL = [[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0], [2.0, 0.0, -2.0, 4.0]]
# row 0: hole + trailing pad (last valid = 2); row 1: short (last valid = 1);
# row 2: all-masked; row 3: full (last valid = 3)
RMASK = [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
EOS = [True, False, True, True]


def _shape(**kw):
    return shape_rewards(t(SCORES), t(KL), t(RMASK), 0.1, t(EOS, torch.bool), **kw)


def test_shape_rewards_score_at_last_valid_token():
    rewards, eff = _shape()
    close(eff, SCORES)
    expected = [
        [-0.1, 0.0, -0.3 + 2.0, 0.0],  # -0.1*[1, ., 3, .]; score 2 at t=2
        [-0.1, -0.1 - 3.0, 0.0, 0.0],  # -0.1*[1, 1]; score -3 at t=1
        [0.0, 0.0, 0.0, 0.0],  # all-masked row: nothing
        [-0.2, 0.0, 0.2, -0.4 + 1.0],  # -0.1*[2, 0, -2, 4]; score 1 at t=3
    ]
    close(rewards, expected)


def test_shape_rewards_non_eos_penalty():
    rewards, eff = _shape(non_eos_penalty=-10.0)
    close(eff, [2.0, -10.0, 5.0, 1.0])  # row 1 did not end with EOS
    close(rewards[1], [-0.1, -0.1 - 10.0, 0.0, 0.0])
    close(rewards[0], [-0.1, 0.0, 1.7, 0.0])  # EOS rows untouched


def test_shape_rewards_clip_then_penalty():
    _, eff = _shape(reward_clip=2.5)
    close(eff, [2.0, -2.5, 2.5, 1.0])  # clamp(s, -2.5, 2.5)
    rewards, eff = _shape(reward_clip=2.5, non_eos_penalty=-10.0)
    close(eff, [2.0, -10.0, 2.5, 1.0])  # the penalty replaces the clipped score
    close(rewards[3], [-0.2, 0.0, 0.2, -0.4 + 1.0])
    close(rewards[2], [0.0] * 4)  # all-masked row stays 0 even with score 2.5


# ---------------------------------------------------------------- GAE

# row 0 full; row 1 has holes at t=1 and t=3 holding garbage rewards/values
G_R = [[0.0, 0.0, 0.0, 1.0], [0.5, 9.0, 1.0, 7.0]]
G_V = [[0.1, 0.2, 0.3, 0.4], [0.2, 5.0, 0.6, 3.0]]
G_M = [[1, 1, 1, 1], [1, 0, 1, 0]]


def test_gae_gamma1_lam095():
    adv, ret = gae(t(G_R), t(G_V), t(G_M), gamma=1.0, lam=0.95)
    # row 0: d3 = 1 - 0.4 = 0.6                 A3 = 0.6
    #        d2 = 0 + 0.4 - 0.3 = 0.1           A2 = 0.1 + 0.95*0.6    = 0.67
    #        d1 = 0.3 - 0.2 = 0.1               A1 = 0.1 + 0.95*0.67   = 0.7365
    #        d0 = 0.2 - 0.1 = 0.1               A0 = 0.1 + 0.95*0.7365 = 0.799675
    # row 1 (t=1, t=3 skipped): d2 = 1 - 0.6 = 0.4   A2 = 0.4
    #        d0 = 0.5 + 1*V2 - 0.2 = 0.9        A0 = 0.9 + 0.95*0.4    = 1.28
    close(adv, [[0.799675, 0.7365, 0.67, 0.6], [1.28, 0.0, 0.4, 0.0]])
    close(ret, [[0.899675, 0.9365, 0.97, 1.0], [1.48, 0.0, 1.0, 0.0]])  # A + V


def test_gae_gamma09_lam05():
    adv, ret = gae(t(G_R), t(G_V), t(G_M), gamma=0.9, lam=0.5)
    # gamma*lam = 0.45
    # row 0: d3 = 1 - 0.4 = 0.6                 A3 = 0.6
    #        d2 = 0.9*0.4 - 0.3 = 0.06          A2 = 0.06 + 0.45*0.6    = 0.33
    #        d1 = 0.9*0.3 - 0.2 = 0.07          A1 = 0.07 + 0.45*0.33   = 0.2185
    #        d0 = 0.9*0.2 - 0.1 = 0.08          A0 = 0.08 + 0.45*0.2185 = 0.178325
    # row 1: d2 = 1 - 0.6 = 0.4                 A2 = 0.4
    #        d0 = 0.5 + 0.9*0.6 - 0.2 = 0.84    A0 = 0.84 + 0.45*0.4    = 1.02
    close(adv, [[0.178325, 0.2185, 0.33, 0.6], [1.02, 0.0, 0.4, 0.0]])
    close(ret, [[0.278325, 0.4185, 0.63, 1.0], [1.22, 0.0, 1.0, 0.0]])


def test_gae_all_masked_row_and_no_grad():
    v = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    adv, ret = gae(t([[1.0, 1.0], [5.0, 5.0]]), v, t([[0, 0], [1, 1]]), 1.0, 1.0)
    close(adv[0], [0.0, 0.0])
    close(ret[0], [0.0, 0.0])
    # row 1: A1 = 5 - 4 = 1; A0 = 5 + 4 - 3 + 1 = 7; returns = [10, 5]
    close(adv[1], [7.0, 1.0])
    close(ret[1], [10.0, 5.0])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_matches_per_row_reference_on_random_masks():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    m = torch.rand(5, 7, generator=g) > 0.4
    m[2] = False
    adv, _ = gae(r, v, m, 0.9, 0.8)
    for b in range(5):  # reference: compact the valid tokens, run plain GAE
        idx = m[b].nonzero().flatten().tolist()
        a_next, v_next, ref = 0.0, 0.0, torch.zeros(7)
        for i in reversed(idx):
            a_next = r[b, i] + 0.9 * v_next - v[b, i] + 0.9 * 0.8 * a_next
            v_next, ref[i] = v[b, i], a_next
        torch.testing.assert_close(adv[b], ref)


# ---------------------------------------------------------------- policy loss

# ratios (row-major): 1.5, 0.5, 1.1 | 1.5, 0.5, <masked>; clip_range 0.2 -> band [0.8, 1.2]
RATIO = [[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]]
ADV = [[1.0, 1.0, 2.0], [-1.0, -1.0, 100.0]]
PMASK = [[1, 1, 1], [1, 1, 0]]


def _policy(num_tokens=None):
    lp = torch.log(t(RATIO))
    lp[1, 2] = 3.0  # masked token: huge ratio and advantage, must be ignored
    lp.requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(2, 3), t(ADV), t(PMASK), 0.2, num_tokens)
    return lp, loss, stats


def test_policy_loss_both_clip_branches():
    _, loss, stats = _policy()
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5
    # A=+2, r=1.1: max(-2.2, -2.2) = -2.2   (inside band: not clipped)
    # A=-1, r=1.5: max( 1.5,  1.2) =  1.5
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped
    # mean = (-1.2 - 0.5 - 2.2 + 1.5 + 0.8) / 5 = -1.6 / 5
    close(loss, -0.32)
    close(stats["clipfrac"], 0.4)  # 2 of 5
    close(stats["ratio_mean"], 1.02)  # (1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5
    # (r-1) - log r: 1.5 -> 0.0945349, 0.5 -> 0.1931472, 1.1 -> 0.0046898
    # (2*0.0945349 + 2*0.1931472 + 0.0046898) / 5 = 0.580054 / 5
    close(stats["approx_kl"], 0.1160108)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())


def test_policy_loss_gradient_zero_at_clipped_tokens():
    lp, loss, _ = _policy()
    loss.backward()
    # d/dlp(-A*r) = -A*r, divided by 5 valid tokens; clipped and masked tokens get 0
    # [-1*1.5->0 (clipped), -1*0.5/5, -2*1.1/5 | +1*1.5/5, 0 (clipped), 0 (masked)]
    close(lp.grad, [[0.0, -0.1, -0.44], [0.3, 0.0, 0.0]])


def test_policy_loss_num_tokens():
    _, loss, _ = _policy(num_tokens=10)
    close(loss, -0.16)  # sum -1.6 over 10 global tokens


# ---------------------------------------------------------------- value loss

# tokens (old, v, R): (0, .5, 1) (0, .5, 0) (0, -.1, 1) | (1, 0, 0) + 2 masked garbage
V_OLD = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
V_NEW = [[0.5, 0.5, -0.1], [0.0, 10.0, 10.0]]
V_RET = [[1.0, 0.0, 1.0], [0.0, -10.0, -10.0]]
V_MASK = [[1, 1, 1], [1, 0, 0]]


def test_value_loss_clipped():
    v = t(V_NEW).requires_grad_()
    loss, stats = value_loss(v, t(V_OLD), t(V_RET), t(V_MASK), clip_range=0.2)
    # v_c = old + clamp(v - old, -.2, .2) = [0.2, 0.2, -0.1 | 0.8]
    # (v-R)^2 = [0.25, 0.25, 1.21 | 0]; (v_c-R)^2 = [0.64, 0.04, 1.21 | 0.64]
    # 0.5*max = [0.32, 0.125, 0.605 | 0.32]; mean = 1.37 / 4
    close(loss, 0.3425)
    close(stats["vf_clipfrac"], 0.5)  # tokens 0 and 3 take the clipped branch
    loss.backward()
    # clipped tokens: no gradient; token 1: (v-R)/4 = 0.125; token 2: (-1.1)/4
    close(v.grad, [[0.0, 0.125, -0.275], [0.0, 0.0, 0.0]])


def test_value_loss_unclipped():
    loss, stats = value_loss(t(V_NEW), t(V_OLD), t(V_RET), t(V_MASK))
    close(loss, 0.21375)  # 0.5 * (0.25 + 0.25 + 1.21 + 0) / 4
    close(stats["vf_clipfrac"], 0.0)
    loss, _ = value_loss(t(V_NEW), t(V_OLD), t(V_RET), t(V_MASK), num_tokens=2)
    close(loss, 0.4275)  # 0.5 * 1.71 / 2 = 0.855 / 2


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_and_peaked():
    close(entropy_from_logits(torch.zeros(2, 8)), [math.log(8)] * 2)  # log 8 = 2.0794415
    close(entropy_from_logits(torch.full((8,), 1000.0)), math.log(8))  # shift-stable
    # p = [1/4, 3/4]: H = 0.25*ln4 + 0.75*ln(4/3) = 0.3465736 + 0.2157616
    close(entropy_from_logits(t([0.0, math.log(3.0)])), 0.5623351)
    # one-hot-ish: H ~ 3 * e^-100 * 101 ~ 0
    close(entropy_from_logits(t([100.0, 0.0, 0.0, 0.0])), 0.0)


def test_entropy_float32_and_neg_inf():
    h = entropy_from_logits(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert h.dtype == torch.float32 and h.shape == (3,)
    close(h, [math.log(4)] * 3)
    logits = t([[0.0, 0.0, -INF], [-INF, 5.0, -INF]]).requires_grad_()
    h = entropy_from_logits(logits)
    close(h, [math.log(2), 0.0])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- aggregation


def test_token_aggregate_micro_batches_sum_to_global_mean():
    a, ma = t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]])  # 3 tokens, sum 6
    b, mb = t([[10.0, 99.0]]), t([[1, 0]])  # 1 token, sum 10
    # global: 4 tokens, (6 + 10) / 4 = 4
    total = token_aggregate(a, ma, 4) + token_aggregate(b, mb, torch.tensor(4))
    close(total, 4.0)  # 6/4 + 10/4
    per_mb = (token_aggregate(a, ma) + token_aggregate(b, mb)) / 2
    close(per_mb, 6.0)  # (2 + 10) / 2: mean of means is not the token mean
    close(token_aggregate(a, ma, 0), 6.0)  # num_tokens <= 0 -> 1
    close(token_aggregate(b, torch.zeros(1, 2)), 0.0)  # all-masked -> 0
