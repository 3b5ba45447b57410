"""Pure tensor maths for PPO on language models.

Conventions: ``B`` is the batch size, ``T`` the response length. A ``mask`` is a
float or bool tensor ``[B, T]`` with 1 (True) on valid response tokens; any
position may be masked (including holes inside a row) and whole rows may be
all-masked. Values at masked positions are ignored, even if they are NaN/inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def _sum(x: Tensor, dim: int | None) -> Tensor:
    return x.sum() if dim is None else x.sum(dim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of valid entries: ``sum(x * mask)`` over ``dim`` (all dims if None).

    x, mask: ``[B, T]`` -> scalar, or ``x`` reduced over ``dim``.
    Masked entries are replaced by 0 (so NaN/inf there do not leak).
    """
    m = mask.bool().expand_as(x)
    return _sum(torch.where(m, x, torch.zeros_like(x)), dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of valid entries: ``sum(x * mask) / sum(mask)``; 0 where ``sum(mask) == 0``.

    x, mask: ``[B, T]`` -> scalar, or ``x`` reduced over ``dim``.
    """
    count = _sum(mask.bool().expand_as(x).to(x.dtype), dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all valid entries: ``mean_m((x - mean_m(x))^2)``, times ``n/(n-1)``
    when ``unbiased`` and ``n = sum(mask) > 1``.

    x, mask: ``[B, T]`` -> scalar (0 when no entry is valid).
    """
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.bool().expand_as(x).to(x.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whiten over the valid entries of the whole batch:
    ``(x - mean) / sqrt(var + eps)`` (unbiased var), ``+ mean`` if not ``shift_mean``.

    x, mask: ``[B, T]`` -> ``[B, T]``, 0 at masked positions.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(policy || ref) estimate, with ``log r = ref_logprobs - logprobs``:

    - ``k1 = logprobs - ref_logprobs``  (= -log r)
    - ``k2 = 0.5 * (log r)^2``
    - ``k3 = exp(log r) - 1 - log r``

    logprobs, ref_logprobs: ``[B, T]`` -> ``[B, T]``.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each row: ``max{t : mask[b, t] = 1}``.

    mask: ``[B, T]`` -> ``[B]`` long (0 for all-masked rows).
    """
    pos = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.bool() * pos).argmax(-1)


def shape_rewards(
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    kl_coef: float,
    ended_with_eos: Tensor,
    non_eos_penalty: float | None = None,
    reward_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Token rewards ``r = -kl_coef * kl * mask``, plus the effective score at the last
    valid token of each row.

    effective score ``s' = clamp(s, -reward_clip, reward_clip)`` (if ``reward_clip``),
    then ``s' = non_eos_penalty`` where ``not ended_with_eos`` (if ``non_eos_penalty``).

    scores ``[B]``, kl ``[B, T]``, mask ``[B, T]``, ended_with_eos ``[B]`` bool
    -> (rewards ``[B, T]``, effective_scores ``[B]``). All-masked rows get 0 rewards.
    """
    s = scores.to(kl.dtype)
    if reward_clip is not None:
        s = s.clamp(-reward_clip, reward_clip)
    if non_eos_penalty is not None:
        s = torch.where(ended_with_eos.bool(), s, torch.full_like(s, non_eos_penalty))
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    bonus = torch.where(valid.any(-1), s, torch.zeros_like(s))
    rewards = rewards.scatter_add(-1, last_valid_index(mask)[:, None], bonus[:, None])
    return rewards, s


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over valid tokens (masked ones are skipped):

    ``delta_t = r_t + gamma * V_{t'} - V_t``, ``A_t = delta_t + gamma * lam * A_{t'}``,
    where ``t'`` is the next valid position of the row (``V = A = 0`` past the last one).
    ``returns = A + V``.

    rewards, values, mask: ``[B, T]`` -> (advantages ``[B, T]``, returns ``[B, T]``),
    detached, 0 at masked positions.
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    next_v = torch.zeros_like(values[:, 0])
    next_a = torch.zeros_like(next_v)
    advs = []
    for t in reversed(range(rewards.shape[1])):
        m, v = valid[:, t], values[:, t]
        a = rewards[:, t] + gamma * next_v - v + gamma * lam * next_a
        next_v = torch.where(m, v, next_v)
        next_a = torch.where(m, a, next_a)
        advs.append(torch.where(m, a, torch.zeros_like(a)))
    adv = torch.stack(advs[::-1], dim=1)
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return adv, returns


def token_aggregate(
    per_token: Tensor, mask: Tensor, num_tokens: int | float | Tensor | None = None
) -> Tensor:
    """Aggregate a per-token loss to a scalar: ``masked_sum(per_token, mask) / num_tokens``.

    ``num_tokens`` is the number of valid tokens of the GLOBAL batch (all micro-batches,
    all data-parallel ranks), so summing micro-batch losses gives the global token mean;
    ``num_tokens <= 0`` counts as 1. If None: ``masked_mean(per_token, mask)``.

    per_token, mask: ``[B, T]`` -> scalar.
    """
    if num_tokens is None:
        return masked_mean(per_token, mask)
    total = masked_sum(per_token, mask)
    n = torch.as_tensor(num_tokens, dtype=total.dtype, device=total.device)
    return total / torch.where(n > 0, n, torch.ones_like(n))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: ``rho = exp(logprobs - old_logprobs)``,
    ``l_t = max(-A * rho, -A * clamp(rho, 1 - eps, 1 + eps))``,
    ``loss = token_aggregate(l, mask, num_tokens)``.

    Stats (detached scalars): ``clipfrac`` = mean_m[-A*clamped > -A*rho],
    ``approx_kl`` = mean_m[(rho - 1) - log rho], ``ratio_mean`` = mean_m[rho].

    logprobs, old_logprobs, advantages, mask: ``[B, T]`` -> (scalar, stats).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = token_aggregate(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = None,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ``v_c = old + clamp(v - old, -eps, eps)``,
    ``l_t = 0.5 * max((v - R)^2, (v_c - R)^2)`` (``0.5 * (v - R)^2`` if ``clip_range``
    is None), ``loss = token_aggregate(l, mask, num_tokens)``.

    Stats (detached scalar): ``vf_clipfrac`` = mean_m[(v_c - R)^2 > (v - R)^2].

    values, old_values, returns, mask: ``[B, T]`` -> (scalar, stats).
    """
    err = (values - returns) ** 2
    if clip_range is None:
        per_token, clipped_more = err, torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        err_clip = (v_clip - returns) ** 2
        per_token, clipped_more = torch.maximum(err, err_clip), err_clip > err
    loss = token_aggregate(0.5 * per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(clipped_more.to(err.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in (at least) float32:
    ``H = logsumexp(z) - sum(softmax(z) * z)``.

    logits: ``[..., V]`` -> ``[...]``. ``-inf`` logits are allowed (probability 0).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = z.clamp(min=torch.finfo(z.dtype).min)  # -inf -> finite, so 0 * z is 0, not NaN
    z = z - z.detach().amax(-1, keepdim=True)  # H is shift-invariant; avoids cancellation
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
