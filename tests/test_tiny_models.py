"""The tiny offline models load unchanged in transformers and in vLLM, and are deterministic."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.models.specs import resolve_model
from rlhf_ray.models.tiny import build_tiny_models
from tests.conftest import vllm_greedy


def test_specs_resolve_and_hub_names_pass_through(tiny_cache):
    assert resolve_model("tiny:policy", tiny_cache).endswith("/policy")
    assert resolve_model("allenai/tulu-2-13b", tiny_cache) == "allenai/tulu-2-13b"
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model("tiny:critic", tiny_cache)


def test_build_is_deterministic_and_cached(tiny_cache, tmp_path):
    other = build_tiny_models(tmp_path, seed=0)
    for kind in ("policy", "reward", "policy-tied"):
        a = load_file(build_tiny_models(tiny_cache, seed=0) / kind / "model.safetensors")
        b = load_file(other / kind / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (other / "COMPLETE").stat().st_mtime_ns
    assert build_tiny_models(tmp_path, seed=0) == other and (other / "COMPLETE").stat().st_mtime_ns == stamp
    seed0 = load_file(other / "policy" / "model.safetensors")
    seed1 = load_file(build_tiny_models(tmp_path, seed=1) / "policy" / "model.safetensors")
    assert not torch.equal(seed0["model.embed_tokens.weight"], seed1["model.embed_tokens.weight"])


def test_loads_in_transformers(tiny_cache):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy_dir, reward_dir = resolve_model("tiny:policy", tiny_cache), resolve_model("tiny:reward", tiny_cache)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    assert tok.eos_token == "</s>" and tok.pad_token_id is not None
    assert len(tok("<|user|>\n", add_special_tokens=False)["input_ids"]) == 2  # special token + newline
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    n_params = sum(p.numel() for p in policy.parameters())
    assert 200_000 <= n_params <= 5_000_000 and policy.config.head_dim >= 32
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    ids = tok(["<|user|>\nhi\n<|assistant|>\nyes</s>"], return_tensors="pt")
    assert rm(**ids).logits.shape == (1, 1)


@pytest.mark.e2e
def test_loads_in_vllm_and_matches_hf_greedy(tiny_cache):
    """vLLM (in a subprocess: its CPU engine binds threads) decodes greedily exactly like HF generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir = resolve_model("tiny:policy", tiny_cache)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompt = tok("<|user|>\nWrite a poem about the sea.\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(policy_dir)
    hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, min_new_tokens=12)[0, len(prompt):].tolist()
    assert vllm_greedy(policy_dir, prompt, 12) == hf_out
