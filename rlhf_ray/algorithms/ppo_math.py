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
    non_eos_mode: str = "replace",
) -> tuple[Tensor, Tensor]:
    """Token rewards ``r = -kl_coef * kl * mask``, plus the effective score at the last
    valid token of each row.

    effective score ``s' = clamp(s, -reward_clip, reward_clip)`` (if ``reward_clip``),
    then, where ``not ended_with_eos`` (if ``non_eos_penalty``): ``s' = non_eos_penalty``
    (``non_eos_mode='replace'``) or ``s' = s' - |non_eos_penalty|`` (``'subtract'``).

    scores ``[B]``, kl ``[B, T]``, mask ``[B, T]``, ended_with_eos ``[B]`` bool
    -> (rewards ``[B, T]``, effective_scores ``[B]``). All-masked rows get 0 rewards.
    """
    s = scores.to(kl.dtype)
    if reward_clip is not None:
        s = s.clamp(-reward_clip, reward_clip)
    if non_eos_penalty is not None:
        if non_eos_mode == "replace":
            cut = torch.full_like(s, non_eos_penalty)
        elif non_eos_mode == "subtract":
            cut = s - abs(non_eos_penalty)
        else:
            raise ValueError(f"unknown non_eos_mode {non_eos_mode!r}; expected 'replace' or 'subtract'")
        s = torch.where(ended_with_eos.bool(), s, cut)
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    bonus = torch.where(valid.any(-1), s, torch.zeros_like(s))
    rewards = rewards.scatter_add(-1, last_valid_index(mask)[:, None], bonus[:, None])
    return rewards, s


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment, to add to each score: 0 up to ``L0 = max_tokens - buffer`` tokens, then
    ``-penalty * (L - L0) / buffer``, reaching ``-penalty`` at ``max_tokens``.

    lengths: ``[B]`` response lengths -> ``[B]`` (≤ 0).
    """
    excess = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0, max=buffer)
    return -penalty * excess / buffer


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


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    num_units: int | float | Tensor | None = None,
    max_tokens: int | None = None,
) -> Tensor:
    """A per-token loss ``l`` as one scalar, over the valid tokens; ``|o_i|`` is row i's valid token count:

    - ``token_mean``:         ``Σ_{i,t} l_it / N_tokens``                  (every token weighs the same)
    - ``seq_mean_token_mean``: ``Σ_i (Σ_t l_it / |o_i|) / N_seqs``        (every sequence weighs the same)
    - ``seq_mean_token_sum``:  ``Σ_i (Σ_t l_it / max_tokens) / N_seqs``   (Dr. GRPO: a constant in place of |o_i|)

    ``num_units`` is N_tokens, or N_seqs for the sequence modes, of the GLOBAL batch (all micro-batches, all
    data-parallel ranks), so summing micro-batch losses gives the global mean; None: this batch's own count.
    All-masked rows count as sequences with loss 0.

    per_token, mask: ``[B, T]`` -> scalar.
    """
    if mode == "token_mean":
        return token_aggregate(per_token, mask, num_units)
    row_sums = masked_sum(per_token, mask, dim=-1)
    if mode == "seq_mean_token_mean":
        rows = row_sums / mask.bool().to(per_token.dtype).sum(-1).clamp(min=1)
    elif mode == "seq_mean_token_sum":
        if not max_tokens:
            raise ValueError("seq_mean_token_sum needs max_tokens (the response length cap)")
        rows = row_sums / max_tokens
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    n = torch.as_tensor(per_token.shape[0] if num_units is None else num_units, dtype=rows.dtype, device=rows.device)
    return rows.sum() / torch.where(n > 0, n, torch.ones_like(n))


def importance_weights(
    learner_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token off-policy correction between the sampler (vLLM) and the learner before the update:
    ``w = exp(learner_logprobs - sampler_logprobs)`` = π_learner(y_t) / π_sampler(y_t), then

    - ``none``: ``w' = 1``
    - ``tis`` (truncated): ``w' = min(w, cap)``
    - ``mis`` (masked):    ``w' = w`` where ``w ≤ cap``, else 0 (the token drops out of the loss)

    The policy loss of each token is multiplied by ``w'`` (a constant: no gradient flows through it).
    Stats over valid tokens: ``weight_mean``, ``weight_max`` (of w, before the cap), ``clipped_fraction``
    (share with w > cap) and ``mismatch_kl`` = mean[k3] = mean[w − 1 − log w] ≈ KL(sampler ‖ learner).

    learner_logprobs, sampler_logprobs, mask: ``[B, T]`` -> (weights ``[B, T]``, 0 at masked positions; stats).
    """
    log_w = (learner_logprobs - sampler_logprobs).detach()
    valid = mask.bool()
    log_w = torch.where(valid, log_w, torch.zeros_like(log_w))
    w = torch.exp(log_w)
    over = w > cap
    if mode == "none":
        out = torch.ones_like(w)
    elif mode == "tis":
        out = w.clamp(max=cap)
    elif mode == "mis":
        out = torch.where(over, torch.zeros_like(w), w)
    else:
        raise ValueError(f"unknown importance-sampling correction {mode!r}; expected none, tis or mis")
    stats = {"weight_mean": masked_mean(w, mask),
             "weight_max": torch.where(valid, w, torch.zeros_like(w)).max() if valid.any() else torch.zeros(()),
             "clipped_fraction": masked_mean(over.to(w.dtype), mask),
             "mismatch_kl": masked_mean(torch.expm1(log_w) - log_w, mask)}
    return torch.where(valid, out, torch.zeros_like(out)), stats


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    num_tokens: int | float | Tensor | None = None,
    *,
    clip_range_high: float | None = None,
    is_weights: Tensor | None = None,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: ``rho = exp(logprobs - old_logprobs)``,
    ``l_t = w_t * max(-A * rho, -A * clamp(rho, 1 - eps, 1 + eps_high))`` (``eps_high = clip_range_high`` or
    ``eps``; ``w_t`` the importance weights of ``importance_weights``, or 1),
    ``loss = aggregate_loss(l, mask, aggregation, num_tokens, max_tokens)`` (``num_tokens``: tokens, or sequences
    for the sequence aggregations).

    Stats (detached scalars): ``clipfrac`` = mean_m[-A*clamped > -A*rho],
    ``approx_kl`` = mean_m[(rho - 1) - log rho], ``ratio_mean`` = mean_m[rho].

    logprobs, old_logprobs, advantages, mask: ``[B, T]`` -> (scalar, stats).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_range if clip_range_high is None else clip_range_high
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens, max_tokens)
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
    *,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ``v_c = old + clamp(v - old, -eps, eps)``,
    ``l_t = 0.5 * max((v - R)^2, (v_c - R)^2)`` (``0.5 * (v - R)^2`` if ``clip_range``
    is None), ``loss = aggregate_loss(l, mask, aggregation, num_tokens, max_tokens)``.

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
    loss = aggregate_loss(0.5 * per_token, mask, aggregation, num_tokens, max_tokens)
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
