"""The PPO driver. One step, in order:

    prompts → generate → score (reward ‖ reference ‖ values, concurrently) → advantages → learn
            → weight sync → metrics

Only this file knows the order of a step; the roles (rlhf_ray.roles) know how to split work over their
actors, the math lives in rlhf_ray.ppo_math.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager


from actors.common import process_memory
from rlhf_ray import preflight
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import ExperimentConfig, PPOConfig
from rlhf_ray.data import PromptSampler, load_prompts
from rlhf_ray.modeling import check_same_tokenizer
from rlhf_ray.ppo_math import gae, kl_penalty, masked_mean, masked_whiten, shape_rewards
from rlhf_ray.roles import ModelPaths, Roles, connect
from rlhf_ray.model_specs import resolve_model

log = logging.getLogger(__name__)


class PPOTrainer:
    def __init__(self, cfg: ExperimentConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        models = cfg.models
        resolve = lambda spec: resolve_model(spec, models.cache_dir, cfg.seed)  # noqa: E731
        reward = resolve(models.reward.model) if models.reward.kind == "model" else None
        self.paths = ModelPaths(policy=resolve(models.policy), reference=resolve(models.reference_path), reward=reward,
                                value=resolve(models.value_model_path) if models.value_init == "reward" else None)
        # everything checkable without a cluster is checked before one starts
        preflight.check_experiment(cfg, {"models.policy": self.paths.policy, "models.reference": self.paths.reference,
                                         "models.reward.model": self.paths.reward,
                                         "models.value_model": self.paths.value})
        if self.paths.value:
            check_same_tokenizer(self.paths.policy, self.paths.value, "the value model's source (models.value_init=reward)")
        if self.paths.reference != self.paths.policy:
            check_same_tokenizer(self.paths.policy, self.paths.reference, "the reference model (models.reference)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths.policy)
        self.dataset = load_prompts(cfg.data, self.tokenizer)
        self.sampler = PromptSampler(len(self.dataset), cfg.ppo.rollout_batch_size, cfg.seed, cfg.data.shuffle)
        if self.paths.reward:
            preflight.check_reward_template(models.reward, self.paths.reward, self.dataset.prompts[0].messages)
        if cfg.deepspeed.zero_stage > 0 and cfg.resources.learner.num_actors == 1:
            log.warning("deepspeed.zero_stage=%d with one learner rank partitions nothing but keeps extra fp32 "
                        "copies of the weights and gradients (SmolLM2-135M: peak 7.5 GB and 1.4x slower than with "
                        "0); set deepspeed.zero_stage=0 unless you are testing ZeRO", cfg.deepspeed.zero_stage)
        connect(cfg)
        start = time.perf_counter()
        self.roles = Roles(cfg, self.paths)
        self.startup_seconds = time.perf_counter() - start
        self.step_count = 0
        self.last_samples: list[dict] = []

    def step(self) -> dict[str, float]:
        """One PPO step; returns its metrics (rewards, KL, losses, and each phase's seconds)."""
        times: dict[str, float] = {}
        started = time.perf_counter()
        prompts = [self.dataset.prompts[i] for i in self.sampler.batch(self.step_count)]
        with phase(times, "generate"):
            batch, generate_s = self.roles.generate(prompts)
        with phase(times, "score_wall"):  # reward, reference and critic run at the same time
            scored, role_seconds = self.roles.score(batch)
        batch, rollout_stats = with_advantages(batch.with_(**scored), self.cfg.ppo)
        with phase(times, "learn"):
            learn_stats, learn_s = self.roles.learn(batch)
        with phase(times, "weight_sync"):
            sync = self.roles.sync_weights()
        self.step_count += 1
        self.last_samples = pick_samples(batch, self.cfg.logging.samples_per_step, self.step_count)
        memory = {**self.roles.memory(), "memory/driver_peak_gb": process_memory(reset_peak=True)["peak_gb"]}
        times["step"] = time.perf_counter() - started
        return {"step": self.step_count, **rollout_stats, **learn_stats, **memory,
                **step_timing(times, role_seconds, generate_s, learn_s, sync, batch)}

    def save(self, path: str) -> str:
        return self.roles.save(path)

    def shutdown(self) -> None:
        self.roles.shutdown()


@contextmanager
def phase(times: dict, name: str):
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


def with_advantages(batch: RolloutBatch, ppo: PPOConfig) -> tuple[RolloutBatch, dict[str, float]]:
    """Shape per-token rewards (score at the last token − β·KL), then GAE and whitening."""
    mask = batch.response_mask
    kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, ppo.kl_estimator) * mask
    rewards, scores = shape_rewards(batch.scores, kl, mask, ppo.kl_coef, batch.ended_with_eos,
                                    ppo.non_eos_penalty, ppo.reward_clip)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, batch.values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    per_sequence = rewards.sum(-1)
    lengths = mask.sum(-1)
    stats = {
        "reward/mean": float(per_sequence.mean()), "reward/std": float(per_sequence.std()),
        "score/mean": float(batch.scores.mean()), "score/std": float(batch.scores.std()),
        "score/effective_mean": float(scores.mean()),
        "kl/mean": float(kl.sum(-1).mean()),
        "kl/sampler_vs_learner": float(masked_mean((batch.gen_logprobs - batch.old_logprobs).abs(), mask)),
        "value/mean": float(masked_mean(batch.values, mask)),
        "response/length_mean": float(lengths.mean()),
        "response/eos_fraction": float(batch.ended_with_eos.float().mean()),
        "response/tokens": float(lengths.sum()),
    }
    return batch.with_(rewards=rewards, advantages=advantages, returns=returns), stats


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
                batch: RolloutBatch) -> dict[str, float]:
    """Wall time of each phase and the orchestration overhead.

    The roles' own compute on the step's critical path is generate + max(reward, reference, values)
    + learn + publish + load; the overhead is the rest of the step's wall time (serialisation, object
    store transfers, scheduling, driver work).
    """
    step = times["step"]  # the whole step, driver work (sampling prompts, advantages) included
    compute = generate_s + max(role_seconds.values()) + learn_s + sync["publish"] + sync["load"]
    tokens = float(batch.response_mask.sum())
    return {
        "time/generate": times["generate"], "time/reward": role_seconds["reward"],
        "time/reference": role_seconds["reference"], "time/values": role_seconds["values"],
        "time/score_wall": times["score_wall"], "time/learn": times["learn"],
        "time/weight_sync": times["weight_sync"], "time/step": step,
        "time/compute_generate": generate_s, "time/compute_learn": learn_s,
        "time/weight_publish": sync["publish"], "time/weight_load": sync["load"],
        "time/overhead": step - compute, "time/overhead_fraction": (step - compute) / step,
        "throughput/tokens_per_s": tokens / step,
        "throughput/generate_tokens_per_s": tokens / times["generate"],
    }
