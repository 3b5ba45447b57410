"""The learner's spec, the objective interface and its registry (rlhf_ray.objectives says what an objective is)."""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.config import DeepSpeedConfig, LoRAConfig, OptimizerConfig


class NoOptions(BaseModel):
    """An objective with no options of its own."""
    model_config = ConfigDict(extra="forbid")


class LearnerSpec(BaseModel):
    """Everything a learner group needs, derived by a driver from its experiment config (not user-facing:
    the experiment configs document the keys these come from)."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    objective: str
    model: str                                # policy (ppo, sft, dpo) or the RM's backbone (bradley_terry): a local path
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
    pad_token_id: Optional[int] = None        # the saved tokenizer's pad token (an RM pools at its last non-pad token)
    lora: Optional[LoRAConfig] = None         # the policy as LoRA adapters (ppo, sft, dpo)
    options: BaseModel = NoOptions()          # the objective's own options: its class's ``Options``

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
    objective = OBJECTIVES[spec.objective]
    if not isinstance(spec.options, objective.Options):
        raise TypeError(f"the {spec.objective} objective takes {objective.Options.__name__} options, "
                        f"not {type(spec.options).__name__}")
    return objective(spec)


class Objective:
    name = ""
    export_name = "model"  # the exported model's directory in a checkpoint
    Options: type[BaseModel] = NoOptions  # what LearnerSpec.options holds for this objective

    def __init__(self, spec: LearnerSpec):
        self.spec = spec
        self.options = spec.options

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
