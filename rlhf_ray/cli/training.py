"""The four training entry points as one table: PPO (train), reward-model training (train_rm), SFT (train_sft) and DPO
(train_dpo). Each reads its config (``--config`` plus ``key=value`` overrides; a bad one is exit 2 in one line), then
hands the driver it names to the run harness (rlhf_ray.run.harness.run)."""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


@dataclass(frozen=True)
class RunKind:
    schema: str          # the config class in rlhf_ray.config
    default_config: Path
    description: str     # --help's first line
    title: str           # the console's first line
    driver: str          # module:Class of the driver, imported only when the run starts


RUN_KINDS = {
    "train": RunKind("ExperimentConfig", CONFIGS / "tiny_cpu.yaml", "Run PPO on Ray.", "rlhf-ray PPO",
                     "rlhf_ray.drivers.ppo:PPOTrainer"),
    "train_rm": RunKind("RewardTrainingConfig", CONFIGS / "rm_tiny_cpu.yaml",
                        "Train a reward model (Bradley–Terry) on Ray.", "rlhf-ray reward model",
                        "rlhf_ray.drivers.reward_model:RewardModelTrainer"),
    "train_sft": RunKind("SFTConfig", CONFIGS / "sft_tiny_cpu.yaml", "Supervised fine-tuning of a policy on Ray.",
                         "rlhf-ray SFT", "rlhf_ray.drivers.sft:SFTTrainer"),
    "train_dpo": RunKind("DPOConfig", CONFIGS / "dpo_tiny_cpu.yaml", "Train a policy by DPO (or a variant) on Ray.",
                         "rlhf-ray DPO", "rlhf_ray.drivers.dpo:DPOTrainer"),
}


def main(kind: str, argv: list[str] | None = None) -> int:
    """Run the entry point ``kind`` (a key of RUN_KINDS) with ``argv``; -> the process's exit code."""
    from rlhf_ray import config
    from rlhf_ray.run.harness import run

    spec = RUN_KINDS[kind]
    parser = argparse.ArgumentParser(prog=f"python -m rlhf_ray.{kind}", description=spec.description)
    parser.add_argument("--config", default=str(spec.default_config),
                        help=f"YAML config (default: {spec.default_config.name})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        cfg = config.load_config(args.config, args.overrides, getattr(config, spec.schema))
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def make_trainer():
        module, _, name = spec.driver.partition(":")
        return getattr(importlib.import_module(module), name)(cfg)

    return run(cfg, f"{spec.title}: {args.config}", make_trainer)
