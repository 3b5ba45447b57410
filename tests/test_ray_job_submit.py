"""`ray job submit` against a real local head on loopback, started and stopped by the test."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, ray_head, short_tmp

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_runs_a_two_step_job(tiny_cache, tmp_path):
    with short_tmp("rj") as ray_tmp, ray_head(ray_tmp) as (_, address, env):
        out = tmp_path / "job_run"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "-m", "rlhf_ray.train", "--config", "configs/tiny_cpu.yaml", "ppo.total_episodes=32",
                  f"models.cache_dir={tiny_cache}", f"output_dir={out}", "logging.progress_bar=false",
                  "deepspeed.zero_stage=2"]  # the ZeRO-2 code path (one rank; the other e2e tests: 0 and 3)
        for _ in range(15):  # the dashboard answers a few seconds before its job agent accepts jobs
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps] == [1, 2]
        assert (out / "final_model" / "model.safetensors").is_file()
        assert (out / "report.png").is_file() and (out / "logs" / "learner-0.log").is_file()

        rm_out = tmp_path / "rm_job"  # reward-model training goes the same way
        rm_job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m",
                                 "rlhf_ray.train_rm", f"cache_dir={tiny_cache}", f"output_dir={rm_out}",
                                 "training.epochs=1", "logging.progress_bar=false"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert rm_job.returncode == 0 and "succeeded" in rm_job.stdout, rm_job.stdout[-4000:] + rm_job.stderr[-2000:]
        assert json.loads((rm_out / "eval.json").read_text())["sets"]["heldout"]["accuracy"] > 0.5
        assert (rm_out / "final_model" / "reward_stats.json").is_file()

        chain = tmp_path / "chain"  # SFT, then DPO from the SFT model: one job, as a user chains them
        sft = ["python", "-m", "rlhf_ray.train_sft", f"cache_dir={tiny_cache}", f"output_dir={chain / 'sft'}",
               "training.epochs=1", "training.batch_size=32", "logging.progress_bar=false"]
        dpo = ["python", "-m", "rlhf_ray.train_dpo", f"model={chain / 'sft' / 'final_model'}",
               f"output_dir={chain / 'dpo'}", "dpo.epochs=1", "dpo.batch_size=32", "logging.progress_bar=false"]
        chain_job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "bash", "-c",
                                    f"{shlex.join(sft)} && {shlex.join(dpo)}"],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert chain_job.returncode == 0 and "succeeded" in chain_job.stdout, chain_job.stdout[-4000:]
        sft_eval = json.loads((chain / "sft" / "eval.json").read_text())["sets"]["heldout"]
        dpo_eval = json.loads((chain / "dpo" / "eval.json").read_text())["sets"]["heldout"]
        assert sft_eval["tokens"] > 0 and dpo_eval["pairs"] == 64
        assert (chain / "dpo" / "final_model" / "model.safetensors").is_file() and (chain / "dpo" / "report.png").is_file()
        assert f"model: {chain / 'sft' / 'final_model'}" in (chain / "dpo" / "config.yaml").read_text()

        sweep_out = tmp_path / "sweep_job"  # the sweep's points join the job's cluster (RAY_ADDRESS)
        sweep_job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
                                    "-m", "rlhf_ray.sweep", "--grid", "ppo.async_steps=1", "--steps", "1", "--warmup",
                                    "0", "--out", str(sweep_out), f"models.cache_dir={tiny_cache}"],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert sweep_job.returncode == 0 and "succeeded" in sweep_job.stdout, sweep_job.stdout[-4000:]
        point = json.loads((sweep_out / "sweep.json").read_text())["points"][0]
        assert point["status"] == "ok" and point["samples_per_s"] > 0
        assert "joined the Ray cluster" in (sweep_out / "points" / "async-1" / "logs" / "driver.log").read_text()


def job_imports(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("IMPORTS")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("IMPORTS"):])


def test_role_classes_import_as_rlhf_ray_actors_from_the_uploaded_directory_and_from_an_installed_wheel(tmp_path):
    """``ray job submit --working-dir .`` runs the uploaded tree's code (its rlhf_ray finds the actors/ beside it);
    a cluster with the package installed as a wheel runs a job from any directory (the wheel maps actors/ to
    rlhf_ray/actors). Either way the driver, a task and an actor import the role classes as rlhf_ray.actors; from the
    wheel nothing named ``actors`` is importable."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    assert not (target / "actors").exists() and (target / "rlhf_ray" / "actors" / "learner.py").is_file()
    elsewhere = tmp_path / "experiment"  # a user's own directory: no rlhf_ray in it
    elsewhere.mkdir()
    shutil.copy(ROOT / "tests" / "job_imports.py", elsewhere)
    with short_tmp("rj") as ray_tmp, ray_head(ray_tmp, extra_env={"PYTHONPATH": str(target)}) as (_, address, env):
        uploaded = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
                                   "python", "tests/job_imports.py"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        installed = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(elsewhere), "--",
                                    "python", "job_imports.py"],
                                   cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    for job in (uploaded, installed):
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
    from_upload, from_wheel = job_imports(uploaded.stdout), job_imports(installed.stdout)
    for where in ("driver", "worker"):
        assert "runtime_resources" in from_upload[where]["role"] and from_upload[where]["role"].endswith("/actors/role.py")
        assert from_wheel[where]["role"] == str(target / "rlhf_ray" / "actors" / "role.py")
        assert not from_wheel[where]["bare_actors"]  # (an uploaded tree has actors/ at its top, as the repo has)
    assert from_upload["actor_memory_gb"] > 0 and from_wheel["actor_memory_gb"] > 0
