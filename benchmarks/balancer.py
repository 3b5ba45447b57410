"""The closed-loop balancer against a sweep of the same options, on this machine.

    python benchmarks/balancer.py [--configs tiny,20m] [--repeats 3] [--steps 3] [--warmup 1]

Per config (tiny: configs/tiny_cpu.yaml with 32 prompts per rollout; 20m: the same with the random ~20M Llamas of
benchmarks/vs_trl.py, scaled:llama-20m as policy and scaled:llama-20m-reward as RM, on its chat prompts):
1. the balancer as python -m rlhf_ray.plan --calibrate runs it (rlhf_ray.cli.balance): two probe runs, the fit, every
   layout of the default grid (engines, learner ranks, ppo.async_steps, rollout cores, threads per role) predicted,
   the chosen one written as a config;
2. every distinct layout the balancer predicted (the chosen one among them), each as its own short training run
   (rlhf_ray.cli.sweep.run_point), in INTERLEAVED repeats (A B C … A B C …): this VM's speed drifts by up to a third
   over minutes, and interleaving spreads the drift over every layout alike.
Reported per layout: the median over repeats of each run's median step, and the spread (min–max of the repeats);
for the chosen layout its prediction and the error; the best layout of the sweep (lowest median) and whether the
chosen one is as fast within the spreads (its median at most the best's largest repeat).

Writes benchmarks/results/balancer.json (the machine, each calibration, every prediction and every run's steps) and
balancer.md. Heavy: run it alone (flock /tmp/e2e.lock python benchmarks/balancer.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_ray.cli.balance import label, probe_from_run, run_probes, search  # noqa: E402
from rlhf_ray.cli.sweep import run_point  # noqa: E402
from rlhf_ray.cluster.machine import describe, machine_info  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.planning.calibration import calibrate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
WORKLOADS = {
    "tiny": ["ppo.rollout_batch_size=32"],
    "20m": ["models.policy=scaled:llama-20m", "models.reward.model=scaled:llama-20m-reward",
            "models.reward.template=tokenizer", f"data.prompts={ROOT / 'configs' / 'data' / 'chat_prompts.jsonl'}",
            "data.template=tokenizer", "data.max_prompt_tokens=128"],
}
# The targets: the chosen layout's measured step within this share of its prediction, and at least as fast
# as the sweep's best within the spread.
PREDICTION_TARGET = 0.15


def balance(name: str, args, out: Path, recorded: list[dict] | None = None) -> dict:
    """Probe, fit and choose (as the CLI does); every distinct layout it predicted, with the chosen one marked.
    ``recorded``: a calibration's probes (dir, label, overrides) to fit again instead of running new ones (--refit)."""
    overrides = WORKLOADS[name]
    cfg = load_config(CONFIG, overrides)
    probe_args = SimpleNamespace(probe_steps=args.steps, probe_warmup=args.warmup, timeout_s=args.timeout_s)
    started = time.perf_counter()
    if recorded:
        probes = []
        for p in recorded:
            probes.append(probe_from_run(p["dir"], args.warmup, p["label"], p["overrides"],
                                         probes[0].plan.hardware if probes else None))
    else:
        probes = run_probes(CONFIG, overrides, cfg, probe_args, out)
    calibration = calibrate(probes, CONFIG)
    calibration.save(out / "calibration.json")
    candidates, chosen = search(cfg, calibration, probes[0].plan.hardware, None, None, None)
    layouts = [{"label": label(c), "overrides": c.overrides, "chosen": c is chosen, "predicted_step_s": c.step,
                "predicted_phases_s": {k: p.seconds for k, p in c.plan.phases.items()},
                "idle_share": {r.role: r.idle_share for r in c.roles}, "bound_by": c.bound_by()}
               for c in sorted((c for c in candidates if c.plan is not None), key=lambda c: c.step)]
    return {"overrides": overrides, "calibration": calibration.to_json(), "layouts": layouts,
            "balance_s": time.perf_counter() - started}


def sweep(name: str, layouts: list[dict], args, out: Path) -> None:
    """Every layout as its own run, the repeats interleaved; each run's steps and median step added to its layout."""
    overrides = WORKLOADS[name]
    for repeat in range(args.repeats):
        for layout in layouts:
            point = {o.partition("=")[0]: o.partition("=")[2] for o in layout["overrides"]}
            record = run_point(CONFIG, overrides, point, args.steps, args.warmup, out / f"repeat{repeat}",
                               args.timeout_s)
            run = {"repeat": repeat, "status": record["status"], "error": record.get("error", ""),
                   "step_s": record.get("step_s"), "steps": [s["time/step"] for s in record.get("steps", [])],
                   "phases_s": record.get("phases_s", {})}
            layout.setdefault("runs", []).append(run)
            shown = f"{run['step_s']:.3g} s" if run["status"] == "ok" else f"{run['status']}: {run['error'][:200]}"
            print(f"  [{name} repeat {repeat + 1}/{args.repeats}] {layout['label']}: {shown}", flush=True)


def refit(args) -> int:
    """The recorded results with their calibration, predictions and choice made again by this commit's planner from
    the same probe runs; every layout keeps its measured runs (matched by label)."""
    recorded = json.loads((RESULTS / "balancer.json").read_text())["results"]
    for name, old in recorded.items():
        args.warmup = old["args"]["warmup"]
        new = balance(name, args, Path(args.out), old["calibration"]["probes"])
        runs = {layout["label"]: layout.get("runs", []) for layout in old["layouts"]}
        for layout in new["layouts"]:
            layout["runs"] = runs.get(layout["label"], [])
        new["balance_s"] = old["balance_s"]  # the probes' runs and the fit as they were timed (a refit runs none)
        recorded[name] = summarise({**old, **new, "refit": {"commit": machine_info()["git_commit"],
                                                           "recorded_commit": old["machine"]["git_commit"]}})
    (RESULTS / "balancer.json").write_text(json.dumps({"results": recorded}, indent=2) + "\n")
    (RESULTS / "balancer.md").write_text(markdown(recorded))
    return 0


def summarise(result: dict) -> dict:
    """Per layout the median and spread of its repeats; the chosen one against its prediction and the best."""
    for layout in result["layouts"]:
        steps = [r["step_s"] for r in layout.get("runs", []) if r["status"] == "ok"]
        layout["measured"] = ({"median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
                               "repeats": len(steps)} if steps else None)
    measured = [la for la in result["layouts"] if la["measured"]]
    chosen = next(la for la in result["layouts"] if la["chosen"])
    best = min(measured, key=lambda la: la["measured"]["median_s"]) if measured else None
    summary = {"chosen": chosen["label"], "best": best["label"] if best else None}
    if chosen["measured"] and best:
        m = chosen["measured"]
        summary |= {"chosen_predicted_s": chosen["predicted_step_s"], "chosen_measured_s": m["median_s"],
                    "prediction_error": chosen["predicted_step_s"] / m["median_s"] - 1,
                    "within_prediction_target": abs(chosen["predicted_step_s"] / m["median_s"] - 1) <= PREDICTION_TARGET,
                    "best_measured_s": best["measured"]["median_s"],
                    "chosen_vs_best": m["median_s"] / best["measured"]["median_s"] - 1,
                    "as_fast_as_best_within_spread": m["median_s"] <= best["measured"]["max_s"],
                    "median_abs_prediction_error_all_layouts": statistics.median(
                        abs(la["predicted_step_s"] / la["measured"]["median_s"] - 1) for la in measured)}
    summary["drift"] = drift(result)
    result["summary"] = summary
    return result


def drift(result: dict) -> dict[str, float]:
    """The probes' own layouts measured again in the sweep, as sweep median / probe step: how far the machine's speed
    moved between the calibration and the sweep (a prediction inherits the probes' moment)."""
    probes = result["calibration"]["probes"]
    configured = _async_of(probes[0]["overrides"], 0)   # the first probe runs the config as it is
    found = {}
    for probe in probes:
        k = _async_of(probe["overrides"], configured)
        for layout in result["layouts"]:
            keys = {o for o in layout["overrides"] if not o.endswith(tuple(f"{r}.num_cpus" for r in ROLE_KEYS))
                    and "num_cpus=" not in o}
            if keys == (set() if k == configured else {f"ppo.async_steps={k}"}) and layout.get("measured"):
                found[probe["label"]] = layout["measured"]["median_s"] / probe["measured"]["step"]
    return found


ROLE_KEYS = ("generation", "reward", "reference", "learner")


def _async_of(overrides: list[str], default: int) -> int:
    return next((int(o.partition("=")[2]) for o in reversed(overrides) if o.startswith("ppo.async_steps=")), default)


def markdown(results: dict) -> str:
    lines = ["# The balancer against a sweep of the same options", "",
             "Per config: the balancer (`python -m rlhf_ray.plan --calibrate`: two probe runs, the fit, every layout of "
             "its default grid predicted), then every distinct layout it predicted run as its own short training run, "
             "the repeats interleaved (A B C … A B C …). Step = a run's median step; measured = the median of the "
             "repeats (min–max). Written by `benchmarks/balancer.py`.", ""]
    for name, result in results.items():
        s, cal, a = result["summary"], result["calibration"], result["args"]
        factors = cal["factors"]
        lines += [f"## {name}", "", f"Machine: {describe(result['machine'])}", "",
                  f"Config: `configs/tiny_cpu.yaml` {' '.join(f'`{o}`' for o in result['overrides'])}; "
                  f"{a['warmup']} + {a['steps']} steps per run and probe, {a['repeats']} repeats; balancer "
                  f"{result['balance_s']:.0f} s." + (
                      f" Predictions refit at commit {result['refit']['commit']} from the same probe runs (recorded at "
                      f"{result['refit']['recorded_commit']}); every measurement is the recorded run's."
                      if result.get("refit") else ""),
                  "", "Probes (measured / predicted without calibration / after the fit, seconds):", "",
                  "| probe | " + " | ".join(k for k in ("generate", "reward", "reference", "values", "learn",
                                                           "weight_sync", "step")) + " |",
                  "|---|" + "---:|" * 7]
        for p in cal["probes"]:
            lines.append(f"| {p['label']} | " + " | ".join(
                f"{p['measured'].get(k, 0):.3g} / {p['predicted'].get(k, 0):.3g} / {p['calibrated'].get(k, 0):.3g}"
                for k in ("generate", "reward", "reference", "values", "learn", "weight_sync", "step")) + " |")
        lines += ["", "Factors (measured / planned seconds, serial share): " + ", ".join(
            f"{k} ×{v:.3g}" + (f" ({factors['serial'][k]:.2f})" if k in factors["serial"] else "")
            for k, v in factors["time"].items()) + "; driver per step " + ", ".join(
            f"{m} {v:.3g} s" for m, v in factors["overhead_s"].items()) + ".", "",
            "| layout | predicted s | measured s (min–max) | error | bound by (predicted) | predicted idle share |",
            "|---|---:|---:|---:|---|---|"]
        for la in result["layouts"]:
            m = la["measured"]
            cell = f"{m['median_s']:.3f} ({m['min_s']:.3f}–{m['max_s']:.3f})" if m else "failed"
            error = f"{la['predicted_step_s'] / m['median_s'] - 1:+.0%}" if m else ""
            mark = " **chosen**" if la["chosen"] else (" *best measured*" if la["label"] == s.get("best") else "")
            idle = ", ".join(f"{r} {v:.0%}" for r, v in la["idle_share"].items())
            lines.append(f"| {la['label']}{mark} | {la['predicted_step_s']:.3f} | {cell} | {error} | {la['bound_by']} "
                         f"| {idle} |")
        if "chosen_measured_s" in s:
            lines += ["", f"**Chosen: {s['chosen']}** — predicted {s['chosen_predicted_s']:.3f} s, measured "
                      f"{s['chosen_measured_s']:.3f} s ({s['prediction_error']:+.1%}; target ±{PREDICTION_TARGET:.0%}: "
                      f"{'met' if s['within_prediction_target'] else 'NOT met'}). Best of the sweep: {s['best']}, "
                      f"{s['best_measured_s']:.3f} s; the chosen layout is {s['chosen_vs_best']:+.1%} against it "
                      f"({'as fast within the spread' if s['as_fast_as_best_within_spread'] else 'SLOWER beyond the spread'}). "
                      f"Median |error| of the predictions over all {len(result['layouts'])} layouts: "
                      f"{s['median_abs_prediction_error_all_layouts']:.1%}.", ""]
        if s.get("drift"):
            lines += ["Drift: the probes' own layouts measured again in the sweep took " + ", ".join(
                f"{ratio:.2f}× ({label})" for label, ratio in s["drift"].items()) + " their probe's step: the machine's "
                "speed between the calibration and the sweep, which every prediction carries.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,20m", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run (and per probe)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--out", default="runs/balancer_benchmark")
    parser.add_argument("--refit", action="store_true", help="fit the recorded probes again with this commit's "
                                                             "planner (their run directories must still exist) and "
                                                             "predict and choose again; the sweep's measurements stay")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite balancer.md (and the summaries) from "
                                                                     "balancer.json; run nothing")
    args = parser.parse_args(argv)
    if args.refit:
        return refit(args)
    if args.markdown_only:
        results = json.loads((RESULTS / "balancer.json").read_text())["results"]
        results = {name: summarise(r) for name, r in results.items()}
        (RESULTS / "balancer.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
        (RESULTS / "balancer.md").write_text(markdown(results))
        return 0
    machine, results = machine_info(), {}
    kept = RESULTS / "balancer.json"   # configs measured by an earlier invocation stay (each with its own machine line)
    if kept.is_file():
        results = {name: r for name, r in json.loads(kept.read_text())["results"].items()
                   if name not in args.configs.split(",")}
    print(f"machine: {describe(machine)}", flush=True)
    for name in args.configs.split(","):
        out = Path(args.out).resolve() / name
        result = {**balance(name, args, out), "machine": machine, "args": vars(args)}
        chosen = next(la for la in result["layouts"] if la["chosen"])
        print(f"{name}: chosen {chosen['label']} (predicted {chosen['predicted_step_s']:.3g} s); sweeping "
              f"{len(result['layouts'])} layouts × {args.repeats}", flush=True)
        sweep(name, result["layouts"], args, out / "sweep")
        results[name] = summarise(result)
        print(json.dumps(results[name]["summary"], indent=2), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)   # written after each config: a later failure keeps the earlier
        (RESULTS / "balancer.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
        (RESULTS / "balancer.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
