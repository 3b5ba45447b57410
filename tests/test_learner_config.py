"""The learner's DeepSpeed set-up: communication buckets sized from the model, not DeepSpeed's fixed 5e8; no JIT build
that training does not need, and no wait on a dead build's lock."""
from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.actors.learner import communication_buckets, deepspeed_config
from rlhf_ray.cluster.roles import ModelPaths
from rlhf_ray.drivers.ppo import ppo_learner
from rlhf_ray.runtime.builds import clear_stale_build_locks, skip_cpu_shm_comm_op
from tests.conftest import tiny_config


def test_buckets_are_a_tenth_of_the_model_within_bounds():
    assert communication_buckets(269_030_592, 576)["reduce_bucket_size"] == 26_902_528  # SmolLM2 policy + critic
    assert communication_buckets(1_000, 64)["reduce_bucket_size"] == 64 * 64             # floor: hidden²
    buckets = communication_buckets(12_345_678, 100)
    assert all(buckets[k] % 8 == 0 for k in ("reduce_bucket_size", "allgather_bucket_size"))  # DeepSpeed alignment
    assert communication_buckets(26_000_000_000, 5120)["allgather_bucket_size"] == 499_999_744  # under the 5e8 cap
    assert communication_buckets(10**9, 4096)["stage3_param_persistence_threshold"] == 40_960


def test_zero_config_carries_the_buckets_only_when_zero_is_on(tmp_path, tiny_cache):
    model = torch.nn.Linear(100, 100)
    model.config = SimpleNamespace(hidden_size=100)
    paths = ModelPaths(policy="p", reference="p", reward=None, value=None)

    def zero(stage: int) -> dict:
        spec = ppo_learner(tiny_config(tmp_path, tiny_cache, f"deepspeed.zero_stage={stage}"), paths)
        return deepspeed_config(spec, model)["zero_optimization"]

    assert zero(2)["stage"] == 2 and zero(2)["reduce_bucket_size"] == 9 * 1024  # hidden² = 10,000, rounded to 1024s
    assert zero(0) == {"stage": 0}


def test_a_dead_builds_lock_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dead, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (dead, live):
        lock.parent.mkdir()
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(dead, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks() == [str(dead)]
    assert not dead.exists() and live.exists()
    assert "deepspeed_shm_comm/lock, left by a JIT build killed half-way" in capsys.readouterr().err


def test_deepspeed_builds_no_shared_memory_op_for_training_on_cpu():
    skip_cpu_shm_comm_op()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None  # no C++ build, no lock to wait on


def test_bf16_is_chosen_where_the_cpu_multiplies_bf16_natively_and_refused_where_it_would_be_emulated(monkeypatch):
    import torch

    from rlhf_ray.runtime import devices

    for amx, avx512, expected in ((True, True, "AMX (and AVX512-BF16)"), (False, True, "AVX512-BF16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512=avx512: avx512)
        assert devices.cpu_bf16() == (True, expected)
        devices.require_cpu_bf16("the learner", "deepspeed.precision")  # allowed
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    native, has = devices.cpu_bf16()
    assert not native and has.startswith("no AVX512-BF16, AMX or Arm BF16")
    with pytest.raises(RuntimeError, match=r"the learner is set to bf16 \(deepspeed.precision\).*emulate.*"
                                           r"Set deepspeed.precision to fp32"):
        devices.require_cpu_bf16("the learner", "deepspeed.precision")


def test_bf16_accumulates_gradients_in_fp32_under_zero_1(tmp_path, tiny_cache):
    model = torch.nn.Linear(100, 100)
    model.config = SimpleNamespace(hidden_size=100)
    paths = ModelPaths(policy="p", reference="p", reward=None, value=None)

    def config(*overrides) -> dict:
        return deepspeed_config(ppo_learner(tiny_config(tmp_path, tiny_cache, *overrides), paths), model)

    bf16 = config("deepspeed.precision=bf16", "deepspeed.zero_stage=1")
    assert bf16["bf16"] == {"enabled": True} and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in config("deepspeed.precision=bf16", "deepspeed.zero_stage=0")
    assert config()["bf16"] == {"enabled": False} and "data_types" not in config()


ONE_UPDATE = r"""
import sys, types
import torch
root, policy, critic, stage, precision, out = sys.argv[1:]
sys.path[:0] = [root, root + "/benchmarks"]
from learner_profile import make_learner, ragged_batch
from transformers import AutoConfig

setting = {"zero_stage": int(stage), "precision": precision, "padding_free": True, "logits_chunk_tokens": None}
learner = make_learner(policy, critic, setting, types.SimpleNamespace(mini=4, micro=2, batch=8, threads=1))
for group in learner.engine.optimizer.param_groups:
    group["lr"] = 1e-3  # a step the weights show in fp32
before = torch.cat([p.detach().float().flatten() for p in learner.engine.module.parameters()])
learner.train(ragged_batch(AutoConfig.from_pretrained(policy).vocab_size, 8, 12, 8, 0))
after = torch.cat([p.detach().float().flatten() for p in learner.engine.module.parameters()])
torch.save({"before": before, "after": after}, out)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_1_on_one_rank_updates_the_weights_as_zero_0_does(tiny_cache, tmp_path, precision):
    """At world size 1 the learner skips DeepSpeed's gradient all-reduce where it only averages (ZeRO-0, the
    BF16_Optimizer), and must keep it where it hands the gradients to ZeRO's optimizer: a skipped reduction there
    would leave ZeRO-1's fp32 optimizer stepping with no gradients. Each update runs in a fresh process, as DeepSpeed
    sets up once per process (the two run side by side)."""
    import subprocess
    import sys

    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.runtime.devices import cpu_bf16

    if precision == "bf16" and not cpu_bf16()[0]:
        pytest.skip(f"this CPU has {cpu_bf16()[1]}: bf16 is refused here")
    root = str(Path(__file__).resolve().parent.parent)
    policy, critic = resolve_model("tiny:policy", tiny_cache), resolve_model("tiny:reward", tiny_cache)
    outs = {stage: tmp_path / f"zero{stage}.pt" for stage in (0, 1)}
    updates = [subprocess.Popen([sys.executable, "-c", ONE_UPDATE, root, policy, critic, str(stage), precision,
                                 str(out)]) for stage, out in outs.items()]  # side by side: one process each
    assert [update.wait(timeout=600) for update in updates] == [0, 0]
    weights = {stage: torch.load(out) for stage, out in outs.items()}
    zero0, zero1 = weights[0], weights[1]
    assert torch.equal(zero0["before"], zero1["before"])
    moved = (zero1["after"] - zero1["before"]).abs()
    assert moved.max() > 1e-4, "ZeRO-1 did not update the weights"
    if precision == "fp32":
        torch.testing.assert_close(zero1["after"], zero0["after"], rtol=0, atol=1e-6)
    else:  # ZeRO-0 in bf16 accumulates in bf16, ZeRO-1 in fp32: the same step up to bf16 rounding
        step0, step1 = zero0["after"] - zero0["before"], zero1["after"] - zero1["before"]
        assert torch.nn.functional.cosine_similarity(step0, step1, dim=0) > 0.9
