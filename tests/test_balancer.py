"""The closed-loop balancer's pure parts: the CPU model of shared cores, the fit, the calibration file and its checks,
the candidate layouts and the config written for the chosen one (rlhf_ray.planning.cores, .calibration, .balance;
rlhf_ray.cli.balance). Fast: probes are planned with given architectures and 'measured' from known factors; the one
run fitted from a real run directory rides on tests/test_console_and_report.py's main job."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, dump_config, load_config
from rlhf_ray.planning import Architecture, plan_experiment, with_overrides, write_plan
from rlhf_ray.planning.balance import choose, cpu_candidates, default_grid, reservations
from rlhf_ray.planning.calibration import (CalibrationError, Probe, calibrate, check, fit, load, predicted_seconds,
                                           with_calibration)
from rlhf_ray.planning.cores import SERIAL_SHARE_PRIOR, Group, Work, thread_plan
from rlhf_ray.planning.hardware import WORK_KINDS, WorkFactors, this_machine

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_cpu.yaml"
CPU = this_machine(peak_flops_fp32=1e11, peak_flops_16bit=1e11, memory_bandwidth=1e10, cores=2)
SMALL = Architecture(name="tiny-llama", hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, intermediate=128,
                     vocab=1000, tied_embeddings=False)
ARCHS = {"policy": SMALL, "reference": SMALL, "critic": SMALL, "reward": SMALL}
# what a machine 'measures' in these tests: every kind slower than planned, the rollout and learner mostly serial
TRUE = WorkFactors(time={"generate": 2.0, "reward": 0.5, "reference": 0.8, "values": 0.7, "learn": 1.3,
                         "weight_sync": 1.5},
                   serial={"generate": 0.8, "reward": 0.0, "reference": 0.0, "values": 0.0, "learn": 0.7,
                           "weight_sync": 1.0},
                   overhead_s={"sequential": 0.03, "overlapped": 0.01})


def tiny(*overrides: str):
    return load_config(TINY, ["ppo.rollout_batch_size=32", *overrides])


def planned(cfg, hw=CPU):
    return plan_experiment(cfg, hw, search=False, archs=ARCHS)


def probe(*overrides: str, truth: WorkFactors = TRUE) -> Probe:
    """A probe of the tiny config with ``overrides`` whose measured seconds are what ``truth`` predicts."""
    plan = planned(tiny(*overrides))
    return Probe(" ".join(overrides) or "as configured", plan, predicted_seconds(plan.work, plan.async_steps, truth),
                 overrides=list(overrides), config=tiny(*overrides))


# ------------------------------------------------------------------------------------------------ CPU model

def test_actors_sharing_cores_end_as_a_fair_scheduler_would_let_them():
    one = Work("generation", "generate", 1.0, threads=2)
    assert Group((one,), pool=2, cores=2).seconds("generate") == pytest.approx(1.0)           # all cores: as priced
    half = Group((replace(one, threads=1),), pool=1, cores=2)
    assert half.seconds("generate") == pytest.approx(2.0)                                      # σ = 0: linear
    assert half.seconds("generate", serials={"generate": 1.0}) == pytest.approx(1.0)           # σ = 1: no gain
    two = Group((replace(one, threads=1, seconds=0.5),) * 2, pool=1, cores=2)                   # time-sliced on 1 core
    assert two.seconds("generate") == pytest.approx(2.0)
    # three one-thread actors on 2 cores: 2/3 of a core each until the smallest ends, then a core each
    score = Group((Work("reward", "reward", 0.5), Work("reference", "reference", 0.5), Work("learner", "values", 0.25)),
                  pool=2, cores=2)
    assert score.ends() == pytest.approx([0.75 + 0.5, 0.75 + 0.5, 0.75])   # values ends after 0.5 / (2/3)
    assert score.seconds("reward") == pytest.approx(sum(2 * w.seconds for w in score.works) / 2)   # all busy: Σ W / C
    light = Group((Work("reward", "reward", 0.1, light=True), replace(one, threads=1)), pool=2, cores=2)
    assert light.ends() == pytest.approx([0.1 * 2, 2.0])                          # a light actor takes no core
    assert Group((one,)).seconds("generate", {"generate": 3.0}) == pytest.approx(3.0)          # GPUs: × factor


def test_overlap_gives_each_side_its_cores_as_the_run_does():
    threads = thread_plan(tiny("ppo.async_steps=1"), 2)
    assert (threads.rollout, threads.learner) == (1, 1)
    assert threads.of("generation", 0, "generate") == 1 and threads.of("learner", 0, "learn") == 1
    sync, overlapped = planned(tiny()), planned(tiny("ppo.async_steps=1"))
    # one core instead of two at σ = 0: twice the time of each phase, and the step the slower side plus the sync
    assert overlapped.phases["generate"].seconds == pytest.approx(2 * sync.phases["generate"].seconds)
    assert overlapped.phases["learn"].seconds == pytest.approx(2 * sync.phases["learn"].seconds)
    parts = overlapped.phases["score"].parts
    rollout = overlapped.phases["generate"].seconds + max(parts["reward"], parts["reference"])
    learner = parts["values"] + overlapped.phases["learn"].seconds
    assert overlapped.step_seconds == pytest.approx(max(rollout, learner) + overlapped.phases["weight_sync"].seconds)


def test_the_serial_share_priors_cover_every_kind_of_work():
    assert set(SERIAL_SHARE_PRIOR) == set(WORK_KINDS)


# ------------------------------------------------------------------------------------------------ the fit

def test_the_fit_recovers_factors_serial_shares_and_the_driver_from_two_thread_counts():
    probes = [probe("ppo.async_steps=0"), probe("ppo.async_steps=1")]
    factors = fit(probes)
    for kind in ("generate", "learn", "weight_sync", "values"):
        assert factors.time[kind] == pytest.approx(TRUE.time[kind], rel=0.05), kind
    for kind in ("generate", "learn"):   # run at 2 threads and at 1: identified
        assert factors.serial[kind] == pytest.approx(TRUE.serial[kind], abs=0.03), kind
    assert factors.overhead_s == pytest.approx(TRUE.overhead_s, abs=1e-3)
    # reward and reference time-slice one pool in both probes: what is identified is what they take together
    for one in probes:
        again = predicted_seconds(one.plan.work, one.plan.async_steps, factors)
        for kind in ("reward", "reference", "step"):
            assert again[kind] == pytest.approx(one.measured[kind], rel=0.03), kind


def test_fitted_factors_predict_layouts_that_were_not_probed():
    factors = fit([probe("ppo.async_steps=0"), probe("ppo.async_steps=1")])
    for layout in (["resources.generation.num_actors=2"], ["resources.learner.num_actors=2", "ppo.async_steps=1"]):
        other = probe(*layout)
        predicted = predicted_seconds(other.plan.work, other.plan.async_steps, factors)["step"]
        assert predicted == pytest.approx(other.measured["step"], rel=0.03), layout


def test_one_probe_fits_each_factor_and_leaves_the_serial_shares_at_their_prior():
    one = probe()
    factors = fit([one])
    assert factors.serial == {k: SERIAL_SHARE_PRIOR[k] for k in factors.serial}
    again = predicted_seconds(one.plan.work, one.plan.async_steps, factors)
    for kind in ("generate", "learn", "weight_sync", "step"):
        assert again[kind] == pytest.approx(one.measured[kind], rel=0.02), kind


# ------------------------------------------------------------------------------------------------ the file

def test_a_calibration_file_round_trips_and_its_plan_predicts_what_was_measured(tmp_path):
    probes = [probe("ppo.async_steps=0"), probe("ppo.async_steps=1")]
    calibration = calibrate(probes, str(TINY))
    path = calibration.save(tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data["format"] == "rlhf_ray.calibration/1" and data["machine"]["cores"] == 2
    assert {"hardware", "models", "precision", "created", "factors", "probes"} <= set(data)
    assert set(data["probes"][0]) >= {"label", "measured", "predicted", "calibrated"}
    loaded = load(path)
    assert loaded.factors.time == pytest.approx(calibration.factors.time)
    assert loaded.factors.serial == calibration.factors.serial
    cfg = tiny("ppo.async_steps=1")
    hw, why = with_calibration(str(path), cfg, None, ARCHS)
    assert why is None and hw.factors is not None and hw.peak_flops_fp32 == CPU.peak_flops_fp32
    plan = plan_experiment(cfg, hw, search=False, archs=ARCHS)
    assert plan.step_seconds == pytest.approx(probes[1].measured["step"], rel=0.03)
    assert any("measured on this hardware" in note for note in plan.assumptions)


def test_a_calibration_of_other_models_hardware_or_precision_is_refused_in_one_line(tmp_path):
    path = str(calibrate([probe()]).save(tmp_path / "calibration.json"))
    other = {**ARCHS, "policy": replace(SMALL, name="other-llama", layers=4)}
    _, why = with_calibration(path, tiny(), None, other)
    assert why.startswith(f"calibration {path} does not apply: its policy was tiny-llama") and "\n" not in why
    _, why = with_calibration(path, tiny(), None, ARCHS, default="h100-80gb")
    assert "measured on" in why and "this is h100-80gb" in why
    assert "models.dtype=float32" in check(load(path), CPU, ARCHS, tiny("models.dtype=bfloat16"))
    (tmp_path / "bad.json").write_text("{}")
    _, why = with_calibration(str(tmp_path / "bad.json"), tiny(), None, ARCHS)
    assert "is not a calibration file" in why


def test_planning_calibration_must_name_a_file():
    with pytest.raises(ConfigError, match="planning.calibration: /no/such.json is not a file"):
        tiny("planning.calibration=/no/such.json")


def test_probes_of_other_models_are_not_fitted_together():
    other = probe()
    other.plan = plan_experiment(tiny(), CPU, search=False, archs={**ARCHS, "policy": replace(SMALL, layers=3)})
    with pytest.raises(CalibrationError, match="ran on other hardware or models"):
        calibrate([probe(), other])


# ------------------------------------------------------------------------------------------------ candidates

def test_the_candidates_are_the_grid_the_config_accepts_each_planned_once():
    cfg = tiny()
    hw = replace(CPU, factors=TRUE)
    grid = default_grid(cfg, 2)
    assert grid["resources.generation.num_actors"] == [1, 2] and grid["ppo.async_steps"] == [0, 1]
    grid["resources.rollout_cores"] = [None, 1]   # (1 is the default half of 2 cores; refused without overlap)
    found = cpu_candidates(cfg, hw, grid, lambda c: plan_experiment(c, hw, search=False, archs=ARCHS))
    planned_ = [c for c in found if c.plan is not None]
    refused = [c for c in found if c.plan is None]
    assert refused and all("rollout_cores" in c.error for c in refused)   # (on 2 cores: only with ppo.async_steps)
    labels = {tuple(sorted(c.settings.items(), key=str)) for c in planned_}
    assert len(labels) == len(planned_) >= 8
    for c in planned_:
        assert c.step == pytest.approx(c.plan.step_seconds) and {r.role for r in c.roles} >= {"generation", "learner"}
        assert all(0 <= r.idle_share <= 1 for r in c.roles)
    chosen = choose(found)
    assert chosen.step <= min(c.step for c in planned_) * 1.01
    assert chosen is choose(list(reversed(found)))   # the same whatever the order
    loose = choose(found, tolerance=10.0)            # everything a tie: the simplest layout
    assert loose.actors == min(c.actors for c in planned_) and loose.async_steps == 0 and not loose.overrides


def test_reservations_are_scaled_down_only_where_they_would_not_fit_the_cores():
    assert reservations(tiny(), 2) == []      # 0.5 + 0.25 + 0.25 + 0.5
    crowded = tiny("resources.generation.num_actors=2", "resources.learner.num_actors=2")
    scaled = reservations(crowded, 2)
    assert scaled and sum(float(o.split("=")[1]) * n for o, n in zip(sorted(scaled), (2, 2, 1, 1))) <= 2


# ------------------------------------------------------------------------------------------------ the command

def fake_run(directory: Path, cfg, plan, measured: dict[str, float], steps: int = 3) -> Path:
    """A finished run's output dir as train writes it: config.yaml, plan.json, metrics.jsonl."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(dump_config(cfg))
    write_plan(plan, directory / "plan.json")
    keys = {"generate": "time/generate", "reward": "time/reward", "reference": "time/reference",
            "values": "time/values_wall" if cfg.ppo.async_steps else "time/values", "learn": "time/learn",
            "weight_sync": "time/weight_sync", "step": "time/step"}
    rows = [{"step": i, "response/length_mean": 20.0, **{keys[k]: v for k, v in measured.items()}}
            for i in range(1, steps + 2)]
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return directory


def test_the_balancer_fits_finished_runs_and_writes_a_config_train_takes(tmp_path, capsys, monkeypatch):
    from rlhf_ray.cli import balance as balance_cli
    from rlhf_ray.cli.plan import main
    from rlhf_ray.planning import planner

    monkeypatch.setattr(planner, "resolve_models", lambda cfg: ARCHS)   # the runs' models as this test sizes them
    monkeypatch.setattr(balance_cli, "prompt_tokens_mean", lambda cfg: 17.4)   # the prompts as the run tokenizes them
    runs = []
    for overrides in ([], ["ppo.async_steps=1"]):
        cfg = tiny(*overrides, "planning.response_tokens_mean=20", "planning.prompt_tokens_mean=17")
        plan = planned(cfg)
        runs.append(fake_run(tmp_path / f"run{len(runs)}", tiny(*overrides), plan,
                             predicted_seconds(plan.work, plan.async_steps, TRUE)))
    out = tmp_path / "balance"
    assert main([str(TINY), "ppo.rollout_batch_size=32", "--calibrate", "--from-run", str(runs[0]), "--from-run",
                 str(runs[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "idle share per role" in printed and "* " in printed and "factors (measured / planned" in printed
    written = load_config(out / "balanced.yaml")
    assert written.planning.calibration and Path(written.planning.calibration).resolve() == (out / "calibration.json").resolve()
    assert (written.planning.response_tokens_mean, written.planning.prompt_tokens_mean) == (20, 17)
    assert json.loads((out / "calibration.json").read_text())["lengths"] == {"planning.prompt_tokens_mean": 17,
                                                                            "planning.response_tokens_mean": 20}
    overrides = printed.split("or as overrides of")[1].splitlines()[1].split()
    assert with_overrides(load_config(TINY), overrides) == written    # the same layout, both ways
    table = json.loads((out / "candidates.json").read_text())
    assert sum(c["chosen"] for c in table) == 1 and all(math.isfinite(c["step_s"]) for c in table if c["step_s"])
    # the plan takes the file; another model's config refuses it
    assert main([str(out / "balanced.yaml"), "--calibration", str(out / "calibration.json")]) in (0, 1)
    monkeypatch.setattr(planner, "resolve_models", lambda cfg: {**ARCHS, "policy": replace(SMALL, name="other")})
    assert main([str(out / "balanced.yaml"), "--calibration", str(out / "calibration.json")]) == 2
    assert "--calibration: calibration" in capsys.readouterr().err


def test_on_gpus_the_factors_reach_the_plan_and_its_layout_search(tmp_path):
    from rlhf_ray.planning import get_hardware

    h100 = get_hardware("h100-80gb")
    tulu = load_config(ROOT / "configs" / "tulu25_ppo_13b.yaml")
    big = Architecture(name="llama-13b", hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128,
                       intermediate=13824, vocab=32000, tied_embeddings=False)
    archs = {"policy": big, "reference": big, "critic": big, "reward": big}
    plain = plan_experiment(tulu, h100, gpus=16, archs=archs, search=False)
    truth = WorkFactors(time={"generate": 3.0, "learn": 1.5}, overhead_s={"sequential": 2.0})
    measured = predicted_seconds(plain.work, plain.async_steps, truth)
    path = calibrate([Probe("16 GPUs", plain, measured)]).save(tmp_path / "calibration.json")
    hw, why = with_calibration(str(path), tulu, h100, archs, default="h100-80gb")
    assert why is None
    calibrated = plan_experiment(tulu, hw, gpus=16, archs=archs)
    assert calibrated.phases["generate"].seconds == pytest.approx(3.0 * plain.phases["generate"].seconds, rel=1e-3)
    assert calibrated.step_seconds == pytest.approx(measured["step"], rel=1e-3)
    assert calibrated.recommendation is not None     # the search prices its layouts with the same factors
    assert calibrated.recommendation.step_seconds > plain.step_seconds * 1.2


def test_async_steps_k_is_one_more_option_and_the_least_stale_of_equal_layouts_is_chosen():
    cfg = tiny()
    hw = replace(CPU, factors=TRUE)
    grid = {"ppo.async_steps": [0, 1, 2, 3], "resources.generation.num_actors": [1]}
    found = cpu_candidates(cfg, hw, grid, lambda c: plan_experiment(c, hw, search=False, archs=ARCHS))
    steps = {c.settings["ppo.async_steps"]: c.step for c in found}
    assert steps[1] == pytest.approx(steps[2]) and steps[1] == pytest.approx(steps[3])   # the steady state: k ≥ 1 alike
    assert steps[1] < steps[0]
    assert choose(found).settings["ppo.async_steps"] == 1
