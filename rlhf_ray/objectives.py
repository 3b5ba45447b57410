"""What the learner optimises: a registry of objectives run by one generic DeepSpeed learner.

The learner (actors/learner.py) owns everything objectives share — the process group, the engine, AdamW
and the LR schedule, epochs over a batch, mini-batches, gradient accumulation, checkpoints, saving the
model. An objective says only:

    build(spec)               the trainable module (from spec.model, spec.value_model)
    units(batch)              what its loss is a mean over (response tokens, pairs), counted on this rank
    loss(module, micro, N, fresh)  one micro-batch's loss as a share of the mean over N units (N: global
                              mini-batch); fresh: the weights are still those the update started from
    evaluate(module, batch, **options)  forward passes without gradients (PPO: values, old logprobs; RM: scores)
    exported(module)          the Hugging Face model that ``save`` writes and ``publish_weights`` sends

A new objective (DPO, SFT) is a new class here plus its name in ``learner.objective``; no trainer changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.batch import PairBatch, RolloutBatch
from rlhf_ray.config import DeepSpeedConfig, OptimizerConfig, PPOConfig
from rlhf_ray.models.modeling import PolicyAndValue, load_causal_lm, load_reward_model, load_value_model, token_logprobs
from rlhf_ray.ppo_math import entropy_from_logits, policy_loss, token_aggregate, value_loss
from rlhf_ray.preference_math import bradley_terry_loss


class LearnerSpec(BaseModel):
    """Everything a learner group needs, derived by a driver from its experiment config (not user-facing:
    the experiment configs document the keys these come from)."""
    model_config = ConfigDict(extra="forbid")

    objective: str
    model: str                                # policy (ppo) or the RM's backbone (bradley_terry): a local path
    value_model: Optional[str] = None         # ppo: the critic's source when value_init='reward'
    value_init: str = "policy"
    world_size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    mini_batch_size: int                      # rows per optimizer step, global (tokens' sequences or pairs)
    micro_batch_size: int                     # rows per forward/backward on one rank
    epochs: int = 1                           # passes over each batch handed to ``train``
    optimizer_steps: int                      # over the whole run: the LR schedule's length
    optimizer: OptimizerConfig
    deepspeed: DeepSpeedConfig
    timeout_s: float = 1800.0
    seed: int = 0
    export_dtype: str = "float32"             # dtype of published / saved weights
    pad_token_id: Optional[int] = None        # bradley_terry: where the RM pools (its last non-pad token)
    ppo: Optional[PPOConfig] = None
    temperature: float = 1.0                  # ppo: the sampling temperature the logprobs are taken at


OBJECTIVES: dict[str, type["Objective"]] = {}


def register(name: str):
    def add(cls):
        OBJECTIVES[name] = cls
        cls.name = name
        return cls
    return add


def make_objective(spec: LearnerSpec) -> "Objective":
    if spec.objective not in OBJECTIVES:
        raise ValueError(f"unknown learner objective {spec.objective!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[spec.objective](spec)


class Objective:
    name = ""
    export_name = "model"  # the exported model's directory in a checkpoint

    def __init__(self, spec: LearnerSpec):
        self.spec = spec

    def build(self) -> nn.Module:
        raise NotImplementedError

    def units(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, module, micro, num_units: float, fresh: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, module, batch, **options):
        raise NotImplementedError

    def exported(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError


@register("ppo")
class PPOObjective(Objective):
    """Clipped policy loss + clipped value loss − entropy bonus over response tokens (rlhf_ray.ppo_math)."""
    export_name = "policy"

    def build(self) -> nn.Module:
        spec = self.spec
        return PolicyAndValue(load_causal_lm(spec.model),
                              load_value_model(spec.value_init, spec.model, spec.value_model, "float32"))

    def units(self, batch: RolloutBatch) -> torch.Tensor:
        return batch.response_mask.sum()

    def loss(self, module, micro: RolloutBatch, num_units: float, fresh: bool = False):
        """``fresh`` (the first mini-batch of an update): these logprobs are the policy's before the update, so
        their gap to the sampler's is the weight-sync check — also when the sampler's serve as old logprobs."""
        ppo, mask, temperature = self.spec.ppo, micro.response_mask, self.spec.temperature
        logits, values = module(micro)
        logprobs = token_logprobs(logits, micro.response_ids, temperature)
        pg_loss, pg_stats = policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, ppo.clip_range,
                                        num_units)
        vf_loss, vf_stats = value_loss(values, micro.values, micro.returns, mask, ppo.value_clip_range, num_units)
        with torch.set_grad_enabled(ppo.entropy_coef > 0):  # a metric only: keep [B, R, V] out of the graph
            entropy = token_aggregate(entropy_from_logits(logits / temperature), mask, num_units)
        loss = pg_loss + ppo.vf_coef * vf_loss - ppo.entropy_coef * entropy
        share = float(mask.sum()) / max(num_units, 1.0)  # this micro-batch's share of the global token mean
        stats = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "entropy": entropy.item(),
                 **{f"ppo/{key}": float(value) * share for key, value in {**pg_stats, **vf_stats}.items()}}
        if fresh and micro.gen_logprobs is not None:
            gap = (logprobs.detach() - micro.gen_logprobs).abs() * mask
            stats.update({"check/sampler_gap_sum": float(gap.sum()), "check/sampler_gap_tokens": float(mask.sum())})
        return loss, stats

    @torch.no_grad()
    def evaluate(self, module, batch: RolloutBatch, logprobs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Old logprobs (None without ``logprobs``: the sampler's serve) and values before the update. ([B, R], [B, R])"""
        net = getattr(module, "module", module)  # the DeepSpeed engine's module: the critic alone, when that is all
        old, values = [], []
        for micro in batch.chunks(max(1, len(batch) // self.spec.micro_batch_size)):
            if logprobs:
                logits, v = module(micro)
                old.append(token_logprobs(logits, micro.response_ids, self.spec.temperature))
                del logits
            else:
                v = net.value(micro)
            values.append(v)
        mask = batch.response_mask
        return ((torch.cat(old) * mask).cpu() if logprobs else None), (torch.cat(values) * mask).cpu()

    def exported(self, module: nn.Module) -> nn.Module:
        return module.policy


class PairScorer(nn.Module):
    """A sequence-classification RM scoring both sides of each pair in one forward pass."""

    def __init__(self, reward_model: nn.Module):
        super().__init__()
        self.reward_model = reward_model
        self.config = reward_model.config

    def forward(self, batch: PairBatch) -> torch.Tensor:
        """[B, 2] scores (chosen, rejected)."""
        B, _, T = batch.input_ids.shape
        logits = self.reward_model(input_ids=batch.input_ids.view(2 * B, T),
                                   attention_mask=batch.attention_mask.view(2 * B, T), use_cache=False).logits
        return logits[:, 0].float().view(B, 2)


@register("bradley_terry")
class BradleyTerryObjective(Objective):
    """Reward modelling: −log σ(r_chosen − r_rejected − margin), mean over pairs (rlhf_ray.preference_math).
    The RM is the backbone with a new scalar head (or an existing RM, trained further)."""
    export_name = "reward_model"

    def build(self) -> nn.Module:
        model = load_reward_model(self.spec.model)
        model.config.pad_token_id = self.spec.pad_token_id  # HF pools each sequence at its last non-pad token
        return PairScorer(model)

    def units(self, batch: PairBatch) -> torch.Tensor:
        return torch.tensor(float(len(batch)))

    def loss(self, module, micro: PairBatch, num_units: float, fresh: bool = False):
        scores = module(micro)
        loss, stats = bradley_terry_loss(scores[:, 0], scores[:, 1], micro.margin, num_units)
        return loss, {"loss/bradley_terry": loss.item(), **{f"rm/{k}": float(v) for k, v in stats.items()}}

    @torch.no_grad()
    def evaluate(self, module, batch: PairBatch) -> torch.Tensor:
        """[B, 2] scores of (chosen, rejected), micro-batch by micro-batch."""
        size = self.spec.micro_batch_size
        return torch.cat([module(batch.select(range(i, min(i + size, len(batch))))).cpu()
                          for i in range(0, len(batch), size)])

    def exported(self, module: nn.Module) -> nn.Module:
        return module.reward_model
