"""A rollout:learn sweep (python -m rlhf_ray.sweep) run several times over, its repeats interleaved (every point once,
then every point again …), with each point's median and spread: this VM's speed drifts by up to a third between
minutes, so one run per point cannot tell two points apart.

    python benchmarks/sweep_repeats.py --sweep configs/sweep_async_k.yaml --repeats 3 --name sweep_async_k
    python benchmarks/sweep_repeats.py --name sweep_async_k --from OUT/r1 OUT/r2 OUT/r3   # sweeps already run

Writes benchmarks/results/<name>.{json,md}: per point, samples/s and step as median (min–max) over the repeats, the
median phases, how often each side bounded the step, the staleness, and the points ranked by their median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_ray.cluster.machine import describe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PHASES = ("generate", "score_wall", "values", "learn", "weight_sync", "rollout_wait", "overhead")


def run_sweeps(sweep: str, repeats: int, out: Path) -> list[Path]:
    """The sweep ``repeats`` times, one after another (so the repeats of the points interleave)."""
    dirs = []
    for r in range(1, repeats + 1):
        target = out / f"r{r}"
        subprocess.run([sys.executable, "-m", "rlhf_ray.sweep", "--sweep", sweep, "--out", str(target)], cwd=ROOT,
                       check=True)
        dirs.append(target)
    return dirs


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(sweeps: list[dict]) -> dict:
    """Per point label: its figures over the repeats (points that failed in a repeat are counted, not averaged)."""
    points: dict[str, list[dict]] = {}
    for sweep in sweeps:
        for point in sweep["points"]:
            points.setdefault(point["label"], []).append(point)
    out = {}
    for label, runs in points.items():
        ok = [p for p in runs if p["status"] == "ok"]
        if not ok:
            out[label] = {"point": runs[0]["point"], "failed": len(runs)}
            continue
        out[label] = {
            "point": ok[0]["point"], "failed": len(runs) - len(ok),
            "samples_per_s": spread([p["samples_per_s"] for p in ok]),
            "step_s": spread([p["step_s"] for p in ok]),
            "phases_s": {k: statistics.median(p["phases_s"].get(k, 0.0) for p in ok) for k in PHASES},
            "bound_by": dict(Counter(p["bound_by"] for p in ok)),
            "staleness_mean": statistics.median(p["staleness_mean"] for p in ok),
            "rollout_learn_ratio": statistics.median(p["rollout_learn_ratio"] for p in ok),
            "idle_share": {role: statistics.median(p["idle_share"][role] for p in ok)
                           for role in ("generation", "learner")},
        }
    return out


def markdown(result: dict) -> str:
    first = result["sweeps"][0]
    lines = [f"# {result['name']}: a sweep in {len(result['sweeps'])} interleaved repeats", "",
             f"Machine: {describe(first['machine'])}", "",
             f"Config: `{first['config']}` " + " ".join(f"`{o}`" for o in first["overrides"])
             + f"; {first['warmup']} warm-up + {first['steps']} measured steps per point and repeat; repeats "
             + ", ".join(f"{s['wall_s'] / 60:.1f} min" for s in result["sweeps"]) + ". Written by "
             "`benchmarks/sweep_repeats.py`.", "",
             "Per point: the median over the repeats (min–max); phases are medians of the repeats' medians, in "
             "seconds; bound by: how many repeats named each side.", "",
             "| point | samples/s | step s | generate | score | values | learn | weight sync | waited for rollout "
             "| staleness | idle gen / learner | bound by |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    ranked = sorted((p for p in result["points"].items() if "step_s" in p[1]), key=lambda p: p[1]["step_s"]["median"])
    for label, p in result["points"].items():
        if "step_s" not in p:
            lines.append(f"| {label} | failed in all {p['failed']} repeats |" + " |" * 10)
            continue
        s, t, ph = p["samples_per_s"], p["step_s"], p["phases_s"]
        bound = ", ".join(f"{k} ×{n}" for k, n in p["bound_by"].items())
        lines.append(f"| {label} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | {t['median']:.3f} "
                     f"({t['min']:.3f}–{t['max']:.3f}) | {ph['generate']:.3f} | {ph['score_wall']:.3f} | "
                     f"{ph['values']:.3f} | {ph['learn']:.3f} | {ph['weight_sync']:.3f} | {ph['rollout_wait']:.3f} | "
                     f"{p['staleness_mean']:.2f} | {p['idle_share']['generation']:.0%} / "
                     f"{p['idle_share']['learner']:.0%} | {bound} |"
                     + (f" ({p['failed']} failed)" if p["failed"] else ""))
    lines += ["", "Ranked by median step: " + " < ".join(f"{label} {p['step_s']['median']:.3f} s"
                                                          for label, p in ranked), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="configs/sweep_async_k.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/sweep_repeats", help="where the sweeps' runs go")
    parser.add_argument("--from", dest="dirs", nargs="*", help="aggregate these sweep output dirs instead of running")
    parser.add_argument("--name", default="sweep_async_k", help="results file name under benchmarks/results/")
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.dirs] if args.dirs else run_sweeps(args.sweep, args.repeats, Path(args.out))
    sweeps = [json.loads((d / "sweep.json").read_text()) for d in dirs]
    result = {"name": args.name, "sweeps": [{k: v for k, v in s.items() if k != "points"} for s in sweeps],
              "points": aggregate(sweeps)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
