"""Entry point: python -m rlhf_ray.train_rm --config configs/rm_tiny_cpu.yaml [key=value ...]

Trains a Bradley–Terry reward model on preference pairs with the generic learner (also under
``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, logs/,
checkpoints/, eval.json and final_model/ (HF sequence-classification safetensors + reward_stats.json).
Keys: ``python -m rlhf_ray.config --rm --help``.
"""
from __future__ import annotations

from rlhf_ray.cli import training
from rlhf_ray.run.harness import exit_with


def main(argv: list[str] | None = None) -> int:
    return training.main("train_rm", argv)


if __name__ == "__main__":
    exit_with(main())
