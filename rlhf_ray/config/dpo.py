"""Direct preference optimisation and its variants (python -m rlhf_ray.train_dpo)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from rlhf_ray.config import rules
from rlhf_ray.config.errors import require
from rlhf_ray.config.learner_run import LearnerRunConfig, PreferenceSourcesConfig
from rlhf_ray.config.sections import (LearnerResourcesConfig, LearnerTimeouts, LoRAConfig, ModelDtype, OptimizerConfig,
                                      RoleResources, StrictSection)


class PreferencePairsConfig(PreferenceSourcesConfig):
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How the prompt turns are rendered: the Tulu chat format or the tokenizer's chat template; "
                            "each response follows as the assistant's turn, end-of-turn marker included.")
    max_prompt_length: int = Field(512, gt=0, description="Prompt tokens kept (its end, next to the response).")
    max_length: int = Field(1024, gt=0, description="Prompt + response tokens; a longer response is cut at its end.")

    @model_validator(mode="after")
    def _room_for_a_response(self) -> "PreferencePairsConfig":
        require(self.max_prompt_length < self.max_length, "max_prompt_length",
                f"{self.max_prompt_length} leaves no room for a response within data.max_length={self.max_length}")
        return self


class DPOTrainingConfig(StrictSection):
    loss: str = Field("sigmoid", description="The preference loss (rlhf_ray.algorithms.preference_math.DPO_LOSSES): 'sigmoid' "
                                             "(DPO), 'ipo', 'length_normalized' (Tulu 3), 'simpo' (no reference), "
                                             "'hinge'.")
    beta: float = Field(0.1, gt=0.0, description="β: how far the policy may move from the reference (Zephyr, Tulu 2 "
                                                  "DPO: 0.1; SimPO: 2.0).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="sigmoid only: the share of pairs assumed "
                                                                    "mislabelled (conservative DPO); 0: plain DPO.")
    simpo_gamma: float = Field(1.0, ge=0.0, description="simpo only: the target reward margin γ (SimPO: γ/β = 0.5).")
    epochs: int = Field(3, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (global, across learner ranks).")
    micro_batch_size: int = Field(1, gt=0, description="Pairs per forward/backward on one rank (2× sequences).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate before training too (step 0 in metrics.jsonl: the starting "
                                                  "policy, equal to the reference: margins ~0, loss log 2 for sigmoid).")

    @model_validator(mode="after")
    def _known_loss(self) -> "DPOTrainingConfig":
        import inspect

        from rlhf_ray.algorithms.preference_math import DPO_LOSSES

        require(self.loss in DPO_LOSSES, "loss", f"{self.loss!r} is not a registered loss; known: "
                                                f"{', '.join(DPO_LOSSES)}")
        takes = inspect.signature(DPO_LOSSES[self.loss]).parameters
        require(self.label_smoothing == 0 or "label_smoothing" in takes, "label_smoothing",
                f"dpo.loss={self.loss!r} has no label smoothing; set it to 0")
        return self


class ReferenceTimeouts(LearnerTimeouts):
    score_s: float = Field(600.0, gt=0, description="The reference role's logprobs of one batch of pairs.")


class LearnerAndReferenceResources(LearnerResourcesConfig):
    reference: RoleResources = Field(default_factory=RoleResources)


class DPOConfig(LearnerRunConfig):
    """Direct preference optimisation (python -m rlhf_ray.train_dpo) and its variants on preference pairs; the
    reference log-probs come from the reference role (shardable, like PPO's), once per pair. Writes
    <output_dir>/final_model: the policy (HF safetensors) with its tokenizer."""
    model: str = Field(description="The policy to train (usually an SFT model): hub name, local path, 'tiny:policy' "
                                   "or 'real:smollm2-135m'.")
    reference: Optional[str] = Field(None, description="The frozen reference policy; null: the starting policy.")
    dtype: ModelDtype = Field(
        "float32", description="dtype of the saved policy and of the frozen reference (with lora the reference is the "
                               "learner's own base, in deepspeed.precision).")
    data: PreferencePairsConfig
    dpo: DPOTrainingConfig = Field(default_factory=DPOTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-7, warmup_ratio=0.1))
    resources: LearnerAndReferenceResources = Field(default_factory=LearnerAndReferenceResources)
    timeouts: ReferenceTimeouts = Field(default_factory=ReferenceTimeouts)
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the policy as LoRA adapters on its frozen weights (rlhf_ray.models.lora). The reference "
                          "is then the policy with its adapters off, computed in the learner: no reference actors "
                          "(resources.reference is unused). Checkpoints hold the adapters; final_model is the merged "
                          "weights, the adapter in final_model/adapter. null: full fine-tuning.")

    @model_validator(mode="after")
    def _check_combinations(self) -> "DPOConfig":
        rules.check_batch_split("dpo.batch_size", self.dpo.batch_size, "dpo.micro_batch_size",
                                self.dpo.micro_batch_size, self.resources.learner.num_actors)
        if self.lora is not None:
            rules.check_lora(self.deepspeed, "lora", reference_key="reference", reference=self.reference,
                             policy=self.model)
        return self

    @property
    def reference_path(self) -> str:
        return self.reference or self.model

    def reference_forward(self) -> tuple[str, int, float, dict]:
        """The reference role's forward passes: (dtype, sequences per micro-batch: both sides of the pairs, the
        temperature of its logprobs: 1, the model's own distribution, ForwardOptions' fields)."""
        return self.dtype, 2 * self.dpo.micro_batch_size, 1.0, self.deepspeed.forward_options()


