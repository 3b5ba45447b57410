"""Per-phase breakdown of PPO steps and the orchestration overhead.

    python benchmarks/ppo_step.py [--config configs/tiny_cpu.yaml] [--steps 10] [--out FILE] [key=value ...]

Runs a real job (all roles as Ray actors), drops the first (warm-up) step, and reports per phase the
mean wall seconds, plus the overhead = step wall − the roles' own compute on the critical path
(generate + max(reward, reference, values) + learn + weight publish + weight load), as a fraction.
Prints a table and writes JSON (default benchmarks/results/ppo_step_<config>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_ray.config import DEFAULT_CONFIG, load_config  # noqa: E402

PHASES = ["time/generate", "time/score_wall", "time/reward", "time/reference", "time/values", "time/learn",
          "time/weight_sync", "time/weight_publish", "time/weight_load", "time/step", "time/overhead"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=10, help="measured steps (one warm-up step is added)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import tempfile

    overrides = [f"output_dir={tempfile.mkdtemp(prefix='bench_ppo_step_')}", *args.overrides,
                 "logging.progress_bar=false", "logging.trackers=[]"]
    batch = load_config(args.config, overrides).ppo.rollout_batch_size
    cfg = load_config(args.config, [*overrides, f"ppo.total_episodes={(args.steps + 1) * batch}"])
    from rlhf_ray.drivers.ppo import PPOTrainer

    started = time.perf_counter()
    trainer = PPOTrainer(cfg)
    startup = time.perf_counter() - started
    try:
        steps = [trainer.step() for _ in range(args.steps + 1)][1:]
    finally:
        trainer.shutdown()
    mean = {k: statistics.fmean(s[k] for s in steps) for k in PHASES}
    result = {
        "config": Path(args.config).name, "overrides": args.overrides, "measured_steps": args.steps,
        "startup_s": startup, "phases_mean_s": mean,
        "overhead_fraction_mean": statistics.fmean(s["time/overhead_fraction"] for s in steps),
        "overhead_fraction_of_mean_step": mean["time/overhead"] / mean["time/step"],
        "tokens_per_step": statistics.fmean(s["response/tokens"] for s in steps),
        "tokens_per_s": statistics.fmean(s["throughput/tokens_per_s"] for s in steps),
        "generate_tokens_per_s": statistics.fmean(s["throughput/generate_tokens_per_s"] for s in steps),
        "sequences_per_step": cfg.rollout_sequences,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "resources": cfg.resources.model_dump(),
    }
    print(f"{'phase':<22}{'mean s':>10}{'share of step':>16}")
    for key in PHASES:
        print(f"{key:<22}{mean[key]:>10.3f}{mean[key] / mean['time/step']:>15.1%}")
    print(f"orchestration overhead: {result['overhead_fraction_of_mean_step']:.1%} of the mean step "
          f"({mean['time/overhead']:.3f} s of {mean['time/step']:.3f} s); startup {startup:.1f} s; "
          f"{result['tokens_per_s']:.0f} response tokens/s per step")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ppo_step_{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
