"""Entry point: python -m rlhf_ray.train_sft --config configs/sft_tiny_cpu.yaml [key=value ...]

Supervised fine-tuning on conversations (the loss on the assistant turns only), with the generic learner (also under
``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, logs/,
checkpoints/, eval.json and final_model/ (the policy, HF safetensors). Keys: ``python -m rlhf_ray.config --sft --help``.
"""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import SFTConfig
from rlhf_ray.train import exit_with, entry_point

DEFAULT_SFT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sft_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    def make_trainer(cfg):
        from rlhf_ray.drivers.sft import SFTTrainer

        return SFTTrainer(cfg)

    return entry_point(argv, SFTConfig, DEFAULT_SFT_CONFIG, "Supervised fine-tuning of a policy on Ray.",
                            "rlhf-ray SFT", make_trainer)


if __name__ == "__main__":
    exit_with(main())
