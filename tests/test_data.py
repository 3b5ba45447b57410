from __future__ import annotations

import json

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data.sources import PromptSampler, load_preferences, load_prompts, render_tulu
from tests.conftest import shared_file

GOOD = {"messages": [{"role": "user", "content": "Name a red fruit."}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_render_tulu_matches_the_tulu_format():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"}]
    assert render_tulu(msgs) == "<|user|>\nHi\n<|assistant|>\nHello</s>\n<|user|>\nBye?\n<|assistant|>\n"


def test_tulu_and_tokenizer_template_agree_on_the_tiny_tokenizer(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_tulu(msgs)


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    rows = [GOOD,
            {"messages": []},                                              # empty
            {"messages": [{"role": "user", "content": "   "}]},            # empty content
            {"messages": [{"role": "robot", "content": "x"}]},             # malformed role
            {"messages": "not a list"},                                    # malformed
            {"messages": [{"role": "user", "content": "long " * 200}]},    # too long
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},  # SFT row: prompt kept
            {"messages": [{"role": "system", "content": "S"}]}]            # no user turn
    cfg = DataConfig(prompts=write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_tokens=40, overlong="drop")
    ds = load_prompts(cfg, tiny_tokenizer)
    assert len(ds) == 2 and ds.total_rows == 8
    assert ds.skipped == {"empty_or_not_a_list": 2, "empty_content": 1, "malformed_message": 1,
                          "too_long": 1, "does_not_end_with_user_turn": 1}
    assert ds.prompts[1].text == "<|user|>\nQ\n<|assistant|>\n"
    assert "skipped" in ds.summary() and "too_long=1" in ds.summary()


def test_overlong_truncation_keeps_the_generation_prompt(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "word " * 100}]}]
    cfg = DataConfig(prompts=write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_tokens=16, overlong="truncate")
    ds = load_prompts(cfg, tiny_tokenizer)
    assert ds.truncated == 1 and len(ds.prompts[0].token_ids) == 16
    assert ds.prompts[0].text.endswith("<|assistant|>\n")


def test_plain_prompt_field_and_missing_column(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "What is 2+2?"}, {"q": ""}])
    ds = load_prompts(DataConfig(prompts=path, prompt_field="q"), tiny_tokenizer)
    assert [p.text for p in ds.prompts] == ["<|user|>\nWhat is 2+2?\n<|assistant|>\n"]
    assert ds.skipped == {"empty_content": 1}
    with pytest.raises(ValueError, match="data.messages_field='messages' is not a column"):
        load_prompts(DataConfig(prompts=path), tiny_tokenizer)


def test_missing_file_and_empty_result(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError):
        load_prompts(DataConfig(prompts=str(tmp_path / "none.jsonl")), tiny_tokenizer)
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": []}])
    with pytest.raises(ValueError, match="no usable prompt"):
        load_prompts(DataConfig(prompts=path), tiny_tokenizer)


def test_parquet_source(tmp_path, tiny_tokenizer):
    import datasets
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(tmp_path / "p.parquet"))
    assert len(load_prompts(DataConfig(prompts=str(tmp_path / "p.parquet")), tiny_tokenizer)) == 2


def test_sampler_is_a_pure_function_of_the_step_and_covers_each_epoch():
    a, b = PromptSampler(10, 3, seed=1), PromptSampler(10, 3, seed=1)
    first = [a.batch(s) for s in range(3)]
    assert first == [b.batch(s) for s in range(3)]
    assert len(set(sum(first, []))) == 9                           # no repeats within an epoch
    assert a.state_dict(3) == {"epoch": 1, "position": 0, "seed": 1, "n": 10, "batch_size": 3, "shuffle": True}
    assert a.state_dict(2)["position"] == 6
    assert a.batch(3) != first[0] or a.batch(4) != first[1]        # tail of 1 dropped, a new order
    assert a.batch(7) == b.batch(7)                                # a resumed run reads the same next batch
    assert PromptSampler(10, 10, seed=0, shuffle=False).batch(0) == list(range(10))
    a.check_state(a.state_dict(5), 5)
    with pytest.raises(ValueError, match="seed 1 -> 5"):
        PromptSampler(10, 3, seed=5).check_state(a.state_dict(5), 5)
    with pytest.raises(ValueError, match="n 10 -> 11"):
        PromptSampler(11, 3, seed=1).check_state(a.state_dict(5), 5)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        PromptSampler(2, 3, seed=0)


def test_preferences_schema(tmp_path):
    u = {"role": "user", "content": "Q"}
    rows = [{"chosen": [u, {"role": "assistant", "content": "good"}],
             "rejected": [u, {"role": "assistant", "content": "bad"}], "source": "s"},
            {"chosen": [u, {"role": "assistant", "content": "same"}],
             "rejected": [u, {"role": "assistant", "content": "same"}]},
            {"chosen": [u, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
            {"chosen": [u], "rejected": [u]},
            {"chosen": None, "rejected": []}]
    ds = load_preferences(write_jsonl(tmp_path / "prefs.jsonl", rows))
    assert len(ds) == 1 and ds.pairs[0].chosen == "good" and ds.pairs[0].prompt == [u]
    assert ds.skipped == {"identical_responses": 1, "prompts_differ": 1, "no_final_assistant_turn": 1,
                          "empty_or_not_a_list": 1}


def test_real_prompt_file(tiny_tokenizer):
    path = shared_file("starter/prompts_ppo.jsonl")
    ds = load_prompts(DataConfig(prompts=str(path), max_prompt_tokens=4096), tiny_tokenizer)
    assert ds.total_rows == 412 and len(ds) + sum(ds.skipped.values()) == 412
    assert all(p.text.startswith("<|user|>\n") and p.text.endswith("<|assistant|>\n") for p in ds.prompts)


def test_real_preference_files():
    train = load_preferences(str(shared_file("starter/prefs_train.tulu25.jsonl")))
    assert train.total_rows == 1574 and len(train) + sum(train.skipped.values()) == 1574 and len(train) > 1500
    evals = load_preferences(str(shared_file("starter/prefs_eval_alpacaeval.tulu25.jsonl")))
    assert evals.total_rows == 200 and len(evals) > 190
