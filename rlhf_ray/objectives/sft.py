"""Supervised fine-tuning: next-token cross-entropy on the tokens a loss mask selects (the assistant turns)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.data.batch import SequenceBatch
from rlhf_ray.models.forward import ForwardOptions, backbone_of, token_stats
from rlhf_ray.models.lora import add_adapters, causal_lm
from rlhf_ray.models.modeling import load_causal_lm
from rlhf_ray.objectives.base import Objective, register


class SequenceScorer(nn.Module):
    """The policy reading packed conversations (SequenceBatch): −log p(x_t | x_<t) of the learned tokens."""

    def __init__(self, policy: nn.Module, options: ForwardOptions = ForwardOptions()):
        super().__init__()
        self.policy, self.options = policy, options

    padding_free = False  # rows come packed from the data pipeline, padded at their ends

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        return token_nll(causal_lm(self.policy), batch, self.options)


def token_nll(model: nn.Module, batch: SequenceBatch, options: ForwardOptions = ForwardOptions()) -> torch.Tensor:
    """−log p(x_t | x_<t) of every token after the first, 0 where the loss mask is 0. [B, T-1] float32
    The mask of token t says whether x_t is learned, so it is taken at t (labels shifted by one, as in HF).
    Only the learned tokens go through the LM head, ``options.chunk_tokens`` at a time (rlhf_ray.models.forward)."""
    (B, T), dtype = batch.input_ids.shape, next(model.parameters()).dtype
    # additive: eager attention adds the mask to the scores (a boolean one would be wrong there); SDPA takes it too
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=batch.input_ids.device).masked_fill(
        ~batch.attention_mask(), torch.finfo(dtype).min)
    if options.logits_chunk_tokens == 0:
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                       use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        return nll * batch.loss_mask[:, 1:]
    hidden = backbone_of(model)(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                use_cache=False).last_hidden_state[:, :-1]
    learned = batch.loss_mask[:, 1:].bool()
    logprobs, _ = token_stats(model, hidden[learned], batch.input_ids[:, 1:][learned],
                              chunk=options.chunk_tokens(model.config.vocab_size))
    return torch.zeros(learned.shape, dtype=torch.float32, device=hidden.device).masked_scatter(learned, -logprobs)


def sequence_token_counts(batch: SequenceBatch) -> torch.Tensor:
    """[B, S] learned tokens of each conversation s = 1…S of each row (S: the most conversations in a row)."""
    segments = batch.segment_ids[:, 1:]
    S = int(batch.segment_ids.max())
    one_hot = torch.nn.functional.one_hot(segments, S + 1)[..., 1:].float()   # [B, T-1, S]
    return torch.einsum("bt,bts->bs", batch.loss_mask[:, 1:], one_hot)


class SFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss_mean: Literal["token", "sequence"] = "token"  # training.loss_mean: over all learned tokens, or per sequence


@register("sft")
class SFTObjective(Objective):
    """L = Σ_t m_t · −log p(x_t | x_<t) / N, with N the learned tokens of the global mini-batch (loss_mean='token'),
    or each conversation's token mean summed over conversations / N conversations (loss_mean='sequence').
    With ``spec.lora`` the policy trains as LoRA adapters on its frozen weights."""
    Options = SFTOptions
    export_name = "policy"

    def build(self) -> nn.Module:
        policy = load_causal_lm(self.spec.model)
        # conversations arrive packed by the data pipeline (rlhf_ray.data.conversations), with their own block mask
        options = ForwardOptions(padding_free=False, logits_chunk_tokens=self.spec.deepspeed.logits_chunk_tokens)
        options = options.checked(policy, f"policy {self.spec.model}")
        return SequenceScorer(add_adapters(policy, self.spec.lora, key="lora") if self.spec.lora else policy, options)

    def units(self, batch: SequenceBatch) -> torch.Tensor:
        if self.options.loss_mean == "token":
            return batch.loss_mask[:, 1:].sum()
        return (sequence_token_counts(batch) > 0).sum().float()

    def loss(self, module, micro: SequenceBatch, num_units: float, fresh: bool = False):
        nll = module(micro)
        tokens = micro.loss_mask[:, 1:].sum()
        if self.options.loss_mean == "token":
            loss = nll.sum() / max(num_units, 1.0)
        else:
            segments = torch.nn.functional.one_hot(micro.segment_ids[:, 1:], int(micro.segment_ids.max()) + 1)[..., 1:]
            per_sequence = torch.einsum("bt,bts->bs", nll, segments.float())
            counts = sequence_token_counts(micro)
            loss = (per_sequence / counts.clamp(min=1.0)).sum() / max(num_units, 1.0)
        # shares of the mini-batch's figures: the learner sums them over micro-batches and ranks
        return loss, {"loss/sft": loss.item(), "sft/tokens_per_step": float(tokens)}

    @torch.no_grad()
    def evaluate(self, module, batch: SequenceBatch, side_by_side: bool = False) -> torch.Tensor:
        """[B, 2]: each row's summed NLL of its learned tokens and their count (a loss and a perplexity over a set)."""
        size = self.spec.micro_batch_size
        parts = []
        for start in range(0, len(batch), size):
            micro = batch.select(range(start, min(start + size, len(batch))))
            nll = module(micro)
            parts.append(torch.stack([nll.sum(-1), micro.loss_mask[:, 1:].sum(-1)], dim=-1).cpu())
        return torch.cat(parts)

    def exported(self, module: nn.Module) -> nn.Module:
        return module.policy
