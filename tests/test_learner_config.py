"""The learner's DeepSpeed set-up: communication buckets sized from the model, not DeepSpeed's fixed 5e8; no JIT build
that training does not need, and no wait on a dead build's lock."""
from __future__ import annotations

from types import SimpleNamespace

import importlib
import os
import time

import pytest
import torch

from actors.common import clear_stale_build_locks, skip_cpu_shm_comm_op
from actors.learner import communication_buckets, deepspeed_config
from rlhf_ray.cluster.roles import ModelPaths
from rlhf_ray.drivers.ppo import ppo_learner
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

    from actors import common

    for amx, avx512, expected in ((True, True, "AMX (and AVX512-BF16)"), (False, True, "AVX512-BF16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512=avx512: avx512)
        assert common.cpu_bf16() == (True, expected)
        common.require_cpu_bf16("the learner", "deepspeed.precision")  # allowed
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    native, has = common.cpu_bf16()
    assert not native and has.startswith("no AVX512-BF16, AMX or Arm BF16")
    with pytest.raises(RuntimeError, match=r"the learner is set to bf16 \(deepspeed.precision\).*emulate.*"
                                           r"Set deepspeed.precision to fp32"):
        common.require_cpu_bf16("the learner", "deepspeed.precision")


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
