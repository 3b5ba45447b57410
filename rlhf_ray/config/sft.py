"""Supervised fine-tuning (python -m rlhf_ray.train_sft)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from rlhf_ray.config import rules
from rlhf_ray.config.learner_run import LearnerRunConfig
from rlhf_ray.config.sections import LoRAConfig, ModelDtype, OptimizerConfig, StrictSection


class ConversationDataConfig(StrictSection):
    train: str = Field(description="Conversations to imitate: rows with a list of {role, content} messages (system, "
                                   "user, assistant turns, ending with an assistant turn): a local "
                                   ".jsonl/.json/.parquet file or a hub dataset.")
    split: str = Field("train", description="Split of a hub dataset to read.")
    messages_field: str = Field("messages", description="Column with the conversation.")
    eval: list[str] = Field(default_factory=list, description="Further conversation files/datasets, each evaluated "
                                                               "(loss on assistant tokens) and reported on its own.")
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of `train` held out for evaluation "
                                    "('heldout' in the reports) and never trained on.")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How a conversation is rendered: the Tulu chat format or the tokenizer's chat template "
                            "(ChatML, Llama-3, …). The loss covers the assistant turns only, end-of-turn marker "
                            "included; which tokens those are is found by rendering (rlhf_ray.data.conversations).")
    max_length: int = Field(2048, gt=0, description="Tokens per conversation; longer ones keep their start.")
    packing: bool = Field(False, description="Several conversations per row up to max_length, each attending only to "
                                             "itself (position ids restart): less padding, the same loss.")
    limit: Optional[int] = Field(None, gt=0, description="Train on N conversations drawn at random (seeded) after the "
                                 "hold-out (a quicker run).")


class SFTTrainingConfig(StrictSection):
    epochs: int = Field(2, gt=0, description="Passes over the training conversations.")
    batch_size: int = Field(128, gt=0, description="Rows per optimizer step (global, across learner ranks): "
                                                   "conversations, or packed rows with data.packing.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per forward/backward on one rank.")
    loss_mean: Literal["token", "sequence"] = Field(
        "token", description="'token': the mean over every assistant token of the optimizer step (long answers weigh "
                             "more); 'sequence': each conversation's own token mean, averaged over conversations.")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate before training too (step 0 in metrics.jsonl).")


class SFTConfig(LearnerRunConfig):
    """Supervised fine-tuning (python -m rlhf_ray.train_sft): the loss on the assistant turns of conversations.
    Writes <output_dir>/final_model: the fine-tuned causal LM (HF safetensors) with its tokenizer — a policy for
    PPO (models.policy) or DPO (model)."""
    model: str = Field(description="The model to fine-tune: hub name, local path, 'tiny:policy' or 'real:smollm2-135m'.")
    dtype: ModelDtype = Field("float32", description="dtype of the saved model.")
    data: ConversationDataConfig
    training: SFTTrainingConfig = Field(default_factory=SFTTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_ratio=0.03))
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the model as LoRA adapters on its frozen weights (rlhf_ray.models.lora). Checkpoints "
                          "hold the adapters; final_model is the merged weights, the adapter in final_model/adapter. "
                          "null: full fine-tuning.")

    @model_validator(mode="after")
    def _check_combinations(self) -> "SFTConfig":
        rules.check_batch_split("training.batch_size", self.training.batch_size, "training.micro_batch_size",
                                self.training.micro_batch_size, self.resources.learner.num_actors)
        if self.lora is not None:
            rules.check_lora(self.deepspeed, "lora")
        return self


