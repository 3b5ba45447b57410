"""Entry point: python -m rlhf_ray.train_rm --config configs/rm_tiny_cpu.yaml [key=value ...]

Trains a Bradley–Terry reward model on preference pairs with the generic learner (also under
``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, logs/,
checkpoints/, eval.json and final_model/ (HF sequence-classification safetensors + reward_stats.json).
Keys: ``python -m rlhf_ray.config --rm --help``.
"""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import RewardTrainingConfig
from rlhf_ray.train import exit_with, entry_point

DEFAULT_RM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rm_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    def make_trainer(cfg):
        from rlhf_ray.drivers.reward_model import RewardModelTrainer

        return RewardModelTrainer(cfg)

    return entry_point(argv, RewardTrainingConfig, DEFAULT_RM_CONFIG, "Train a reward model (Bradley–Terry) on Ray.",
                            "rlhf-ray reward model", make_trainer)


if __name__ == "__main__":
    exit_with(main())
