"""The planner's layout search, fix search and weight-transport pricing (rlhf_ray.planning.search, .fixes, .timing).

Fast: architectures are built here (no config.json, no download), nothing starts; every search runs in well under a
second (the time at 4,096 GPUs is printed by the CLI: "combinations searched in … s").
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.planning import Architecture, get_hardware, plan_experiment, with_overrides
from rlhf_ray.planning.planner import recommend_layout
from rlhf_ray.planning.search import Search, role_options, step_of
from rlhf_ray.planning.timing import Placement, TransferRates, transport_prices

ROOT = Path(__file__).resolve().parent.parent
TULU = ROOT / "configs" / "tulu25_ppo_13b.yaml"
H100, A800 = get_hardware("h100-80gb"), get_hardware("a800-80gb")


def llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> Architecture:
    return Architecture(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                        head_dim=hidden // heads, intermediate=intermediate, vocab=32000, tied_embeddings=False)


L13, L70 = llama("llama-13b", 5120, 40, 40, 40, 13824), llama("llama-70b", 8192, 80, 64, 8, 28672)
L8 = dataclasses.replace(llama("llama-3-8b", 4096, 32, 32, 8, 14336), vocab=128256)
TULU_ARCHS = {"policy": L13, "reference": L13, "critic": L13, "reward": L70}  # Tulu 2.5: 13B policy, 70B RM
# a workload whose batches many counts divide (3840 = 2^8 · 3 · 5), so that the search can use thousands of GPUs
LARGE = ["ppo.rollout_batch_size=3840", "ppo.total_episodes=384000", "ppo.mini_batch_size=3840",
         "weights.transport=auto"]


def tulu(*overrides: str):
    return load_config(TULU, list(overrides))


def plan(cfg, gpus: int, hw=H100, archs=None, search: bool = True):
    return plan_experiment(cfg, hw, gpus=gpus, archs=archs or TULU_ARCHS, search=search)


# ------------------------------------------------------------------------------------------------ layout search

@pytest.mark.parametrize("gpus", [512, 1000])
def test_a_search_at_hundreds_of_gpus_leaves_no_gpu_idle_without_a_reason(gpus):
    rec = plan(tulu(*LARGE), gpus).recommendation
    assert rec is not None
    taken = sum(role.gpus for role in rec.roles)
    assert rec.gpus_reserved == taken and rec.idle_gpus == gpus - taken
    assert {role.role for role in rec.roles} == {"learner", "generation", "reward", "reference"}
    assert all(0 <= role.idle_share <= 1 and role.busy_seconds > 0 for role in rec.roles)
    if rec.idle_gpus:  # every role says why it does not take them
        assert sorted(reason.split(":")[0] for reason in rec.idle_reasons) == sorted(r.role for r in rec.roles)
        assert all(len(reason) > 30 for reason in rec.idle_reasons)
    assert rec.idle_gpus < gpus / 10


def test_an_idle_gpu_is_explained_by_the_batch_its_role_must_divide():
    rec = plan(tulu(), 16).recommendation   # batches of 64: 8 learner ranks, then 16
    assert rec.idle_gpus >= 1
    learner = next(r for r in rec.idle_reasons if r.startswith("learner"))
    assert "would not divide ppo.mini_batch_size = 64" in learner and "needs 8 more GPUs" in learner


def test_counts_that_are_not_powers_of_two_are_chosen_when_they_are_faster():
    cfg, gpus = tulu(*LARGE), 384
    options = role_options(cfg, H100, gpus, TULU_ARCHS)
    best = Search(cfg, H100, gpus, TULU_ARCHS, options).ranked(1)[0]
    powers = {role: [o for o in found if (o.count & (o.count - 1)) == 0] for role, found in options.items()}
    best_powers = Search(cfg, H100, gpus, TULU_ARCHS, powers).ranked(1)[0]
    counts = [o.count for o in best.options.values()]
    assert any(c & (c - 1) for c in counts), counts
    assert best.step < best_powers.step


def test_at_4096_gpus_generation_and_learning_get_gpus_in_step_with_their_time():
    rec = plan(tulu(*LARGE), 4096).recommendation
    assert rec is not None and rec.idle_gpus < 4096 / 10
    for role in (r for r in rec.roles if r.role in ("generation", "learner")):
        # no phase gets most of the GPUs for a small part of the step
        assert role.gpus / 4096 <= 2 * role.busy_seconds / rec.step_seconds, role


def test_overlapped_layouts_are_ranked_by_their_overlapped_step():
    gpus = 64
    overlapped, serial = tulu(*LARGE, "ppo.async_steps=1"), tulu(*LARGE)
    search = Search(overlapped, H100, gpus, TULU_ARCHS, role_options(overlapped, H100, gpus, TULU_ARCHS))
    ranked = search.ranked(50)
    assert all(c.step == pytest.approx(step_of(c.phases, 1)) for c in ranked)
    assert any(c.step < step_of(c.phases, 0) - 1e-9 for c in ranked)   # the overlap counts
    chosen = recommend_layout(overlapped, H100, gpus, TULU_ARCHS)
    full = plan(with_overrides(overlapped, chosen.overrides), gpus, search=False)
    g, l, w = (full.phases[k].seconds for k in ("generate", "learn", "weight_sync"))
    score = full.phases["score"].parts   # overlapped: reward and reference score beside generation
    assert chosen.step_seconds == pytest.approx(max(g + max(score["reward"], score["reference"]),
                                                    score["values"] + l) + w)
    # the layout ranked by the sum of the phases is no faster once overlapped
    by_sum = recommend_layout(serial, H100, gpus, TULU_ARCHS)
    assert plan(with_overrides(overlapped, by_sum.overrides), gpus, search=False).step_seconds >= chosen.step_seconds


def test_the_search_plans_without_a_reference_role():
    archs = {k: v for k, v in TULU_ARCHS.items() if k != "reference"}
    rec = plan(tulu(), 16, archs=archs).recommendation
    assert rec is not None
    assert not any(o.startswith("resources.reference") for o in rec.overrides)
    assert "reference" not in {r.role for r in rec.roles}


# ------------------------------------------------------------------------------------------------ fixes

def openrlhf_70b_on_16(*overrides: str):
    """OpenRLHF's published 70B layout on 16 A800s (examples/scripts/train_ppo_llama_ray_70b.sh): actor 4 + critic 4
    GPUs (here one learner of 8 ranks holding both), vLLM 2 × TP2, reference 2, reward 2; ZeRO-3, checkpointing."""
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        "models.policy=meta-llama/Llama-2-70b-hf", "models.reference=null", "models.reward.kind=model",
        "models.reward.model=meta-llama/Llama-2-70b-hf", "models.reward.max_length=2048", "models.value_init=reward",
        "models.value_model=null", "models.dtype=bfloat16", "data.max_prompt_tokens=1024",
        "generation.max_new_tokens=1024", "ppo.rollout_batch_size=1024", "ppo.total_episodes=1024",
        "ppo.mini_batch_size=128", "ppo.micro_batch_size=2", "models.reward.batch_size=1",
        "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "deepspeed.gradient_checkpointing=true",
        "resources.learner.num_actors=8", "resources.learner.num_gpus=1", "resources.generation.num_actors=2",
        "resources.generation.num_gpus=2", "resources.generation.tensor_parallel_size=2",
        "resources.reference.num_actors=2", "resources.reference.num_gpus=1", "resources.reference.sharded=true",
        "resources.reward.num_actors=2", "resources.reward.num_gpus=1", "resources.reward.sharded=true", *overrides])


SEVENTY = {"policy": L70, "reference": L70, "critic": L70, "reward": L70}


# 8 learner ranks on one node each load a 70B policy and a 70B critic in fp32 before ZeRO-3 partitions them: 4.5 TB
HOSTS_6TIB = dataclasses.replace(A800, host_memory_bytes=6 * 2**40)


def test_the_70b_layout_on_16_gpus_gets_offload_and_micro_batch_1_together():
    result = plan(openrlhf_70b_on_16(), 16, hw=HOSTS_6TIB, archs=SEVENTY)
    fix = next(p.fix for p in result.problems if p.role == "learner")
    assert fix.gpus_reserved <= 16, fix
    assert {"deepspeed.offload_optimizer=true", "ppo.micro_batch_size=1"} <= set(fix.overrides)
    fixed = plan(with_overrides(openrlhf_70b_on_16(), fix.overrides), 16, hw=HOSTS_6TIB, archs=SEVENTY, search=False)
    assert fixed.fits


def test_where_host_memory_rules_out_the_gpus_the_plan_says_so():
    result = plan(openrlhf_70b_on_16(), 16, hw=A800, archs=SEVENTY)   # 1 TiB per node: the ranks cannot even load
    learner = next(p for p in result.problems if p.role == "learner")
    assert learner.fix is None
    assert "within 16 GPUs" in learner.message and "host memory" in learner.message and "loading" in learner.message
    assert result.recommendation is None and "host memory" in result.no_layout_reason


# ------------------------------------------------------------------------------------------------ transports

def eight_b(*overrides: str):
    return tulu("models.policy=meta-llama/Meta-Llama-3-8B", "weights.transport=auto", *overrides)


EIGHT_B = {"policy": L8, "reference": L8, "critic": L13, "reward": L70}


def test_each_transport_is_priced_by_the_links_that_carry_it():
    cfg, full = eight_b(), L8.parameters("lm") * 2
    inside = transport_prices(cfg, L8, H100, Placement())
    across = transport_prices(cfg, L8, H100, Placement(engines_off_learner_node=True, engine_nodes_elsewhere=7))
    # the broadcast: NVLink inside a node, the node's NICs across nodes (8 × 400 Gb/s)
    assert inside["collective"].parts["broadcast"] == pytest.approx(full / (450e9 * 0.7))
    assert across["collective"].parts["broadcast"] == pytest.approx(full / (8 * 50e9 * 0.7))
    # through host memory: PCIe down and up, the object store, Ray's pulls doubling over the nodes (3 rounds for 7)
    files = across["files"].parts
    assert files["device_to_host"] == files["host_to_device"] == pytest.approx(full / H100.host_link_bandwidth)
    rates = TransferRates()
    assert files["cross_node_pull"] == pytest.approx(3 * full / rates.ray_object_transfer_bytes_per_s)
    assert "cross_node_pull" not in inside["files"].parts
    assert across["collective"].seconds < across["object_store"].seconds < across["files"].seconds


def test_auto_takes_the_cheapest_transport_that_serves_the_run_and_the_plan_reports_the_others():
    from rlhf_ray.weights import choose_transport

    sync = plan(eight_b(), 16, archs=EIGHT_B, search=False).phases["weight_sync"]
    assert "via collective" in sync.bound and sync.alternatives["files"] > 100 * sync.seconds
    # overlapped on GPUs too: the broadcast serves it (the engines between rollouts), the plan and the trainer take it
    cfg = eight_b("ppo.async_steps=2")
    assert choose_transport(cfg)[0] == "collective"   # the trainer: no prices, the registry's cheapest-first order
    overlapped = plan(cfg, 16, archs=EIGHT_B, search=False)
    sync = overlapped.phases["weight_sync"]
    assert "via collective" in sync.bound and sync.seconds < 1 and sync.alternatives["files"] > 100 * sync.seconds
    assert overlapped.step_seconds < plan(eight_b(), 16, archs=EIGHT_B, search=False).step_seconds


def test_on_one_cpu_machine_auto_keeps_the_object_store(tmp_path):
    from rlhf_ray.planning.hardware import this_machine

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"output_dir={tmp_path}"])
    tiny = llama("tiny", 64, 2, 2, 2, 128)
    cpu = this_machine(peak_flops_fp32=1e11, peak_flops_16bit=1e11, memory_bandwidth=1e10, cores=2)
    result = plan_experiment(cfg, cpu, archs={"policy": tiny, "reference": tiny, "critic": tiny, "reward": tiny},
                             search=False)
    assert "via object_store" in result.phases["weight_sync"].bound
    assert math.isfinite(result.step_seconds)


def test_where_the_priced_transport_is_not_the_trainers_the_plan_follows_the_price_and_says_so():
    from rlhf_ray.planning.hardware import this_machine
    from rlhf_ray.weights import choose_transport

    # CPU engines in their own processes (TP 2): files measured faster than the gloo broadcast
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["resources.generation.tensor_parallel_size=2",
                                                            "resources.generation.num_cpus=2"])
    tiny = llama("tiny", 64, 2, 2, 2, 128)
    cpu = this_machine(peak_flops_fp32=1e11, peak_flops_16bit=1e11, memory_bandwidth=1e10, cores=2)
    result = plan_experiment(cfg, cpu, archs={"policy": tiny, "reference": tiny, "critic": tiny, "reward": tiny},
                             search=False)
    assert choose_transport(cfg)[0] == "collective"
    assert "via files" in result.phases["weight_sync"].bound
    assert any("planned with files" in note for note in result.assumptions)
    learner = next(r for r in result.roles if r.role == "learner")
    assert any(i.what == "published weights (files, rank 0)" for i in learner.items)   # memory follows the transport


def test_a_judge_and_its_baseline_are_said_to_be_unpriced():
    from rlhf_ray.planning.hardware import this_machine

    judge = ["models.reward.kind=judge", "models.reward.model=tiny:policy", "models.value_init=policy"]
    tiny = llama("tiny", 64, 2, 2, 2, 128)
    cpu = this_machine(peak_flops_fp32=1e11, peak_flops_16bit=1e11, memory_bandwidth=1e10, cores=2)
    archs = {"policy": tiny, "reference": tiny, "critic": tiny, "reward": tiny}
    for extra, baseline_named in ([], False), (["models.reward.judge.mode=pairwise",
                                                "models.reward.judge.baseline=tiny:policy-tied"], True):
        cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*judge, *extra])
        (note,) = [n for n in plan_experiment(cfg, cpu, archs=archs, search=False).assumptions if "NOT priced" in n]
        assert "tiny:policy" in note and ("baseline's (tiny:policy-tied" in note) == baseline_named, note
