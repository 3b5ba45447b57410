"""Reward-model training (python -m rlhf_ray.train_rm)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from rlhf_ray.config import rules
from rlhf_ray.config.learner_run import LearnerRunConfig, PreferenceSourcesConfig
from rlhf_ray.config.sections import ModelDtype, OptimizerConfig, StrictSection


class PreferenceDataConfig(PreferenceSourcesConfig):
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How a conversation is rendered for the RM: Tulu chat format or the tokenizer's chat template "
                            "(the reward backends must use the same: models.reward.template).")
    max_length: int = Field(512, gt=0, description="Tokens per conversation; longer ones keep their end (the response).")
    margin_field: Optional[str] = Field(
        None, description="Column with a per-pair margin m: loss −log σ(r_chosen − r_rejected − m) (Llama 2); null: m = 0.")


class RMTrainingConfig(StrictSection):
    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (global, across learner ranks).")
    micro_batch_size: int = Field(4, gt=0, description="Pairs per forward/backward on one rank (2× sequences).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate the untrained RM too (step 0 in metrics.jsonl): the baseline.")


class RewardTrainingConfig(LearnerRunConfig):
    """Bradley–Terry reward-model training (python -m rlhf_ray.train_rm). Writes <output_dir>/final_model: an HF
    sequence-classification model (safetensors) + reward_stats.json, which the `model` and `serve` reward backends
    load and models.value_model can start a PPO critic from."""
    model: str = Field(description="Backbone: a causal LM (a new scalar head is added) or an RM to train further; hub "
                                   "name, local path, 'tiny:policy' or 'real:smollm2-135m'.")
    dtype: ModelDtype = Field("float32", description="dtype of the saved RM.")
    data: PreferenceDataConfig
    training: RMTrainingConfig = Field(default_factory=RMTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_ratio=0.03))

    @model_validator(mode="after")
    def _check_combinations(self) -> "RewardTrainingConfig":
        rules.check_batch_split("training.batch_size", self.training.batch_size, "training.micro_batch_size",
                                self.training.micro_batch_size, self.resources.learner.num_actors)
        return self


