"""Entry point: python -m rlhf_ray.train --config configs/tiny_cpu.yaml [key=value ...]

Joins a running Ray cluster when there is one (``ray job submit`` sets RAY_ADDRESS), otherwise starts a
local one. Writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/ and final_model/.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rlhf_ray.config import DEFAULT_CONFIG, ConfigError, dump_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run PPO on Ray.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: tiny CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.kl_coef=0.1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from rlhf_ray.metrics import MetricsLogger
    from rlhf_ray.roles import RoleError
    from rlhf_ray.trainer import PPOTrainer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    trainer = None
    try:
        trainer = PPOTrainer(cfg)
        print(f"roles ready in {trainer.startup_seconds:.1f} s; {cfg.num_steps} PPO steps", flush=True)
        with MetricsLogger(out, cfg.logging.tensorboard) as metrics_log:
            bar = tqdm(range(cfg.num_steps), desc="ppo", disable=not cfg.logging.progress_bar)
            for _ in bar:
                metrics = trainer.step()
                metrics_log.log(metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}",
                                step_s=f"{metrics['time/step']:.1f}")
        if cfg.logging.save_final_model:
            print(f"final policy saved to {trainer.save(str((out / 'final_model').resolve()))}", flush=True)
    except (RoleError, ValueError, OSError) as err:  # OSError: e.g. a model path or hub name not found
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
