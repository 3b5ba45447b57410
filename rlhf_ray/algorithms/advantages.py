"""Advantage estimators: a registry of pure tensor functions, picked by ``ppo.advantage``.

Every estimator takes the same inputs (``AdvantageInputs``) and returns ``(advantages, returns)``, both ``[B, T]``
and 0 on masked positions; ``returns`` is None for the estimators that train no critic. A sequence's reward ``R_i``
is the sum of its token rewards: the score at its last token, plus −β·KL per token when the KL is in the reward.
Samples of one prompt share a group id; the grouped estimators compare a sample only with its own group.

    gae                    A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} − V_t        (a critic; PPO)
    grpo                   A_i = (R_i − mean_g R) / (std_g R + ε)                        (GRPO)
    dr_grpo                A_i = R_i − mean_g R                                           (Dr. GRPO: no std)
    rloo                   A_i = R_i − mean_{j≠i in g} R_j = n/(n−1) · (R_i − mean_g R)   (RLOO)
    reinforce_pp           A_t = whiten_batch(G_t),  G_t = Σ_{k≥t} γ^{k−t} r_k            (REINFORCE++)
    reinforce_pp_baseline  A_t = whiten_batch(R_i − mean_g R)                             (REINFORCE++-baseline)

A sequence-level advantage applies to every token of the sequence. A new estimator is a function here with
``@register_advantage``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf_ray.algorithms.ppo_math import gae, masked_whiten

GROUP_EPS = 1e-6


@dataclass(frozen=True)
class AdvantageInputs:
    rewards: Tensor                  # [B, T] token rewards (score at the last valid token, −β·KL where it applies)
    mask: Tensor                     # [B, T] valid response tokens
    group_ids: Tensor                # [B] long: samples of one prompt share an id
    values: Optional[Tensor] = None  # [B, T] the critic's values (gae only)
    gamma: float = 1.0
    lam: float = 0.95


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    compute: Callable[[AdvantageInputs], tuple[Tensor, Optional[Tensor]]]
    needs_critic: bool   # the learner builds a value model and runs a values pass
    grouped: bool        # compares samples of one prompt: needs n_samples_per_prompt ≥ 2


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, needs_critic: bool = False, grouped: bool = False):
    def add(fn):
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, grouped)
        return fn
    return add


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


# ------------------------------------------------------------------------------------------------- helpers

def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_i = Σ_t r_{i,t} over valid tokens. [B, T] -> [B]"""
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards)).sum(-1)


def group_mean_std(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: its group's mean, unbiased std (0 for a group of one) and size. [B] -> ([B], [B], [B])"""
    groups = torch.unique(group_ids, return_inverse=True)[1]
    count = torch.zeros(int(groups.max()) + 1, dtype=values.dtype).index_add_(0, groups, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, groups, values) / count
    deviation = (values - mean[groups]) ** 2
    var = torch.zeros_like(count).index_add_(0, groups, deviation) / (count - 1).clamp(min=1)
    return mean[groups], var.sqrt()[groups], count[groups]


def per_token(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    """A sequence's advantage on each of its valid tokens. [B] -> [B, T]"""
    return torch.where(mask.bool(), sequence_advantages[:, None].expand(mask.shape),
                       torch.zeros((), dtype=sequence_advantages.dtype))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + γ G_{t'} over valid tokens (t' the next valid one; G = 0 past the last). [B, T] -> [B, T]"""
    valid = mask.bool()
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return out


# ---------------------------------------------------------------------------------------------- estimators

@register_advantage("gae", needs_critic=True)
def gae_advantages(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with the critic's values (rlhf_ray.algorithms.ppo_math.gae); returns = A + V."""
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    return gae(x.rewards, x.values, x.mask, x.gamma, x.lam)


@register_advantage("grpo", grouped=True)
def grpo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_i = (R_i − mean_g R) / (std_g R + ε), std unbiased; a group whose rewards are all equal gets 0."""
    rewards = sequence_rewards(x.rewards, x.mask)
    mean, std, _ = group_mean_std(rewards, x.group_ids)
    return per_token((rewards - mean) / (std + GROUP_EPS), x.mask), None


@register_advantage("dr_grpo", grouped=True)
def dr_grpo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_i = R_i − mean_g R (Dr. GRPO: no division by the group's std, which favours groups that barely differ)."""
    rewards = sequence_rewards(x.rewards, x.mask)
    mean, _, _ = group_mean_std(rewards, x.group_ids)
    return per_token(rewards - mean, x.mask), None


@register_advantage("rloo", grouped=True)
def rloo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_i = R_i − (1/(n−1)) Σ_{j≠i} R_j, the leave-one-out baseline = n/(n−1) · (R_i − mean_g R)."""
    rewards = sequence_rewards(x.rewards, x.mask)
    mean, _, count = group_mean_std(rewards, x.group_ids)
    if bool((count < 2).any()):
        raise ValueError("rloo needs at least 2 samples per prompt (generation.n_samples_per_prompt ≥ 2)")
    return per_token(count / (count - 1) * (rewards - mean), x.mask), None


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = whiten over the batch's valid tokens of G_t = Σ_{k≥t} γ^{k−t} r_k (token rewards with the KL in them)."""
    return masked_whiten(discounted_returns(x.rewards, x.mask, x.gamma), x.mask), None


@register_advantage("reinforce_pp_baseline", grouped=True)
def reinforce_pp_baseline_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = whiten over the batch's valid tokens of (R_i − mean_g R): the group mean as baseline, the batch's
    spread as scale (steadier than one group's std)."""
    rewards = sequence_rewards(x.rewards, x.mask)
    mean, _, _ = group_mean_std(rewards, x.group_ids)
    return masked_whiten(per_token(rewards - mean, x.mask), x.mask), None
