"""Reward-model training end to end: the generic learner running the Bradley–Terry objective on the real
engines (Ray, DeepSpeed) learns a learnable preference set, and what it saves is an RM the reward backends
and the PPO critic load unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.algorithms.preference_math import bradley_terry_loss, pairwise_accuracy
from tests.conftest import ROOT


def test_bradley_terry_loss_matches_its_formula_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(loss, expected)
    assert float(stats["accuracy"]) == pytest.approx(1 / 3)  # a tie is not a win
    with_margin, _ = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 1.0, 1.0]))
    assert with_margin > loss  # the chosen side must win by more
    half, _ = bradley_terry_loss(chosen, rejected, num_pairs=6)  # a share of a global mean over 6 pairs
    torch.testing.assert_close(half, loss / 2)
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(1 / 3)


def test_hold_out_is_per_source_and_seeded():
    from rlhf_ray.data.sources import PreferencePair, hold_out

    pairs = [PreferencePair([], f"c{i}", f"r{i}", source="a" if i < 40 else "b") for i in range(60)]
    train, held = hold_out(pairs, 0.25, seed=3)
    assert sum(p.source == "a" for p in held) == 10 and sum(p.source == "b" for p in held) == 5
    assert not {p.chosen for p in train} & {p.chosen for p in held}
    assert hold_out(pairs, 0.25, seed=3)[1] == held and hold_out(pairs, 0.25, seed=4)[1] != held


def test_preference_margins_are_read_and_bad_ones_counted(tmp_path):
    from rlhf_ray.data.sources import load_preferences

    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({**row, "margin": m}) for m in (1.5, "big", None, float("inf"))) + "\n")
    loaded = load_preferences(str(path), margin_field="margin")
    assert [p.margin for p in loaded.pairs] == [1.5] and loaded.skipped["bad_margin"] == 3
    assert [p.margin for p in load_preferences(str(path)).pairs] == [0.0] * 4  # no margin_field: m = 0


def test_bad_preference_data_is_one_line_before_anything_starts(tiny_cache, tmp_path, capsys):
    from rlhf_ray.train_rm import main

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "not a list", "rejected": []}\nnot json\n')
    common = [f"cache_dir={tiny_cache}", "logging.progress_bar=false"]
    assert main([*common, f"output_dir={tmp_path / 'a'}", f"data.train={broken}"]) == 1
    assert main([*common, f"output_dir={tmp_path / 'b'}", f"data.train={tmp_path / 'missing.jsonl'}"]) == 1
    assert main([*common, f"output_dir={tmp_path / 'c'}", "training.batch_size=10", "training.micro_batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "no usable preference pair" in err and "malformed_json" in err and "empty_or_not_a_list" in err
    assert "missing.jsonl does not exist" in err
    assert "training.micro_batch_size: 4 does not divide the per-rank batch 10" in err


@pytest.mark.e2e
def test_tiny_rm_learns_held_out_preferences_and_loads_everywhere(ray_session, tiny_cache, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.modeling import (check_same_tokenizer, encode_conversations, load_reward_tokenizer,
                                          load_value_model)
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.models.tiny import tiny_preferences
    from rlhf_ray.train_rm import main

    prefs = tmp_path / "prefs.jsonl"  # other rows than the embedded config's file: seed 7
    prefs.write_text("".join(json.dumps(r) + "\n" for r in tiny_preferences(ROOT / "configs/data/tiny_prompts.jsonl",
                                                                             160, seed=7)))
    out = tmp_path / "rm"
    # two learner ranks under ZeRO-3: the data-parallel path, and gathers after ZeRO-3 evaluation forwards
    args = ["model=tiny:policy", f"cache_dir={tiny_cache}", f"data.train={prefs}", "logging.progress_bar=false",
            "training.epochs=2", "training.eval_every_steps=5", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
            "resources.learner.num_actors=2", "resources.learner.num_cpus=0.5", "deepspeed.zero_stage=3"]
    assert main([*args, f"output_dir={out}"]) == 0
    result = json.loads((out / "eval.json").read_text())["sets"]["heldout"]
    assert result["pairs"] == 40 and result["accuracy"] >= 0.9, result
    assert all(row["accuracy"] >= 0.85 for row in result["per_source"].values()), result
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/bradley_terry" in r]
    assert len(steps) == 14 and steps[-1]["loss/bradley_terry"] < steps[0]["loss/bradley_terry"] / 2
    assert rows[0]["step"] == 0 and "eval/heldout/accuracy" in rows[0]  # the untrained baseline

    # the saved RM is the evaluated one, scored the way the reward backends score
    final = out / "final_model"
    rm = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = load_reward_tokenizer(str(final))
    pairs = [json.loads(line) for line in prefs.read_text().splitlines()]  # train and held-out
    enc = encode_conversations(tokenizer, [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs], "tulu", 512)
    with torch.no_grad():
        scores = rm(**enc).logits[:, 0]
    assert pairwise_accuracy(scores[:len(pairs)], scores[len(pairs):]) >= 0.9
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["count"] == 80 and stats["std"] > 0 and "heldout" in stats["source"]

    # the evaluation command compares it with another reward (a function) through the reward backends
    from rlhf_ray.cli.rm_eval import main as rm_eval

    assert rm_eval(["--data", str(prefs), "--rm", f"trained={final}", "--rm",
                    "e_share=function:rlhf_ray.rewards:char_frequency", "--out", str(tmp_path / "cmp")]) == 0
    compared = json.loads((tmp_path / "cmp" / "rm_eval.json").read_text())
    assert compared["trained"]["sets"]["prefs"]["accuracy"] >= 0.9 and set(compared) == {"trained", "e_share"}
    table = (tmp_path / "cmp" / "rm_eval.md").read_text()
    assert "| prefs | **all** | 160 |" in table and "polite-vs-rude" in table and "e_share" in table

    # it can start a PPO critic (Tulu 2.5), and a tokenizer that differs from the policy's is refused
    policy = resolve_model("tiny:policy", tiny_cache)
    check_same_tokenizer(policy, str(final), "the value model's source")
    value = load_value_model("reward", policy, str(final), "float32")
    torch.testing.assert_close(value.head.weight, rm.score.weight)
    other = tmp_path / "other_tokenizer"
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(policy, str(other), "the value model's source")

    # resumed from its step-5 checkpoint (in another directory), the run continues exactly: same losses, same result
    resumed = tmp_path / "resumed"
    assert main([*args, f"output_dir={resumed}", f"resume={out}/checkpoints/step-000005"]) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: [(r["step"], r["loss/bradley_terry"], r["optim/lr"]) for r in rows  # noqa: E731
                           if "loss/bradley_terry" in r]
    assert losses(again) == losses(steps)[5:] and len(losses(again)) == 9
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())
