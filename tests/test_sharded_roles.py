"""Sharded frozen roles (resources.<role>.sharded, ZeRO-3 inference over 2 ranks): scores and reference logprobs
equal the unsharded model's in fp32, each rank holds about half of the parameters, and a PPO step with both roles
sharded is the unsharded step."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config

pytestmark = pytest.mark.e2e


def rollout(trainer):
    """A real rollout of the tiny policy (8 prompts × 2 samples) from the trainer's engines."""
    prompts = [trainer.dataset.prompts[i] for i in range(8)]
    batch, _ = trainer.roles.generate(prompts, list(range(0, 8 * 1024, 1024)))
    return batch


def sharded_group(cls, *args):
    """Two actors of ``cls`` holding one model between them (ranks 0 and 1), set up together."""
    import ray

    actors = [ray.remote(cls).options(num_cpus=0.1).remote(*args, shard=(rank, 2), timeout_s=120) for rank in range(2)]
    addr, port = ray.get(actors[0].master_address.remote(), timeout=120)
    ray.get([a.setup.remote(addr, port) for a in actors], timeout=300)
    return actors


def on_halves(actors, method: str, batch) -> torch.Tensor:
    """Each rank on its own half of the batch, as the roles call them; the halves joined."""
    import ray

    results = ray.get([getattr(a, method).remote(part) for a, part in zip(actors, batch.chunks(2))], timeout=300)
    return torch.cat([out for out, _ in results])


@pytest.fixture(scope="module")
def plain_trainer(ray_session, tiny_cache, tmp_path_factory):
    from rlhf_ray.drivers.ppo import PPOTrainer

    trainer = PPOTrainer(tiny_config(tmp_path_factory.mktemp("plain"), tiny_cache, "ppo.total_episodes=32",
                                     "ppo.rollout_batch_size=16"))
    yield trainer
    trainer.shutdown()


def test_sharded_rm_and_reference_equal_the_whole_models_with_half_the_parameters_each(plain_trainer):
    import ray

    from rlhf_ray.actors.reference import ReferenceActor
    from rlhf_ray.actors.reward import RewardActor

    cfg, paths = plain_trainer.cfg, plain_trainer.paths
    batch = rollout(plain_trainer)
    whole_scores, _ = plain_trainer.roles.score(batch, roles=("reward", "reference"))

    reward = sharded_group(RewardActor, cfg.models.reward.model_dump(), paths.reward, "float32")
    reference = sharded_group(ReferenceActor, paths.reference, "float32", cfg.ppo.micro_batch_size,
                              cfg.generation.temperature)
    try:
        torch.testing.assert_close(on_halves(reward, "score", batch), whole_scores["scores"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(on_halves(reference, "logprobs", batch), whole_scores["ref_logprobs"],
                                   atol=1e-6, rtol=1e-6)
        for actors, unsharded in ((reward, plain_trainer.roles.rewards[0]), (reference, plain_trainer.roles.references[0])):
            whole = ray.get(unsharded.resident_parameter_bytes.remote())
            held = ray.get([a.resident_parameter_bytes.remote() for a in actors])
            assert all(0.45 * whole < h < 0.55 * whole for h in held), (held, whole)  # about half each
    finally:
        for actor in reward + reference:
            ray.kill(actor)


def assert_same(got: dict, expected: dict) -> None:
    """The step's figures agree as far as their inputs do: sharded scores and reference logprobs may differ from the
    whole models' in the last float32 bits (up to 1e-6 above), and loss/policy, a mean of whitened advantages of
    either sign, keeps that absolute error while the figure itself is near 0 (2e-3 here)."""
    for key in ("reward/mean", "score/mean", "kl/mean", "loss/policy", "loss/value", "optim/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_a_ppo_step_with_sharded_frozen_roles_is_the_unsharded_step(plain_trainer, tiny_cache, tmp_path):
    """… and stays so after a rank of the sharded RM is lost and the group restarts."""
    import ray

    from rlhf_ray.drivers.ppo import PPOTrainer

    sharded = PPOTrainer(tiny_config(tmp_path, tiny_cache, "ppo.total_episodes=32", "ppo.rollout_batch_size=16",
                                     "resources.reward.num_actors=2", "resources.reward.sharded=true",
                                     "resources.reference.num_actors=2", "resources.reference.sharded=true",
                                     "resources.reward.num_cpus=0.1", "resources.reference.num_cpus=0.1"))
    try:
        assert plain_trainer.step_count == 0
        expected, got = plain_trainer.step(), sharded.step()
        assert_same(got, expected)
        # a rank of the sharded RM dies: the other fails inside a gather with it; the whole group is started anew
        ray.kill(sharded.roles.rewards[1], no_restart=True)
        expected, got = plain_trainer.step(), sharded.step()
        assert sharded.roles.restarts["reward"] == 1
        assert_same(got, expected)
    finally:
        sharded.shutdown()
