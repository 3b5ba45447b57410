"""What watching a run costs: PPO step time with the observability on (the trace, Prometheus, alarms, the hang doctor:
the defaults) and off, in interleaved repeats (on, off, then off, on, …: this VM's speed drifts between minutes).

    python benchmarks/observability_overhead.py --config configs/tiny_cpu.yaml --repeats 3 --name tiny
    python benchmarks/observability_overhead.py --config configs/smollm2_cpu.yaml --steps 4 --repeats 2 --name smollm2

Each run is ``python -m rlhf_ray.train`` with nothing saved; a run's figure is its median step after ``--warmup``
steps. "Off" sets logging.trace=false, logging.prometheus=false, logging.alarms=off and timeouts.hang_dump_at=null; the
actors still record their spans (the idle shares are computed either way), so "off" measures what the options switch.
Writes benchmarks/results/observability_overhead_<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_ray.cluster.machine import describe, machine_info  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"on": [], "off": ["logging.trace=false", "logging.prometheus=false", "logging.alarms=off",
                              "timeouts.hang_dump_at=null"]}
QUIET = ["overwrite=true", "logging.progress_bar=false", "logging.report=false", "logging.save_final_model=false",
         "checkpoint.at_end=false", "logging.plan=false"]


def run(config: str, overrides: list[str], out: Path, warmup: int) -> float:
    """One training run; its median step time after ``warmup`` steps."""
    subprocess.run([sys.executable, "-m", "rlhf_ray.train", "--config", config, f"output_dir={out}", *QUIET,
                    *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["time/step"] for r in rows[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=12, help="PPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of a run's median")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="tiny")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    common = [*args.overrides, f"ppo.total_episodes={args.steps * cfg.ppo.rollout_batch_size}"]
    medians: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="obs-overhead-") as tmp:
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                step = run(args.config, [*common, *VARIANTS[name]], Path(tmp) / f"{name}-{r}", args.warmup)
                medians[name].append(step)
                print(f"repeat {r + 1}, {name}: median step {step:.3f} s", file=sys.stderr)
    summary = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs_s": v}
               for name, v in medians.items()}
    overhead = summary["on"]["median_s"] / summary["off"]["median_s"] - 1
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "machine": machine_info(), "variants": summary, "overhead": overhead,
              "off_means": VARIANTS["off"]}
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"observability_overhead_{args.name}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Observability overhead: {args.config}", "",
             f"{args.repeats} interleaved repeats of {args.steps} PPO steps (the first {args.warmup} left out), "
             f"{describe(machine_info())}. A run's figure is its median step; the table gives the median over runs "
             "(min–max).", "",
             "| variant | step | runs |", "|---|---:|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['median_s']:.3f} s ({s['min_s']:.3f}–{s['max_s']:.3f}) | "
                     f"{', '.join(f'{v:.3f}' for v in s['runs_s'])} |")
    lines += ["", f"Overhead (median on / median off − 1): **{overhead:+.1%}**. Off: `{' '.join(VARIANTS['off'])}`."]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
