"""Durable runs, end to end as a user meets them: a run stopped by SIGTERM stops cleanly (test_signals.py's checks:
one line, loopback only, every process gone, the lock released) and resumes and reproduces the uninterrupted run
(also from an older checkpoint when the latest is damaged) — overlapped two updates deep (ppo.async_steps=2), with its
engine killed on the way; actors killed by PID are replaced and the run finishes with every step recorded exactly
once."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import (actor_pid, listening_addresses, metric_rows, ray_processes, short_tmp, start_run,
                            vllm_greedy, wait_for_steps)
from tests.test_trackers import assert_each_step_once_in_the_trackers

pytestmark = pytest.mark.e2e
COMPARED = ("reward/mean", "score/mean", "kl/mean", "loss/policy", "loss/value", "response/tokens", "optim/lr")


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def finish(run, timeout_s: float = 600) -> str:
    output = run.communicate(timeout=timeout_s)[0]
    assert run.returncode == 0, output[-4000:]
    return output


def test_a_stopped_run_resumes_and_reproduces_the_uninterrupted_run(tiny_cache, tmp_path, ray_tmp):
    """Both runs with ppo.async_steps=2: every checkpoint keeps the two batches sampled by weights older than its own,
    and a resumed run trains on them. The stopped run's engine is killed after step 2, while the batches of steps 3 to 5
    are sampled ahead: its replacement must hold the weights the engine had (up to two updates behind the learner's)
    and redo the call it died in, or the steps after it differ from the uninterrupted run's (ppo.async_steps=1 has the
    same path with a queue of one: tests/test_e2e_ppo.py)."""
    settings = ("ppo.total_episodes=192", "checkpoint.every_steps=2", "ppo.async_steps=2")  # 12 steps
    with short_tmp("rw") as whole_tmp:  # the uninterrupted run, side by side with the one stopped, in a Ray of its own
        whole_run = start_run(tmp_path / "whole", whole_tmp, tiny_cache, *settings)
        try:
            stopped_and_resumed(tmp_path, tiny_cache, ray_tmp, settings, whole_run)
        finally:
            if whole_run.poll() is None:
                whole_run.kill()


TRACKED = ("logging.trackers=[tensorboard, wandb, mlflow]", "logging.wandb.mode=offline")


def stopped_and_resumed(tmp_path: Path, tiny_cache: Path, ray_tmp: str, settings: tuple, whole_run) -> None:
    out = tmp_path / "stopped"
    settings = (*settings, *TRACKED)  # (the trackers change no figure the whole run's are compared by)
    run = start_run(out, ray_tmp, tiny_cache, *settings)
    wait_for_steps(run, out, 2)
    os.kill(actor_pid(ray_tmp, "GenerationActor"), signal.SIGKILL)
    # stopped late enough that the checkpoint resumed from (the one before the damaged latest) comes after the steps
    # the replacement engine sampled: those are compared as the stopped run recorded them
    wait_for_steps(run, out, 7)
    # the stop is a scheduler's SIGTERM: test_signals.py's checks (its SIGINT run makes them for Ctrl-C)
    assert listening_addresses(run.pid) <= {"127.0.0.1"}, listening_addresses(run.pid)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    time.sleep(2)  # the raylet and the GCS exit right after the driver
    done = len(metric_rows(out))
    last = output.strip().splitlines()[-1]
    # saved now, or already by checkpoint.every_steps when the stop came right after an even step
    assert run.returncode == 143 and (f"checkpoint saved to {out / 'checkpoints' / f'step-{done:06d}'}" in last
                                      or f"the last checkpoint (step {done}) is current" in last), output[-3000:]
    assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    assert f"stopped by SIGTERM after {done} of 12 steps" in last, last
    assert ray_processes(ray_tmp) == [], ray_processes(ray_tmp)
    assert not (out / "run.lock").exists()  # the output dir is free for the next run
    assert [row["step"] for row in metric_rows(out)] == list(range(1, done + 1))
    assert 7 <= done < 12
    assert "recovery: generation actor died while" in output and "replaced generation-0 in" in output, output[-3000:]
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved][-1] == f"step-{done:06d}" and len(saved) == 2  # keep_last=2
    assert json.loads((saved[-1] / "trainer.json").read_text())["step"] == done
    # (a new run into this used output dir is refused: test_checkpoint.py, at the layer that decides it)

    from transformers import AutoTokenizer

    finish(whole_run)
    whole = metric_rows(tmp_path / "whole")
    final_model = tmp_path / "whole" / "final_model"
    with ThreadPoolExecutor(1) as beside:  # vLLM loads the whole run's final policy while the resume runs
        greedy = beside.submit(vllm_greedy, str(final_model), AutoTokenizer.from_pretrained(final_model)(
            "<|user|>\nHello\n<|assistant|>\n")["input_ids"], 4)
        # damage the latest: resume must fall back to the one before and still reproduce the whole run
        policy = saved[-1] / "policy" / "model.safetensors"
        data = bytearray(policy.read_bytes())
        data[-100] ^= 0xFF
        policy.write_bytes(bytes(data))
        output = finish(start_run(out, ray_tmp, tiny_cache, *settings, "resume=auto"))
        assert len(greedy.result()) == 4
    assert "does not match its SHA-256" in output and f"resumed from {saved[0]}" in output, output[-3000:]

    resumed = metric_rows(out)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # each step once: the redone ones replaced
    # batch s sampled by the weights of update s − 2, the first two by the initial policy; the same after the resume
    assert [r["async/staleness"] for r in whole] == [r["async/staleness"] for r in resumed] == [0, 1] + [2] * 10
    assert resumed[5]["recovery/generation_restarts"] == 1  # step 6, recorded by the stopped run after the kill
    assert all(r["time/weight_load"] > 0 for r in whole[3:])  # batch 4 on: loaded by the engines before sampling
    for a, b in zip(whole, resumed):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])
    assert_each_step_once_in_the_trackers(out)  # W&B offline and MLflow too, their earlier records deleted
    samples = (out / "samples.jsonl").read_text().count("\n")
    assert samples == (tmp_path / "whole" / "samples.jsonl").read_text().count("\n")
    assert_policy_loads_unchanged(sorted((out / "checkpoints").glob("step-*"))[-1] / "policy", final_model)


def assert_policy_loads_unchanged(policy: Path, final_model: Path) -> None:
    """A checkpoint's policy is a plain HF model: transformers loads it, and it is file for file the uninterrupted
    run's final policy (both after the last step), which vLLM loaded above."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(policy)
    files = sorted(p.name for p in policy.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files == sorted(p.name for p in final_model.iterdir())
    for name in files:
        assert (policy / name).read_bytes() == (final_model / name).read_bytes(), name


def test_killed_actors_are_replaced_a_killed_learner_restarts_and_a_stuck_reward_actor_is_replaced(tiny_cache, tmp_path,
                                                                                                     ray_tmp):
    """Two runs side by side, each in a Ray of its own: in one, every role's actor is killed in turn (the learner
    restarts from its checkpoint); in the other the reward actor is not dead, just not answering: after
    timeouts.score_s it is killed and replaced, and the step is redone."""
    out, stuck_out = tmp_path / "run", tmp_path / "stuck"
    with short_tmp("rs") as stuck_tmp:
        stuck = start_run(stuck_out, stuck_tmp, tiny_cache, "ppo.total_episodes=64", "models.reward.kind=function",
                          "models.reward.function=tests.hang_reward:hang_once", "models.value_init=policy",
                          f"models.reward.function_kwargs={{marker: {tmp_path / 'hung'}}}", "timeouts.score_s=8")
        run = start_run(out, ray_tmp, tiny_cache, "ppo.total_episodes=320", "checkpoint.every_steps=5")  # 20 steps
        try:
            for actor, after_step in (("GenerationActor", 2), ("RewardActor", 5), ("ReferenceActor", 8),
                                      ("LearnerActor", 12)):
                wait_for_steps(run, out, after_step)
                os.kill(actor_pid(ray_tmp, actor), signal.SIGKILL)
            output, stuck_output = finish(run), finish(stuck)
        finally:
            for started in (run, stuck):
                if started.poll() is None:
                    started.kill()

    rows = metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21)), output[-3000:]  # none lost, none twice
    last = rows[-1]
    assert {k: last[f"recovery/{k}_restarts"] for k in ("generation", "reward", "reference", "learner")} == {
        "generation": 1, "reward": 1, "reference": 1, "learner": 1}, output[-3000:]
    for role in ("generation", "reward", "reference"):
        assert f"recovery: {role} actor died while" in output and f"replaced {role}-0 in" in output, output[-3000:]
    assert "restarting the learner group from" in output and "checkpoints/step-0000" in output
    assert "(raylet)" not in output and "Traceback" not in output
    assert max(r["kl/sampler_vs_learner"] for r in rows) < 1e-4  # replacements got the current weights
    assert ray_processes(ray_tmp) == []

    assert "recovery: reward did not finish scoring a rollout within 8 s" in stuck_output, stuck_output[-3000:]
    assert "replaced reward-0 in" in stuck_output
    # the hang doctor at half of timeouts.score_s: one line naming the actor and our innermost frame, every stack kept
    (doctor,) = [line for line in stuck_output.splitlines() if "hang doctor:" in line]
    assert re.search(r"hang doctor: reward has been scoring a rollout for [4-7] s of its 8 s \(timeouts.score_s\); "
                     r"reward-0 is in \S+ \(rlhf_ray/rewards/\S+\.py:\d+\); every actor's stacks: \S+hang-step-1\.txt",
                     doctor), doctor
    stacks = (stuck_out / "logs" / "hang-step-1.txt").read_text()
    assert "hang_once" in stacks and "--- reward-0 (pid" in stacks and "--- learner-0 (pid" in stacks
    stuck_rows = metric_rows(stuck_out)
    assert [r["step"] for r in stuck_rows] == [1, 2, 3, 4] and stuck_rows[-1]["recovery/reward_restarts"] == 1
