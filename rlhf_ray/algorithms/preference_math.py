"""Pure tensor maths for learning from preference pairs: reward modelling (Bradley–Terry) and the DPO
family of direct preference losses (``DPO_LOSSES``, ``dpo_loss``).

``B`` is the number of pairs; ``chosen`` and ``rejected`` are the scores (or summed response log-probs)
of the preferred and the other response of each pair.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       num_pairs: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the preferences under the Bradley–Terry model, with an optional margin
    (Llama 2's RM loss):

        loss = Σ_i −log σ(r_chosen_i − r_rejected_i − m_i) / N

    chosen, rejected, margin: [B]. ``N`` (``num_pairs``) is the count the mean is over — the global
    mini-batch across micro-batches and ranks, so that accumulated gradients are those of its mean;
    default B. Returns the loss and detached sums divided by N: accuracy (chosen scored strictly higher),
    the mean score difference and the mean scores of each side.
    """
    n = float(num_pairs if num_pairs is not None else chosen.shape[0])
    diff = chosen.float() - rejected.float()
    target = diff if margin is None else diff - margin.to(diff)
    loss = -F.logsigmoid(target).sum() / n
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().sum() / n, "score_margin": diff.sum() / n,
                 "chosen_score": chosen.float().sum() / n, "rejected_score": rejected.float().sum() / n}
    return loss, stats


def pairwise_accuracy(chosen: Tensor, rejected: Tensor, tie: float | None = None) -> float:
    """Fraction of pairs whose preferred response scores strictly higher: ties count as wrong, as in RewardBench;
    with ``tie``, pairs whose scores are within ``tie`` of each other count half (a DPO policy's implicit rewards
    at the start, when the policy is the reference: rounding noise, not preferences)."""
    if not chosen.numel():
        return float("nan")
    if tie is None:
        return float((chosen > rejected).float().mean())
    margin = chosen - rejected
    return float(torch.where(margin.abs() <= tie, 0.5, (margin > 0).float()).mean())


# ---------------------------------------------------------------- DPO family
#
# A variant maps the per-pair inputs (all [B], float):
#   policy_chosen, policy_rejected       π_c, π_r: the policy's log-probs summed over each response's tokens
#   reference_chosen, reference_rejected ref_c, ref_r: the same for the frozen reference (None when the
#                                        variant is reference-free: it must then not read them)
#   chosen_tokens, rejected_tokens       |y_c|, |y_r|: response lengths (None if the caller has none; the
#                                        length-normalised variants then raise)
# and ``beta`` plus its own keyword options to per-pair (loss, reward_chosen, reward_rejected), all [B].
# The rewards are the implicit rewards whose margin the variant optimises; the pair counts as correct
# (``accuracy``) when reward_chosen − reward_rejected > 0.

DPOVariant = Callable[..., tuple[Tensor, Tensor, Tensor]]
DPO_LOSSES: dict[str, DPOVariant] = {}

DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "logps/chosen",
             "logps/rejected")


def register_dpo_loss(name: str, *, needs_reference: bool = True) -> Callable[[DPOVariant], DPOVariant]:
    """Decorator: register a DPO-family variant in ``DPO_LOSSES`` under ``name`` and set its attribute
    ``needs_reference`` (False: reference-free, the driver may skip the reference model's forward passes
    and pass None for both reference inputs). Registering a taken name raises ValueError.

    The variant is called as ``fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
    chosen_tokens, rejected_tokens, *, beta, **options)`` -> (loss [B], reward_chosen [B],
    reward_rejected [B]); see the comment above ``DPO_LOSSES``.
    """
    def register(fn: DPOVariant) -> DPOVariant:
        if name in DPO_LOSSES:
            raise ValueError(f"DPO loss {name!r} is already registered")
        fn.needs_reference = needs_reference
        DPO_LOSSES[name] = fn
        return fn
    return register


def get_dpo_loss(name: str) -> DPOVariant:
    """The registered variant called ``name``; ValueError naming the known ones if there is none."""
    try:
        return DPO_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown DPO loss {name!r}; known: {', '.join(sorted(DPO_LOSSES))}") from None


def dpo_needs_reference(name: str) -> bool:
    """Whether variant ``name`` reads the reference log-probs (False for reference-free ones: simpo)."""
    return get_dpo_loss(name).needs_reference


def dpo_loss(loss_type: str, policy_chosen: Tensor, policy_rejected: Tensor,
             reference_chosen: Tensor | None = None, reference_rejected: Tensor | None = None,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None, *,
             beta: float, num_units: float | None = None, tie: float | None = None,
             **options) -> tuple[Tensor, dict[str, float]]:
    """A DPO-family loss (``loss_type`` names a variant of ``DPO_LOSSES``) on a micro-batch of pairs:

        loss = Σ_i ℓ_i / N

    all inputs [B] (see above); ``beta`` > 0 is required (typical values differ by variant: 0.1 for DPO,
    2.0 for SimPO); ``options`` go to the variant (label_smoothing, gamma, average_log_probs). ``N``
    (``num_units``) is the count the mean is over — the global mini-batch of pairs across micro-batches and
    ranks, so that summed micro-batch losses (and gradients) are those of its mean; default B (≤ 0 counts
    as 1). Log-probs are computed in at least float32.

    Returns the loss (scalar tensor) and stats, floats, each a sum over the pairs divided by N so that
    they too add up across micro-batches and ranks: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margin`` (the variant's implicit rewards, e.g. β·(π − ref)), ``accuracy`` (share of pairs
    with margin > 0; with ``tie``, a margin within ±tie counts half: see pairwise_accuracy), ``logps/chosen``, ``logps/rejected`` (the policy's summed log-probs).
    """
    variant = get_dpo_loss(loss_type)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if variant.needs_reference and (reference_chosen is None or reference_rejected is None):
        raise ValueError(f"DPO loss {loss_type!r} needs reference_chosen and reference_rejected")
    pc, pr = _wide(policy_chosen), _wide(policy_rejected)
    rc, rr = (_wide(reference_chosen), _wide(reference_rejected)) if variant.needs_reference else (None, None)
    losses, reward_c, reward_r = variant(pc, pr, rc, rr, chosen_tokens, rejected_tokens, beta=beta, **options)
    n = float(num_units) if num_units is not None else float(pc.shape[0])
    n = n if n > 0 else 1.0
    loss = losses.sum() / n
    with torch.no_grad():
        reward_c, reward_r = reward_c.detach(), reward_r.detach()
        margin = reward_c - reward_r
        right = (margin > 0).to(margin) if tie is None else torch.where(margin.abs() <= tie, 0.5, (margin > 0).to(margin))
        sums = torch.stack([reward_c.sum(), reward_r.sum(), margin.sum(), right.sum(),
                            pc.detach().sum(), pr.detach().sum()]) / n
    return loss, dict(zip(DPO_STATS, sums.tolist()))


def _wide(x: Tensor) -> Tensor:
    """``x`` as a float tensor of at least float32 precision (bf16/fp16/ints -> float32, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_token(logps: Tensor, tokens: Tensor | None, loss_type: str) -> Tensor:
    """``logps / |y|`` ([B]; lengths below 1 count as 1); ValueError if the lengths were not given."""
    if tokens is None:
        raise ValueError(f"DPO loss {loss_type!r} needs chosen_tokens and rejected_tokens (response lengths)")
    return logps / torch.as_tensor(tokens).to(logps).clamp(min=1)


def _smoothed_nll(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ε)·log σ(x) − ε·log σ(−x): the Bradley–Terry NLL when a share ε of the labels is flipped."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_dpo_loss("sigmoid")
def sigmoid_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                     reference_rejected: Tensor, chosen_tokens: Tensor | None, rejected_tokens: Tensor | None,
                     *, beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023), with conservative DPO's label smoothing ε (Mitchell 2023):

        h = (π_c − ref_c) − (π_r − ref_r)
        ℓ = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)          (ε = 0: plain DPO)

    rewards β·(π − ref). Lengths are unused.
    """
    chosen, rejected = beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)
    return _smoothed_nll(chosen - rejected, label_smoothing), chosen, rejected


@register_dpo_loss("ipo")
def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, chosen_tokens: Tensor | None, rejected_tokens: Tensor | None,
             *, beta: float, average_log_probs: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, eq. 17, with β as the regulariser τ):

        h = (π_c − ref_c)/|y_c| − (π_r − ref_r)/|y_r|      (average_log_probs, the default)
        h = (π_c − ref_c) − (π_r − ref_r)                  (average_log_probs=False)
        ℓ = (h − 1/(2β))²

    The paper writes h with sequence log-probs; TRL's DPOTrainer (loss_type="ipo") divides the policy's
    and the reference's summed log-probs by the response length first, and the default follows TRL, since
    the regression target 1/(2β) does not scale with length (with sums, long responses would dominate).
    Rewards β·(π − ref), per token when averaged. Lengths are needed only when averaging.
    """
    chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    if average_log_probs:
        chosen, rejected = _per_token(chosen, chosen_tokens, "ipo"), _per_token(rejected, rejected_tokens, "ipo")
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2, beta * chosen, beta * rejected


@register_dpo_loss("length_normalized")
def length_normalized_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                               reference_rejected: Tensor, chosen_tokens: Tensor | None,
                               rejected_tokens: Tensor | None, *, beta: float,
                               label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO (Tulu 3's "dpo_norm"): sigmoid DPO on per-token averages,

        h = (π_c − ref_c)/|y_c| − (π_r − ref_r)/|y_r|
        ℓ = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    rewards β·(π − ref)/|y|. Tulu 3 trains it with β = 5.
    """
    chosen = beta * _per_token(policy_chosen - reference_chosen, chosen_tokens, "length_normalized")
    rejected = beta * _per_token(policy_rejected - reference_rejected, rejected_tokens, "length_normalized")
    return _smoothed_nll(chosen - rejected, label_smoothing), chosen, rejected


@register_dpo_loss("simpo", needs_reference=False)
def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor | None,
               reference_rejected: Tensor | None, chosen_tokens: Tensor | None, rejected_tokens: Tensor | None,
               *, beta: float, gamma: float = 1.0, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024), reference-free (the reference inputs are ignored and may be None):

        ℓ = −(1 − ε)·log σ(x) − ε·log σ(−x),   x = β/|y_c|·π_c − β/|y_r|·π_r − γ

    ``gamma`` is the absolute target margin γ (SimPO's configs give the ratio γ/β: γ = ratio·β). SimPO's
    defaults: β = 2.0, γ/β = 0.5, so γ = 1.0 — the default here; pass ``beta=2.0`` with it. Rewards
    β/|y|·π; the margin (and accuracy) leaves γ out.
    """
    chosen = beta * _per_token(policy_chosen, chosen_tokens, "simpo")
    rejected = beta * _per_token(policy_rejected, rejected_tokens, "simpo")
    return _smoothed_nll(chosen - rejected - gamma, label_smoothing), chosen, rejected


@register_dpo_loss("hinge")
def hinge_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
                   reference_rejected: Tensor, chosen_tokens: Tensor | None, rejected_tokens: Tensor | None,
                   *, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC's calibration hinge loss (Zhao et al. 2023) on the DPO log-ratio difference, as in TRL:

        h = (π_c − ref_c) − (π_r − ref_r)
        ℓ = max(0, 1 − β·h)                 (a margin δ = 1/β on h)

    rewards β·(π − ref). Lengths are unused.
    """
    chosen, rejected = beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)
    return torch.relu(1.0 - (chosen - rejected)), chosen, rejected
