"""Model architectures the planner sizes, read without loading any weights.

Where an architecture comes from, in order:

1. ``tiny:*``, ``real:*``, ``scaled:*``: built (cheaply, once) by rlhf_ray's model specs, then read as 2.;
2. a local directory: its config.json through transformers.AutoConfig;
3. a hub name already in the local Hugging Face cache (never the network);
4. a hub name in the built-in table below (Llama-2 7B/13B/70B, CodeLlama 34B and the AllenAI Tulu 2 /
   Tulu 2.5 models built on them, OPT 350m–66b, Llama-3 8B/70B, SmolLM2-135M, DeepSeek-LLM 7B, Qwen2.5 7B
   (and Math-7B), Qwen3 32B).

Anything else is one error line. The role decides the head: policy and reference carry the LM head,
reward and value models a scalar score head on the same body.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path


class PlannerError(ValueError):
    """A config the planner cannot size; the message says what to pass instead."""


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer, as far as memory and FLOPs are concerned."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool = True        # Llama: gate, up, down (3 matrices); OPT/GPT: fc1, fc2 with biases
    learned_positions: int = 0    # OPT keeps a learned position table (max positions + 2)
    embed_dim: int = 0            # OPT-350m embeds in 512 dims and projects in/out of its 1024-wide body
    source: str = ""

    # ------------------------------------------------------------------ parameters
    @property
    def layer_params(self) -> int:
        """One block: attention (q, k, v, o; GQA shrinks k and v) + MLP + norms (+ OPT's biases)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        if self.gated_mlp:
            return attention + mlp + 2 * h                              # two RMSNorms
        return attention + mlp + (q + 2 * kv + h) + (self.intermediate + h) + 4 * h  # biases, two LayerNorms

    def lora_params(self, rank: int) -> int:
        """LoRA adapters of rank r on every linear layer of the body (PEFT's 'all-linear'): r·(in + out) each."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = (h + q) + 2 * (h + kv) + (q + h)
        mlp = (3 if self.gated_mlp else 2) * (h + i)
        return rank * self.layers * (attention + mlp)

    @property
    def body_params(self) -> int:
        """All layers and the final norm, without embeddings or heads."""
        return self.layers * self.layer_params + (self.hidden if self.gated_mlp else 2 * self.hidden)

    @property
    def embedding_params(self) -> int:
        width = self.embed_dim or self.hidden
        projections = 2 * width * self.hidden if self.embed_dim and self.embed_dim != self.hidden else 0
        return self.vocab * width + self.learned_positions * self.hidden + projections

    def lm_head_params(self) -> int:
        return self.vocab * (self.embed_dim or self.hidden)

    def parameters(self, head: str) -> int:
        """Stored parameters with an 'lm' head (policy, reference) or a 'score' head (reward, value)."""
        if head == "lm":
            return self.body_params + self.embedding_params + (0 if self.tied_embeddings else self.lm_head_params())
        return self.body_params + self.embedding_params + self.hidden

    def matmul_params(self, head: str) -> int:
        """Parameters multiplied per token (the embedding is a lookup; a tied LM head still multiplies)."""
        projections = self.embedding_params - self.vocab * (self.embed_dim or self.hidden) \
            - self.learned_positions * self.hidden
        head_params = self.lm_head_params() if head == "lm" else self.hidden
        return self.body_params + projections + head_params

    def forward_flops_per_token(self, head: str, context: int) -> float:
        """2 FLOP per multiplied parameter, plus attention scores and their weighted sum over ``context``
        tokens: 4·layers·context·heads·head_dim (Megatron's count: the full context, no causal halving)."""
        return 2.0 * self.matmul_params(head) + 4.0 * self.layers * context * self.heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """vLLM's KV cache per token: 2 (K and V) · layers · kv_heads · head_dim · dtype bytes."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _llama(name, hidden, layers, heads, kv_heads, intermediate, vocab=32000, tied=False):
    return Architecture(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                        head_dim=hidden // heads, intermediate=intermediate, vocab=vocab, tied_embeddings=tied,
                        source="built-in table")


def _opt(name, hidden, layers, heads, embed_dim=0):
    return Architecture(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                        intermediate=4 * hidden, vocab=50272, tied_embeddings=True, gated_mlp=False,
                        learned_positions=2050, embed_dim=embed_dim, source="built-in table")


# Published configs (config.json on the hub); each entry: (pattern on the lower-case hub id, architecture).
KNOWN = [
    (r"llama-2-7b|tulu-2(-dpo)?-7b|tulu-v2\.5-7b", _llama("llama-2-7b", 4096, 32, 32, 32, 11008)),
    (r"llama-2-13b|tulu-2(-dpo)?-13b|tulu-v2\.5-13b", _llama("llama-2-13b", 5120, 40, 40, 40, 13824)),
    (r"codellama-34b|codetulu-2-34b|llama-2-34b", _llama("codellama-34b", 8192, 48, 64, 8, 22016)),
    (r"llama-2-70b|tulu-2(-dpo)?-70b|tulu-v2\.5-70b", _llama("llama-2-70b", 8192, 80, 64, 8, 28672)),
    (r"llama-3(\.1)?-8b", _llama("llama-3-8b", 4096, 32, 32, 8, 14336, vocab=128256)),
    (r"llama-3(\.1)?-70b", _llama("llama-3-70b", 8192, 80, 64, 8, 28672, vocab=128256)),
    (r"smollm2-135m", replace(_llama("smollm2-135m", 576, 30, 9, 3, 1536, vocab=49152, tied=True), head_dim=64)),
    (r"deepseek-llm-7b", _llama("deepseek-llm-7b", 4096, 30, 32, 32, 11008, vocab=102400)),
    (r"qwen2\.5(-math)?-7b", _llama("qwen2.5-7b", 3584, 28, 28, 4, 18944, vocab=152064)),  # q/k/v biases left out
    (r"qwen3-32b", replace(_llama("qwen3-32b", 5120, 64, 64, 8, 25600, vocab=151936), head_dim=128)),
    (r"opt-350m", _opt("opt-350m", 1024, 24, 16, embed_dim=512)),
    (r"opt-1\.3b", _opt("opt-1.3b", 2048, 24, 32)),
    (r"opt-6\.7b", _opt("opt-6.7b", 4096, 32, 32)),
    (r"opt-13b", _opt("opt-13b", 5120, 40, 40)),
    (r"opt-30b", _opt("opt-30b", 7168, 48, 56)),
    (r"opt-66b", _opt("opt-66b", 9216, 64, 72)),
]
BUILT_PREFIXES = ("tiny:", "real:", "scaled:")


def known_architecture(name: str) -> Architecture | None:
    """The built-in table's entry for a hub id (matched on its name, any organisation), or None."""
    lowered = name.lower()
    for pattern, arch in KNOWN:
        if re.search(rf"(^|/|-)({pattern})($|-|_|\b)", lowered):
            return replace(arch, source=f"built-in table ({arch.name})")
    return None


def resolve_architecture(spec: str, cache_dir: str | None = None, seed: int = 0) -> Architecture:
    """A config's model name -> its Architecture (see the module docstring for the order)."""
    if spec.startswith(BUILT_PREFIXES):
        return from_config_dir(_build_local(spec, cache_dir, seed), name=spec)
    if Path(spec).expanduser().is_dir():
        return from_config_dir(str(Path(spec).expanduser()), name=spec)
    cached = _hf_cache_config(spec)
    if cached:
        return from_config_dir(str(Path(cached).parent), name=spec, source=f"local HF cache ({cached})")
    arch = known_architecture(spec)
    if arch is None:
        names = ", ".join(a.name for _, a in KNOWN)
        raise PlannerError(f"unknown model '{spec}': not a local directory, not in the local Hugging Face cache, "
                           f"and not a known architecture ({names}); pass a local directory with its config.json")
    return replace(arch, name=spec)


def from_config_dir(path: str, name: str | None = None, source: str | None = None) -> Architecture:
    """Read a model directory's config.json with transformers.AutoConfig (no weights are touched)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM inside
    return from_hf_config(config, name or path, source or f"config.json in {path}")


def from_hf_config(config, name: str, source: str) -> Architecture:
    """transformers config -> Architecture (Llama-family names, with OPT's spellings as fallbacks)."""
    get = lambda *keys, default=None: next((getattr(config, k) for k in keys  # noqa: E731
                                            if getattr(config, k, None) is not None), default)
    hidden = get("hidden_size", "d_model", "n_embd")
    heads = get("num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise PlannerError(f"{name}: its config ({type(config).__name__}) has no hidden_size/num_attention_heads")
    opt = getattr(config, "model_type", "") == "opt"
    embed = get("word_embed_proj_dim", default=hidden) if opt else 0
    return Architecture(
        name=name, hidden=hidden, layers=get("num_hidden_layers", "n_layer"), heads=heads,
        kv_heads=get("num_key_value_heads", default=heads), head_dim=get("head_dim", default=hidden // heads),
        intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden), vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", default=opt)), gated_mlp=not opt,
        learned_positions=(get("max_position_embeddings", default=2048) + 2) if opt else 0,
        embed_dim=embed if embed != hidden else 0, source=source)


def _build_local(spec: str, cache_dir: str | None, seed: int) -> str:
    from rlhf_ray.models.specs import resolve_model

    try:
        return resolve_model(spec, cache_dir, seed)
    except Exception as err:  # noqa: BLE001 — a missing optional package or an unknown name: one line
        raise PlannerError(f"cannot build '{spec}' to read its architecture: {err}") from None


def _hf_cache_config(repo_id: str) -> str | None:
    """config.json of ``repo_id`` in the local Hugging Face cache, or None (no network access)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 — a malformed id is simply not cached
        return None
    return found if isinstance(found, str) else None
