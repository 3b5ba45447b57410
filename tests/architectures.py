"""Tiny random Hugging Face models of several architectures (tests of weight sync and of the forward passes)."""
from __future__ import annotations

import torch
import transformers as T

# name -> (model class, config class, config overrides): tied heads, fused HF projections (Phi-3's qkv_proj and
# gate_up_proj), q/k norms (Qwen3), attention biases (Qwen2), scaled embeddings and (1 + w) norms (Gemma)
ARCHITECTURES = {
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, {"tie_word_embeddings": False}),
    "llama-tied": (T.LlamaForCausalLM, T.LlamaConfig, {"tie_word_embeddings": True}),
    "qwen2-tied": (T.Qwen2ForCausalLM, T.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen3-tied": (T.Qwen3ForCausalLM, T.Qwen3Config, {"tie_word_embeddings": True}),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, {}),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, {"tie_word_embeddings": False, "head_dim": None}),
    "gemma-tied": (T.GemmaForCausalLM, T.GemmaConfig, {}),
}


def build(name: str, tokenizer) -> torch.nn.Module:
    model_cls, config_cls, overrides = ARCHITECTURES[name]
    config = {**dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id), **overrides}
    torch.manual_seed(0)
    return model_cls(config_cls(**{k: v for k, v in config.items() if v is not None})).eval()
