"""Entry point: python -m rlhf_ray.train_dpo --config configs/dpo_tiny_cpu.yaml [key=value ...]

Direct preference optimisation (or a variant: dpo.loss) of a policy on preference pairs, with the generic learner and
the reference role (also under ``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml,
metrics.jsonl, tensorboard/, logs/, checkpoints/, eval.json and final_model/ (the policy, HF safetensors).
Keys: ``python -m rlhf_ray.config --dpo --help``.
"""
from __future__ import annotations

from rlhf_ray.cli import training
from rlhf_ray.run.harness import exit_with


def main(argv: list[str] | None = None) -> int:
    return training.main("train_dpo", argv)


if __name__ == "__main__":
    exit_with(main())
