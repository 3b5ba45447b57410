"""The planner (rlhf_ray.planning, python -m rlhf_ray.plan): sizing formulas, fits and fixes, the CLI.

Fast: hub names resolve from the built-in architecture table, no weights are loaded, no Ray, no vLLM.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.planning import PlannerError, format_plan, get_hardware, plan_experiment, resolve_architecture
from rlhf_ray.planning.hardware import this_machine
from rlhf_ray.planning.memory import model_states, training_activation_bytes
from rlhf_ray.planning.timing import zero_traffic_bytes

ROOT = Path(__file__).resolve().parent.parent
TULU = ROOT / "configs" / "tulu25_ppo_13b.yaml"
H100 = get_hardware("h100-80gb")


def tulu(*overrides: str):
    return load_config(TULU, list(overrides))


# ------------------------------------------------------------------------------------------------ formulas

def test_known_architectures_match_published_parameter_counts():
    assert resolve_architecture("meta-llama/Llama-2-7b-hf").parameters("lm") == pytest.approx(6.74e9, rel=0.01)
    assert resolve_architecture("allenai/tulu-2-13b").parameters("lm") == pytest.approx(13.0e9, rel=0.01)
    assert resolve_architecture("allenai/tulu-v2.5-70b-uf-rm").parameters("score") == pytest.approx(68.7e9, rel=0.01)
    assert resolve_architecture("facebook/opt-6.7b").parameters("lm") == pytest.approx(6.66e9, rel=0.01)
    assert resolve_architecture("facebook/opt-350m").parameters("lm") == pytest.approx(331e6, rel=0.01)


def test_kv_cache_of_llama2_70b_is_320_kib_per_token_in_bf16():
    arch = resolve_architecture("meta-llama/Llama-2-70b-hf")
    assert arch.kv_bytes_per_token(2) == 320 * 1024


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("world", [1, 4, 8])
def test_zero3_model_states_are_16_bytes_per_parameter_over_world(precision, world):
    n = 13_000_000_000
    items = model_states(n, "policy", precision, 3, world, offload_optimizer=False, offload_params=False)
    assert sum(i.bytes for i in items) == pytest.approx(16 * n / world)


def test_zero_stages_partition_more_and_offload_moves_states_to_the_host():
    n, world = 1_000_000_000, 8
    per_stage = [sum(i.bytes for i in model_states(n, "p", "bf16", z, world, False, False)) for z in range(4)]
    assert per_stage[0] == pytest.approx(16 * n)
    assert per_stage == sorted(per_stage, reverse=True)
    offloaded = model_states(n, "p", "bf16", 3, world, offload_optimizer=True, offload_params=True)
    on_device = sum(i.bytes for i in offloaded if i.where == "device")
    assert on_device == pytest.approx(2 * n / world)  # only the bf16 gradient partition stays


def test_activations_with_checkpointing_are_smaller():
    arch = resolve_architecture("allenai/tulu-2-13b")
    full = training_activation_bytes(arch, micro=2, seq=2048, precision="bf16", checkpointing=False)
    ckpt = training_activation_bytes(arch, micro=2, seq=2048, precision="bf16", checkpointing=True)
    # Korthikanti: 34·s·b·h per layer without the attention scores; 2·s·b·h per layer + one layer with recompute
    assert full == pytest.approx(40 * 34 * 2048 * 2 * 5120)
    assert ckpt == pytest.approx(40 * 2 * 2048 * 2 * 5120 + 34 * 2048 * 2 * 5120)
    assert ckpt < full / 5
    assert training_activation_bytes(arch, 2, 2048, "fp32", True) == pytest.approx(2 * ckpt)


def test_zero3_moves_more_bytes_than_zero2():
    cfg = tulu()
    z2 = zero_traffic_bytes(cfg.deepspeed.model_copy(update={"zero_stage": 2}), 1e9, 8, 64, 1)
    z3 = zero_traffic_bytes(cfg.deepspeed, 1e9, 8, 64, 1)
    assert z3 > z2 > 0
    assert zero_traffic_bytes(cfg.deepspeed, 1e9, 1, 64, 1) == 0


# ------------------------------------------------------------------------------------------------ fits, fixes

def test_a_70b_rm_on_one_80gb_gpu_does_not_fit_and_the_fix_shards_it():
    cfg = tulu("resources.reward.num_actors=1", "resources.reward.num_gpus=1", "resources.reward.sharded=false")
    plan = plan_experiment(cfg, H100, gpus=32, nodes=4)
    reward_problems = [p for p in plan.problems if p.role == "reward"]
    assert reward_problems and "GiB of 79.2" in reward_problems[0].message
    fix = reward_problems[0].fix
    assert fix is not None and "resources.reward.sharded=true" in fix.overrides
    fixed = plan_experiment(tulu(*cfg_overrides(cfg), *fix.overrides), H100, gpus=32, nodes=4, search=False)
    assert not [p for p in fixed.problems if p.role == "reward"]


def cfg_overrides(cfg) -> list[str]:
    res = cfg.resources.reward
    return [f"resources.reward.num_actors={res.num_actors}", f"resources.reward.num_gpus={res.num_gpus}",
            f"resources.reward.sharded={str(res.sharded).lower()}"]


def test_a_learner_that_does_not_fit_gets_the_smallest_change():
    cfg = tulu("deepspeed.zero_stage=2", "deepspeed.gradient_checkpointing=false")
    plan = plan_experiment(cfg, H100, gpus=32, nodes=4)
    learner = next(p for p in plan.problems if p.role == "learner")
    assert learner.fix is not None and len(learner.fix.overrides) <= 2
    fixed = plan_experiment(tulu("deepspeed.zero_stage=2", "deepspeed.gradient_checkpointing=false",
                                 *learner.fix.overrides), H100, gpus=32, nodes=4, search=False)
    assert not [p for p in fixed.problems if p.role == "learner"]


def test_the_13b_plus_70b_config_fits_16_gpus_on_2_nodes_and_search_finds_a_layout():
    plan = plan_experiment(tulu(), "h100-80gb", gpus=16, nodes=2, config_path=str(TULU))
    assert plan.fits, [p.message for p in plan.problems]
    assert sum(1 for d in plan.layout.devices if d.actors) <= 16
    assert plan.recommendation is not None and plan.recommendation.gpus_reserved <= 16
    assert set(plan.phases) == {"generate", "score", "learn", "weight_sync"}
    assert plan.step_seconds == pytest.approx(sum(p.seconds for p in plan.phases.values()))


def test_too_many_gpus_requested_is_a_problem():
    plan = plan_experiment(tulu("resources.learner.num_actors=16"), H100, gpus=16, nodes=2)
    assert any(p.role == "layout" and "16 available" in p.message for p in plan.problems)


def test_more_learner_ranks_learn_faster():
    fast = plan_experiment(tulu("resources.learner.num_actors=16"), H100, gpus=32, nodes=4, search=False)
    slow = plan_experiment(tulu("resources.learner.num_actors=4", "deepspeed.offload_optimizer=true"), H100, gpus=32,
                           nodes=4, search=False)
    assert fast.phases["learn"].seconds < slow.phases["learn"].seconds


def test_a_critic_free_learner_is_planned_without_the_critic():
    def learner(*overrides):
        plan = plan_experiment(tulu("generation.n_samples_per_prompt=2", "ppo.mini_batch_size=128", *overrides), H100,
                               gpus=32, nodes=4, search=False)
        return next(r for r in plan.roles if r.role == "learner"), plan
    (gae, gae_plan), (grpo, grpo_plan) = learner(), learner("ppo.advantage=grpo")
    assert any("critic" in i.what for i in gae.items) and not any("critic" in i.what for i in grpo.items)
    # a 13B policy without its 13B critic: the model states halve, the learn phase is about half as long
    assert grpo.device_bytes < 0.6 * gae.device_bytes
    assert grpo_plan.phases["learn"].seconds < 0.6 * gae_plan.phases["learn"].seconds
    assert "critic" in gae_plan.models and "critic" not in grpo_plan.models
    assert "critic" not in "\n".join(format_plan(grpo_plan))


def test_a_lora_run_is_planned_with_a_frozen_base_no_reference_role_and_its_sync():
    def plan(*overrides):
        return plan_experiment(tulu("deepspeed.zero_stage=2", *overrides), H100, gpus=32, nodes=4, search=False)
    full, lora, adapter = plan(), plan("models.lora.rank=64"), plan("models.lora.rank=64", "weights.transport=adapter")
    learner = lambda p: next(r for r in p.roles if r.role == "learner")  # noqa: E731
    policy = resolve_architecture("allenai/tulu-2-13b")
    # Llama-2 13B, rank 64 on q, k, v, o, gate, up, down: 250 M adapter parameters (PEFT counts the same)
    assert policy.lora_params(64) == 64 * 40 * (4 * (5120 + 5120) + 3 * (5120 + 13824))
    frozen = next(i for i in learner(lora).items if i.what == "policy frozen weights")
    assert frozen.bytes == policy.parameters("lm") * 2  # bf16
    # ZeRO-2 over 8 ranks: the base keeps its 2·N, its gradients and Adam states (1.75·N a rank) go
    assert learner(lora).device_bytes < learner(full).device_bytes - 1.5 * policy.parameters("lm")
    assert "reference" in full.models and "reference" not in lora.models
    assert not any(r.role == "reference" for r in lora.roles)
    assert lora.phases["learn"].seconds < full.phases["learn"].seconds   # no weight gradients for the base
    assert lora.phases["score"].parts["values"] > full.phases["score"].parts["values"]  # + the reference pass
    # the adapter path sends 0.47 GiB instead of 24 GiB, but through the object store: on GPUs an NCCL broadcast of the
    # merged weights is predicted faster
    assert "0.47 GiB via adapter" in adapter.phases["weight_sync"].bound
    assert "24.24 GiB via collective" in lora.phases["weight_sync"].bound


def test_planning_a_hub_config_is_fast_and_prints_every_section():
    started = time.perf_counter()
    plan = plan_experiment(tulu(), "h100-80gb", gpus=16, nodes=2)
    assert time.perf_counter() - started < 1.0
    text = "\n".join(format_plan(plan))
    for section in ("Models", "Memory per device", "Devices", "Step (predicted)", "KV cache"):
        assert section in text


def test_cpu_plan_puts_every_role_on_the_host():
    machine = this_machine(peak_flops_fp32=100e9, peak_flops_16bit=100e9, memory_bandwidth=20e9, cores=2)
    cfg = tulu("resources.generation.num_gpus=0", "resources.generation.tensor_parallel_size=1",
               "resources.reward.num_gpus=0", "resources.reference.num_gpus=0", "resources.learner.num_gpus=0",
               "models.policy=HuggingFaceTB/SmolLM2-135M-Instruct", "models.reward.model=HuggingFaceTB/SmolLM2-135M",
               "models.value_model=null", "resources.reward.num_actors=1", "resources.learner.num_actors=1",
               "resources.generation.num_actors=1")
    plan = plan_experiment(cfg, machine)
    assert len(plan.layout.devices) == 1 and len(plan.layout.devices[0].actors) == 4
    assert plan.step_seconds > 0 and plan.gpus == 0


# ------------------------------------------------------------------------------------------------ models

def test_unknown_hub_name_is_one_clear_error():
    with pytest.raises(PlannerError, match="unknown model 'nobody/no-such-model-7b'"):
        resolve_architecture("nobody/no-such-model-7b")


def test_a_local_directory_is_read_from_its_config_json(tmp_path):
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = resolve_architecture(str(tmp_path))
    assert (arch.hidden, arch.layers, arch.kv_heads, arch.head_dim) == (256, 4, 2, 64)
    per_layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 1024 + 2 * 256
    assert arch.parameters("lm") == 4 * per_layer + 256 + 1000 * 256


def test_a_hub_name_in_the_local_hf_cache_is_read_from_there(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someorg--cached-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 500}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    arch = resolve_architecture("someorg/cached-llama")
    assert (arch.hidden, arch.layers, arch.kv_heads) == (128, 2, 4) and "local HF cache" in arch.source


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_prints_the_plan_and_writes_json(tmp_path, capsys):
    from rlhf_ray.cli.plan import main

    out = tmp_path / "plan.json"
    code = main([str(TULU), "--gpus", "16", "--gpu", "h100-80gb", "--nodes", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "Fits." in printed and "Step (predicted)" in printed
    data = json.loads(out.read_text())
    assert data["fits"] is True and data["gpus"] == 16 and data["nodes"] == 2
    assert set(data["phases"]) == {"generate", "score", "learn", "weight_sync"}
    assert data["models"]["reward"]["parameters"] == pytest.approx(68.7e9, rel=0.01)


def test_cli_unknown_model_exits_2_with_one_line(capsys):
    from rlhf_ray.cli.plan import main

    code = main([str(TULU), "models.policy=nobody/no-such-model-7b", "--gpu", "h100-80gb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown model" in err[0]


def test_train_plans_at_startup_and_an_unknown_model_is_only_a_note(tmp_path, caplog):
    import logging

    from rlhf_ray.planning.planner import plan_at_startup

    cfg = tulu(f"output_dir={tmp_path}", "resources.reward.num_actors=1", "resources.reward.sharded=false")
    with caplog.at_level(logging.INFO, logger="rlhf_ray.plan"):
        plan = plan_at_startup(cfg)  # no GPU here: planned for the H100s it asks for; a 70B RM on one does not fit
    assert plan is not None and (tmp_path / "plan.json").is_file()
    assert any(r.message.startswith("plan: predicted step") for r in caplog.records)
    assert not plan.fits and any(r.levelno == logging.WARNING and "fix:" in r.message for r in caplog.records)
    unknown = tulu(f"output_dir={tmp_path / 'u'}", "models.policy=nobody/no-such-model-7b")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_ray.plan"):
        assert plan_at_startup(unknown) is None
    assert any(r.message.startswith("no plan for this config") for r in caplog.records)


def test_a_dtype_the_cpu_only_emulates_is_timed_on_small_matrices(monkeypatch):
    """Every product "takes" 50 ms on this clock: long enough at the first size, so no 1024² product of an
    emulated dtype (~1 GFLOP/s: ~2 s each) is run at every startup."""
    from rlhf_ray.planning import hardware

    clock = iter(range(1000))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(clock) * 0.05)
    assert hardware.measure_matmul_flops("bfloat16", threads=1) == pytest.approx(2 * 256**3 / 0.05)
    clock = iter(range(1000))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(clock) * 1e-3)  # fast: doubles up to 1024
    assert hardware.measure_matmul_flops("float32", threads=1) == pytest.approx(2 * 1024**3 / 1e-3)
