"""Entry point: python -m rlhf_ray.train_sft --config configs/sft_tiny_cpu.yaml [key=value ...]

Supervised fine-tuning on conversations (the loss on the assistant turns only), with the generic learner (also under
``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, logs/,
checkpoints/, eval.json and final_model/ (the policy, HF safetensors). Keys: ``python -m rlhf_ray.config --sft --help``.
"""
from __future__ import annotations

from rlhf_ray.cli import training
from rlhf_ray.run.harness import exit_with


def main(argv: list[str] | None = None) -> int:
    return training.main("train_sft", argv)


if __name__ == "__main__":
    exit_with(main())
