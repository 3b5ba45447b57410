"""The planner's validation cases (benchmarks/published_runs.yaml) stay complete and plannable: every case cites its
source and builds a valid config, and the script's emulations (colocated scoring, mini-batch split, datasheet GPUs)
do what they say. The errors themselves are benchmarks/results/planner_validation.md's, not asserted here."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs():
    name = "benchmarks_published_runs"  # benchmarks/ is no package: load the file under a name of its own
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "published_runs.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(runs):
    return runs.load_cases()


def test_every_case_cites_its_source_and_states_its_layout_and_lengths(data):
    cases = data["cases"]
    assert len(cases) >= 12 and len({c["system"] for c in cases}) >= 4
    assert len({c["id"] for c in cases}) == len(cases)
    for case in cases:
        assert case["algorithm"] in ("ppo", "grpo"), case["id"]
        assert all(case["source"].get(k) for k in ("url", "where", "quote")), case["id"]
        assert "step_s" in case["published"] or {"run_hours", "run_prompts"} <= set(case["published"]), case["id"]
        for length in ("prompt_tokens", "response_tokens"):
            assert case["workload"][length]["cap"] > 0, case["id"]
        assert case["layout"]["learner"] > 0 and case["layout"]["generation"]["engines"] > 0, case["id"]
        assert case["gpu"] in data.get("gpu_specs", {}) or case["gpu"] in _catalogue(), case["id"]


def _catalogue():
    from rlhf_ray.planning.hardware import GPUS

    return GPUS


def test_every_case_builds_a_valid_config(runs, data, tmp_path):
    paths = runs.write_architectures(data["architectures"], tmp_path)
    for case in data["cases"]:
        built = runs.build(case, paths, case["workload"]["micro_batch"] or 1, {"reference": False, "reward": False})
        assert built.cfg.resources.learner.num_actors == case["layout"]["learner"], case["id"]
        assert built.cfg.rollout_sequences == case["workload"]["prompts"] * case["workload"]["samples_per_prompt"]


def test_colocated_roles_add_their_scoring_passes_and_separate_ones_overlap(runs):
    parts = {"reward": 1.0, "reference": 4.0, "values": 2.0}
    phase = lambda seconds, **kw: SimpleNamespace(seconds=seconds, parts=kw.get("parts", {}),  # noqa: E731
                                                 alternatives=kw.get("alternatives", {}))
    planned = SimpleNamespace(phases={"generate": phase(10.0), "score": phase(4.0, parts=parts), "learn": phase(20.0),
                                      "weight_sync": phase(9.0, alternatives={"collective": 0.5})})
    overhead = runs.ROLE_CALL_OVERHEAD_S
    assert runs.compared_phases(planned, shared=True)["score"] == pytest.approx(7.0 - 2 * overhead)
    separate = runs.compared_phases(planned, shared=False)
    assert separate["score"] == 4.0 and separate["weight_sync"] == 0.5
    assert runs.compared_step(separate, async_steps=0) == pytest.approx(10 + 4 + 20 + 0.5)
    assert runs.compared_step(separate, async_steps=1) == pytest.approx(max(10, 4 + 20) + 0.5)


def test_a_mini_batch_the_ranks_cannot_split_is_raised_and_said(runs):
    case = {"id": "x", "layout": {"learner": 256}, "workload": {"prompts": 1024, "samples_per_prompt": 1,
                                                                 "mini_batch": 128}}
    overrides, adjusted = runs.batch_overrides(case, micro=1)
    assert "ppo.mini_batch_size=256" in overrides and adjusted
    case["layout"]["learner"] = 3
    with pytest.raises(ValueError, match="no mini-batch"):
        runs.batch_overrides(case, micro=1)


def test_a_gpu_outside_the_catalogue_comes_from_the_case_files_spec(runs):
    hw, note = runs.hardware_for("mi300x-192gb", {})
    assert hw.peak_flops_16bit == pytest.approx(1307.4e12) and "catalogue" in note
    spec = {"memory_gib": 48, "bf16_tflops": 200, "fp32_tflops": 50, "hbm_tbps": 1.0, "nvlink_gbps": 0,
            "pcie_gbps": 25, "nics": 4, "nic_gbit": 200, "devices_per_node": 8, "host_memory_gib": 512,
            "source": "a datasheet"}
    hw, note = runs.hardware_for("some-card", {"some-card": spec})   # the fields of --gpu-spec
    assert hw.peak_flops_16bit == pytest.approx(200e12) and hw.name == "some-card" and "a datasheet" in note
    with pytest.raises(ValueError, match="gpu_specs"):
        runs.hardware_for("no-such-gpu", {})


def test_static_batches_wait_for_their_longest_response(runs, data, tmp_path):
    """The published system's static generation batches (NeMo-Aligner's rollout micro-batches): one batch of an
    engine's whole share is the planner's own generate phase; smaller batches each wait for their longest."""
    from rlhf_ray.planning import get_hardware

    paths = runs.write_architectures(data["architectures"], tmp_path)
    case = next(c for c in data["cases"] if c["id"] == "nemo-aligner-llama3-70b-8+4-nodes")
    hw = get_hardware(case["gpu"])
    built = runs.build(case, paths, 1, {"reference": True, "reward": True})
    planned = runs.plan(built, hw, case["gpus"])
    share = built.cfg.rollout_sequences // built.cfg.resources.generation.num_actors
    whole = runs.static_batch_generate(built.cfg, planned, share)
    assert whole == pytest.approx(planned.phases["generate"].seconds, rel=1e-6)
    eight = runs.static_batch_generate(built.cfg, planned, 8)
    assert eight > 3 * whole   # 16 batches, each to the longest of 8, against one queue of 128
