"""The bad-input matrix (issue 7): each bad input gives one clear error line — or a counted, logged skip —
and leaves what an earlier run wrote (metrics, checkpoints, config) as it was.

Whole runs are started as a user starts them (``python -m rlhf_ray.train``) on an output dir that holds an
earlier run and asks to resume it; every one of these fails before a cluster starts. Inputs that only
show up inside a role (a reward model's NaN, a reward function that raises) are fed to that role."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.config import dump_config
from rlhf_ray.data.sources import load_prompts
from rlhf_ray.run import checkpoint
from tests.conftest import ROOT, tiny_config
from tests.test_reward import batch_of

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def earlier_run(tmp_path, tiny_cache):
    """An output dir holding an earlier run: its metrics, samples, config and a valid checkpoint."""
    out = tmp_path / "run"
    cfg = tiny_config(out, tiny_cache)
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.1 * s}) + "\n" for s in (1, 2)))
    (out / "samples.jsonl").write_text(json.dumps({"step": 2, "prompt": "p", "response": "r"}) + "\n")
    (out / "config.yaml").write_text(dump_config(cfg))
    staging = checkpoint.begin(out, 2)
    (staging / "policy").mkdir()
    (staging / "policy" / "model.safetensors").write_bytes(b"0" * 64)
    checkpoint.commit(staging, 2, {"step": 2, "sampler": {}}, dump_config(cfg), keep_last=2)
    return out


def fingerprint(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parts[-2:-1] != ("logs",)}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def no_template_tokenizer(tmp_path: Path, tiny_cache: Path) -> str:
    from rlhf_ray.models.specs import resolve_model

    copy = tmp_path / "policy-without-template"
    shutil.copytree(resolve_model("tiny:policy", tiny_cache), copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    return str(copy)


def read_only_dir(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        return "/sys/rlhf_ray_run"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "run")


# (case, overrides built from (tmp_path, tiny_cache, earlier run dir), exit code, what the one line says)
RUN_CASES = [
    ("empty prompts file", lambda t, c, o: [f"data.prompts={write(t / 'p.jsonl', '')}"], 1,
     "has no rows (it is empty)"),
    ("only malformed JSON lines", lambda t, c, o: [f"data.prompts={write(t / 'p.jsonl', '{oops' + chr(10))}"], 1,
     "has no rows that parse as JSON objects (1 lines did not)"),
    ("every prompt longer than the context", lambda t, c, o: ["data.max_prompt_tokens=2", "data.overlong=drop"], 1,
     "no usable prompt in configs/data/tiny_prompts.jsonl (0 prompts from 64 rows; skipped: too_long=64"),
    ("tokenizer without a chat template", lambda t, c, o: [f"models.policy={no_template_tokenizer(t, c)}",
                                                           "data.template=tokenizer"], 1,
     "data.template='tokenizer' but the policy's tokenizer"),
    ("reward function that cannot be imported", lambda t, c, o: [
        "models.reward.kind=function", "models.reward.function=no_such_module:score", "models.value_init=policy"], 1,
     "models.reward.function='no_such_module:score' cannot be imported"),
    ("model path that does not exist", lambda t, c, o: ["models.policy=/no/such/model"], 1,
     "models.policy='/no/such/model': no such model directory"),
    ("missing checkpoint", lambda t, c, o: [f"resume={t / 'nowhere'}"], 1, "does not exist"),
    ("corrupt checkpoint", lambda t, c, o: [f"resume={corrupt_copy(o, t)}"], 1, "does not match its SHA-256"),
    ("resume with another batch geometry", lambda t, c, o: ["ppo.rollout_batch_size=8", "ppo.total_episodes=320"], 1,
     "cannot resume from .* differs in .*ppo.rollout_batch_size: 16 -> 8"),
    ("resume with another model", lambda t, c, o: ["models.policy=tiny:policy-tied"], 1,
     "differs in .*models.policy: 'tiny:policy' -> 'tiny:policy-tied'"),
    ("read-only output dir", lambda t, c, o: [f"output_dir={read_only_dir(t)}"], 2, "is not writable"),
    ("a new run into a used output dir", lambda t, c, o: ["resume=null"], 2, "already holds a run"),
]


def corrupt_copy(out: Path, tmp_path: Path) -> str:
    copy = tmp_path / "corrupt"
    shutil.copytree(out / "checkpoints" / "step-000002", copy)
    (copy / "policy" / "model.safetensors").write_bytes(b"1" * 64)
    return str(copy)


@pytest.mark.parametrize("case, overrides, code, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_a_bad_run_input_is_one_line_and_damages_nothing(tmp_path, tiny_cache, earlier_run, capsys, case, overrides,
                                                         code, message):
    from rlhf_ray.train import main

    before = fingerprint(earlier_run)
    argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"models.cache_dir={tiny_cache}",
            f"output_dir={earlier_run}", "resume=auto", "logging.progress_bar=false",
            *overrides(tmp_path, tiny_cache, earlier_run)]
    started = time.perf_counter()
    assert main(argv) == code
    seconds = time.perf_counter() - started
    output = capsys.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in output.err, output.err[-3000:]
    assert message in lines[0] or re.search(message, lines[0]), lines[0]
    assert fingerprint(earlier_run) == before  # nothing the earlier run wrote was touched
    assert seconds < 60, f"{case}: told after {seconds:.0f} s"


def test_a_hub_name_without_network_is_told_within_seconds(tmp_path, tiny_cache, capsys):
    """Real attempt, no fake: offline (this machine) the Hub cannot be reached; online the name does not exist."""
    from rlhf_ray.train import main

    started = time.perf_counter()
    code = main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"models.cache_dir={tiny_cache}",
                 f"output_dir={tmp_path / 'run'}", "models.policy=rlhf-ray-tests/no-such-model-7f3a"])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 1 and ("Hub cannot be reached" in err or "no such model on the Hugging Face Hub" in err), err
    assert seconds < 30 and "Retrying" not in err, (seconds, err[-2000:])


# ------------------------------------------------------------------------ skips: counted and logged

def test_malformed_rows_and_overlong_prompts_are_counted_skips(tmp_path, tiny_tokenizer, caplog):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"messages": MESSAGES})
    path.write_text("\n".join([good, "{broken", "[1]", json.dumps({"messages": []}),
                               json.dumps({"messages": [{"role": "user", "content": "word " * 200}]}), good]) + "\n")
    cfg = tiny_config(tmp_path, None, f"data.prompts={path}", "data.max_prompt_tokens=64", "data.overlong=drop").data
    dataset = load_prompts(cfg, tiny_tokenizer)
    assert len(dataset) == 2
    assert dataset.skipped == {"malformed_json": 1, "not_an_object": 1, "empty_or_not_a_list": 1, "too_long": 1}
    assert "2 line(s) skipped" in caplog.text and "too_long=1" in caplog.text


# ------------------------------------------------------------------------ inside the reward role

@pytest.mark.parametrize("function, message", [
    (lambda p, r: 1 / 0, r"raised ZeroDivisionError: division by zero for sample 0 \(response 'x'\)"),
    (lambda p, r: "0.5", r"returned '0.5' \(str\) for sample 0; it must return one number"),
    (lambda p, r: None, r"returned None \(NoneType\)"),
    (lambda p, r: float("inf"), "returned inf for sample 0"),
])
def test_a_reward_function_that_raises_or_returns_no_number(function, message):
    actor = RewardActor({"kind": "function", "function": "rlhf_ray.rewards:char_frequency"}, None)
    actor.backend.function = function
    with pytest.raises(ValueError, match=r"models.reward.function='rlhf_ray.rewards:char_frequency' " + message):
        actor.score(batch_of(["x"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_from_a_reward_model_is_an_error_naming_it(tiny_cache, value):
    from rlhf_ray.models.specs import resolve_model

    path = resolve_model("tiny:reward", tiny_cache)
    actor = RewardActor({"kind": "model", "model": "tiny:reward"}, path)
    with torch.no_grad():
        actor.backend.model.score.weight.fill_(value)
    with pytest.raises(ValueError, match=r"the reward model \(tiny:reward\) scored 2 of 2 samples (nan|inf) "
                                         r"\(first: sample 0"):
        actor.score(batch_of(["a", "b"]))
