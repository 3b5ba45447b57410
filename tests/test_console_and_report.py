"""What a user sees: a quiet console, logs in files, samples, the report and its summary line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def fake_steps(n: int) -> list[dict]:
    return [{"step": i, "reward/mean": 0.1 * i, "score/mean": 0.2 * i, "kl/mean": 0.01 * i,
             "kl/sampler_vs_learner": 1e-7, "response/length_mean": 30 - i, "response/eos_fraction": i / n,
             "response/tokens": 100.0, "time/generate": 1.0, "time/score_wall": 0.5, "time/learn": 2.0,
             "time/weight_sync": 0.25, "time/step": 4.0, "memory/learner_peak_gb": 5.0 + i / 10,
             "memory/generation_peak_gb": 3.0} for i in range(1, n + 1)]


def test_summary_line_says_what_happened():
    from rlhf_ray.run.report import summary

    line = summary(fake_steps(10))
    assert line.startswith("10 steps in 40 s; reward 0.200 → 0.900, score 0.400 → 1.800 (mean of the first/last 3")
    assert "25 generated tokens/s" in line
    assert "learn 50%, generate 25%, score 12%, sync 6%, other 6%" in line
    assert "peak GB: learner 6.0, generation 3.0" in line


def test_overlapped_steps_are_shown_by_their_critical_path(tmp_path):
    """ppo.async_steps=1: generation and scoring ran beside the update; the step is values + learn + wait + sync."""
    from rlhf_ray.run.report import draw, summary

    rows = [{**r, "time/values_wall": 0.5, "time/learn": 2.5, "time/rollout_wait": 0.5, "time/weight_sync": 0.25}
            for r in fake_steps(4)]
    line = summary(rows)
    assert "learn 62%, values 12%, rollout wait 12%, sync 6%, other 6%" in line and "generate" not in line.split("time:")[1]
    assert draw({"run": rows}, tmp_path / "report.png").stat().st_size > 10_000


def test_report_reads_the_latest_series_and_draws_four_panels(tmp_path):
    from rlhf_ray.run.report import load_metrics, main

    run = tmp_path / "run_a"
    run.mkdir()
    rows = fake_steps(3) + fake_steps(5)  # a second run into the same dir restarts the step counter
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert [r["step"] for r in load_metrics(run)] == [1, 2, 3, 4, 5]
    assert main([str(run)]) == 0 and (run / "report.png").stat().st_size > 20_000
    other = tmp_path / "run_b"
    shutil.copytree(run, other)
    assert main([str(run), str(other), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()
    assert main([str(tmp_path / "missing")]) == 2


@pytest.mark.e2e
def test_quiet_console_of_the_main_job_beside_another_run_each_in_its_own_cluster(tiny_cache, tmp_path, ray_session):
    """The README's main job on the tiny default: ≤ 30 console lines besides the progress bar, engine
    chatter in logs/, samples and the report written, and the summary line last. It runs side by side with a second,
    shorter run and with the test session's own Ray: neither run joins another cluster (one pair of runs for what
    were two tests, a main job alone and two short runs side by side)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "run"
    main_job = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "--config", "configs/tiny_cpu.yaml",
                                 "ppo.total_episodes=64", f"models.cache_dir={tiny_cache}", f"output_dir={out}"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # beside: no KL (ppo.kl_coef=0) and so, with ppo.reference=auto, no reference: none planned, started or logged;
    # and made to trip an alarm set to stop: stop strings end every response early, and a cut one would earn 100
    beside = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "--config", "configs/tiny_cpu.yaml",
                               "ppo.total_episodes=32", f"models.cache_dir={tiny_cache}", f"output_dir={tmp_path / 'b'}",
                               "logging.progress_bar=false", "logging.report=false", "logging.save_final_model=false",
                               "ppo.kl_coef=0", "logging.alarms=stop", 'generation.stop=["a","e","o"," "]',
                               "ppo.non_eos_penalty=100"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, stderr = main_job.communicate(timeout=900)
        beside_output = beside.communicate(timeout=600)[0]
    finally:
        for run in (main_job, beside):
            if run.poll() is None:
                run.kill()
    console = stdout + stderr
    assert main_job.returncode == 0, console[-4000:]
    assert beside.returncode == 3, beside_output[-3000:]  # stopped by its alarm
    for output in (console, beside_output):
        assert "joined the Ray cluster" not in output
    lines = [line for line in re.split(r"[\r\n]+", console) if line.strip() and not line.startswith("ppo:")]
    assert len(lines) <= 30, "\n".join(lines)
    assert not [line for line in lines if re.search(r"\b(INFO|WARNING)\b", line)], "\n".join(lines)
    assert lines[-1].split(" ", 1)[1].startswith("4 steps in"), lines[-1]
    assert "Loading" in (out / "logs" / "generation-0.log").read_text()  # vLLM's own output is in its log
    assert (out / "logs" / "driver.log").stat().st_size > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 4 and {"prompt", "response", "score", "reward"} <= samples[0].keys()
    assert (out / "report.png").stat().st_size > 20_000
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(0.05 < m["memory/learner_peak_gb"] < 8 for m in metrics)
    assert all("kl/mean" in m and "time/reference" in m for m in metrics)
    assert_the_timeline(out, metrics)
    assert_the_balancer_fits(out, tmp_path)
    beside_metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in beside_metrics] == [1]
    assert_no_reference(tmp_path / "b", beside_metrics, beside_output)
    assert_stopped_by_its_alarm(tmp_path / "b", beside_metrics, beside_output)
    assert ray_session.is_initialized()  # the test session's cluster is still there


def assert_the_timeline(out, metrics: list[dict]) -> None:
    """trace.json (rlhf_ray.run.timeline): valid trace events, every role's actor and the driver in it, each step
    once, every actor's spans nested or disjoint, clocks with their bounds; each role's idle share per step."""
    from tests.test_timeline import assert_nested_or_disjoint

    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"]
    processes = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == {"driver", "learner-0", "generation-0", "reward-0", "reference-0"}
    assert sorted(e["name"] for e in events if e["name"].startswith("step ")) == [f"step {i}" for i in range(1, 5)]
    assert {e["name"] for e in events if e.get("cat") == "generation"} >= {"generate", "load_weights"}
    assert all(e["args"]["tokens"] > 0 for e in events if e.get("cat") == "generation" and e["name"] == "generate")
    assert_nested_or_disjoint(events)
    assert set(trace["otherData"]["clocks"]) == processes - {"driver"}
    assert all(c["bound_s"] < 1.0 for c in trace["otherData"]["clocks"].values())
    for m in metrics:
        assert {k for k in m if k.startswith("idle/")} == {"idle/learner", "idle/generation", "idle/reward",
                                                           "idle/reference"}
        assert all(0.0 <= m[k] <= 1.0 for k in m if k.startswith("idle/"))


def assert_stopped_by_its_alarm(out, metrics: list[dict], console: str) -> None:
    """logging.alarms=stop, the penalty_pays rule met at step 1 (rlhf_ray.run.alarms): one line naming it, the marker
    in that step's metrics, a checkpoint of the step, the run's end said in one line, the summary naming it."""
    assert metrics[0]["score/cut_pays"] == 1.0 and metrics[0]["alarm/penalty_pays"] == 1.0
    assert len(re.findall(r"alarm penalty_pays at step 1: ppo.non_eos_penalty is above the median", console)) == 1
    assert "stopped by the alarm penalty_pays (logging.alarms=stop) after 1 of 2 steps; checkpoint saved" in console
    assert (out / "checkpoints" / "step-000001").is_dir()
    summary = [line for line in console.splitlines() if " 1 step in " in line]
    assert summary and summary[-1].endswith("; alarms: penalty_pays (step 1)"), console[-2000:]


def assert_the_balancer_fits(out, tmp_path) -> None:
    """A finished run is a probe for the balancer (python -m rlhf_ray.plan --calibrate --from-run): its config.yaml,
    plan.json and metrics.jsonl fitted; the calibration written, read back and, applied to the run's own config,
    predicting the step it measured."""
    from rlhf_ray.cli.balance import probe_from_run
    from rlhf_ray.config import load_config
    from rlhf_ray.planning import plan_experiment
    from rlhf_ray.planning.calibration import calibrate, with_calibration
    from rlhf_ray.planning.planner import resolve_models

    probe = probe_from_run(out, warmup=1)
    assert {"generate", "reward", "reference", "values", "learn", "weight_sync", "step"} <= set(probe.measured)
    calibration = calibrate([probe], "configs/tiny_cpu.yaml")
    assert all(0.001 < k < 1000 for k in calibration.factors.time.values()), calibration.factors
    path = calibration.save(tmp_path / "calibration.json")
    cfg = load_config(out / "config.yaml", [f"planning.calibration={path}"])
    hw, why = with_calibration(str(path), cfg, None, resolve_models(cfg))
    assert why is None, why
    assert set(probe.lengths) == {"planning.prompt_tokens_mean", "planning.response_tokens_mean"}
    assert probe.lengths["planning.prompt_tokens_mean"] < cfg.data.max_prompt_tokens   # the tiny prompts, measured
    planned = plan_experiment(load_config(out / "config.yaml", [f"planning.calibration={path}",
                                                                *calibration.length_overrides(cfg)]), hw, search=False)
    assert planned.step_seconds == pytest.approx(probe.measured["step"], rel=0.1)


def assert_no_reference(out, metrics: list[dict], console: str) -> None:
    """A run at ppo.kl_coef=0 with ppo.reference=auto: no reference planned or started, no KL or reference figures
    logged, the console says so at the start and in its summary, and its report draws (its KL panel says so too:
    tests/test_reference_at_kl0.py)."""
    from rlhf_ray.config import NO_REFERENCE
    from rlhf_ray.run.report import main as report

    plan = json.loads((out / "plan.json").read_text())
    assert "reference" not in plan["models"] and "reference" not in {r["role"] for r in plan["roles"]}
    assert "reference-0" not in json.loads((out / "placement.json").read_text())["actors"]
    assert not (out / "logs" / "reference-0.log").exists() and (out / "logs" / "reward-0.log").exists()
    assert not [key for m in metrics for key in m if key == "kl/mean" or "reference" in key]
    assert f"{NO_REFERENCE}: no reference actors, no KL metrics" in console
    summary = [line for line in console.splitlines() if re.search(r" steps? in ", line)]
    assert summary and f"{NO_REFERENCE}: no KL" in summary[-1], console[-3000:]
    assert report([str(out)]) == 0 and (out / "report.png").stat().st_size > 20_000


@pytest.mark.e2e
def test_an_error_in_an_actor_reaches_the_console_with_its_traceback(ray_session):
    import ray

    from rlhf_ray.cluster.roles import RoleError, wait

    @ray.remote(num_cpus=0)
    class Broken:
        def score(self):
            return {"a": 1}["missing_key"]

    with pytest.raises(RoleError) as err:
        wait(Broken.remote().score.remote(), "reward", "scoring a rollout", 60, "timeouts.score_s",
             "runs/x/logs/reward-*.log")
    message = str(err.value)
    assert message.startswith("reward failed while scoring a rollout: KeyError: 'missing_key'")
    assert "traceback in the reward actor (its output: runs/x/logs/reward-*.log)" in message
    assert 'return {"a": 1}["missing_key"]' in message  # the actor's own source line
