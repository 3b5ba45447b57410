"""Policy evaluation (python -m rlhf_ray.evaluate): win-rate arithmetic, spec resolution and bad inputs without Ray;
two tiny policies end to end with real vLLM engines, judged by a reward function."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.cli import evaluate as ev
from rlhf_ray.evaluation import comparison
from rlhf_ray.evaluation import prompts as eval_prompts

ROOT = Path(__file__).resolve().parent.parent
TINY_PROMPTS = ROOT / "configs" / "data" / "tiny_prompts.jsonl"
CHAR_FREQUENCY = "function:rlhf_ray.rewards:char_frequency"


def fake_model(path: Path, architecture: str = "LlamaForCausalLM") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ no Ray

def test_win_rate_counts_ties_as_half():
    assert comparison.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, 0.0]) == (0.5 + 1 + 0 + 0.5) / 4
    assert comparison.win_rate([0.3, 0.1], [0.3, 0.1]) == 0.5  # against itself
    with pytest.raises(ValueError):
        comparison.win_rate([1.0], [1.0, 2.0])
    record = lambda score, tokens, finish, response="r": {"score": score, "tokens": tokens,  # noqa: E731
                                                          "finish_reason": finish, "response": response}
    records = {"a": [record(1.0, 4, "stop"), record(0.0, 8, "length")],
               "b": [record(2.0, 2, "stop", "other"), record(0.0, 2, "stop")]}
    prompts = [eval_prompts.EvalPrompt([{"role": "user", "content": "x"}], "f", 0, "s1"),
               eval_prompts.EvalPrompt([{"role": "user", "content": "y"}], "f", 1, "s2")]
    out = comparison.compare(records, prompts, "a", samples=2)
    assert out["policies"]["b"]["all"] == {"prompts": 2, "win_rate": 0.75, "mean_score": 1.0, "mean_tokens": 2.0,
                                           "eos_rate": 1.0, "same_as_baseline": 0.5}
    # side by side only where the answers differ: b's first; the baseline itself has none
    assert [s["row"] for s in out["samples"]["b"]] == [0] and out["samples"]["a"] == []
    assert comparison.spread([3, 5, 8, 9, 12], 3) == [3, 8, 12] and comparison.spread([4], 3) == [4] and comparison.spread([], 2) == []
    assert out["policies"]["a"]["all"]["win_rate"] == 0.5 and out["policies"]["a"]["all"]["eos_rate"] == 0.5
    assert out["policies"]["b"]["f/s1"]["win_rate"] == 1.0 and out["policies"]["b"]["f/s2"]["win_rate"] == 0.5
    assert list(out["policies"]["b"]) == ["all", "f", "f/s1", "f/s2"]
    assert comparison.shown_groups(out["policies"]["b"], ["f"]) == ["f", "f/s1", "f/s2"]  # 'all' is the one file


def test_policy_specs_resolve_or_fail_in_one_line(tmp_path):
    model = fake_model(tmp_path / "model")
    checkpoint = fake_model(tmp_path / "run" / "checkpoints" / "step-000012" / "policy").parent
    final = fake_model(tmp_path / "run" / "final_model")
    fake_model(tmp_path / "rm" / "final_model", "LlamaForSequenceClassification")
    assert ev.resolve_policy(str(model), None, 0) == str(model)
    assert ev.resolve_policy(str(checkpoint), None, 0) == str(checkpoint / "policy")
    assert ev.resolve_policy(str(checkpoint.parent / "step-12"), None, 0) == str(checkpoint / "policy")
    assert ev.resolve_policy(str(tmp_path / "run"), None, 0) == str(final)
    (tmp_path / "unfinished" / "checkpoints" / "step-000004").mkdir(parents=True)
    for spec, message in ((tmp_path / "nowhere", "does not exist"),
                          (tmp_path / "unfinished", "holds no HF model.*latest checkpoint is .*step-000004"),
                          (tmp_path / "rm", "sequence-classification model"),
                          ("tiny:nonsense", "unknown tiny model")):
        with pytest.raises(ValueError, match=message):
            ev.resolve_policy(str(spec), None, 0)
    with pytest.raises(ValueError, match="not NAME=SPEC"):
        ev.parse_policies(["no-name"], None, 0)
    with pytest.raises(ValueError, match="given twice"):
        ev.parse_policies([f"a={model}", f"a={model}"], None, 0)


def test_judge_specs_become_reward_configs():
    for spec in (CHAR_FREQUENCY, "function=rlhf_ray.rewards:char_frequency"):
        cfg = ev.reward_config(spec, ["function_kwargs.char=a"], "tulu")
        assert (cfg.kind, cfg.function, cfg.function_kwargs) == ("function", "rlhf_ray.rewards:char_frequency",
                                                                 {"char": "a"})
    assert ev.reward_config("model=tiny:reward", ["batch_size=4"], "tokenizer").model_dump(
        include={"kind", "model", "batch_size", "template"}) == {"kind": "model", "model": "tiny:reward",
                                                                 "batch_size": 4, "template": "tokenizer"}
    assert ev.reward_config("http://127.0.0.1:1/", [], "tulu").url == "http://127.0.0.1:1/"
    with pytest.raises(ValueError, match="batch_sise: unknown key"):
        ev.reward_config("model=tiny:reward", ["batch_sise=4"], "tulu")
    with pytest.raises(ValueError, match="give the function"):
        ev.reward_config("function=", [], "tulu")


def test_prompt_files_messages_strings_and_preference_pairs(tmp_path):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [turn("user", "hi")], "source": "a"},
                                                 {"messages": [turn("user", "  ")]}, "not json",
                                                 {"prompt": "plain", "source": "b"},
                                                 {"messages": [turn("user", "q"), turn("assistant", "sft answer")]},
                                                 {"prompt": "over the limit"}])
    prefs = write_jsonl(tmp_path / "prefs.tulu25.jsonl", [
        {"chosen": [turn("user", "which?"), turn("assistant", "good")],
         "rejected": [turn("user", "which?"), turn("assistant", "bad")], "source": "uf"}])
    prompts, files = eval_prompts.load_eval_prompts([str(chat), str(prefs)], limit=3)
    assert [(p.group, p.messages) for p in prompts] == [
        ("chat/a", [turn("user", "hi")]), ("chat/b", [turn("user", "plain")]), ("chat", [turn("user", "q")]),
        ("prefs/uf", [turn("user", "which?")])]
    assert files["chat"].skipped == {"empty_content": 1, "malformed_json": 1} and files["chat"].rows == 6
    assert files["prefs"].used == 1


def test_labels_of_a_verifiable_task_are_kept_and_rows_without_one_skipped(tmp_path):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    rows = write_jsonl(tmp_path / "arith.jsonl", [{"messages": user("2+2?"), "answer": 4}, {"messages": user("3+3?")}])
    prompts, files = eval_prompts.load_eval_prompts([str(rows)], limit=None, label_field="answer")
    assert [(p.messages[0]["content"], p.label) for p in prompts] == [("2+2?", "4")]
    assert files["arith"].skipped == {"no_label": 1}
    with pytest.raises(ValueError, match="--label-field solution is not a column"):
        eval_prompts.load_eval_prompts([str(rows)], limit=None, label_field="solution")


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    model = fake_model(tmp_path / "model")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "assistant", "content": "no user"}]}])
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "no prompt column"}])
    out = tmp_path / "out"
    base = ["--policy", f"m={model}", "--reward", CHAR_FREQUENCY, "--out", str(out)]
    cases = [([*base, "--prompts", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
             ([*base, "--prompts", str(empty)], "no usable prompt in .*empty.jsonl"),
             ([*base, "--prompts", str(other)], "none of the columns messages, prompt, chosen"),
             ([*base, "--prompts", str(TINY_PROMPTS), "--policy", f"x={tmp_path}/nope"], "--policy x=.*does not exist"),
             ([*base, "--prompts", str(TINY_PROMPTS), "--baseline", "zz"], "--baseline 'zz' is none of the policies"),
             ([*base, "--prompts", str(TINY_PROMPTS), "--reward-option", "batch_size=0"],
              "batch_size: .*greater than 0"),
             ([*base, "--prompts", str(TINY_PROMPTS)], "--policy m: .*tokenizer")]  # a config.json alone
    import re

    for argv, message in cases:
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()
    with pytest.raises(ValueError, match="cannot be imported"):
        ev.build_judge(ev.reward_config("function:rlhf_ray.rewards:nothing_here", [], "tulu"), None, 0)


def test_report_files_from_synthetic_results(tmp_path):
    prompts = [eval_prompts.EvalPrompt([{"role": "user", "content": f"q{i} | with a pipe"}], "f", i, None) for i in range(3)]
    records = {name: [{"policy": name, "index": i, "score": s, "tokens": 3, "finish_reason": "stop",
                       "response": f"{name} says\nline {i}"} for i, s in enumerate(scores)]
               for name, scores in (("base", [0.1, 0.2, 0.3]), ("new", [0.2, 0.2, 0.1]))}
    compared = comparison.compare(records, prompts, "base", samples=2)
    report = {"baseline": "base", "judge": {"kind": "function", "function": "m:f"},
              "settings": {"temperature": 0.0, "max_new_tokens": 8, "seed": 0},
              "prompt_files": {"f": {"path": "f.jsonl", "rows": 3, "used": 3, "skipped": {}}},
              "policies": {n: {"groups": g} for n, g in compared["policies"].items()}, "samples": compared["samples"]}
    written = comparison.write(tmp_path / "out", report, [r for rows in records.values() for r in rows])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    text = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| f | new | 3 | 0.500 | 0.1667 | 3.0 | 1.00 | 0.00 |" in text and "## new vs base: samples" in text
    assert "q0 \\| with a pipe" in text and "new says<br>line 2" in text


# ------------------------------------------------------------------------------------------------ end to end

def perturbed_policy(tiny_cache: Path, run_dir: Path) -> Path:
    """tiny:policy with its MLP weights scaled, saved as a run's checkpoint (<run>/checkpoints/step-000002/policy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.models.specs import resolve_model

    source = resolve_model("tiny:policy", tiny_cache)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.mul_(3.0)
    target = run_dir / "checkpoints" / "step-000002" / "policy"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target.parent


@pytest.mark.e2e
def test_two_tiny_policies_judged_by_a_function(ray_session, tiny_cache, tmp_path, capsys):
    """Three policies in one evaluation: the base, the same base again (the evaluation is reproducible: its engine,
    started afresh with the same seeds, gives the base's answers and scores; this was a second evaluation of its own)
    and a perturbed one."""
    checkpoint = perturbed_policy(tiny_cache, tmp_path / "run")
    argv = ["--policy", "base=tiny:policy", "--policy", "again=tiny:policy", "--policy",
            f"scaled={checkpoint.parent / 'step-2'}", "--prompts", str(TINY_PROMPTS), "--limit", "6", "--reward",
            CHAR_FREQUENCY, "--max-new-tokens", "12", "--samples", "2", "--cache-dir", str(tiny_cache)]
    assert ev.main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert "| tiny_prompts/rlhf-ray-tiny | scaled | 6 |" in capsys.readouterr().out

    out = tmp_path / "first"
    report = json.loads((out / "evaluation.json").read_text())
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert report["policies"]["scaled"]["path"] == str(checkpoint / "policy")
    assert report["policies"]["base"]["groups"]["all"]["win_rate"] == 0.5  # the baseline against itself
    by_policy = {name: sorted((r for r in rows if r["policy"] == name), key=lambda r: r["index"])
                 for name in ("base", "again", "scaled")}
    assert [len(v) for v in by_policy.values()] == [6, 6, 6]
    assert [r["response"] for r in by_policy["base"]] != [r["response"] for r in by_policy["scaled"]]
    for name, mine in by_policy.items():  # the JSON's numbers are what the responses imply
        stats = report["policies"][name]["groups"]["all"]
        assert stats["win_rate"] == comparison.win_rate([r["score"] for r in mine], [r["score"] for r in by_policy["base"]])
        assert stats["mean_score"] == pytest.approx(sum(r["score"] for r in mine) / 6)
        assert stats["mean_tokens"] == sum(r["tokens"] for r in mine) / 6
        assert stats["eos_rate"] == sum(r["finish_reason"] == "stop" for r in mine) / 6
        assert all(r["score"] == pytest.approx(r["response"].count("e") / max(1, len(r["response"]))) for r in mine)
        assert all(0 < r["tokens"] <= 12 for r in mine)
    assert len(report["samples"]["scaled"]) == 2 and "## scaled vs base: samples" in (out / "evaluation.md").read_text()
    import matplotlib.image

    assert matplotlib.image.imread(out / "evaluation.png").shape[2] in (3, 4)

    # reproducible: the base evaluated again gives the same answers, scores and figures (timings aside)
    strip = lambda r: {k: v for k, v in r.items() if k != "policy"}  # noqa: E731
    assert [strip(r) for r in by_policy["again"]] == [strip(r) for r in by_policy["base"]]
    assert report["policies"]["again"]["groups"] == report["policies"]["base"]["groups"]
    assert report["samples"]["again"] == [] and report["policies"]["again"]["groups"]["all"]["same_as_baseline"] == 1.0
