"""Forward passes that compute only on real tokens and never hold full-vocabulary logits for a whole micro-batch.

Padding-free: a micro-batch's sequences (prompts left-padded, responses right-padded, rlhf_ray.data.batch) are repacked,
their real tokens only, several to a row, with position ids restarting at 0 for each sequence and no 2-D attention
mask, which is how Hugging Face models take packed sequences: a block-diagonal causal mask with SDPA/eager attention,
variable-length kernels with FlashAttention. The rows' width is chosen by cost (``packed_layout``): a wider row wastes
less on padding, but its masked attention, computed in full, grows with the width squared. Hidden states are then
taken back at the columns the caller wants.

Chunked log-probs: the LM head runs on the response tokens' hidden states ``chunk`` tokens at a time, each chunk's
logits reduced at once to one log-prob and one entropy per token; under autograd every chunk is checkpointed (its
logits are recomputed in backward), so at most one chunk's [chunk, V] logits are alive at a time instead of the
micro-batch's [B, R, V].

Both paths are checked on each model when it is loaded (``ForwardOptions.checked``): a model whose forward they do not
reproduce (an architecture that ignores packed position ids, an unknown transform after its LM head) falls back to the
plain padded, full-logits forward, and the log says why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf_ray.algorithms.ppo_math import entropy_from_logits
from rlhf_ray.data.batch import RolloutBatch

log = logging.getLogger(__name__)

# fp32 logits per chunk when the chunk is sized automatically: 2^24 elements = 64 MiB (341 tokens of a 49k vocabulary)
AUTO_CHUNK_LOGITS = 2**24
CHECK_TOLERANCE = 1e-4  # max |Δ log-prob| (fp32) between the fast path and the plain forward on the check sequences


@dataclass(frozen=True)
class ForwardOptions:
    """How the forward passes run (config: deepspeed.padding_free, deepspeed.logits_chunk_tokens)."""
    padding_free: bool = True
    logits_chunk_tokens: int | None = None   # None: sized from the vocabulary (AUTO_CHUNK_LOGITS); 0: no chunking

    def chunk_tokens(self, vocab_size: int) -> int | None:
        """Tokens per LM-head chunk, or None for the whole micro-batch at once."""
        if self.logits_chunk_tokens is None:
            return max(1, AUTO_CHUNK_LOGITS // max(1, vocab_size))
        return self.logits_chunk_tokens or None

    @property
    def plain(self) -> bool:
        return not self.padding_free and self.logits_chunk_tokens == 0

    @torch.no_grad()
    def checked(self, model: nn.Module, name: str = "model") -> "ForwardOptions":
        """These options as far as ``model`` (a causal LM, a sequence classifier, or a backbone returning
        ``last_hidden_state``) reproduces its plain forward with them on three sequences, two of them sharing a packed
        row; what it does not is switched off, with a warning naming the model."""
        if self.plain:
            return self
        was_training = model.training
        if was_training:  # (a ZeRO-3 inference model, which loops back to itself, is never in training mode)
            model.eval()  # dropout would make the two passes differ
        try:
            options, batch = self, _check_batch(model)
            if options.padding_free and not _packing_holds(model, batch):
                log.warning("%s does not keep packed sequences apart (its attention ignores position-id boundaries): "
                            "it runs on padded rows (deepspeed.padding_free has no effect on it)", name)
                options = replace(options, padding_free=False)
            if _is_causal_lm(model) and options.logits_chunk_tokens != 0 and not _chunking_holds(model, batch, options):
                log.warning("%s's logits are not its LM head's output as rlhf_ray.models.forward.output_logits "
                            "computes them: its log-probs come from full logits (deepspeed.logits_chunk_tokens "
                            "has no effect on it)", name)
                options = replace(options, logits_chunk_tokens=0)
            return options
        finally:
            if was_training:
                model.train()


def _packing_holds(model: nn.Module, batch: RolloutBatch) -> bool:
    if score_head(model) is None:  # a causal LM or a backbone: the hidden states before each response token
        return _same(response_hidden(backbone_of(model), batch, padding_free=False),
                     response_hidden(backbone_of(model), batch, padding_free=True))
    # a sequence classifier (reward model): its pooled scores, against each sequence scored alone
    rows = [ids[real.bool()][:n] for ids, real, n in zip(batch.input_ids, batch.attention_mask, (7, 3, 4))]
    alone = torch.cat([model(input_ids=row[None]).logits[:, 0] for row in rows])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return _same(alone, sequence_scores(model, ids, mask, padding_free=True))


def _chunking_holds(model: nn.Module, batch: RolloutBatch, options: "ForwardOptions") -> bool:
    expected = _token_logprobs(_plain_response_logits(model, batch), batch) * batch.response_mask
    got, _ = response_token_stats(model, batch, options=replace(options, logits_chunk_tokens=1))
    return _same(expected, got)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under a causal LM's head (or ``model`` itself when it is one)."""
    return model.base_model if _is_causal_lm(model) else model


def pack_sequences(lengths: list[int], width: int | None = None) -> tuple[list[list[int]], int]:
    """Sequences into as few rows of ``width`` (default: the longest sequence) as first-fit-decreasing finds.
    -> (the sequences of each row, the width)"""
    width = max(max(lengths, default=0), width or 0)
    rows, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, load in enumerate(loads) if load + lengths[i] <= width), None)
        if fit is None:
            rows.append([])
            loads.append(0)
            fit = len(rows) - 1
        rows[fit].append(i)
        loads[fit] += lengths[i]
    return rows, width


def packed_layout(lengths: list[int], attention_width: float) -> tuple[list[list[int]], int]:
    """The packing that costs least: rows × width × (1 + width / attention_width) over widths of 1, 2, 4, … times the
    longest sequence. A row's attention (under a block-diagonal mask, computed in full) grows with its width squared;
    ``attention_width`` is the width at which it equals the rest of the model's work (``attention_width(model)``)."""
    longest, total = max(lengths, default=0), sum(lengths)
    best, width = None, longest
    while True:
        rows, _ = pack_sequences(lengths, width)
        cost = len(rows) * width * (1 + width / attention_width)
        if best is None or cost < best[0]:
            best = (cost, rows, width)
        if width >= total or width == 0:
            return best[1], best[2]
        width = min(total, 2 * width)


def attention_width(model: nn.Module) -> float:
    """The row width at which a transformer's attention FLOPs equal its other FLOPs per token: 2·N per token for N
    parameters against 4·width·hidden per layer for the scores and the weighted sum -> N / (2 · hidden · layers)."""
    cached = getattr(model, "_attention_width", None)
    if cached is None:
        config = model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        cached = max(1.0, params / (2 * hidden * layers))
        object.__setattr__(model, "_attention_width", cached)
    return cached


def hidden_at(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              wanted: torch.Tensor, padding_free: bool) -> torch.Tensor:
    """The last layer's hidden states at the padded layout's flat positions ``wanted`` (row · T + column, real tokens
    only) of a [B, T] batch. -> [len(wanted), H]

    Padding-free, the real tokens are repacked into rows of several sequences (``pack_sequences``), position ids
    restarting at 0 for each and no 2-D mask; a row's unused tail is one more sequence, of padding."""
    if not padding_free:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return hidden.flatten(0, 1)[wanted]
    B, T = input_ids.shape
    real = [row.nonzero().flatten() for row in attention_mask]   # each sequence's columns, in order
    rows, width = packed_layout([len(cols) for cols in real], attention_width(backbone))
    ids = input_ids.new_zeros(len(rows), width)
    positions = torch.arange(width, device=input_ids.device).repeat(len(rows), 1)
    destination = torch.zeros(B * T, dtype=torch.long, device=input_ids.device)  # padded flat -> packed flat
    for r, sequences in enumerate(rows):
        offset = 0
        for i in sequences:
            cols, n = real[i], len(real[i])
            ids[r, offset:offset + n] = input_ids[i, cols]
            positions[r, offset:offset + n] = position_ids[i, cols]
            destination[i * T + cols] = r * width + offset + torch.arange(n, device=input_ids.device)
            offset += n
        positions[r, offset:] = torch.arange(width - offset, device=input_ids.device)  # the tail: its own sequence
    hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[destination[wanted]]


def packed_positions(attention_mask: torch.Tensor, model: nn.Module) -> int:
    """Token positions a padding-free forward of ``model`` computes for this [..., T] mask (``packed_layout``)."""
    lengths = attention_mask.reshape(-1, attention_mask.shape[-1]).sum(-1).tolist()
    rows, width = packed_layout(lengths, attention_width(backbone_of(model)))
    return len(rows) * width


def score_head(model: nn.Module) -> nn.Linear | None:
    """A sequence-classification model's head on the pooled hidden state (``score``, or ``classifier``)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    return head if isinstance(head, nn.Linear) else None


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    padding_free: bool) -> torch.Tensor:
    """A sequence-classification model's first output at each row's pooled token — as Hugging Face pools: the
    rightmost token that is not its pad token — from only that token's hidden state. [B, T] right-padded -> [B]"""
    if score_head(model) is None:  # a head we do not know: the model's own forward
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    B, T = input_ids.shape
    pad = model.config.pad_token_id
    columns = torch.arange(T, device=input_ids.device)
    last = (columns * (input_ids != pad)).argmax(-1) if pad is not None else attention_mask.sum(-1) - 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    wanted = torch.arange(B, device=input_ids.device) * T + last
    hidden = hidden_at(model.base_model, input_ids, attention_mask, position_ids, wanted, padding_free)
    return score_head(model)(hidden)[:, 0].float()


def response_positions(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the real response tokens in the [B, R] layout, row by row."""
    return batch.response_mask.bool().nonzero(as_tuple=True)


def response_hidden(backbone: nn.Module, batch: RolloutBatch, padding_free: bool) -> torch.Tensor:
    """Hidden states that predict each real response token (the state *before* it), row by row. -> [M, H]"""
    rows, cols = response_positions(batch)
    wanted = rows * batch.input_ids.shape[1] + batch.prompt_length - 1 + cols
    return hidden_at(backbone, batch.input_ids, batch.attention_mask, batch.position_ids, wanted, padding_free)


def scatter_response(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """[M] per real response token -> [B, R], 0 on padding (float32)."""
    rows, cols = response_positions(batch)
    out = values.new_zeros(batch.response_mask.shape, dtype=torch.float32)
    return out.index_put((rows, cols), values.float())


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits from its last hidden states: the LM head, then the scalings some architectures apply
    after it (Cohere's logit_scale, Granite's logits_scaling, Gemma's final soft cap)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_stats(model, hidden, tokens, temperature: float, entropy: bool, entropy_grad: bool, state: dict):
    z = output_logits(model, hidden).float()
    if temperature != 1.0:
        z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    logprobs = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy or (state.get("done") and not entropy_grad):  # a metric is not recomputed for backward
        return logprobs, torch.zeros_like(logprobs)
    state["done"] = True
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # H = −Σ p log p from the log-softmax already computed; a −inf log-prob has p = 0 and adds 0
        return logprobs, -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(-1)


def token_stats(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False, chunk: int | None = None,
                entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[token] and (``entropy``) H(softmax(logits / T)) of each row of ``hidden`` [M, H] with
    its ``tokens`` [M], ``chunk`` rows at a time; with gradients each chunk is checkpointed. Entropies have a gradient
    only under ``entropy_grad`` (else they are a metric, not recomputed in backward). -> ([M], [M] | None)"""
    step = chunk or max(1, hidden.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in model.parameters()))
    checkpointed = grad and chunk

    def run(hidden_chunk, token_chunk):
        args = (model, hidden_chunk, token_chunk, temperature, entropy, entropy_grad, {})
        return checkpoint(_chunk_stats, *args, use_reentrant=False) if checkpointed else _chunk_stats(*args)

    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], step):
        lp, h = run(hidden[start:start + step], tokens[start:start + step])
        logprobs.append(lp)
        entropies.append(h)
    # ZeRO-3 over several ranks gathers the head's weight at each call (and again in backward): a collective, so every
    # rank calls it as often as the rank with the most chunks; the extra calls see one zero row and add exactly 0
    padding = [run(hidden.new_zeros(1, hidden.shape[-1]), tokens.new_zeros(1))
               for _ in range(_head_calls_short(model, len(logprobs), hidden.device))]
    zero = sum((lp.sum() + h.sum()) * 0.0 for lp, h in padding) if padding else None
    if not logprobs:  # no response tokens here
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logprobs, entropies = [empty], [empty]
    logprobs = torch.cat(logprobs) + zero if zero is not None else torch.cat(logprobs)
    return logprobs, (torch.cat(entropies) if entropy else None)


def _head_calls_short(model: nn.Module, calls: int, device) -> int:
    """How many fewer LM-head calls this rank makes than the rank with the most, where the head's weight is
    partitioned by ZeRO-3 over several processes (each call gathers it); else 0."""
    import torch.distributed as dist

    weight = model.get_output_embeddings().weight
    if not (hasattr(weight, "ds_id") and dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    most = torch.tensor([calls], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) - calls


def response_token_stats(model: nn.Module, batch: RolloutBatch, temperature: float = 1.0, entropy: bool = False,
                         options: ForwardOptions = ForwardOptions(),
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal LM's log-probs (and, with ``entropy``, entropies: with a gradient only under ``entropy_grad``) of the
    response tokens at ``temperature``, 0 on padding. -> ([B, R], [B, R] | None), float32"""
    if options.plain:
        logits = _plain_response_logits(model, batch)
        logprobs = _token_logprobs(logits, batch, temperature) * batch.response_mask
        if not entropy:
            return logprobs, None
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # no [B, R, V] graph for a metric
            return logprobs, entropy_from_logits(logits.float() / temperature) * batch.response_mask
    hidden = response_hidden(backbone_of(model), batch, options.padding_free)
    rows, cols = response_positions(batch)
    lp, ent = token_stats(model, hidden, batch.response_ids[rows, cols], temperature, entropy,
                          options.chunk_tokens(model.config.vocab_size), entropy_grad)
    return scatter_response(lp, batch), (scatter_response(ent, batch) if entropy else None)


def _plain_response_logits(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Logits that predict each response token from one padded forward: [B, R, V] (``logits_to_keep`` skips the LM
    head on prompt positions)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False, logits_to_keep=batch.response_length + 1)
    return out.logits[:, :-1]


def _token_logprobs(logits: torch.Tensor, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    return torch.log_softmax(z, dim=-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _check_batch(model: nn.Module) -> RolloutBatch:
    """Three sequences of different prompt and response lengths from a fixed generator (not the global RNG), without
    the model's pad token (a reward model pools at the last token that is not one)."""
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: [t if t != pad else 1 + t % (vocab - 1)  # noqa: E731
                     for t in torch.randint(1, vocab, (n,), generator=generator).tolist()]
    device = next(model.parameters()).device
    # lengths 8, 3 and 4: the two short ones share a packed row
    return RolloutBatch.from_samples([ids(5), ids(1), ids(2)], [ids(3), ids(2), ids(2)], [[0.0] * 3, [0.0] * 2, [0.0] * 2],
                                     ["stop"] * 3, [[]] * 3, [""] * 3, [""] * 3, pad_token_id=0).to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(b).all()) and float((a.float() - b.float()).abs().max()) <= \
        CHECK_TOLERANCE * max(1.0, float(a.float().abs().max()))
