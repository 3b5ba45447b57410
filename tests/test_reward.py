"""The reward role's scoring, outside Ray (the class is plain Python; Ray only hosts it)."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.rewards import char_frequency
from rlhf_ray.rewards.backends import BACKENDS, FunctionBackend
from rlhf_ray.rewards.base import load_function, write_reward_stats
from rlhf_ray.rewards.model import ModelBackend


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
    assert seconds >= 0 and char_frequency("", "eeee") == 1.0 and scores.dtype == torch.float32
    assert isinstance(actor.backend, FunctionBackend) and actor.stored_statistics() is None
    with pytest.raises(ValueError, match="cannot be imported"):
        load_function("rlhf_ray.rewards:nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_function("no_such_module:f")
    nan = RewardActor({"kind": "function", "function": "math:sqrt"}, None)
    nan.backend.function = lambda p, r: float("nan")
    with pytest.raises(ValueError, match="returned nan for sample 0"):
        nan.score(batch_of(["x"]))


def test_model_reward_uses_its_own_tokenizer_and_template(tiny_cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.models.specs import resolve_model

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
    assert isinstance(actor.backend, ModelBackend) and actor.stored_statistics() is None  # tiny:reward has none


def test_model_backend_passes_the_whole_conversation(tiny_cache, monkeypatch):
    """The RM reads prompt turns + the response as one conversation, through modeling.encode_conversations
    (the encoding RM training and evaluation use), in batches of batch_size."""
    from rlhf_ray.models import modeling
    from rlhf_ray.models.specs import resolve_model

    seen = []
    encode = modeling.encode_conversations
    monkeypatch.setattr(modeling, "encode_conversations",
                        lambda tok, convs, template, max_length: seen.append(convs) or encode(tok, convs, template,
                                                                                              max_length))
    path = resolve_model("tiny:reward", tiny_cache)
    actor = RewardActor({"kind": "model", "model": path, "batch_size": 2, "max_length": 64}, path)
    actor.score(batch_of(["one", "two", "three"]))
    assert [len(c) for c in seen] == [2, 1]
    assert seen[0][1] == [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "two"}]


def test_stored_statistics_come_from_the_rm_directory(tiny_cache, tmp_path):
    import shutil

    from rlhf_ray.models.specs import resolve_model

    rm = tmp_path / "rm"
    shutil.copytree(resolve_model("tiny:reward", tiny_cache), rm)
    with pytest.raises(ValueError, match=r"models.reward.normalize='stored' needs .*rm/reward_stats.json.*"
                                         r"normalize=running"):
        RewardActor({"kind": "model", "model": str(rm), "normalize": "stored"}, str(rm))
    stats = write_reward_stats(rm, torch.tensor([1.0, 3.0]), source="unit test")
    assert stats == {"mean": 2.0, "std": 1.0, "count": 2, "source": "unit test"}
    actor = RewardActor({"kind": "model", "model": str(rm), "normalize": "stored"}, str(rm))
    assert actor.stored_statistics() == stats


def test_every_kind_is_a_registered_backend():
    from typing import get_args

    from rlhf_ray.config import RewardConfig

    assert set(BACKENDS) == set(get_args(RewardConfig.model_fields["kind"].annotation)) == {
        "model", "function", "http", "serve", "judge", "composite"}
