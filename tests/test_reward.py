"""The reward role's scoring, outside Ray (the class is plain Python; Ray only hosts it)."""
from __future__ import annotations

import pytest
import torch

from actors.reward import RewardActor, load_function
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.rewards import char_frequency


def batch_of(responses):
    n = len(responses)
    msgs = [[{"role": "user", "content": "Say something."}]] * n
    return RolloutBatch.from_samples([[1]] * n, [[2]] * n, [[0.0]] * n, ["stop"] * n, msgs,
                                     ["<|user|>\nSay something.\n<|assistant|>\n"] * n, responses, pad_token_id=0)


def test_function_reward_with_kwargs_and_clear_errors():
    actor = RewardActor({"kind": "function", "function": "rlhf_ray.rewards:char_frequency",
                         "function_kwargs": {"char": "a"}}, None)
    scores, seconds = actor.score(batch_of(["aab", "", "bbbb"]))
    torch.testing.assert_close(scores, torch.tensor([2 / 3, 0.0, 0.0]))
    assert seconds >= 0 and char_frequency("", "eeee") == 1.0
    with pytest.raises(ValueError, match="cannot be imported"):
        load_function("rlhf_ray.rewards:nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_function("no_such_module:f")
    nan = RewardActor({"kind": "function", "function": "math:sqrt"}, None)
    nan.function = lambda p, r: float("nan")
    with pytest.raises(ValueError, match="returned nan for sample 0"):
        nan.score(batch_of(["x"]))


def test_model_reward_uses_its_own_tokenizer_and_template(tiny_cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.model_specs import resolve_model

    path = resolve_model("tiny:reward", tiny_cache)
    actor = RewardActor({"kind": "model", "model": path, "batch_size": 2}, path)
    responses = ["The sea is blue.", "No.", "A much longer answer about the quiet forest at night."]
    scores, _ = actor.score(batch_of(responses))
    tok, rm = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    for response, score in zip(responses, scores):
        text = f"<|user|>\nSay something.\n<|assistant|>\n{response}</s>\n"
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        assert score.item() == pytest.approx(rm(**ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(scores.tolist())) == 3
