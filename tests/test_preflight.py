"""Bad inputs that need no cluster are caught before one starts, each with one clear line (issue 7's matrix,
the part checkable up front)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from rlhf_ray.config import RewardConfig
from rlhf_ray.data.sources import load_rows
from rlhf_ray.run.preflight import (PreflightError, check_model_path, check_output_dir, check_reward_function,
                                    check_reward_template)
from tests.conftest import ROOT

MESSAGES = [{"role": "user", "content": "hi"}]


def test_jsonl_skips_and_counts_broken_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n{not json\n\n[1, 2]\n" + json.dumps({"messages": MESSAGES}))
    rows = load_rows(str(path))
    assert len(rows) == 2 and rows.columns == {"messages"}
    assert rows.skipped == {"malformed_json": 1, "not_an_object": 1}


@pytest.mark.parametrize("content, message", [("", "has no rows (it is empty)"),
                                              ("{oops\n", "has no rows that parse as JSON objects (1 lines did not)")])
def test_a_jsonl_without_rows_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_rows(str(path))


def test_output_dir_must_be_writable(tmp_path):
    assert check_output_dir(tmp_path / "new" / "run").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match="output_dir=.* is not writable"):
        check_output_dir(blocker / "run")


def test_model_paths(tmp_path, tiny_cache):
    from rlhf_ray.models.specs import resolve_model

    check_model_path("tiny:policy", resolve_model("tiny:policy", tiny_cache), "models.policy")
    with pytest.raises(PreflightError, match="models.policy='/nope/model': no such model directory"):
        check_model_path("/nope/model", "/nope/model", "models.policy")
    with pytest.raises(PreflightError, match="models.reward.model=.* is a directory without config.json"):
        check_model_path(str(tmp_path), str(tmp_path), "models.reward.model")


@pytest.mark.parametrize("function, kwargs, message", [
    ("no_such_module:fn", {}, "cannot be imported: No module named 'no_such_module'"),
    ("rlhf_ray.rewards:no_such_function", {}, "cannot be imported"),
    ("rlhf_ray.rewards:concise_answer", {"max_wordz": 3}, "unexpected keyword argument 'max_wordz'"),
])
def test_reward_functions_are_checked_up_front(function, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_reward_function(RewardConfig(kind="function", function=function, function_kwargs=kwargs))


def test_good_reward_function_passes():
    check_reward_function(RewardConfig(kind="function", function="rlhf_ray.rewards:concise_answer",
                                       function_kwargs={"max_words": 3}))


def test_reward_template_the_rm_tokenizer_cannot_render(tmp_path, tiny_cache):
    from transformers import AutoTokenizer

    from rlhf_ray.models.specs import resolve_model

    rm = tmp_path / "rm"
    shutil.copytree(resolve_model("tiny:reward", tiny_cache), rm)
    tokenizer = AutoTokenizer.from_pretrained(rm)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(rm)
    (rm / "chat_template.jinja").unlink(missing_ok=True)
    check_reward_template(RewardConfig(model=str(rm), template="tulu"), str(rm), MESSAGES)
    with pytest.raises(PreflightError, match="models.reward.template='tokenizer' cannot render"):
        check_reward_template(RewardConfig(model=str(rm), template="tokenizer"), str(rm), MESSAGES)


@pytest.mark.e2e
def test_a_bad_reward_function_is_reported_before_ray_starts(tiny_cache, tmp_path):
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "rlhf_ray.train", "models.reward.kind=function",
                          "models.reward.function=no_such_module:fn", "models.value_init=policy",
                          f"models.cache_dir={tiny_cache}", f"output_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].endswith(
        "error: models.reward.function='no_such_module:fn' cannot be imported: No module named 'no_such_module'")
    assert "ready" not in run.stderr and time.perf_counter() - started < 60
