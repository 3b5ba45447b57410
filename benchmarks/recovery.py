"""Durability costs: checkpoint size and save/verify/load seconds, and seconds from killing an actor to the
next completed PPO step, per actor kind.

    python benchmarks/recovery.py [--config configs/tiny_cpu.yaml] [--skip-kills] [key=value ...]

Checkpoint part (in this process, real roles): one PPO step, then ``save_checkpoint`` (the learner writes
the HF policy and its DeepSpeed state, the driver hashes every file and renames the directory into place),
``checkpoint.verify`` (re-hashing, what ``resume=auto`` does), and ``restore`` (learners load the DeepSpeed
state, the engines take the restored weights), each timed; the checkpoint's size on disk.

Kill part (the real CLI, ``python -m rlhf_ray.train``, in its own local Ray): after steps 2, 4, 6 and 9 the
generation, reward, reference and learner actor is killed with SIGKILL by PID; for each, the seconds from
the kill until the next step is recorded in metrics.jsonl (a step that was being run when the actor died is
redone; a killed learner group restarts from the checkpoint of step 8). The steps' median time is given
beside it for scale.

Resume part (the real CLI): an uninterrupted run of 4 steps, and the same run stopped by SIGTERM after its
second step and resumed with ``resume=auto``; the largest difference of every metric over the steps run after
the resume, and of every policy tensor at the end. Writes benchmarks/results/recovery_<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_ray.config import load_config  # noqa: E402

KILLS = (("generation", "GenerationActor", 2), ("reward", "RewardActor", 4), ("reference", "ReferenceActor", 6),
         ("learner", "LearnerActor", 9))
CHECKPOINT_EVERY = 4
STEPS = 11


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_costs(config: str, overrides: list[str]) -> dict:
    from rlhf_ray.cluster.connection import stop_ray
    from rlhf_ray.drivers.ppo import PPOTrainer
    from rlhf_ray.run import checkpoint
    from rlhf_ray.run.console import setup_console

    run_dir = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    batch = load_config(config, overrides).ppo.rollout_batch_size
    cfg = load_config(config, [*overrides, f"output_dir={run_dir}", f"ppo.total_episodes={4 * batch}",
                               "logging.progress_bar=false", "logging.trackers=[]"])
    setup_console(cfg.logging.console, run_dir)
    trainer = PPOTrainer(cfg)
    try:
        trainer.step()
        started = time.perf_counter()
        path = Path(trainer.save_checkpoint())
        save_s = time.perf_counter() - started
        started = time.perf_counter()
        checkpoint.verify(path)
        verify_s = time.perf_counter() - started
        started = time.perf_counter()
        trainer.restore(path)
        restore_s = time.perf_counter() - started
        parts = {part: du(path / part) for part in ("policy", "learner")}
        size = du(path)
    finally:
        trainer.shutdown()
        stop_ray()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"size_bytes": size, "size_gb": size / 1e9, "parts_gb": {k: v / 1e9 for k, v in parts.items()},
            "save_s": save_s, "verify_s": verify_s, "restore_s": restore_s,
            "restore_includes": "learner DeepSpeed load + weight sync to the engines (verify is separate)"}


def actor_pid(root_pid: int, actor_class: str) -> int:
    import psutil

    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith(f"ray::{actor_class}"):
                return proc.pid
        except psutil.Error:
            continue
    raise RuntimeError(f"no live {actor_class} process under {root_pid}")


def rows(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def kill_costs(config: str, overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_kill_"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    batch = load_config(config, overrides).ppo.rollout_batch_size
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "--config", config, *overrides,
                            f"output_dir={out}", f"ppo.total_episodes={STEPS * batch}",
                            f"checkpoint.every_steps={CHECKPOINT_EVERY}", "logging.progress_bar=false",
                            "logging.report=false", "logging.save_final_model=false"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    try:
        for role, actor_class, after_step in KILLS:
            while len(rows(out)) < after_step:
                if run.poll() is not None:
                    raise RuntimeError(f"the run ended early:\n{run.communicate()[0][-3000:]}")
                time.sleep(0.1)
            seen = set(rows(out))
            os.kill(actor_pid(run.pid, actor_class), signal.SIGKILL)
            killed = time.perf_counter()
            while not set(rows(out)) - seen:
                if run.poll() is not None:
                    raise RuntimeError(f"the run ended after the {role} kill:\n{run.communicate()[0][-3000:]}")
                time.sleep(0.1)
            new = [json.loads(r) for r in set(rows(out)) - seen]
            results[role] = {"killed_after_step": after_step, "next_step": min(r["step"] for r in new),
                             "seconds_to_next_step": time.perf_counter() - killed}
            print(f"  {role}: killed after step {after_step}; step {results[role]['next_step']} done "
                  f"{results[role]['seconds_to_next_step']:.1f} s later", flush=True)
        output = run.communicate(timeout=3600)[0]
        if run.returncode != 0:
            raise RuntimeError(f"the run failed:\n{output[-3000:]}")
        final = [json.loads(r) for r in rows(out)]
        steps = [r["step"] for r in final]
        results["every_step_once"] = steps == list(range(1, STEPS + 1))
        results["median_step_s"] = statistics.median(r["time/step"] for r in final)
        results["recovery_seconds_in_metrics"] = sum(r["recovery/seconds"] for r in final)
        results["restarts"] = {k.split("/")[1]: v for k, v in final[-1].items() if k.startswith("recovery/")
                               and k.endswith("_restarts")}
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return results


def cli_run(config: str, overrides: list[str], out: Path, ray_tmp: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "--config", config, *overrides, f"output_dir={out}",
                             "logging.progress_bar=false", "logging.report=false", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(run: subprocess.Popen, code: int = 0) -> None:
    output = run.communicate(timeout=3600)[0]
    if run.returncode != code:
        raise RuntimeError(f"exit {run.returncode}, expected {code}:\n{output[-3000:]}")


def resume_check(config: str, overrides: list[str], steps: int = 4) -> dict:
    from safetensors.torch import load_file

    base = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    total = [f"ppo.total_episodes={steps * load_config(config, overrides).ppo.rollout_batch_size}"]
    try:
        finished(cli_run(config, overrides, base / "whole", ray_tmp, *total))
        run = cli_run(config, overrides, base / "stopped", ray_tmp, *total)
        while len(rows(base / "stopped")) < steps // 2:
            if run.poll() is not None:
                raise RuntimeError(run.communicate()[0][-3000:])
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        finished(run, 143)
        stopped_at = len(rows(base / "stopped"))
        finished(cli_run(config, overrides, base / "stopped", ray_tmp, *total, "resume=auto"))
        whole = [json.loads(r) for r in rows(base / "whole")]
        resumed = [json.loads(r) for r in rows(base / "stopped")]
        compared = [k for k, v in whole[0].items() if isinstance(v, (int, float)) and k != "step"
                    and not k.startswith(("time/", "memory/", "throughput/", "recovery/"))]
        diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(whole[stopped_at:], resumed[stopped_at:])
                        if a[k] is not None and b[k] is not None) for k in compared}
        last = f"step-{steps:06d}"
        w = load_file(base / "whole" / "checkpoints" / last / "policy" / "model.safetensors")
        r = load_file(base / "stopped" / "checkpoints" / last / "policy" / "model.safetensors")
        weight_diff = max(float((w[k] - r[k]).abs().max()) for k in w)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"steps": steps, "stopped_after_step": stopped_at, "steps_compared": steps - stopped_at,
            "every_step_once": [r["step"] for r in resumed] == list(range(1, steps + 1)),
            "metrics_bit_identical": all(d == 0 for d in diffs.values()), "max_metric_abs_diff": max(diffs.values()),
            "metric_abs_diff": diffs, "final_policy_max_abs_diff": weight_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--skip-kills", action="store_true", help="leave out the kills")
    parser.add_argument("--skip-resume", action="store_true", help="leave out the resume check")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    name = Path(args.config).stem
    print(f"checkpoint costs ({name}) ...", flush=True)
    result = {"config": Path(args.config).name, "overrides": args.overrides,
              "checkpoint": checkpoint_costs(args.config, args.overrides)}
    ckpt = result["checkpoint"]
    print(f"  {ckpt['size_gb']:.3f} GB (policy {ckpt['parts_gb']['policy']:.3f}, learner "
          f"{ckpt['parts_gb']['learner']:.3f}); save {ckpt['save_s']:.1f} s, verify {ckpt['verify_s']:.1f} s, "
          f"restore {ckpt['restore_s']:.1f} s", flush=True)
    if not args.skip_kills:
        print(f"kills ({name}, {STEPS} steps, checkpoint every {CHECKPOINT_EVERY}) ...", flush=True)
        result["kills"] = kill_costs(args.config, args.overrides)
        kills = result["kills"]
        print(f"  every step recorded once: {kills['every_step_once']}; median step {kills['median_step_s']:.1f} s; "
              f"restarts {kills['restarts']}", flush=True)
    if not args.skip_resume:
        print("resume check (uninterrupted vs SIGTERM + resume=auto) ...", flush=True)
        result["resume"] = check = resume_check(args.config, args.overrides)
        print(f"  stopped after step {check['stopped_after_step']} of {check['steps']}; later metrics bit-identical: "
              f"{check['metrics_bit_identical']} (max diff {check['max_metric_abs_diff']:.2e}); final policy max "
              f"diff {check['final_policy_max_abs_diff']:.2e}", flush=True)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "gpu": None}
    path = ROOT / "benchmarks" / "results" / f"recovery_{name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    for part in ("kills", "resume"):  # parts left out this time keep their last measurement (dated)
        if part not in result and part in previous:
            result[part] = previous[part]
    measured = time.strftime("%Y-%m-%d %H:%M")
    result["measured"] = {**previous.get("measured", {}), "checkpoint": measured,
                          **{part: measured for part in ("kills", "resume") if part in result
                             and not (part in previous and result[part] is previous[part])}}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
