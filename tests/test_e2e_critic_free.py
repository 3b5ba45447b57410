"""Critic-free RL end to end on the real engines: GRPO and RLOO learn the verifiable tiny task that PPO with GAE
learns in tests/test_e2e_ppo.py (same seed, model, reward and 32 sequences a step: 8 prompts × 4 samples here)."""
from __future__ import annotations

import pytest

from tests.conftest import tiny_config
from tests.test_e2e_ppo import LEARN_STEPS, SYNC_ATOL, assert_learns

pytestmark = pytest.mark.e2e

CRITIC_FREE = ["models.policy=tiny:policy-tied", "models.reward.kind=function",
               "models.reward.function=rlhf_ray.rewards:char_frequency", "models.reward.function_kwargs={char: e}",
               f"ppo.total_episodes={8 * (LEARN_STEPS + 2)}", "ppo.rollout_batch_size=8",
               "generation.n_samples_per_prompt=4", "ppo.mini_batch_size=16", "ppo.micro_batch_size=8",
               "ppo.epochs=2", "ppo.kl_coef=0.01", "optimizer.lr=2e-3", "optimizer.schedule=constant",
               "optimizer.warmup_ratio=0"]
# every option the issue adds, at once: clip-higher, sequence-mean loss, KL as a k3 loss term, TIS between the
# learner's old logprobs and the sampler's, DAPO's overlong shaping, the subtracting non-EOS penalty, dynamic sampling
EVERY_OPTION = ["ppo.advantage=grpo", "ppo.clip_range_high=0.28", "ppo.loss_aggregation=seq_mean_token_mean",
                "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.kl_coef=0.01", "ppo.old_logprobs=learner",
                "ppo.is_correction=tis", "ppo.overlong_buffer=8", "ppo.non_eos_penalty=-0.1",
                "ppo.non_eos_penalty_mode=subtract", "ppo.dynamic_sampling=true"]
COMPARED = ("reward/mean", "score/mean", "kl/mean", "loss/policy", "loss/kl", "response/tokens", "optim/grad_norm",
            "is/weight_mean")


def policy_parameters(trainer) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(trainer.paths.policy).parameters())


def test_grpo_with_every_option_learns_builds_no_critic_and_resumes_exactly(ray_session, tiny_cache, tmp_path):
    from rlhf_ray.drivers.ppo import PPOTrainer

    trainer = PPOTrainer(tiny_config(tmp_path, tiny_cache, *CRITIC_FREE, *EVERY_OPTION))
    try:
        metrics = [trainer.step() for _ in range(LEARN_STEPS)]
        assert trainer.roles.learner_parameters() == policy_parameters(trainer)  # the policy alone: no critic
        path, step = trainer.save_checkpoint(), trainer.step_count
        first = trainer.step()
        trainer.restore(path)
        trainer.metrics_log.rewind(step)
        again = trainer.step()
    finally:
        trainer.shutdown()
    assert_learns([m["score/mean"] for m in metrics])
    for key in COMPARED:  # the step after a restore is the same step, with every option on
        assert again[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), (key, first[key], again[key])
    assert all("loss/value" not in m and "value/mean" not in m for m in metrics)
    assert all(m["loss/kl"] > 0 for m in metrics[1:])  # the KL is a loss term, and the policy left the reference
    # synced fp32 weights: the learner's old logprobs are the sampler's, so TIS weighs every token 1
    assert max(abs(m["is/weight_mean"] - 1) for m in metrics) < SYNC_ATOL
    assert max(m["is/weight_max"] for m in metrics) < 1 + SYNC_ATOL and max(m["is/mismatch_kl"] for m in metrics) < 1e-6
    assert {m["sampling/filled_with_equal"] for m in metrics} == {0.0}  # every group kept differs in score


def test_rloo_learns_with_no_values_pass_and_a_reference_kept_at_kl0(ray_session, tiny_cache, tmp_path):
    """Dr. GRPO's length-free loss with no KL (ppo.kl_coef=0), the reference kept to watch the drift
    (ppo.reference=keep; without it there would be none: tests/test_console_and_report.py)."""
    from rlhf_ray.drivers.ppo import PPOTrainer

    trainer = PPOTrainer(tiny_config(tmp_path, tiny_cache, *CRITIC_FREE, "ppo.advantage=rloo",
                                     "ppo.loss_aggregation=seq_mean_token_sum", "ppo.kl_coef=0",
                                     "ppo.reference=keep"))
    try:
        metrics = [trainer.step() for _ in range(LEARN_STEPS)]
        assert trainer.roles.learner_parameters() == policy_parameters(trainer)
        assert len(trainer.roles.references) == 1  # kept: a reference actor, as with a KL that weighs
    finally:
        trainer.shutdown()
    assert_learns([m["score/mean"] for m in metrics])
    # old logprobs are the sampler's and there are no values: the learner does not take part in scoring
    assert trainer.old_logprobs == "sampler" and trainer.is_correction == "none"
    assert {m["time/values"] for m in metrics} == {0.0} and all("is/weight_mean" not in m for m in metrics)
    # the KL is logged and the policy drifts from the reference, but it weighs 0: the reward is the score
    assert all(m["time/reference"] > 0 for m in metrics) and metrics[-1]["kl/mean"] != 0
    assert all(m["reward/mean"] == pytest.approx(m["score/effective_mean"], abs=1e-6) for m in metrics)
