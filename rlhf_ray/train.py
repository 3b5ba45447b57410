"""Entry point: python -m rlhf_ray.train --config configs/tiny_cpu.yaml [key=value ...]

Joins the Ray cluster named by ``ray.address`` or RAY_ADDRESS (``ray job submit`` sets it), otherwise
starts a local one of its own. Writes <output_dir>/config.yaml, metrics.jsonl, samples.jsonl, tensorboard/, logs/,
report.png and final_model/, and ends with a one-line summary of the run.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from rlhf_ray.config import DEFAULT_CONFIG, ConfigError, dump_config, load_config

log = logging.getLogger("rlhf_ray.train")


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
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlhf_ray.console import setup_console
    from rlhf_ray.metrics import MetricsLogger
    from rlhf_ray.preflight import PreflightError, check_output_dir
    from rlhf_ray.report import draw, load_metrics, summary
    from rlhf_ray.roles import RoleError, RunStopped, stop_ray
    from rlhf_ray.trainer import PPOTrainer

    try:
        out = check_output_dir(cfg.output_dir)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    driver_log = setup_console(cfg.logging.console, out)
    (out / "config.yaml").write_text(dump_config(cfg))
    log.info("rlhf-ray PPO: %s → %s%s", args.config, out,
             f" (engine, Ray and DeepSpeed output: {driver_log.parent}/)" if driver_log else "")
    trainer = None
    try:
        trainer = PPOTrainer(cfg)
        log.info("roles ready in %.1f s; %d PPO steps", trainer.startup_seconds, cfg.num_steps)
        with MetricsLogger(out, cfg.logging.tensorboard) as metrics_log, logging_redirect_tqdm():
            bar = tqdm(range(cfg.num_steps), desc="ppo", disable=not cfg.logging.progress_bar, dynamic_ncols=True)
            for _ in bar:
                metrics = trainer.step()
                metrics_log.log(metrics)
                metrics_log.log_samples(trainer.last_samples)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}",
                                step_s=f"{metrics['time/step']:.1f}")
        if cfg.logging.save_final_model:
            log.info("final policy saved to %s", trainer.save(str((out / "final_model").resolve())))
    except (RoleError, ValueError, OSError) as err:  # OSError: e.g. a model path or hub name not found
        log.error("error: %s", err)
        return 1
    except (RunStopped, KeyboardInterrupt) as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        name = stop.signal_name if isinstance(stop, RunStopped) else "SIGINT"
        done = trainer.step_count if trainer is not None else 0
        log.error("stopped by %s after %d of %d steps: the roles and the Ray processes this run started are "
                  "shut down; nothing was saved beyond the metrics of finished steps (no checkpoints yet)",
                  name, done, cfg.num_steps)
        return 128 + getattr(signal, name)
    finally:
        if trainer is not None:
            trainer.shutdown()
        stop_ray()
    rows = load_metrics(out)
    if cfg.logging.report:
        log.info("report: %s", draw({out.resolve().name: rows}, out / "report.png"))
    log.info("%s", summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
