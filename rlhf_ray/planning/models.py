"""Model architectures the planner sizes, read without loading any weights.

Where an architecture comes from, in order:

1. ``tiny:*``, ``real:*``, ``scaled:*``: built (cheaply, once) by rlhf_ray's model specs, then read as 2.;
2. a local directory: its config.json through transformers.AutoConfig;
3. a hub name already in the local Hugging Face cache (never the network);
4. a hub name in the built-in table below (Llama-2 7B/13B/70B, CodeLlama 34B and the AllenAI Tulu 2 /
   Tulu 2.5 models built on them, OPT 350m–66b, Llama-3 / 3.1 8B/70B, Qwen2.5 0.5B–72B (and Math-7B), Qwen3
   0.6B–32B, Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-LLM 7B, SmolLM2-135M).

Anything else is one error line. The role decides the head: policy and reference carry the LM head,
reward and value models a scalar score head on the same body. A mixture of experts is read from its config's MoE
fields (``moe_fields``): every expert counts for memory, the routed experts a token uses (plus shared experts,
attention and router) for compute. Each architecture also carries the longest sequence the model takes
(``context_limit``, as vLLM derives it), which the plan checks the caps against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path


class PlannerError(ValueError):
    """A config the planner cannot size; the message says what to pass instead."""


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer, as far as memory and FLOPs are concerned; a mixture of experts (``experts`` > 0)
    keeps all its experts in memory and runs ``experts_per_token`` of them (plus any shared expert) per token."""
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
    qkv_bias: bool = False        # Qwen2: biases on q, k and v
    max_positions: int = 0        # the longest sequence the model takes (0: unknown, not checked)
    experts: int = 0              # routed experts of each MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0  # one routed expert's MLP width
    shared_intermediate: int = 0  # the shared expert(s) of a MoE layer, as one MLP of this width (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: a sigmoid gate (hidden → 1) on the shared expert
    moe_layers: int = 0           # layers with experts; the other layers have a dense MLP of ``intermediate``
    source: str = ""

    # ------------------------------------------------------------------ parameters
    @property
    def attention_params(self) -> int:
        """q, k, v, o of one layer (GQA shrinks k and v), with Qwen2's q/k/v biases."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)

    def _mlp(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * width

    @property
    def dense_layer_params(self) -> int:
        """One dense block: attention + MLP + norms (+ OPT's biases)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.gated_mlp:
            return self.attention_params + self._mlp(self.intermediate) + 2 * h          # two RMSNorms
        return (self.attention_params + self._mlp(self.intermediate) + (q + 2 * kv + h) + (self.intermediate + h)
                + 4 * h)                                                                    # biases, two LayerNorms

    def moe_layer_params(self, experts: int) -> int:
        """One MoE block with ``experts`` of its experts counted: attention + router (hidden × experts) + the experts
        + the shared expert (and its gate) + two RMSNorms. All of them: memory; experts_per_token: compute."""
        return (self.attention_params + self.hidden * self.experts + experts * self._mlp(self.expert_intermediate)
                + self._mlp(self.shared_intermediate) + (self.hidden if self.shared_expert_gate else 0)
                + 2 * self.hidden)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0 and self.moe_layers > 0

    @property
    def layer_params(self) -> int:
        """The largest block (a MoE block with all its experts): what a ZeRO-3 gather of one layer holds."""
        return max(self.dense_layer_params, self.moe_layer_params(self.experts) if self.is_moe else 0)

    def lora_params(self, rank: int) -> int:
        """LoRA adapters of rank r on the linear layers of the body (PEFT's 'all-linear'): r·(in + out) each. In a
        MoE block: attention and the shared expert; transformers keeps routed experts as fused 3-D tensors, which
        'all-linear' does not adapt, and the router is left out (a few parameters)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = (h + q) + 2 * (h + kv) + (q + h)
        mlp = lambda width: ((3 if self.gated_mlp else 2) * (h + width)) if width else 0  # noqa: E731
        moe = self.moe_layers if self.is_moe else 0
        return rank * (self.layers * attention + (self.layers - moe) * mlp(i) + moe * mlp(self.shared_intermediate))

    def _body(self, experts_counted: int) -> int:
        moe = self.moe_layers if self.is_moe else 0
        final_norm = self.hidden if self.gated_mlp else 2 * self.hidden
        return ((self.layers - moe) * self.dense_layer_params + moe * self.moe_layer_params(experts_counted)
                + final_norm)

    @property
    def body_params(self) -> int:
        """All layers (every expert) and the final norm, without embeddings or heads."""
        return self._body(self.experts)

    @property
    def active_body_params(self) -> int:
        """The body's parameters one token runs through: experts_per_token routed experts per MoE layer."""
        return self._body(self.experts_per_token)

    @property
    def embedding_params(self) -> int:
        width = self.embed_dim or self.hidden
        projections = 2 * width * self.hidden if self.embed_dim and self.embed_dim != self.hidden else 0
        return self.vocab * width + self.learned_positions * self.hidden + projections

    def lm_head_params(self) -> int:
        return self.vocab * (self.embed_dim or self.hidden)

    def _head(self, head: str) -> int:
        if head == "lm":
            return 0 if self.tied_embeddings else self.lm_head_params()
        return self.hidden

    def parameters(self, head: str) -> int:
        """Stored parameters (every expert) with an 'lm' head (policy, reference) or a 'score' head (reward, value):
        what memory holds."""
        return self.body_params + self.embedding_params + self._head(head)

    def active_parameters(self, head: str) -> int:
        """Parameters one token uses (a MoE's routed experts: experts_per_token of them); dense: ``parameters``."""
        return self.active_body_params + self.embedding_params + self._head(head)

    def matmul_params(self, head: str) -> int:
        """Parameters multiplied per token (the embedding is a lookup; a tied LM head still multiplies; a MoE's
        routed experts: experts_per_token of them)."""
        projections = self.embedding_params - self.vocab * (self.embed_dim or self.hidden) \
            - self.learned_positions * self.hidden
        head_params = self.lm_head_params() if head == "lm" else self.hidden
        return self.active_body_params + projections + head_params

    def decode_read_params(self, head: str, sequences: float) -> float:
        """Parameters one decode step reads for ``sequences`` tokens at once. Dense: all of them. MoE: the experts the
        step's tokens are routed to — with routing assumed uniform and independent across tokens, a MoE layer's
        experts touched are E·(1 − (1 − k/E)^sequences), so a batch of a few dozen sequences reads nearly all."""
        if not self.is_moe:
            return float(self.parameters(head))
        untouched = self.experts * (1 - self.experts_per_token / self.experts) ** max(sequences, 1.0)
        return self.parameters(head) - self.moe_layers * untouched * self._mlp(self.expert_intermediate)

    # ------------------------------------------------------------------ FLOPs and KV cache
    def forward_flops(self, head: str, tokens: float, attended: float) -> float:
        """A forward over ``tokens`` tokens: 2 FLOP per multiplied parameter per token, plus attention scores and
        their weighted sum, 4·layers·heads·head_dim per (query, key) pair, over ``attended`` pairs. A causal
        sequence of s tokens has s·(s+1)/2 pairs (Megatron's 4·s² count, halved by the causal mask); a decode step
        of a token after c others has c + 1."""
        return 2.0 * self.matmul_params(head) * tokens + 4.0 * self.layers * self.heads * self.head_dim * attended

    def forward_flops_per_token(self, head: str, context: float) -> float:
        """One token attending over ``context`` keys (a decode step)."""
        return self.forward_flops(head, 1.0, context)

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """vLLM's KV cache per token: 2 (K and V) · layers · kv_heads · head_dim · dtype bytes."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _llama(name, hidden, layers, heads, kv_heads, intermediate, vocab=32000, tied=False, context=0, head_dim=0,
           qkv_bias=False):
    return Architecture(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim or hidden // heads, intermediate=intermediate, vocab=vocab,
                        tied_embeddings=tied, qkv_bias=qkv_bias, max_positions=context, source="built-in table")


def _qwen2(name, hidden, layers, heads, kv_heads, intermediate, vocab=152064, tied=False):
    return _llama(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, context=32768, qkv_bias=True)


def _qwen3(name, hidden, layers, heads, intermediate, tied=False, context=40960):
    return _llama(name, hidden, layers, heads, 8, intermediate, 151936, tied, context, head_dim=128)


def _moe(arch, experts, per_token, expert_intermediate):
    return replace(arch, experts=experts, experts_per_token=per_token, expert_intermediate=expert_intermediate,
                   moe_layers=arch.layers)


def _opt(name, hidden, layers, heads, embed_dim=0):
    return Architecture(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                        intermediate=4 * hidden, vocab=50272, tied_embeddings=True, gated_mlp=False,
                        learned_positions=2050, embed_dim=embed_dim, max_positions=2048, source="built-in table")


# Published configs: each entry (pattern on the lower-case hub id, architecture) holds the values of the model's
# config.json on the hub (https://huggingface.co/<org>/<model>/blob/main/config.json): hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings,
# max_position_embeddings (the context), head_dim where it is not hidden/heads, the MoE fields. Tests check each
# family against its published parameter count. Tulu 2 / 2.5 use Llama-2's shapes; their context is not in the table
# (0: not checked). Qwen2.5: the instruct models' 32768 (the base 7B–72B configs say 131072; only with YaRN), Qwen2.5-Math
# its own 4096. One entry per line, most specific first.
KNOWN = [
    (r"llama-2-7b", _llama("llama-2-7b", 4096, 32, 32, 32, 11008, context=4096)),
    (r"llama-2-13b", _llama("llama-2-13b", 5120, 40, 40, 40, 13824, context=4096)),
    (r"llama-2-70b", _llama("llama-2-70b", 8192, 80, 64, 8, 28672, context=4096)),
    (r"tulu-2(-dpo)?-7b|tulu-v2\.5-7b", _llama("tulu-2-7b", 4096, 32, 32, 32, 11008)),
    (r"tulu-2(-dpo)?-13b|tulu-v2\.5-13b", _llama("tulu-2-13b", 5120, 40, 40, 40, 13824)),
    (r"tulu-2(-dpo)?-70b|tulu-v2\.5-70b", _llama("tulu-2-70b", 8192, 80, 64, 8, 28672)),
    (r"codellama-34b|codetulu-2-34b|llama-2-34b", _llama("codellama-34b", 8192, 48, 64, 8, 22016, context=16384)),
    (r"llama-3\.1-8b", _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336, vocab=128256, context=131072)),
    (r"llama-3\.1-70b", _llama("llama-3.1-70b", 8192, 80, 64, 8, 28672, vocab=128256, context=131072)),
    (r"llama-3-8b", _llama("llama-3-8b", 4096, 32, 32, 8, 14336, vocab=128256, context=8192)),
    (r"llama-3-70b", _llama("llama-3-70b", 8192, 80, 64, 8, 28672, vocab=128256, context=8192)),
    (r"smollm2-135m", _llama("smollm2-135m", 576, 30, 9, 3, 1536, vocab=49152, tied=True, context=8192, head_dim=64)),
    (r"qwen2\.5-0\.5b", _qwen2("qwen2.5-0.5b", 896, 24, 14, 2, 4864, vocab=151936, tied=True)),
    (r"qwen2\.5-1\.5b", _qwen2("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, vocab=151936, tied=True)),
    (r"qwen2\.5-3b", _qwen2("qwen2.5-3b", 2048, 36, 16, 2, 11008, vocab=151936, tied=True)),
    (r"qwen2\.5-math-7b", replace(_qwen2("qwen2.5-math-7b", 3584, 28, 28, 4, 18944), max_positions=4096)),
    (r"qwen2\.5-7b", _qwen2("qwen2.5-7b", 3584, 28, 28, 4, 18944)),
    (r"qwen2\.5-14b", _qwen2("qwen2.5-14b", 5120, 48, 40, 8, 13824)),
    (r"qwen2\.5-32b", _qwen2("qwen2.5-32b", 5120, 64, 40, 8, 27648)),
    (r"qwen2\.5-72b", _qwen2("qwen2.5-72b", 8192, 80, 64, 8, 29568)),
    (r"qwen3-0\.6b", _qwen3("qwen3-0.6b", 1024, 28, 16, 3072, tied=True)),
    (r"qwen3-1\.7b", _qwen3("qwen3-1.7b", 2048, 28, 16, 6144, tied=True)),
    (r"qwen3-4b-(instruct|thinking)-2507", _qwen3("qwen3-4b-2507", 2560, 36, 32, 9728, tied=True, context=262144)),
    (r"qwen3-4b", _qwen3("qwen3-4b", 2560, 36, 32, 9728, tied=True)),
    (r"qwen3-8b", _qwen3("qwen3-8b", 4096, 36, 32, 12288)),
    (r"qwen3-14b", _qwen3("qwen3-14b", 5120, 40, 40, 17408)),
    (r"qwen3-32b", _qwen3("qwen3-32b", 5120, 64, 64, 25600)),
    (r"qwen3-30b-a3b-(instruct|thinking)-2507",
     _moe(replace(_qwen3("qwen3-30b-a3b-2507", 2048, 48, 32, 6144, context=262144), kv_heads=4), 128, 8, 768)),
    (r"qwen3-30b-a3b", _moe(replace(_qwen3("qwen3-30b-a3b", 2048, 48, 32, 6144), kv_heads=4), 128, 8, 768)),
    (r"deepseek-llm-7b", _llama("deepseek-llm-7b", 4096, 30, 32, 32, 11008, vocab=102400, context=4096)),
    (r"mixtral-8x7b", _moe(_llama("mixtral-8x7b", 4096, 32, 32, 8, 14336, context=32768), 8, 2, 14336)),
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
    """transformers config -> Architecture (Llama-family names, with OPT's spellings as fallbacks; the MoE fields of
    ``moe_fields``). What the planner cannot size is one error naming the field: multi-head latent attention, layers
    that are not attention, MoE fields it does not know."""
    get = lambda *keys, default=None: next((getattr(config, k) for k in keys  # noqa: E731
                                            if getattr(config, k, None) is not None), default)
    hidden = get("hidden_size", "d_model", "n_embd")
    heads = get("num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise PlannerError(f"{name}: its config ({type(config).__name__}) has no hidden_size/num_attention_heads")
    _refuse_unsized_attention(config, name)
    model_type = getattr(config, "model_type", "")
    opt = model_type == "opt"
    embed = get("word_embed_proj_dim", default=hidden) if opt else 0
    layers = get("num_hidden_layers", "n_layer")
    limit, limit_key = context_limit(config)
    arch = Architecture(
        name=name, hidden=hidden, layers=layers, heads=heads,
        kv_heads=get("num_key_value_heads", default=heads), head_dim=get("head_dim", default=hidden // heads),
        intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden), vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", default=opt)), gated_mlp=not opt,
        learned_positions=(get("max_position_embeddings", default=2048) + 2) if opt else 0,
        embed_dim=embed if embed != hidden else 0,
        qkv_bias=bool(getattr(config, "attention_bias", False)) or model_type in QKV_BIAS_MODEL_TYPES,
        max_positions=int(limit) if limit else 0, source=source + (f"; context: {limit_key}" if limit_key else ""))
    return replace(arch, **moe_fields(config, name, layers))


# Qwen2 and Qwen2-MoE put biases on q, k and v without an attention_bias field in their config
QKV_BIAS_MODEL_TYPES = ("qwen2", "qwen2_moe")
# Layer kinds sized as attention layers (a sliding window only makes the KV cache smaller than planned)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def _refuse_unsized_attention(config, name: str) -> None:
    if getattr(config, "kv_lora_rank", None):
        raise PlannerError(f"{name}: kv_lora_rank is set — multi-head latent attention (DeepSeek-V2/V3 style) is not "
                           "sized by the planner")
    other = sorted({t for t in getattr(config, "layer_types", None) or () if t not in ATTENTION_LAYER_TYPES})
    if other:
        raise PlannerError(f"{name}: layer_types has {', '.join(other)} layers — the planner sizes attention layers "
                           "only")


# MoE fields the planner reads: Mixtral (num_local_experts, num_experts_per_tok; intermediate_size is an expert's
# width), Qwen2-MoE / Qwen3-MoE (num_experts, moe_intermediate_size, shared_expert_intermediate_size,
# decoder_sparse_step, mlp_only_layers), DeepSeek style (n_routed_experts, n_shared_experts, first_k_dense_replace,
# moe_layer_freq). A config field that looks like MoE (MOE_LOOKING) and is not one of these is refused by name.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "n_shared_experts", "decoder_sparse_step", "mlp_only_layers",
              "first_k_dense_replace", "moe_layer_freq")
MOE_LOOKING = re.compile(r"expert|moe|sparse_step|mlp_only|dense_replace|shared_inter")


def moe_fields(config, name: str, layers: int) -> dict:
    """Architecture's MoE fields from a transformers config ({} for a dense model), or PlannerError naming the field."""
    values = config.to_dict()
    unknown = sorted(k for k, v in values.items() if MOE_LOOKING.search(k) and v and k not in MOE_FIELDS)
    if unknown:
        raise PlannerError(f"{name}: config field {unknown[0]} looks like a mixture of experts the planner does not "
                           f"size (it reads {', '.join(MOE_FIELDS)})")
    get = lambda key, default=None: getattr(config, key, None) if getattr(config, key, None) is not None \
        else default  # noqa: E731
    experts = get("n_routed_experts") or get("num_local_experts") or get("num_experts") or 0
    if not experts:
        return {}
    per_token = get("num_experts_per_tok")
    if not per_token:
        raise PlannerError(f"{name}: a mixture of {experts} experts without num_experts_per_tok")
    width = get("moe_intermediate_size") or get("intermediate_size")
    shared = (get("shared_expert_intermediate_size", 0)
              or get("n_shared_experts", 0) * (get("moe_intermediate_size") or 0))
    return {"experts": experts, "experts_per_token": per_token, "expert_intermediate": width,
            "shared_intermediate": shared, "shared_expert_gate": bool(get("shared_expert_intermediate_size")),
            "moe_layers": sum(_is_moe_layer(config, i) for i in range(layers))}


def _is_moe_layer(config, index: int) -> bool:
    """DeepSeek style: from first_k_dense_replace on, every moe_layer_freq-th layer; Qwen: every
    decoder_sparse_step-th layer (1-based) not in mlp_only_layers; Mixtral: every layer."""
    if getattr(config, "n_routed_experts", None):
        first, every = getattr(config, "first_k_dense_replace", 0) or 0, getattr(config, "moe_layer_freq", 1) or 1
        return index >= first and index % every == 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return index not in (getattr(config, "mlp_only_layers", None) or ()) and (index + 1) % step == 0


# The keys vLLM reads a model's maximum length from (vllm/transformers_utils/model_arch_config_convertor.py:
# derive_max_model_len_and_key); the smallest present wins, then a RoPE scaling factor stretches it, except for the
# scaling types whose max_position_embeddings is already the stretched length.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
ROPE_ALREADY_SCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def context_limit(config) -> tuple[float, str]:
    """(the longest sequence a transformers config allows, where that comes from) as vLLM derives it; (0, '') when
    the config says nothing."""
    found = [(getattr(config, key), key) for key in CONTEXT_KEYS
             if isinstance(getattr(config, key, None), (int, float)) and getattr(config, key) > 0]
    if not found:
        return 0, ""
    limit, key = min(found)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if factor and kind not in ROPE_ALREADY_SCALED and factor != 1:
        return limit * factor, f"{key} × RoPE {kind} factor {factor:g}"
    return limit, key


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
