"""Entry point: python -m rlhf_ray.train_dpo --config configs/dpo_tiny_cpu.yaml [key=value ...]

Direct preference optimisation (or a variant: dpo.loss) of a policy on preference pairs, with the generic learner and
the reference role (also under ``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml,
metrics.jsonl, tensorboard/, logs/, checkpoints/, eval.json and final_model/ (the policy, HF safetensors).
Keys: ``python -m rlhf_ray.config --dpo --help``.
"""
from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import DPOConfig
from rlhf_ray.train import exit_with, entry_point

DEFAULT_DPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "dpo_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    def make_trainer(cfg):
        from rlhf_ray.drivers.dpo import DPOTrainer

        return DPOTrainer(cfg)

    return entry_point(argv, DPOConfig, DEFAULT_DPO_CONFIG, "Train a policy by DPO (or a variant) on Ray.",
                            "rlhf-ray DPO", make_trainer)


if __name__ == "__main__":
    exit_with(main())
