"""Entry point: python -m rlhf_ray.train --config configs/tiny_cpu.yaml [key=value ...]

Joins the Ray cluster named by ``ray.address`` or RAY_ADDRESS (``ray job submit`` sets it), otherwise
starts a local one of its own. Writes <output_dir>/config.yaml, metrics.jsonl, samples.jsonl, tensorboard/, logs/,
report.png, checkpoints/ and final_model/, and ends with a one-line summary of the run.
"""
from __future__ import annotations

from rlhf_ray.cli import training
from rlhf_ray.run.harness import exit_with


def main(argv: list[str] | None = None) -> int:
    return training.main("train", argv)


if __name__ == "__main__":
    exit_with(main())
