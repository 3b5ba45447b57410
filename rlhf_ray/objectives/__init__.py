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

A new objective is a new module here (ppo.py, reward_model.py, …) with a registered class; no learner changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.config import DeepSpeedConfig, DPOTrainingConfig, LoRAConfig, OptimizerConfig, PPOConfig


class LearnerSpec(BaseModel):
    """Everything a learner group needs, derived by a driver from its experiment config (not user-facing:
    the experiment configs document the keys these come from)."""
    model_config = ConfigDict(extra="forbid")

    objective: str
    model: str                                # policy (ppo, sft, dpo) or the RM's backbone (bradley_terry): a local path
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
    lora: Optional[LoRAConfig] = None         # ppo, sft, dpo: the policy as LoRA adapters
    temperature: float = 1.0                  # ppo: the sampling temperature the logprobs are taken at
    critic: bool = True                       # ppo: a value model (ppo.advantage=gae) or the policy alone
    max_new_tokens: Optional[int] = None      # ppo: the response length cap (loss_aggregation=seq_mean_token_sum)
    dpo: Optional[DPOTrainingConfig] = None   # dpo: the loss and its options
    sft_loss_mean: str = "token"              # sft: 'token' or 'sequence' (SFTTrainingConfig.loss_mean)

    def forward_options(self):
        """How the objective's forward passes run (deepspeed.padding_free, deepspeed.logits_chunk_tokens)."""
        from rlhf_ray.models.forward import ForwardOptions

        return ForwardOptions(**self.deepspeed.forward_options())


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

    def evaluate(self, module, batch, side_by_side: bool = False, **options):
        """Forward passes without gradients. ``side_by_side``: independent networks' passes may run at once, in two
        threads (the learner's decision, LearnerActor.side_by_side); an objective with one network ignores it."""
        raise NotImplementedError

    def exported(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError


# the registered objectives (imported for their @register)
from rlhf_ray.objectives import dpo, ppo, reward_model, sft  # noqa: E402,F401
