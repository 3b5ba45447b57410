"""The rollout:learn sweep: short PPO runs over a grid of resource and batch settings, side by side.

    python -m rlhf_ray.sweep                                    # the default grid (configs/sweep_tiny_cpu.yaml)
    python -m rlhf_ray.sweep --sweep configs/sweep_tiny_cpu.yaml --steps 3 --out runs/sweep
    python -m rlhf_ray.sweep --grid ppo.async_steps=0,1 --grid resources.generation.num_actors=1,2 \\
        --config configs/smollm2_cpu.yaml generation.max_new_tokens=32
    ray job submit --working-dir . -- python -m rlhf_ray.sweep      # every point joins the job's cluster

A sweep file names a base experiment config, overrides for every point, and a grid (key -> values); every
combination is one point, run as its own ``python -m rlhf_ray.train`` for ``warmup + steps`` steps (without
checkpoints or final model). A point the config refuses, or a run that fails or times out, is recorded with
its error and the sweep goes on. For every point, from the measured steps (warm-up dropped):

    samples/s, generated and trained tokens/s, the median step; each phase's mean seconds; each role's idle
    share of the step; the rollout:learn time ratio; orchestration overhead; peak memory per role

Writes ``<out>/sweep.json`` (everything, per step too), ``sweep.csv`` (one row per point), ``sweep.png`` and
``sweep.md`` (the table, the best point and the phase that bounds it).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


from rlhf_ray.config import DEFAULT_CONFIG, ConfigError, load_config, read_yaml
from rlhf_ray.run.report import role_peaks

ROOT = DEFAULT_CONFIG.parent.parent

DEFAULT_SWEEP = ROOT / "configs" / "sweep_tiny_cpu.yaml"
ALIASES = {"resources.generation.num_actors": "engines", "resources.learner.num_actors": "learners",
           "ppo.async_steps": "async", "ppo.rollout_batch_size": "batch", "generation.max_new_tokens": "tokens",
           "ppo.epochs": "epochs", "generation.n_samples_per_prompt": "samples", "resources.rollout_cores": "rollout_cores",
           "resources.learner.threads": "learner_threads", "resources.generation.threads": "engine_threads",
           "deepspeed.zero_stage": "zero"}
# axes that change the work itself rather than how it is spread: the best point is picked per workload
WORKLOAD_KEYS = ("generation.max_new_tokens", "ppo.rollout_batch_size", "generation.n_samples_per_prompt",
                 "ppo.epochs", "data.max_prompt_tokens", "models.policy", "models.reward.model")
# what each role computes in a step (max over its actors), for its idle share
ROLE_BUSY = {"generation": ("time/compute_generate", "time/weight_load"), "reward": ("time/reward",),
             "reference": ("time/reference",), "learner": ("time/values", "time/compute_learn", "time/weight_publish")}


def points_of(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the grid's key order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def yaml_value(value) -> str:
    """A grid value as an override writes it (None: null, booleans in lower case)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def label_of(point: dict) -> str:
    return " ".join(f"{ALIASES.get(k, k)}={v}" for k, v in point.items()) or "base"


def run_point(config: str, overrides: list[str], point: dict, steps: int, warmup: int, out: Path,
              timeout_s: float) -> dict:
    """One grid point as its own training run; its measurements, or its error."""
    point_dir = out / "points" / "_".join(f"{ALIASES.get(k, k)}-{v}" for k, v in point.items()).replace("/", "-")
    record = {"label": label_of(point), "point": point, "status": "ok", "dir": str(point_dir)}
    settings = [*overrides, *(f"{k}={yaml_value(v)}" for k, v in point.items())]
    try:
        cfg = load_config(config, settings)
        batch = cfg.ppo.rollout_batch_size
        settings += [f"ppo.total_episodes={(steps + warmup) * batch}", f"output_dir={point_dir}", "overwrite=true",
                     "checkpoint.every_steps=0", "checkpoint.at_end=false", "checkpoint.on_signal=false",
                     "logging.save_final_model=false", "logging.report=false", "logging.progress_bar=false",
                     "logging.samples_per_step=0", *tracker_settings(cfg.logging, out)]
        cfg = load_config(config, settings)
    except ConfigError as err:
        return {**record, "status": "invalid", "error": str(err)}
    record["sequences_per_step"] = cfg.rollout_sequences
    point_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "rlhf_ray.train", "--config", str(config), *settings]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        (point_dir / "console.log").write_text((err.stdout or b"").decode() if isinstance(err.stdout, bytes)
                                               else (err.stdout or ""))
        return {**record, "status": "timeout", "error": f"no result within {timeout_s:.0f} s",
                "wall_s": time.perf_counter() - started}
    record["wall_s"] = time.perf_counter() - started
    (point_dir / "console.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return {**record, "status": "failed", "exit_code": done.returncode,
                "error": (errors or lines or ["(no output)"])[-1][:500], "console": str(point_dir / "console.log")}
    metrics = point_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if len(rows) <= warmup:
        return {**record, "status": "failed", "error": f"the run recorded {len(rows)} steps, none after the warm-up",
                "console": str(point_dir / "console.log")}
    return {**record, **measure(rows[warmup:], cfg.rollout_sequences, cfg.ppo.epochs), "steps": rows[warmup:]}


def tracker_settings(logging, out: Path) -> list[str]:
    """A point's trackers: those its config names but TensorBoard (a point is a few steps), grouped under the sweep
    (rlhf_ray.run.trackers.grouped: logging.group, one MLflow store)."""
    from rlhf_ray.run.trackers import grouped

    trackers = [name for name in logging.trackers if name != "tensorboard"]
    return [f"logging.trackers=[{', '.join(trackers)}]", *(f"{k}={v}" for k, v in grouped(logging, out).items())]


def measure(rows: list[dict], sequences: int, epochs: int) -> dict:
    """The point's figures from its measured steps."""
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in rows)  # noqa: E731
    step = statistics.median(r["time/step"] for r in rows)
    tokens = mean("response/tokens")
    overlapped = "time/values_wall" in rows[-1]
    rollout = mean("time/generate") + mean("time/score_wall")
    learner = mean("time/learn") + (mean("time/values_wall") if overlapped else 0.0)
    phases = {key.removeprefix("time/"): mean(key) for key in rows[-1]
              if key.startswith("time/") and not key.endswith("_fraction")}
    idle = {role: max(0.0, 1.0 - sum(mean(k) for k in keys) / mean("time/step")) for role, keys in ROLE_BUSY.items()
            if any(k in rows[-1] for k in keys)}  # (a run without reference actors has no time/reference)
    memory = role_peaks(rows)
    return {"step_s": step, "samples_per_s": sequences / step, "generated_tokens_per_s": tokens / step,
            "trained_tokens_per_s": tokens * epochs / step, "phases_s": phases, "idle_share": idle,
            "rollout_learn_ratio": rollout / learner if learner else float("inf"),
            "overhead_share": mean("time/overhead") / mean("time/step"), "peak_gb": memory,
            "bound_by": bound_by(phases, overlapped), "overlapped": overlapped,
            # updates between the weights that sampled a batch and those it was learned on (ppo.async_steps=k: k
            # once the first k steps are past)
            "staleness_mean": mean("async/staleness"),
            "staleness_max": max(r.get("async/staleness", 0.0) for r in rows)}


def bound_by(phases: dict, overlapped: bool) -> str:
    """The phase a step waits on: overlapped, the slower side (rollout vs the learner's values + update);
    otherwise the largest phase of the step."""
    if overlapped:
        rollout = phases.get("generate", 0.0) + phases.get("score_wall", 0.0)
        learner = phases.get("values_wall", 0.0) + phases.get("learn", 0.0)
        return "rollout (generate + score)" if rollout > learner else "learner (values + update)"
    candidates = {"generate": phases.get("generate", 0.0), "score": phases.get("score_wall", 0.0),
                  "learn": phases.get("learn", 0.0), "weight sync": phases.get("weight_sync", 0.0)}
    return max(candidates, key=candidates.get)


# ----------------------------------------------------------------------------------------------- output
CSV_FIELDS = ["label", "status", "samples_per_s", "generated_tokens_per_s", "trained_tokens_per_s", "step_s",
              "rollout_learn_ratio", "bound_by", "overhead_share", "error"]


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    points = result["points"]
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    phase_keys = sorted({k for p in points for k in p.get("phases_s", {})})
    roles = sorted({k for p in points for k in p.get("idle_share", {})})
    mem_roles = sorted({k for p in points for k in p.get("peak_gb", {})})
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *result["grid"], *(f"time_{k}" for k in phase_keys),
                         *(f"idle_{r}" for r in roles), *(f"peak_gb_{r}" for r in mem_roles)])
        for p in points:
            writer.writerow([_cell(p.get(k)) for k in CSV_FIELDS] + [p["point"].get(k) for k in result["grid"]]
                            + [_cell(p.get("phases_s", {}).get(k)) for k in phase_keys]
                            + [_cell(p.get("idle_share", {}).get(r)) for r in roles]
                            + [_cell(p.get("peak_gb", {}).get(r)) for r in mem_roles])
    paths["md"].write_text(markdown(result))
    draw(points, paths["png"])
    return paths


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else value)


def best_point(points: list[dict]) -> dict | None:
    ok = [p for p in points if p["status"] == "ok"]
    return max(ok, key=lambda p: p["samples_per_s"]) if ok else None


def best_per_workload(points: list[dict]) -> dict[str, dict]:
    """The fastest point (samples/s) of each workload — the grid's values of WORKLOAD_KEYS — by its label."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        workload = {k: v for k, v in p["point"].items() if k in WORKLOAD_KEYS}
        groups.setdefault(label_of(workload) if workload else "", []).append(p)
    return {name: best for name, group in groups.items() if (best := best_point(group))}


def markdown(result: dict) -> str:
    from rlhf_ray.cluster.machine import describe

    points, bests = result["points"], best_per_workload(result["points"])
    lines = [f"# Rollout:learn sweep — {_shown(result['config'])}", "",
             f"Machine: {describe(result['machine'])}", "",
             f"Base: `{_shown(result['config'])}` {' '.join(f'`{o}`' for o in result['overrides'])}; {result['warmup']} warm-up "
             f"+ {result['steps']} measured steps per point; {len(points)} points in {result['wall_s'] / 60:.1f} min.", "",
             "| point | samples/s | gen tok/s | trained tok/s | step s | rollout:learn | bound by | overhead | "
             "idle: generation / learner | peak GB learner / generation |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for p in points:
        if p["status"] != "ok":
            lines.append(f"| {p['label']} | {p['status']}: {p.get('error', '')[:160]} | | | | | | | | |")
            continue
        idle, peak = p["idle_share"], p["peak_gb"]
        star = " **best**" if any(p is b for b in bests.values()) else ""
        lines.append(f"| {p['label']}{star} | {p['samples_per_s']:.2f} | {p['generated_tokens_per_s']:.0f} | "
                     f"{p['trained_tokens_per_s']:.0f} | {p['step_s']:.2f} | {p['rollout_learn_ratio']:.2f} | "
                     f"{p['bound_by']} | {p['overhead_share']:.0%} | {idle.get('generation', 0):.0%} / "
                     f"{idle.get('learner', 0):.0%} | {peak.get('learner', 0):.1f} / {peak.get('generation', 0):.1f} |")
    lines.append("")
    for workload, best in bests.items():
        lines += [f"**Best{' for ' + workload if workload else ''}: {best['label']}** — {best['samples_per_s']:.2f} "
                  f"samples/s, a step of {best['step_s']:.2f} s, bound by {best['bound_by']} (rollout:learn "
                  f"{best['rollout_learn_ratio']:.2f}; the learner idles {best['idle_share'].get('learner', 0):.0%} and "
                  f"generation {best['idle_share'].get('generation', 0):.0%} of the step). {advice(best)}", ""]
    if not bests:
        lines.append("No point finished: see the errors above and each point's console.log.")
    lines += ["", "Columns: samples/s = sequences per step / median step; rollout:learn = (generate + score) / "
              "update, where score includes the learner's values pass when nothing overlaps (async ≥ 1: / (values + "
              "update)); idle = share of the step a role's actors do not compute; overhead = the "
              "step minus the roles' compute on its critical path. async=k: the engines sample up to k updates "
              "ahead (ppo.async_steps).", ""]
    return "\n".join(lines)


def _shown(path: str) -> str:
    """A path inside the project, relative to it (as a user would type it)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def advice(best: dict) -> str:
    """What would help the best point next, from how its step was bound (any ppo.async_steps)."""
    ratio = best["rollout_learn_ratio"]
    if best.get("overlapped", "values_wall" in best.get("phases_s", {})):
        k = best["point"].get("ppo.async_steps") or round(best.get("staleness_max", 1))
        return (f"Rollout and learning overlap here (ppo.async_steps={k}: each batch is sampled {k} "
                f"update{'s' if k != 1 else ''} behind the learner); the step is the slower side, so resources moved "
                "to that side (resources.rollout_cores, engines or learner ranks) are what would help next. A larger "
                "ppo.async_steps only evens out uneven steps; it does not shorten the slower side.")
    if ratio < 0.5:
        return ("Learning takes most of the step: overlapping the rollout with it (ppo.async_steps ≥ 1) can hide at "
                "most the rollout's share; more learner resources shorten the bound phase itself.")
    if ratio > 2:
        return "The rollout takes most of the step: more or larger generation resources shorten it."
    return ("Rollout and learning take similar time: overlapping them (ppo.async_steps=1, or k to let generation run "
            "up to k updates ahead, which also evens out uneven steps) hides the shorter one where the machine has "
            "cores for both.")


def draw(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(points) + 3), 8), sharex=True)
    x = range(len(points))
    bests = list(best_per_workload(points).values())
    top.bar(x, [p.get("samples_per_s", 0.0) for p in points],
            color=["tab:green" if any(p is b for b in bests) else ("tab:blue" if p["status"] == "ok" else "lightgray") for p in points])
    for i, p in enumerate(points):
        if p["status"] != "ok":
            top.text(i, 0, p["status"], rotation=90, ha="center", va="bottom", fontsize=8)
    top.set_ylabel("samples / s")
    top.set_title("rollout:learn sweep (green: the best of its workload; gray: failed)")
    phases = [("generate", "generate"), ("score_wall", "score"), ("values_wall", "values (async)"),
              ("learn", "learn"), ("rollout_wait", "rollout wait (async)"), ("weight_sync", "weight sync")]
    base = [0.0] * len(points)
    for key, name in phases:
        heights = []
        for p in points:
            ph = p.get("phases_s", {})
            overlapped = "values_wall" in ph
            beside = overlapped and key in ("generate", "score_wall")  # overlapped: not on the critical path
            heights.append(0.0 if beside else ph.get(key, 0.0))
        if any(heights):
            bottom.bar(x, heights, bottom=base, label=name)
            base = [b + h for b, h in zip(base, heights)]
    bottom.bar(x, [max(0.0, p.get("phases_s", {}).get("step", 0.0) - b) for p, b in zip(points, base)], bottom=base,
               label="other", color="lightgray")
    bottom.set_ylabel("seconds per step (critical path)")
    bottom.set_xticks(list(x), [p["label"] for p in points], rotation=30, ha="right", fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- CLI
def load_sweep(path: str | Path) -> dict:
    spec = read_yaml(Path(path).read_text()) or {}
    unknown = set(spec) - {"config", "overrides", "grid", "steps", "warmup", "timeout_s"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (config, overrides, grid, steps, warmup, timeout_s)")
    if not isinstance(spec.get("grid", {}), dict):
        raise ValueError(f"{path}: 'grid' must map config keys to lists of values")
    return spec


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid {item!r}: write KEY=V1,V2,… (e.g. ppo.async_steps=0,1)")
        grid[key] = [read_yaml(v) for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Short PPO runs over a grid of resource and batch settings.")
    parser.add_argument("--sweep", default=None, help=f"sweep YAML (default: {DEFAULT_SWEEP.relative_to(ROOT)} unless "
                                                      "--config/--grid are given)")
    parser.add_argument("--config", default=None, help="base experiment config (overrides the sweep file's)")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,… (repeatable; replaces the file's grid)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per point")
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped per point")
    parser.add_argument("--timeout-s", type=float, default=None, help="per point")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("overrides", nargs="*", help="key=value for every point")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.sweep or DEFAULT_SWEEP) if args.sweep or not (args.config or args.grid) else {}
        grid = parse_grid(args.grid) if args.grid else spec.get("grid", {})
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = args.config or spec.get("config") or str(ROOT / "configs" / "tiny_cpu.yaml")
    if not Path(config).exists() and (ROOT / config).exists():  # a path relative to the project (ray job submit)
        config = str(ROOT / config)
    config = str(Path(config).resolve()) if Path(config).exists() else config
    overrides = [*spec.get("overrides", []), *args.overrides]
    steps = args.steps or spec.get("steps", 4)
    warmup = args.warmup if args.warmup is not None else spec.get("warmup", 1)
    timeout_s = args.timeout_s or spec.get("timeout_s", 600)
    out = Path(args.out).resolve()  # the points run from the project's root
    out.mkdir(parents=True, exist_ok=True)

    from rlhf_ray.cluster.machine import describe, machine_info

    points = points_of(grid)
    machine = machine_info()
    print(f"sweep: {len(points)} points of {config} × {warmup}+{steps} steps → {out}/\nmachine: {describe(machine)}",
          flush=True)
    started, results = time.perf_counter(), []
    for i, point in enumerate(points, 1):
        record = run_point(config, overrides, point, steps, warmup, out, timeout_s)
        results.append(record)
        figure = (f"{record['samples_per_s']:.2f} samples/s, step {record['step_s']:.2f} s, bound by {record['bound_by']}"
                  if record["status"] == "ok" else f"{record['status']}: {record.get('error', '')}")
        print(f"[{i}/{len(points)}] {record['label']}: {figure}", flush=True)
    result = {"config": config, "overrides": overrides, "grid": grid, "steps": steps, "warmup": warmup,
              "machine": machine, "wall_s": time.perf_counter() - started, "points": results}
    paths = write_outputs(result, out)
    bests = best_per_workload(results)
    for workload, best in bests.items():
        print(f"best{' for ' + workload if workload else ''}: {best['label']} ({best['samples_per_s']:.2f} samples/s, "
              f"bound by {best['bound_by']})")
    if not bests:
        print("no point finished")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if bests else 1
