"""Entry point: python -m rlhf_ray.train_rm --config configs/rm_tiny_cpu.yaml [key=value ...]

Trains a Bradley–Terry reward model on preference pairs with the generic learner (also under
``ray job submit``, like rlhf_ray.train). Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, logs/,
checkpoints/, eval.json and final_model/ (HF sequence-classification safetensors + reward_stats.json).
Keys: ``python -m rlhf_ray.config --rm --help``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlhf_ray.config import ConfigError, RewardTrainingConfig, load_config
from rlhf_ray.train import run

DEFAULT_RM_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rm_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a reward model (Bradley–Terry) on Ray.")
    parser.add_argument("--config", default=str(DEFAULT_RM_CONFIG), help="RM training YAML (default: tiny CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.epochs=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, RewardTrainingConfig)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def make_trainer():
        from rlhf_ray.drivers.reward_model import RewardModelTrainer

        return RewardModelTrainer(cfg)

    return run(cfg, f"rlhf-ray reward model: {args.config}", make_trainer)


if __name__ == "__main__":
    code = main()
    from rlhf_ray.cluster.connection import ray_abandoned

    if ray_abandoned():  # see rlhf_ray.train
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
