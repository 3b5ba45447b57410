"""`ray job submit` against a real local head on loopback, started and stopped by the test: one job compares two rewards
(rlhf_ray.compare_rewards: two PPO runs and their evaluation by a gold judge), another at the same time chains
reward-model training, SFT then DPO with LoRA adapters, and a sweep (a point that runs, one that is refused)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, base_reference_logps, ray_head, short_tmp

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def job_imports(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("IMPORTS")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("IMPORTS"):])


def installed_wheel(tmp_path: Path) -> Path:
    """rlhf-ray built as a wheel and installed into a directory of its own, as a cluster's image installs it."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    assert not (target / "actors").exists() and (target / "rlhf_ray" / "actors" / "learner.py").is_file()
    return target


def submit_job(address: str, env: dict, cwd: Path, working_dir: str, *entrypoint: str,
               timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir WORKING_DIR -- ENTRYPOINT`` from ``cwd``, as a user types it, to its end."""
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", working_dir, "--", *entrypoint]
    for _ in range(15):  # the dashboard answers a few seconds before its job agent accepts jobs (and, on a
        # loaded machine, may drop the submission's connection before it has one)
        job = subprocess.run(submit, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        said = job.stdout + job.stderr
        if "No available agent" not in said and not ("RemoteDisconnected" in said and "submitted" not in said):
            return job
        time.sleep(2)
    return job


def test_ray_job_submit_runs_ppo_rm_sft_dpo_and_a_sweep(tiny_cache, tmp_path):
    """Two jobs at once, each chaining commands as a user chains them in one: the RM comparison of two two-step PPO
    runs (ZeRO-2); and reward-model training, then SFT and DPO from the SFT model, both with LoRA adapters, then a sweep
    whose points join the job's cluster. Two submissions instead of five (each cost a job CLI, a working-dir upload and a job driver; the two
    chains went one after the other in one job before), and the LoRA chain's checks are made
    on this job's SFT and DPO (they were a test of their own in tests/test_tulu_suite.py, two runs more): each trains
    rank-8 adapters and saves merged weights with the adapter beside them; DPO starts no reference actor, and the
    reference log-probs its learner computed with the adapters off (pairs first met after updates, too) are the SFT
    model's own.

    The cluster also has rlhf-ray installed as a wheel (on its PYTHONPATH): jobs submitted with ``--working-dir .`` run
    the uploaded tree's code (its rlhf_ray finds the actors/ beside it), a job from a directory of the user's own runs
    the wheel's (which maps actors/ to rlhf_ray/actors). Either way its driver, a task and an actor import the role
    classes as rlhf_ray.actors (tests/job_imports.py), and from the wheel nothing named ``actors`` is importable."""
    wheel = installed_wheel(tmp_path)
    elsewhere = tmp_path / "experiment"  # a user's own directory: no rlhf_ray in it
    elsewhere.mkdir()
    shutil.copy(ROOT / "tests" / "job_imports.py", elsewhere)
    # 4 logical CPUs: the PPO run's roles (1.5) beside the reward-model, SFT or DPO learner (1) and the imports jobs
    with short_tmp("rj") as ray_tmp, ray_head(ray_tmp, num_cpus=4, extra_env={"PYTHONPATH": str(wheel)}) as (_, address,
                                                                                                            env):
        # PPO runs as the RM comparison starts them: against two rewards, scored by a gold judge along the way
        compared = tmp_path / "compare_rewards"
        ppo = ["python", "-m", "rlhf_ray.compare_rewards", "--config", "configs/tiny_cpu.yaml",
               "--reward", "e=function=rlhf_ray.rewards:char_frequency", "--reward", "rm=model=tiny:reward",
               "--gold", "function=rlhf_ray.rewards:char_frequency", "--prompts", "configs/data/tiny_prompts.jsonl",
               "--limit", "12", "--samples-per-prompt", "2", "--evaluations", "2", "--num-cpus", "0.5",
               "--out", str(compared), "ppo.total_episodes=32", "models.value_init=policy",
               f"models.cache_dir={tiny_cache}", "logging.progress_bar=false",
               "deepspeed.zero_stage=2"]  # the ZeRO-2 code path (one rank; the other e2e tests: 0, 1 and 3)
        out = compared / "runs" / "rm"
        rm_out = tmp_path / "rm_job"  # reward-model training goes the same way
        train_rm = ["python", "-m", "rlhf_ray.train_rm", f"cache_dir={tiny_cache}", f"output_dir={rm_out}",
                    "training.epochs=1", "logging.progress_bar=false"]
        chain = tmp_path / "chain"  # SFT, then DPO from the SFT model, with adapters
        lora = [f"cache_dir={tiny_cache}", "lora.rank=8", "logging.progress_bar=false", "optimizer.lr=1e-2"]
        sft = ["python", "-m", "rlhf_ray.train_sft", *lora, f"output_dir={chain / 'sft'}", "training.epochs=1",
               "training.eval_every_steps=0", "checkpoint.every_steps=0"]
        dpo = ["python", "-m", "rlhf_ray.train_dpo", *lora, f"model={chain / 'sft' / 'final_model'}",
               f"output_dir={chain / 'dpo'}", "dpo.epochs=1", "dpo.eval_every_steps=0", "checkpoint.every_steps=12"]
        sweep_out = tmp_path / "sweep_job"  # the sweep's points join the job's cluster (RAY_ADDRESS)
        # one point runs (overlapped), one is refused and recorded (test_sweep.py's real run, merged here)
        sweep = ["python", "-m", "rlhf_ray.sweep", "--grid", "ppo.rollout_batch_size=16,12", "--grid",
                 "ppo.async_steps=1", "--steps", "1", "--warmup", "0", "--out", str(sweep_out),
                 f"models.cache_dir={tiny_cache}"]
        # the comparison's two runs and evaluation beside the four shorter commands: the two chains take about as long
        chains = {"ppo (compare_rewards)": (("ppo", ppo),),
                  "reward model, SFT, DPO, then a sweep": (("rm", train_rm), ("sft", sft), ("dpo", dpo),
                                                           ("sweep", sweep))}
        with ThreadPoolExecutor(4) as jobs:  # two chains and the two imports jobs, all at once on the cluster
            chained = {name: jobs.submit(submit_job, address, env, ROOT, ".", "bash", "-c", " && ".join(
                f"{shlex.join(command)} && echo '###' {step} done" for step, command in chain), timeout_s=1500)
                for name, chain in chains.items()}
            uploaded = jobs.submit(submit_job, address, env, ROOT, ".", "python", "tests/job_imports.py")
            installed = jobs.submit(submit_job, address, env, elsewhere, str(elsewhere), "python", "job_imports.py")
            done = {name: job.result() for name, job in chained.items()}
            uploaded, installed = uploaded.result(), installed.result()
        for name, job in done.items():
            assert job.returncode == 0 and "succeeded" in job.stdout, (name, job.stdout[-4000:] + job.stderr[-2000:])
            steps = [step for step, _ in chains[name]]
            assert re.findall(r"^### (\w+) done$", job.stdout, re.MULTILINE) == steps, (name, job.stdout[-3000:])

    for imports_job in (uploaded, installed):
        assert imports_job.returncode == 0 and "succeeded" in imports_job.stdout, imports_job.stdout[-4000:]
    from_upload, from_wheel = job_imports(uploaded.stdout), job_imports(installed.stdout)
    for where in ("driver", "worker"):
        assert "runtime_resources" in from_upload[where]["role"] and from_upload[where]["role"].endswith("/actors/role.py")
        assert from_wheel[where]["role"] == str(wheel / "rlhf_ray" / "actors" / "role.py")
        assert not from_wheel[where]["bare_actors"]  # (an uploaded tree has actors/ at its top, as the repo has)
    assert from_upload["actor_memory_gb"] > 0 and from_wheel["actor_memory_gb"] > 0

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    assert (out / "final_model" / "model.safetensors").is_file()
    assert (out / "report.png").is_file() and (out / "logs" / "learner-0.log").is_file()
    check_comparison(compared, done["ppo (compare_rewards)"].stdout)

    assert json.loads((rm_out / "eval.json").read_text())["sets"]["heldout"]["accuracy"] > 0.5
    assert (rm_out / "final_model" / "reward_stats.json").is_file()

    sft, dpo = chain / "sft", chain / "dpo"
    start, sft_eval = rows(sft)[0], json.loads((sft / "eval.json").read_text())["sets"]["heldout"]
    assert sft_eval["tokens"] > 0 and sft_eval["loss"] < 0.9 * start["eval/heldout/loss"], (start, sft_eval)
    model = sft / "final_model"
    adapter = load_file(model / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert "lora_" not in " ".join(load_file(model / "model.safetensors"))  # merged: the plain model's names

    assert (dpo / "final_model" / "model.safetensors").is_file() and (dpo / "report.png").is_file()
    assert f"model: {model}" in (dpo / "config.yaml").read_text()
    placed = json.loads((dpo / "placement.json").read_text())["actors"]
    assert set(placed) == {"learner-0"}, placed
    metrics = rows(dpo)
    steps = [r for r in metrics if "loss/dpo" in r]
    assert len(steps) == 12 and sum(r["reference/pairs_computed"] for r in steps) == 192
    assert all(r["memory/learner_peak_gb"] > 0 for r in steps)  # the closing line's peak GB
    dpo_eval = json.loads((dpo / "eval.json").read_text())["sets"]["heldout"]
    assert dpo_eval["pairs"] == 64
    assert dpo_eval["accuracy"] > metrics[0]["eval/heldout/accuracy"] + 0.2 and dpo_eval["margin"] > 0, (metrics[0],
                                                                                                       dpo_eval)
    kept = load_file(dpo / "checkpoints" / "step-000012" / "reference_logps.safetensors")["train"]
    assert torch.allclose(kept, base_reference_logps(dpo, list(range(len(kept)))), rtol=1e-5, atol=1e-4)
    assert (dpo / "final_model" / "adapter" / "adapter_model.safetensors").is_file()

    ran, refused = json.loads((sweep_out / "sweep.json").read_text())["points"]
    assert ran["status"] == "ok" and ran["samples_per_s"] > 0 and ran["phases_s"]["learn"] > 0
    # 12 sequences a step: 320 episodes are no whole number of steps (the ppo section's own check comes first)
    assert refused["status"] == "invalid" and "is not a multiple of ppo.rollout_batch_size=12" in refused["error"]
    assert {"sweep.csv", "sweep.md", "sweep.png"} <= {p.name for p in sweep_out.iterdir()}
    assert "joined the Ray cluster" in (sweep_out / "points" / "batch-16_async-1" / "logs" / "driver.log").read_text()


def check_comparison(compared: Path, console: str) -> None:
    """The RM comparison's report: both runs evaluated at steps 0 (the initial policy), 1 (its policy kept when the
    checkpoint was pruned) and 2; the gold's and the proxies' scores are those of the responses they stand beside;
    the KL of the initial policy's own samples is ~0 (engine and reference agree) and the trained policies answer
    otherwise; the table, the figure and the best checkpoint by gold."""
    from rlhf_ray.rewards.functions import char_frequency

    report = json.loads((compared / "compare_rewards.json").read_text())
    assert {"compare_rewards.md", "compare_rewards.png", "responses.jsonl"} <= {p.name for p in compared.iterdir()}
    assert (compared / "runs" / "e" / "policies" / "step-000001" / "model.safetensors").is_file()
    assert not (compared / "runs" / "e" / "checkpoints" / "step-000001").exists()  # keep_last 1: pruned
    responses = [json.loads(line) for line in (compared / "responses.jsonl").read_text().splitlines()]
    for name, run in report["runs"].items():
        assert run["status"] == "trained" and [p["step"] for p in run["points"]] == [0, 1, 2], (name, run)
        mine = [r for r in responses if r["reward"] == name]
        assert len(mine) == 3 * 12 * 2
        assert all(r["gold"] == pytest.approx(char_frequency("", r["response"])) for r in mine)
        assert all(abs(r["kl"]) < 0.01 for r in mine if r["step"] == 0)
        initial = [r["response"] for r in mine if r["step"] == 0]
        assert initial != [r["response"] for r in mine if r["step"] == 2]
        gold_means = [p["gold"]["mean"] for p in run["points"]]
        assert gold_means == pytest.approx([sum(r["gold"] for r in mine if r["step"] == s) / 24 for s in (0, 1, 2)])
        assert all(p["gold"]["low"] <= p["gold"]["mean"] <= p["gold"]["high"] for p in run["points"])
    # the proxy of run 'e' is the gold function itself; run 'rm''s is the tiny RM
    assert [p["proxy"] for p in report["runs"]["e"]["points"]] == [p["gold"] for p in report["runs"]["e"]["points"]]
    assert report["runs"]["rm"]["reward"]["kind"] == "model"
    best = report["conclusions"]["best"]
    assert best["reward"] in ("e", "rm") and best["step"] in (1, 2)
    assert f"**{best['reward']}, step {best['step']}**" in (compared / "compare_rewards.md").read_text()
    assert "| rm | 2 |" in console  # the table on the job's console
