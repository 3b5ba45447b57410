"""Reward modelling: a sequence-classification model trained on preference pairs (Bradley–Terry)."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.algorithms.preference_math import bradley_terry_loss
from rlhf_ray.data.batch import PairBatch
from rlhf_ray.models.forward import sequence_scores
from rlhf_ray.models.modeling import load_reward_model
from rlhf_ray.objectives.base import Objective, register


class PairScorer(nn.Module):
    """A sequence-classification RM scoring both sides of each pair in one forward pass."""

    def __init__(self, reward_model: nn.Module, padding_free: bool = False):
        super().__init__()
        self.reward_model, self.padding_free = reward_model, padding_free
        self.config = reward_model.config

    def forward(self, batch: PairBatch) -> torch.Tensor:
        """[B, 2] scores (chosen, rejected)."""
        B, _, T = batch.input_ids.shape
        return sequence_scores(self.reward_model, batch.input_ids.view(2 * B, T), batch.attention_mask.view(2 * B, T),
                               self.padding_free).view(B, 2)


@register("bradley_terry")
class BradleyTerryObjective(Objective):
    """Reward modelling: −log σ(r_chosen − r_rejected − margin), mean over pairs (rlhf_ray.algorithms.preference_math).
    The RM is the backbone with a new scalar head (or an existing RM, trained further)."""
    export_name = "reward_model"

    def build(self) -> nn.Module:
        model = load_reward_model(self.spec.model)
        model.config.pad_token_id = self.spec.pad_token_id  # HF pools each sequence at its last non-pad token
        options = self.spec.forward_options().checked(model, f"reward model {self.spec.model}")
        return PairScorer(model, options.padding_free)

    def units(self, batch: PairBatch) -> torch.Tensor:
        return torch.tensor(float(len(batch)))

    def loss(self, module, micro: PairBatch, num_units: float, fresh: bool = False):
        scores = module(micro)
        loss, stats = bradley_terry_loss(scores[:, 0], scores[:, 1], micro.margin, num_units)
        return loss, {"loss/bradley_terry": loss.item(), **{f"rm/{k}": float(v) for k, v in stats.items()}}

    @torch.no_grad()
    def evaluate(self, module, batch: PairBatch, side_by_side: bool = False) -> torch.Tensor:
        """[B, 2] scores of (chosen, rejected), micro-batch by micro-batch."""
        size = self.spec.micro_batch_size
        return torch.cat([module(batch.select(range(i, min(i + size, len(batch))))).cpu()
                          for i in range(0, len(batch), size)])

    def exported(self, module: nn.Module) -> nn.Module:
        return module.reward_model
