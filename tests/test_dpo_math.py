"""Hand-checked unit tests for the DPO family in rlhf_ray.algorithms.preference_math (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.preference_math import (DPO_LOSSES, DPO_STATS, dpo_loss, dpo_needs_reference, get_dpo_loss,
                                                 register_dpo_loss)

NAMES = {"sigmoid", "ipo", "length_normalized", "simpo", "hinge"}


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def nls(x):
    """−log σ(x), written out."""
    return -math.log(1.0 / (1.0 + math.exp(-x)))


# Three pairs. Log-ratios π − ref: chosen [1, -1, 1.5], rejected [-1, 1, -1]
# -> h = [2, -2, 2.5] (pair 1 prefers the rejected response).
PC, PR = [-10.0, -20.0, -5.5], [-12.0, -18.0, -9.0]
RC, RR = [-11.0, -19.0, -7.0], [-11.0, -19.0, -8.0]
NC, NR = [5, 10, 3], [4, 8, 6]


def run(name, pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR, **kw):
    return dpo_loss(name, t(pc), t(pr), None if rc is None else t(rc), None if rr is None else t(rr),
                    None if nc is None else t(nc, torch.long), None if nr is None else t(nr, torch.long), **kw)


def check(loss, stats, expected_loss, expected_stats):
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert set(stats) == set(DPO_STATS)
    assert all(type(v) is float for v in stats.values())
    for key, value in expected_stats.items():
        assert stats[key] == pytest.approx(value, abs=1e-5), key


LOGPS = {"logps/chosen": (-10 - 20 - 5.5) / 3, "logps/rejected": (-12 - 18 - 9) / 3}


# ---------------------------------------------------------------- each variant, by hand


def test_sigmoid():
    loss, stats = run("sigmoid", beta=0.1)
    # β·h = [0.2, -0.2, 0.25]
    expected = (nls(0.2) + nls(-0.2) + nls(0.25)) / 3
    check(loss, stats, expected, {
        "rewards/chosen": (0.1 - 0.1 + 0.15) / 3,  # β·(π_c − ref_c)
        "rewards/rejected": (-0.1 + 0.1 - 0.1) / 3,
        "rewards/margin": (0.2 - 0.2 + 0.25) / 3,
        "accuracy": 2 / 3,  # pair 1 has margin -0.2
        **LOGPS,
    })


def test_sigmoid_label_smoothing():
    loss, _ = run("sigmoid", beta=0.1, label_smoothing=0.2)
    # −0.8·log σ(βh) − 0.2·log σ(−βh)
    expected = sum(0.8 * nls(x) + 0.2 * nls(-x) for x in (0.2, -0.2, 0.25)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx((nls(0.2) + nls(-0.2) + nls(0.25)) / 3, abs=1e-3)


def test_label_smoothing_zero_is_plain_sigmoid():
    plain, plain_stats = run("sigmoid", beta=0.1)
    zero, zero_stats = run("sigmoid", beta=0.1, label_smoothing=0.0)
    torch.testing.assert_close(zero, plain, atol=0, rtol=0)
    assert zero_stats == plain_stats
    with pytest.raises(ValueError, match="label_smoothing"):
        run("sigmoid", beta=0.1, label_smoothing=0.7)


def test_ipo_length_averaged_by_default():
    loss, stats = run("ipo", beta=0.5)
    # per-token log-ratios: chosen [1/5, -1/10, 1.5/3], rejected [-1/4, 1/8, -1/6]
    # h = [0.45, -0.225, 2/3]; target 1/(2β) = 1
    expected = ((0.45 - 1) ** 2 + (-0.225 - 1) ** 2 + (2 / 3 - 1) ** 2) / 3
    check(loss, stats, expected, {
        "rewards/chosen": 0.5 * (0.2 - 0.1 + 0.5) / 3,
        "rewards/rejected": 0.5 * (-0.25 + 0.125 - 1 / 6) / 3,
        "rewards/margin": 0.5 * (0.45 - 0.225 + 2 / 3) / 3,
        "accuracy": 2 / 3,
        **LOGPS,
    })


def test_ipo_sequence_level():
    loss, stats = run("ipo", beta=0.5, average_log_probs=False, nc=None, nr=None)  # lengths not needed
    # h = [2, -2, 2.5]; target 1
    check(loss, stats, ((2 - 1) ** 2 + (-2 - 1) ** 2 + (2.5 - 1) ** 2) / 3,
          {"rewards/margin": 0.5 * (2 - 2 + 2.5) / 3, "accuracy": 2 / 3})


def test_length_normalized():
    loss, stats = run("length_normalized", beta=2.0)
    # h = [0.45, -0.225, 2/3] (as for IPO); β·h = [0.9, -0.45, 4/3]
    expected = (nls(0.9) + nls(-0.45) + nls(4 / 3)) / 3
    check(loss, stats, expected, {
        "rewards/chosen": 2 * (1 / 5 - 1 / 10 + 1.5 / 3) / 3,  # β·(π − ref)/|y|
        "rewards/rejected": 2 * (-1 / 4 + 1 / 8 - 1 / 6) / 3,
        "rewards/margin": (0.9 - 0.45 + 4 / 3) / 3,
        "accuracy": 2 / 3,
        **LOGPS,
    })


def test_simpo_without_reference():
    loss, stats = run("simpo", beta=2.0, gamma=1.0, rc=None, rr=None)
    # β/|y|·π: chosen [2·-10/5, 2·-20/10, 2·-5.5/3] = [-4, -4, -11/3]
    #          rejected [2·-12/4, 2·-18/8, 2·-9/6] = [-6, -4.5, -3]
    # x = margin − γ = [2 − 1, 0.5 − 1, -2/3 − 1] = [1, -0.5, -5/3]
    expected = (nls(1.0) + nls(-0.5) + nls(-5 / 3)) / 3
    check(loss, stats, expected, {
        "rewards/chosen": (-4 - 4 - 11 / 3) / 3,
        "rewards/rejected": (-6 - 4.5 - 3) / 3,
        "rewards/margin": (2 + 0.5 - 2 / 3) / 3,
        "accuracy": 2 / 3,  # γ is not part of the margin: pair 1 (0.5 > 0) counts
        **LOGPS,
    })
    # the reference is ignored when given
    with_ref, _ = run("simpo", beta=2.0, gamma=1.0)
    torch.testing.assert_close(with_ref, loss, atol=0, rtol=0)
    # γ defaults to SimPO's 0.5·β with β = 2
    default, _ = run("simpo", beta=2.0, rc=None, rr=None)
    torch.testing.assert_close(default, loss, atol=0, rtol=0)


def test_hinge():
    loss, stats = run("hinge", beta=0.5)
    # max(0, 1 − β·h), β·h = [1, -1, 1.25] -> [0, 2, 0]
    check(loss, stats, (0 + 2 + 0) / 3, {"rewards/margin": (1 - 1 + 1.25) / 3, "accuracy": 2 / 3, **LOGPS})
    loss, _ = run("hinge", beta=0.1)
    # β·h = [0.2, -0.2, 0.25] -> [0.8, 1.2, 0.75]
    assert loss.item() == pytest.approx((0.8 + 1.2 + 0.75) / 3, abs=1e-5)


# ---------------------------------------------------------------- shared behaviour

# options that put every pair in the region where the loss still has a gradient
ACTIVE = {"sigmoid": dict(beta=0.1), "ipo": dict(beta=0.1), "length_normalized": dict(beta=2.0),
          "simpo": dict(beta=2.0, gamma=1.0), "hinge": dict(beta=0.1)}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_raising_policy_chosen_lowers_the_loss(name):
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    loss, _ = dpo_loss(name, pc, pr, t(RC), t(RR), t(NC), t(NR), **ACTIVE[name])
    loss.backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    higher, _ = run(name, pc=[x + 0.1 for x in PC], **ACTIVE[name])
    assert higher.item() < loss.item()


@pytest.mark.parametrize("name", sorted(NAMES))
def test_micro_batches_add_up_to_the_global_mean(name):
    pc, pr = [-10.0, -20.0, -5.5, -7.0], [-12.0, -18.0, -9.0, -6.0]
    rc, rr = [-11.0, -19.0, -7.0, -8.0], [-11.0, -19.0, -8.0, -5.0]
    nc, nr = [5, 10, 3, 7], [4, 8, 6, 2]
    opts = dict(ACTIVE[name], beta=0.5)
    whole, whole_stats = run(name, pc, pr, rc, rr, nc, nr, **opts)
    halves = [run(name, pc[s], pr[s], rc[s], rr[s], nc[s], nr[s], num_units=4, **opts)
              for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0][0] + halves[1][0]).item() == pytest.approx(whole.item(), abs=1e-6)
    for key in DPO_STATS:
        assert halves[0][1][key] + halves[1][1][key] == pytest.approx(whole_stats[key], abs=1e-6), key
    # without num_units each half is its own mean: twice its share
    alone, _ = run(name, pc[:2], pr[:2], rc[:2], rr[:2], nc[:2], nr[:2], **opts)
    assert alone.item() == pytest.approx(2 * halves[0][0].item(), abs=1e-6)


def test_registry_names_and_reference_needs():
    assert set(DPO_LOSSES) == NAMES
    assert {n for n in NAMES if not dpo_needs_reference(n)} == {"simpo"}
    assert all(get_dpo_loss(n).needs_reference == (n != "simpo") for n in NAMES)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown DPO loss 'dpo2'") as err:
        get_dpo_loss("dpo2")
    assert all(n in str(err.value) for n in NAMES)
    with pytest.raises(ValueError, match="hinge, ipo, length_normalized, sigmoid, simpo"):
        run("dpo2", beta=0.1)


def test_missing_inputs_are_refused():
    with pytest.raises(ValueError, match="reference"):
        run("sigmoid", beta=0.1, rc=None, rr=None)
    for name in ("length_normalized", "simpo", "ipo"):
        with pytest.raises(ValueError, match="chosen_tokens"):
            run(name, beta=0.1, nc=None, nr=None)
    with pytest.raises(ValueError, match="beta"):
        run("sigmoid", beta=0.0)


def test_low_precision_inputs_are_widened_and_stats_detached():
    pc = t(PC, torch.bfloat16).requires_grad_()
    loss, stats = dpo_loss("sigmoid", pc, t(PR, torch.bfloat16), t(RC, torch.bfloat16),
                           t(RR, torch.bfloat16), beta=0.1)
    assert loss.dtype == torch.float32 and loss.requires_grad
    assert loss.item() == pytest.approx((nls(0.2) + nls(-0.2) + nls(0.25)) / 3, abs=1e-5)
    assert stats["accuracy"] == pytest.approx(2 / 3)


def test_register_a_custom_variant():
    @register_dpo_loss("test_only_identity", needs_reference=False)
    def identity(pc, pr, rc, rr, nc, nr, *, beta):
        return -(pc - pr), beta * pc, beta * pr

    try:
        loss, stats = run("test_only_identity", beta=1.0, rc=None, rr=None)
        assert loss.item() == pytest.approx(-(2 - 2 + 3.5) / 3)  # π_c − π_r = [2, -2, 3.5]
        assert not dpo_needs_reference("test_only_identity")
        with pytest.raises(ValueError, match="already registered"):
            register_dpo_loss("sigmoid")(identity)
    finally:
        DPO_LOSSES.pop("test_only_identity")
