"""A PPO step's rollout and the pure functions around it: the rollout container a step (or the prefetcher) fills and a
checkpoint keeps, sampling seeds and groups, advantages on a batch, the sampler-learner gap, the samples shown, and the
step's timing figures. The order of the step itself: rlhf_ray.drivers.ppo."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch

from rlhf_ray.algorithms.advantages import AdvantageInputs, get_advantage_estimator
from rlhf_ray.algorithms.ppo_math import (importance_weights, kl_penalty, masked_mean, masked_whiten, overlong_penalty,
                                          shape_rewards)
from rlhf_ray.config import MAX_SAMPLES_PER_PROMPT, PPOConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.runtime.spans import span


class RolloutCancelled(Exception):
    """A prefetched rollout that is no longer wanted stops after its current call."""


@dataclass
class Rollout:
    step: int
    batch: RolloutBatch            # sampled, with scores and reference logprobs (and values when not overlapped)
    times: dict[str, float]        # wall seconds of its phases
    seconds: dict[str, float]      # each scoring role's own compute seconds
    generate_s: float
    policy_version: int            # the learner update whose weights sampled it
    stats: dict[str, float] = field(default_factory=dict)  # how it was sampled (dynamic sampling: sampling/*)
    load_s: float = 0.0            # prefetched: the engines' load of those weights just before (0: they held them)
    load_report: dict = field(default_factory=dict)  # that load's first engine report (tensors, bytes, …)

    def state_dict(self) -> dict:
        """Tensors, numbers, strings and lists only: loadable with ``torch.load(weights_only=True)``."""
        batch = {f.name: getattr(self.batch, f.name) for f in fields(self.batch)}
        return {"step": self.step, "batch": batch, "times": self.times, "seconds": self.seconds,
                "generate_s": self.generate_s, "policy_version": self.policy_version, "stats": self.stats,
                "load_s": self.load_s, "load_report": self.load_report}

    @staticmethod
    def from_state(state: dict) -> "Rollout":
        return Rollout(**{**state, "batch": RolloutBatch(**state["batch"])})


def sampling_seeds(seed: int, step: int, count: int, start: int = 0) -> list[int]:
    """One vLLM sampling seed per prompt of step ``step``, from the run's seed and the step alone; ``start``: the
    first prompt's place in the step (dynamic sampling's later rounds).

    Prompt i's seed is a 53-bit hash of (seed, step, i) times MAX_SAMPLES_PER_PROMPT (1024): its samples use seed,
    seed+1, …, and no two prompts of any steps share one, however many prompts a step has (two hashes meet by
    chance only, 2^-53 a pair; seeds laid out as step·2^20 + i·1024 repeated past 1024 prompts a step)."""
    import hashlib

    def one(i: int) -> int:
        digest = hashlib.blake2b(f"{seed}/{step}/{i}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * MAX_SAMPLES_PER_PROMPT  # < 2**63: a torch seed

    return [one(i) for i in range(start, start + count)]


def group_ids(prompts: int, samples_per_prompt: int, start: int = 0) -> torch.Tensor:
    """[prompts × samples] long: the generation role returns a prompt's samples next to each other, so row r belongs
    to prompt ``start + r // samples_per_prompt``."""
    return torch.arange(start, start + prompts).repeat_interleave(samples_per_prompt)


def refill_prompts(seed: int, step: int, round_: int, count: int, available: int) -> list[int]:
    """Dynamic sampling's ``count`` further prompts for round ``round_`` of step ``step``: drawn without replacement
    from all ``available``, from the seed, step and round alone (a resumed run draws the same)."""
    import random

    return random.Random((seed * 1_000_003 + step) * 1_009 + round_).sample(range(available), count)


@contextmanager
def phase(times: dict, name: str):
    """Adds the wall time of the block to ``times[name]`` (a phase may run in parts: dynamic sampling's rounds), and
    records it as the driver's span (the timeline: rlhf_ray.run.timeline)."""
    with span(name):
        start = time.perf_counter()
        yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def with_advantages(batch: RolloutBatch, ppo: PPOConfig, is_correction: str = "none",
                    max_new_tokens: int | None = None) -> tuple[RolloutBatch, dict[str, float]]:
    """Scores → effective scores (clip, cut responses, overlong shaping) → token rewards (−β·KL per token where
    ppo.kl_in=reward) → advantages by ppo.advantage (rlhf_ray.algorithms.advantages; GAE's whitened) → importance weights
    between the learner's old logprobs and the sampler's (``is_correction``: none, tis, mis).

    A batch without reference log-probs (no reference: ppo.kl_coef=0, ppo.reference=auto) has no KL: its token rewards
    carry none and its stats no ``kl/mean``."""
    estimator = get_advantage_estimator(ppo.advantage)
    mask = batch.response_mask
    lengths = mask.sum(-1)
    kl = None if batch.ref_logprobs is None else kl_penalty(batch.old_logprobs, batch.ref_logprobs,
                                                             ppo.kl_estimator) * mask
    if kl is None and ppo.kl_coef > 0:
        raise ValueError(f"ppo.kl_coef={ppo.kl_coef:g} weighs the KL to the reference, but the batch has no reference "
                         "log-probs")
    scores = batch.scores
    if ppo.overlong_buffer:
        scores = scores + overlong_penalty(lengths, max_new_tokens, ppo.overlong_buffer, ppo.overlong_penalty)
    rewards, effective = shape_rewards(scores, torch.zeros_like(mask) if kl is None else kl, mask,
                                       ppo.kl_coef if ppo.kl_in == "reward" else 0.0, batch.ended_with_eos,
                                       ppo.non_eos_penalty, ppo.reward_clip, ppo.non_eos_penalty_mode)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = estimator.compute(AdvantageInputs(rewards, mask, batch.group_ids, batch.values,
                                                            ppo.gamma, ppo.lam))
    if estimator.needs_critic and ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    per_sequence = rewards.sum(-1)
    stats = {
        "reward/mean": float(per_sequence.mean()), "reward/std": float(per_sequence.std()),
        "score/mean": float(batch.scores.mean()), "score/std": float(batch.scores.std()),
        "score/effective_mean": float(effective.mean()),
        **({} if kl is None else {"kl/mean": float(kl.sum(-1).mean())}),
        "advantage/zero_fraction": float((advantages.abs().sum(-1) == 0).float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/eos_fraction": float(batch.ended_with_eos.float().mean()),
        "response/tokens": float(lengths.sum()),
    }
    if batch.ref_logprobs is not None:  # falling while the score rises: the responses leave what the reference writes
        stats["ref/logprob_mean"] = float(masked_mean(batch.ref_logprobs, mask))
    stats.update(cut_pays(batch, ppo))
    if batch.values is not None:
        stats["value/mean"] = float(masked_mean(batch.values, mask))
    is_weights = None
    if is_correction != "none":
        is_weights, is_stats = importance_weights(batch.old_logprobs, batch.gen_logprobs, mask, is_correction,
                                                  ppo.is_cap)
        stats.update({f"is/{key}": float(value) for key, value in is_stats.items()})
    return batch.with_(rewards=rewards, advantages=advantages, returns=returns, is_weights=is_weights), stats


def cut_pays(batch: RolloutBatch, ppo) -> dict[str, float]:
    """With ppo.non_eos_penalty replacing a cut response's score: the median score of the finished responses and
    whether the penalty is above it (``score/cut_pays`` 1: cutting earns more than most finished responses — the
    penalty_pays alarm, rlhf_ray.run.alarms). Empty without such a penalty or without a finished response."""
    if ppo.non_eos_penalty is None or ppo.non_eos_penalty_mode != "replace":
        return {}
    finished = batch.scores[batch.ended_with_eos]
    if not len(finished):
        return {}
    median = float(finished.median())
    return {"score/finished_median": median, "score/cut_pays": float(ppo.non_eos_penalty > median)}


def sampler_gap(batch: RolloutBatch, learn_stats: dict, old_logprobs: str) -> float:
    """Mean |sampler − learner| logprob per token before the update: the weight-sync check. Over the whole batch when
    the learner computed old logprobs; else over the update's first mini-batch, where the learner's logprobs are
    still those of the weights the sampler had (its ``check/*`` stats, taken out of the learner's stats here)."""
    gap, tokens = learn_stats.pop("check/sampler_gap_sum", 0.0), learn_stats.pop("check/sampler_gap_tokens", 0.0)
    if old_logprobs == "learner":
        return float(masked_mean((batch.gen_logprobs - batch.old_logprobs).abs(), batch.response_mask))
    return gap / max(tokens, 1.0)


def pick_samples(batch: RolloutBatch, count: int, step: int) -> list[dict]:
    """``count`` rows spread evenly over the batch, as (prompt, response, score, reward) records."""
    if count <= 0:
        return []
    rows = sorted({round(i * (len(batch) - 1) / max(count - 1, 1)) for i in range(min(count, len(batch)))})
    per_sequence = batch.rewards.sum(-1)
    return [{"step": step, "prompt": batch.prompt_texts[i], "response": batch.response_texts[i],
             "score": float(batch.scores[i]), "reward": float(per_sequence[i]),
             "finish_reason": batch.finish_reasons[i], "tokens": int(batch.response_mask[i].sum())} for i in rows]


def step_timing(times: dict, role_seconds: dict, generate_s: float, learn_s: float, sync: dict,
                batch: RolloutBatch, overlapped: bool = False) -> dict[str, float]:
    """Wall time of each phase and the orchestration overhead.

    The roles' own compute on the step's critical path is generate + max(reward, reference, values)
    + learn + publish + load — overlapped (ppo.async_steps ≥ 1): the wait for this step's rollout + values + learn
    + publish, the rollout itself and the engines' load of the weights that sampled it (``sync["load"]``) running
    beside; the overhead is the rest of the step's wall time (serialisation, object store transfers, scheduling,
    driver work).
    """
    step = times["step"]  # the whole step, driver work (sampling prompts, advantages) included
    if overlapped:
        compute = role_seconds.get("values", 0.0) + learn_s + times["rollout_wait"] + sync["publish"]
    else:
        compute = generate_s + max(role_seconds.values()) + learn_s + sync["publish"] + sync["load"]
    tokens = float(batch.response_mask.sum())
    return {
        "time/generate": times["generate"], "time/reward": role_seconds["reward"],
        # a role's time where the role ran: no reference actors (LoRA, none at ppo.kl_coef=0), no time/reference
        **({"time/reference": role_seconds["reference"]} if "reference" in role_seconds else {}),
        "time/values": role_seconds.get("values", 0.0),
        "time/score_wall": times["score_wall"], "time/learn": times["learn"],
        "time/rollout_wait": times["rollout_wait"],
        **({"time/values_wall": times.get("values", 0.0)} if overlapped else {}),
        "time/weight_sync": times["weight_sync"], "time/step": step,
        "time/compute_generate": generate_s, "time/compute_learn": learn_s,
        "time/weight_publish": sync["publish"], "time/weight_load": sync["load"],
        # what the engines received: the policy (or its adapters) in their dtype; none where no load happened
        **({"weights/bytes": float(sync["report"]["bytes"])} if "bytes" in (sync.get("report") or {}) else {}),
        "time/overhead": step - compute, "time/overhead_fraction": (step - compute) / step,
        "throughput/tokens_per_s": tokens / step,
        "throughput/generate_tokens_per_s": tokens / times["generate"],
    }
