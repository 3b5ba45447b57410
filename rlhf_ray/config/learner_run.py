"""What every run of the learner on a fixed dataset has (reward-model training, SFT, DPO): its top level, and the
preference sources RM training and DPO share."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from rlhf_ray.config.sections import (CheckpointSection, DeepSpeedConfig, LearnerResourcesConfig, LearnerTimeouts,
                                      ModelDtype, RaySection, RecoverySection, RunConfig, RunLogging, StrictSection)


class LearnerRunConfig(RunConfig):
    """The top level of a learner-only run; each kind adds its data, objective and optimizer sections and checks its
    batch split (rules.check_batch_split)."""
    model: str = Field(description="The model the run trains.")
    dtype: ModelDtype = Field("float32", description="dtype of the saved model.")
    cache_dir: Optional[str] = Field(None, description="Where 'tiny:*'/'real:*' models are built.")
    # ZeRO 0 unless set: on one learner rank ZeRO 1-2 partition nothing and only add an fp32 copy (deepspeed.zero_stage)
    deepspeed: DeepSpeedConfig = Field(default_factory=lambda: DeepSpeedConfig(zero_stage=0))
    resources: LearnerResourcesConfig = Field(default_factory=LearnerResourcesConfig)
    timeouts: LearnerTimeouts = Field(default_factory=LearnerTimeouts)
    logging: RunLogging = Field(default_factory=RunLogging)
    checkpoint: CheckpointSection
    recovery: RecoverySection
    ray: RaySection


class PreferenceSourcesConfig(StrictSection):
    """Where a preference run's pairs come from (reward-model training, DPO)."""
    train: str = Field(description="Preference pairs in the Tulu 2.5 schema (chosen/rejected message lists sharing the "
                                   "prompt turns, optional source): a local .jsonl/.json/.parquet file or a hub dataset.")
    split: str = Field("train", description="Split of a hub dataset to read.")
    eval: list[str] = Field(default_factory=list, description="Further preference files/datasets, each evaluated and "
                                                               "reported on its own (overall and per source).")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of each source of `train` held out for "
                                    "evaluation ('heldout' in the reports) and never trained on.")
    limit: Optional[int] = Field(None, gt=0, description="Train on N pairs drawn at random (seeded) from all of `train` "
                                 "after the hold-out (a quicker run; the hold-out stays as it is).")


