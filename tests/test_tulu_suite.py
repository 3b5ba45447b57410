"""SFT and DPO end to end on tiny models, as a user runs them (the entry points), on two learner ranks under ZeRO-3:
they learn, they resume exactly, a killed learner rank restarts from the last checkpoint, and DPO computes each pair's
reference log-probs once for the whole run (resumes and restarts included). The chain with LoRA adapters (SFT, then
DPO from the SFT model) is checked on the ray job of tests/test_ray_job_submit.py, which runs it."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
import torch

from tests.conftest import process_table

TWO_RANKS_ZERO3 = ["resources.learner.num_actors=2", "resources.learner.num_cpus=0.5", "deepspeed.zero_stage=3",
                   "logging.progress_bar=false", "checkpoint.keep_last=4"]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_a_learner_rank_after(out, steps: int) -> threading.Thread:
    """A thread that SIGKILLs one learner rank (a worker of the shared session) once the run in ``out`` has recorded
    step ``steps``; ``.killed`` says whether it did."""
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            path = out / "metrics.jsonl"
            recorded = re.findall(r'"step": (\d+)', path.read_text()) if path.is_file() else []
            if recorded and int(recorded[-1]) >= steps:
                ranks = [pid for pid, _, command in process_table() if command.startswith("ray::LearnerActor")]
                os.kill(ranks[0], signal.SIGKILL)
                thread.killed = True
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.killed = False
    thread.start()
    return thread


@pytest.mark.e2e
def test_sft_learns_the_assistant_turns_and_resumes_exactly(ray_session, tiny_cache, tmp_path):
    from rlhf_ray.train_sft import main

    args = [f"cache_dir={tiny_cache}", *TWO_RANKS_ZERO3, "data.packing=true", "training.batch_size=16",
            "training.micro_batch_size=4", "training.epochs=3", "training.eval_every_steps=0", "checkpoint.every_steps=6"]
    out = tmp_path / "sft"
    assert main([*args, f"output_dir={out}"]) == 0
    metrics = rows(out)
    start, end = metrics[0]["eval/heldout/loss"], json.loads((out / "eval.json").read_text())["sets"]["heldout"]
    assert metrics[0]["step"] == 0 and end["loss"] < 0.7 * start, (start, end)
    steps = [(r["step"], r["loss/sft"], r["optim/lr"]) for r in metrics if "loss/sft" in r]
    assert len(steps) == 18 and metrics[1]["data/padding_fraction"] < 0.2  # packed rows: little padding
    assert (out / "final_model" / "model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    assert main([*args, f"output_dir={resumed}", f"resume={out}/checkpoints/step-000012"]) == 0
    again = [(r["step"], r["loss/sft"], r["optim/lr"]) for r in rows(resumed) if "loss/sft" in r]
    assert again == steps[12:] and len(again) == 6
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())


@pytest.mark.e2e
def test_dpo_learns_held_out_preferences_with_each_pairs_reference_logprobs_once(ray_session, tiny_cache, tmp_path):
    from rlhf_ray.train_dpo import main

    args = [f"cache_dir={tiny_cache}", *TWO_RANKS_ZERO3, "dpo.batch_size=32", "dpo.micro_batch_size=4",
            "dpo.epochs=2", "dpo.eval_every_steps=0", "checkpoint.every_steps=6"]
    out = tmp_path / "dpo"
    assert main([*args, f"output_dir={out}"]) == 0
    metrics = rows(out)
    start, end = metrics[0], json.loads((out / "eval.json").read_text())["sets"]["heldout"]
    assert metrics[0]["step"] == 0 and 0.3 <= start["eval/heldout/accuracy"] <= 0.7  # the reference itself: ties
    assert end["pairs"] == 64 and end["accuracy"] >= 0.9 and end["margin"] > 0, end
    steps = [r for r in metrics if "loss/dpo" in r]
    assert len(steps) == 12 and steps[-1]["loss/dpo"] < 0.5 * steps[0]["loss/dpo"]
    # 192 training pairs over two epochs: each pair's reference log-probs computed once, in the first epoch
    assert sum(r["reference/pairs_computed"] for r in steps[:6]) == 192
    assert sum(r["reference/pairs_computed"] for r in steps[6:]) == 0

    # Resumed from the end of the first epoch (its checkpoint has every pair's log-probs), and a learner rank killed
    # after step 8: the group restarts from that other run's checkpoint, as it has none of its own yet.
    resumed = tmp_path / "resumed"
    killer = kill_a_learner_rank_after(resumed, steps=8)
    assert main([*args, f"output_dir={resumed}", f"resume={out}/checkpoints/step-000006"]) == 0
    killer.join(timeout=1)
    again = [r for r in rows(resumed) if "loss/dpo" in r]
    assert [(r["step"], r["loss/dpo"], r["optim/lr"]) for r in again] == [
        (r["step"], r["loss/dpo"], r["optim/lr"]) for r in steps[6:]]  # each step once, as without the loss
    assert again[-1]["recovery/learner_restarts"] == 1 and killer.killed
    assert sum(r["reference/pairs_computed"] for r in again) == 0
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())


BAD_INPUTS = [
    ("sft", "empty data file", lambda t: [f"data.train={write(t / 'empty.jsonl', '')}"],
     "data file {t}/empty.jsonl has no rows (it is empty)"),
    ("sft", "no usable conversation", lambda t: [f"data.train={write(t / 'bad.jsonl', BROKEN_SFT)}"],
     "no usable SFT conversation in {t}/bad.jsonl"),
    ("sft", "a column that is not there", lambda t: ["data.messages_field=chat"],
     "messages_field='chat' is not a column of configs/data/tiny_sft.jsonl"),
    ("dpo", "no usable pair", lambda t: [f"data.train={write(t / 'bad.jsonl', BROKEN_SFT)}"],
     "no usable preference pair in data.train="),
    ("dpo", "a missing reference model", lambda t: [f"reference={t}/no-such-model"],
     "reference="),
    ("dpo", "a bad setting", lambda t: ["dpo.beta=-1"], "dpo.beta: Input should be greater than 0"),
    ("sft", "LoRA under ZeRO-3", lambda t: ["lora.rank=4", "deepspeed.zero_stage=3"],
     "deepspeed.zero_stage: 3 is not supported with lora"),
    ("dpo", "LoRA with a reference of its own", lambda t: ["lora.rank=4", f"reference={t}/sft"],
     "reference: with lora the reference is the policy's base weights (its adapters off); leave reference unset"),
]
BROKEN_SFT = '{"messages": []}\nnot json\n{"messages": [{"role": "user", "content": "no answer"}]}\n'


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("entry, case, overrides, message", BAD_INPUTS, ids=[f"{c[0]}: {c[1]}" for c in BAD_INPUTS])
def test_a_bad_sft_or_dpo_input_is_one_line_before_anything_starts(tiny_cache, tmp_path, capsys, entry, case,
                                                                   overrides, message):
    from rlhf_ray import train_dpo, train_sft

    main = {"sft": train_sft.main, "dpo": train_dpo.main}[entry]
    code = main([f"cache_dir={tiny_cache}", f"output_dir={tmp_path / 'run'}", "logging.progress_bar=false",
                 *overrides(tmp_path)])
    output = capsys.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if "error" in line.lower()]
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in output.err, output.err[-3000:]
    assert message.format(t=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
