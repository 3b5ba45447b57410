"""What watching a run costs: PPO step time with the observability on (the trace, Prometheus, alarms, the hang doctor —
the defaults — and every tracker: TensorBoard, W&B offline, MLflow on its local store) and off, in interleaved
repeats (on, off, then off, on, …: this VM's speed drifts between minutes). During each "on" run its Prometheus
metrics are scraped from Ray's metrics agent as a Prometheus would (its export port: the session's
metrics_export_port_<node> file, on loopback).

    python benchmarks/observability_overhead.py --config configs/tiny_cpu.yaml --repeats 3 --name tiny
    python benchmarks/observability_overhead.py --config configs/smollm2_cpu.yaml --steps 5 --warmup 1 --repeats 2 \
        --name smollm2

Each run is ``python -m rlhf_ray.train`` with nothing saved; a run's figure is its median step after ``--warmup``
steps. "Off" sets logging.trace=false, logging.prometheus=false, logging.alarms=off, timeouts.hang_dump_at=null and
logging.trackers=[]; the
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_ray.cluster.machine import describe, machine_info  # noqa: E402
from rlhf_ray.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"on": ["logging.trackers=[tensorboard, wandb, mlflow]", "logging.wandb.mode=offline"],
            "off": ["logging.trace=false", "logging.prometheus=false", "logging.alarms=off",
                    "timeouts.hang_dump_at=null", "logging.trackers=[]"]}
QUIET = ["overwrite=true", "logging.progress_bar=false", "logging.report=false", "logging.save_final_model=false",
         "checkpoint.at_end=false", "logging.plan=false"]


def run(config: str, overrides: list[str], out: Path, warmup: int, scrape: bool) -> tuple[float, dict | None]:
    """One training run; its median step time after ``warmup`` steps, and what Prometheus scrapes of it showed."""
    process = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "--config", config, f"output_dir={out}",
                                *QUIET, *overrides], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scraped: dict = {"scrapes": 0, "steps_seen": [], "last": {}}
    while process.poll() is None:
        time.sleep(3)
        if scrape:
            scrape_once(process.pid, out.name, scraped)
    if process.returncode != 0:
        raise SystemExit(f"the run in {out} failed (exit {process.returncode})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if scrape:
        scraped["metrics_jsonl_last_step"] = rows[-1]["step"]
        scraped["last_step_time_s"] = {"metrics_jsonl": rows[-1]["time/step"]}
    return statistics.median(r["time/step"] for r in rows[warmup:]), scraped if scrape else None


def recording_cost(config: str, overrides: list[str], run_dir: Path, replay_dir: Path, rounds: int = 4) -> dict:
    """What the driver does per step for the observability, timed alone: a finished "on" run's steps (its
    metrics.jsonl) replayed ``rounds`` times through the alarms and the metrics logger with every tracker on
    (metrics.jsonl, TensorBoard, W&B offline, MLflow on SQLite) — the part of "on" that grows with a step's
    metrics, measured without the VM's run-to-run drift. (The trace's per-step write and the Prometheus gauges are
    in the interleaved runs only.)"""
    from rlhf_ray.run.alarms import AlarmMonitor
    from rlhf_ray.run.metrics import MetricsLogger
    from rlhf_ray.run.trackers import RunInfo, Trackers

    cfg = load_config(config, [*overrides, *VARIANTS["on"], f"output_dir={replay_dir}"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trackers = Trackers(cfg.logging, RunInfo(replay_dir, replay_dir.name, None, cfg.model_dump(mode="json")))
    seconds = []
    with MetricsLogger(replay_dir, trackers, resume_step=0) as log:
        alarms = AlarmMonitor(cfg.logging.alarm_thresholds, cfg.logging.alarms)
        for n in range(rounds * len(rows)):
            row = {**rows[n % len(rows)], "step": n + 1}
            start = time.perf_counter()
            alarms.check(row)
            log.log(row)
            seconds.append(time.perf_counter() - start)
    return {"steps": len(seconds), "keys_per_step": len(rows[0]), "median_s": statistics.median(seconds),
            "max_s": max(seconds), "trackers": cfg.logging.trackers}


def series(sample) -> str:
    """``name{role=…,phase=…}`` with the labels of rlhf_ray.run.prometheus (not Ray's own: node, session, …)."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k in ("role", "phase", "what", "rule"))
    return f"{sample.name}{{{labels}}}"


def scrape_once(pid: int, run_name: str, scraped: dict) -> None:
    """One scrape of the run's series (``run`` = its output dir's name) from the metrics agent under ``pid``."""
    import urllib.request

    import psutil
    from prometheus_client.parser import text_string_to_metric_families

    sessions = set()  # the run's Ray session: where its GCS writes its logs (--log_dir=<session>/logs)
    try:
        for child in psutil.Process(pid).children(recursive=True):
            sessions |= {Path(arg.split("=", 1)[1]).parent for arg in child.cmdline() if arg.startswith("--log_dir=")}
    except psutil.Error:
        return
    for port_file in [path for session in sessions for path in session.glob("metrics_export_port_*")]:
        port = port_file.read_text().strip()
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        found = {series(sample): sample.value for family in text_string_to_metric_families(text)
                 for sample in family.samples
                 if sample.name.startswith("ray_rlhf_") and sample.labels.get("run") == run_name}
        scraped["scrapes"] += 1
        step = int(found.get("ray_rlhf_step{}", 0))
        if found and (step, len(found)) >= (int(scraped["last"].get("ray_rlhf_step{}", 0)), len(scraped["last"])):
            scraped["last"] = found  # the newest step's fullest scrape (one taken as the run ends may have fewer)
            if step and step not in scraped["steps_seen"]:
                scraped["steps_seen"].append(step)


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
    scrapes = []
    with tempfile.TemporaryDirectory(prefix="obs-overhead-") as tmp:
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                step, scraped = run(args.config, [*common, *VARIANTS[name]], Path(tmp) / f"{name}-{r}", args.warmup,
                                    scrape=name == "on")
                medians[name].append(step)
                if scraped:
                    scrapes.append(scraped)
                    print(f"  Prometheus: {scraped['scrapes']} scrapes, steps seen {scraped['steps_seen']}",
                          file=sys.stderr)
                print(f"repeat {r + 1}, {name}: median step {step:.3f} s", file=sys.stderr)
        recording = recording_cost(args.config, common, Path(tmp) / "on-0", Path(tmp) / "replay")
    summary = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs_s": v}
               for name, v in medians.items()}
    overhead = summary["on"]["median_s"] / summary["off"]["median_s"] - 1
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "machine": machine_info(), "variants": summary, "overhead": overhead,
              "on_means": VARIANTS["on"], "off_means": VARIANTS["off"], "prometheus_scrapes": scrapes,
              "recording_per_step": recording}
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
    lines += ["", f"Overhead (median on / median off − 1): **{overhead:+.1%}**. On: the defaults and "
              f"`{' '.join(VARIANTS['on'])}`; off: `{' '.join(VARIANTS['off'])}`.", ""]
    share = recording["median_s"] / summary["off"]["median_s"]
    lines += [f"Recording alone (alarms, metrics.jsonl, {', '.join(recording['trackers'])}; an on-run's "
              f"{recording['keys_per_step']}-key steps replayed {recording['steps']} times): median "
              f"{recording['median_s'] * 1000:.1f} ms per step (max {recording['max_s'] * 1000:.1f} ms) = "
              f"**{share:.2%}** of the median off step.", ""]
    for n, scraped in enumerate(scrapes, 1):
        last = scraped["last"]
        lines.append(f"Prometheus, on-run {n}: {scraped['scrapes']} scrapes of Ray's metrics agent during the run saw "
                     f"steps {scraped['steps_seen']} (metrics.jsonl's last: {scraped.get('metrics_jsonl_last_step')}); "
                     f"last step_seconds {last.get('ray_rlhf_step_seconds{}', float('nan')):.3f} "
                     f"(metrics.jsonl {scraped['last_step_time_s']['metrics_jsonl']:.3f}), "
                     f"{len(last)} ray_rlhf_ series.")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
