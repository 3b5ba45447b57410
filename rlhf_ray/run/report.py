"""The end-of-run report: a picture and a one-line verdict, from ``metrics.jsonl``.

    python -m rlhf_ray.report runs/smollm2_cpu                  # redraws runs/smollm2_cpu/report.png
    python -m rlhf_ray.report runs/a runs/b --out compare.png    # overlays several runs on one figure
    python -m rlhf_ray.report runs/smollm2_cpu --timeline 3      # the last 3 steps of its trace.json: timeline.png

PPO panels: reward and raw score; KL to the reference (in words where the run had none) and the sampler-vs-learner
check; response length and EOS fraction; where each step's time went (stacked per step for one run, the mean step per
run when comparing); each role's idle share per step (the timeline: rlhf_ray.run.timeline). A run of the learner on a
dataset (SFT, DPO, reward-model training: ``LEARNING_RUNS``) gets four: the training loss (and accuracy), each
evaluation set over the steps, step time with throughput, idle shares. An alarm (rlhf_ray.run.alarms) is a red dotted
line at its step, and the summary names it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# phase key in metrics -> legend label; 'other' is the rest of the step (driver work, transfers, scheduling).
# With ppo.async_steps ≥ 1 the rollouts run beside the update: a step's wall time is what is left to wait of its
# rollout, the learner's values pass, the update, and publishing the new weights (the engines load them beside).
PHASES = {"time/generate": "generate", "time/score_wall": "score (reward ‖ ref ‖ values)", "time/learn": "learn",
          "time/weight_sync": "weight sync"}
OVERLAPPED_PHASES = {"time/values_wall": "values", "time/learn": "learn",
                     "time/rollout_wait": "wait for rollout", "time/weight_sync": "weight sync"}
SHORT = {"generate": "generate", "score (reward ‖ ref ‖ values)": "score", "learn": "learn", "values": "values",
         "wait for rollout": "rollout wait", "weight sync": "sync", "other": "other"}


def phases_of(row: dict) -> dict[str, str]:
    """The phases that make up this step's wall time (overlapped steps, ppo.async_steps ≥ 1, record time/values_wall)."""
    return OVERLAPPED_PHASES if "time/values_wall" in row else PHASES


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The steps of the latest series in ``<run_dir>/metrics.jsonl`` (a step counter that restarts begins a new one)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} the output_dir of a run?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path}:{number} is not JSON; skipped", file=sys.stderr)
            continue
        if rows and row.get("step", 0) == rows[-1].get("step", 0):
            rows[-1] = {**rows[-1], **row}  # more figures of the same step (an evaluation after it)
            continue
        if rows and row.get("step", 0) < rows[-1].get("step", 0):
            rows = []
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no steps yet")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def role_peaks(rows: list[dict]) -> dict[str, float]:
    """Each role's peak resident GB over the steps (memory/<role>_peak_gb); {} when the rows have none."""
    return {key.split("/")[1].removesuffix("_peak_gb"): max(r.get(key) or 0.0 for r in rows)
            for key in rows[-1] if key.startswith("memory/") and key.endswith("_peak_gb")} if rows else {}


def peak_memory(rows: list[dict]) -> str:
    """'learner 6.2, generation 3.5': role_peaks, largest first; '' when the rows have none."""
    return ", ".join(f"{role} {gb:.1f}" for role, gb in sorted(role_peaks(rows).items(), key=lambda kv: -kv[1]))


def summary(rows: list[dict], label: str = "") -> str:
    """One line: steps, first → last reward and score, tokens/s, where the time went, peak memory; a run that logged
    no KL says it had no reference."""
    from rlhf_ray.config import NO_REFERENCE

    n = len(rows)
    window = 3 if n >= 6 else 1  # compare averages of a few steps when there are enough
    first = lambda key: _mean([r[key] for r in rows[:window] if r.get(key) is not None])  # noqa: E731
    last = lambda key: _mean([r[key] for r in rows[-window:] if r.get(key) is not None])  # noqa: E731
    total = sum(r.get("time/step", 0.0) for r in rows)
    tokens = sum(r.get("response/tokens", 0.0) for r in rows)
    seconds: dict[str, float] = {}
    for r in rows:
        for key, name in phases_of(r).items():
            seconds[name] = seconds.get(name, 0.0) + r.get(key, 0.0)
    shares = {name: s / total for name, s in seconds.items()} if total else {}
    shares["other"] = 1.0 - sum(shares.values()) if shares else 0.0
    time_text = ", ".join(f"{SHORT[name]} {share:.0%}" for name, share in
                          sorted(shares.items(), key=lambda kv: -kv[1]))
    memory_text = peak_memory(rows)
    averaged = f" (mean of the first/last {window} steps)" if window > 1 else ""
    steps = f"{n} step{'' if n == 1 else 's'}"
    return (f"{label + ': ' if label else ''}{steps} in {total:.0f} s; reward {first('reward/mean'):.3f} → "
            f"{last('reward/mean'):.3f}, score {first('score/mean'):.3f} → {last('score/mean'):.3f}{averaged}; "
            f"{tokens / total if total else 0:.0f} generated tokens/s; time: {time_text}"
            + (f"; peak GB: {memory_text}" if memory_text else "")
            + ("" if any("kl/mean" in r for r in rows) else f"; {NO_REFERENCE}: no KL")
            + (f"; alarms: {', '.join(f'{rule} (step {step})' for step, rule in alarms_of(rows))}"
               if alarms_of(rows) else ""))


def alarms_of(rows: list[dict]) -> list[tuple[int, str]]:
    """(step, rule) of every alarm the run's steps record (alarm/<rule>, rlhf_ray.run.alarms)."""
    from rlhf_ray.run.alarms import ALARM_PREFIX

    return [(r["step"], key[len(ALARM_PREFIX):]) for r in rows for key in r if key.startswith(ALARM_PREFIX)]


def mark_alarms(axes, rows: list[dict]) -> None:
    """A red dotted line at each alarm's step on every panel, the rule named on the first."""
    for step, rule in alarms_of(rows):
        for ax in axes:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.2)
        axes[0].annotate(f"alarm: {rule}", xy=(step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                         va="top", ha="right", fontsize=7, color="tab:red")


def draw(runs: dict[str, list[dict]], out: str | Path) -> Path:
    """Write the four-panel report of one or more runs (label -> metrics rows) to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 11.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.75])
    (ax_reward, ax_kl), (ax_len, ax_time) = [[fig.add_subplot(grid[r, c]) for c in range(2)] for r in range(2)]
    ax_idle = fig.add_subplot(grid[2, :])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    ax_eos = ax_len.twinx()
    for i, (label, rows) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        tag = f"{label}: " if several else ""
        ax_reward.plot(*_series(rows, "reward/mean"), color=color, marker=".",
                       label=f"{tag}shaped reward (score, penalties, KL)")
        ax_reward.plot(*_series(rows, "score/mean"), color=color, linestyle="--", label=f"{tag}score (RM / function)")
        ax_len.plot(*_series(rows, "response/length_mean"), color=color, marker=".", label=f"{tag}mean length")
        ax_eos.plot(*_series(rows, "response/eos_fraction"), color=color, linestyle="--", label=f"{tag}EOS fraction")
    ax_reward.set_title("reward and score per step")
    ax_len.set_title("responses")
    ax_len.set_ylabel("tokens")
    ax_eos.set_ylabel("fraction ending with EOS")
    ax_eos.set_ylim(-0.05, 1.05)
    _step_axes((ax_reward, ax_kl, ax_len, ax_time, ax_idle), "PPO step")
    ax_reward.legend(fontsize=8)
    _legend(ax_len, ax_eos)
    draw_kl(ax_kl, runs, colors)
    _draw_time(ax_time, runs, colors)
    draw_idle(ax_idle, runs)
    for rows in runs.values():
        mark_alarms((ax_reward, ax_kl, ax_len, ax_idle) + (() if several else (ax_time,)), rows)
    title = "  vs  ".join(runs) if several else next(iter(runs))
    return _save(fig, f"rlhf-ray: {title}", out)


ROLE_COLORS = {"generation": "tab:blue", "reward": "tab:orange", "reference": "tab:purple", "learner": "tab:green"}
RUN_STYLES = ["-", "--", ":", "-."]


def draw_idle(ax, runs: dict[str, list[dict]]) -> None:
    """Each role's idle share per step (idle/<role>: the part of the step none of its actors' calls covered,
    rlhf_ray.run.timeline), a colour per role, a line style per run."""
    drawn = False
    for i, (label, rows) in enumerate(runs.items()):
        roles = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("idle/")})
        for role in roles:
            tag = f"{label}: " if len(runs) > 1 else ""
            ax.plot(*_series(rows, f"idle/{role}"), color=ROLE_COLORS.get(role, "tab:gray"),
                    linestyle=RUN_STYLES[i % len(RUN_STYLES)], marker=".", label=f"{tag}{role}")
            drawn = True
    ax.set_title("idle share per role (1 − busy / step wall time; the timeline: trace.json)")
    ax.set_ylim(-0.03, 1.03)
    if drawn:
        ax.legend(fontsize=8, ncol=4)
    else:
        ax.text(0.5, 0.5, "no idle shares logged (a run from before the timeline)", transform=ax.transAxes,
                ha="center", va="center")


def draw_kl(ax, runs: dict[str, list[dict]], colors: list[str]) -> None:
    """The KL to the reference per step and, on a log scale beside it, the weight-sync check. A run that logged no KL
    had no reference (ppo.kl_coef=0, ppo.reference=auto): the panel says so in words, never as a line at 0."""
    from rlhf_ray.config import NO_REFERENCE

    several, sync = len(runs) > 1, ax.twinx()
    without = [label for label, rows in runs.items() if not any("kl/mean" in r for r in rows)]
    for i, (label, rows) in enumerate(runs.items()):
        color, tag = colors[i % len(colors)], f"{label}: " if several else ""
        if label not in without:
            ax.plot(*_series(rows, "kl/mean"), color=color, marker=".", label=f"{tag}KL to reference (per sequence)")
        steps, gaps = _series(rows, "kl/sampler_vs_learner")
        sync.plot(steps, [max(g, 1e-9) for g in gaps], color=color, linestyle=":",
                  label=f"{tag}mean |sampler − learner| logprob")
    if without:
        who = f"{', '.join(without)}: " if several else ""
        y = 0.04 if several else 0.5  # beside other runs' KL: below it, not over it
        ax.text(0.5, y, f"{who}{NO_REFERENCE}:\nno KL to draw", transform=ax.transAxes, ha="center",
                va="bottom" if several else "center", fontsize=10,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})
    if len(without) < len(runs):
        ax.set_title("KL to the reference, and the weight-sync check")
        ax.set_ylabel("KL (k-estimator, summed over tokens)")
    else:  # no KL scale at all: an empty one would read as KL 0
        ax.set_title("no reference: no KL; the weight-sync check")
        ax.set_yticks([])
    sync.set_yscale("log")
    sync.set_ylim(1e-9, 1.0)  # exact sync sits near the bottom; a stale engine climbs to 1e-3 and up
    sync.set_ylabel("sampler vs learner (≈0: exact sync)")
    _legend(ax, sync)


def _legend(ax, twin) -> None:
    """One legend for an axis and its twin (the right-hand scale)."""
    lines, twin_lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=8)


def _draw_time(ax, runs: dict[str, list[dict]], colors: list[str]) -> None:
    """Stacked phase seconds: per step for one run, the mean step per run for several."""
    several = len(runs) > 1
    names = list(dict.fromkeys(name for rows in runs.values() for r in rows for name in phases_of(r).values()))
    seconds = lambda r: [sum(r.get(k, 0.0) for k, n in phases_of(r).items() if n == name) for name in names]  # noqa: E731
    if several:
        positions = list(range(len(runs)))
        stacks = [[_mean(column) for column in zip(*(seconds(r) for r in rows))] for rows in runs.values()]
        steps = [_mean([r.get("time/step", 0.0) for r in rows]) for rows in runs.values()]
        ax.set_xticks(positions, list(runs), rotation=15, fontsize=8)
        ax.set_title("mean step time by phase")
        ax.set_xlabel("run")
    else:
        rows = next(iter(runs.values()))
        positions = [r["step"] for r in rows]
        stacks = [seconds(r) for r in rows]
        steps = [r.get("time/step", 0.0) for r in rows]
        ax.set_title("step time by phase")
    bottom = [0.0] * len(positions)
    for j, name in enumerate([*names, "other"]):
        heights = [(stack[j] if j < len(names) else max(step - sum(stack), 0.0))
                   for stack, step in zip(stacks, steps)]
        ax.bar(positions, heights, bottom=bottom, color=colors[j % len(colors)], label=name, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)


# the training loss of a learner run -> (what the run is, its training metric, the evaluation sets' figure to draw)
LEARNING_RUNS = {"loss/sft": ("SFT", None, "loss"), "loss/dpo": ("DPO", "dpo/accuracy", "accuracy"),
                 "loss/bradley_terry": ("reward model", "rm/accuracy", "accuracy")}


def learning_kind(rows: list[dict]) -> str | None:
    """The training-loss key of a learner run's metrics (None: a PPO run)."""
    return next((key for key in LEARNING_RUNS if any(key in r for r in rows)), None)


def draw_learning(rows: list[dict], out: str | Path, label: str) -> Path:
    """Three panels of a learner run (SFT, DPO, reward-model training) to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_key = learning_kind(rows)
    kind, train_key, eval_figure = LEARNING_RUNS[loss_key]
    fig, (ax_loss, ax_eval, ax_time, ax_idle) = plt.subplots(1, 4, figsize=(20, 4.6))
    ax_loss.plot(*_series(rows, loss_key), marker=".", label=f"training loss ({loss_key})")
    if train_key:
        twin = ax_loss.twinx()
        twin.plot(*_series(rows, train_key), color="tab:orange", linestyle="--", label=f"training {train_key}")
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("accuracy on the step's pairs")
        _legend(ax_loss, twin)
    else:
        ax_loss.legend(fontsize=8)
    ax_loss.set_title("training")
    sets = sorted({key.split("/")[1] for r in rows for key in r
                   if key.startswith("eval/") and key.count("/") == 2 and key.endswith(f"/{eval_figure}")})
    for name in sets:
        ax_eval.plot(*_series(rows, f"eval/{name}/{eval_figure}"), marker="o", label=name)
    ax_eval.set_title(f"evaluation: {eval_figure}" + (" (step 0: before training)" if sets else " (no evaluation sets)"))
    if sets:
        ax_eval.legend(fontsize=8)
    throughput = next((k for k in ("throughput/tokens_per_s", "throughput/pairs_per_s") if any(k in r for r in rows)),
                      None)
    ax_time.bar(*_series(rows, "time/step"), color="tab:gray", label="seconds per step")
    ax_time.set_ylabel("seconds")
    if throughput:
        twin = ax_time.twinx()
        twin.plot(*_series(rows, throughput), color="tab:green", marker=".",
                  label=throughput.split("/")[1].replace("_per_s", "/s"))
        twin.set_ylabel(throughput.split("/")[1].replace("_", " "))
        _legend(ax_time, twin)
    ax_time.set_title("step time and throughput")
    draw_idle(ax_idle, {label: rows})
    _step_axes((ax_loss, ax_eval, ax_time, ax_idle), f"{kind} step")
    mark_alarms((ax_loss, ax_eval, ax_time, ax_idle), rows)
    return _save(fig, f"rlhf-ray {kind}: {label}", out)


def _step_axes(axes, xlabel: str) -> None:
    """Axes over steps: labelled, integer ticks, a grid."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, title: str, out: str | Path) -> Path:
    """The tail every figure shares: its title, the PNG written, the figure closed."""
    from matplotlib import pyplot as plt

    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the report of one or more runs (their output_dir).")
    parser.add_argument("runs", nargs="+", help="run output directories (each with metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: <run>/report.png for one run, report_compare.png "
                                      "in the current directory for several)")
    parser.add_argument("--timeline", type=int, metavar="STEPS", help="draw the last STEPS steps of the run's "
                                                                       "trace.json instead: <run>/timeline.png")
    args = parser.parse_args(argv)
    if args.timeline:
        return timeline_main(args)
    names = [Path(d).resolve().name or str(d) for d in args.runs]
    labels = names if len(set(names)) == len(names) else list(args.runs)  # same folder name twice: full paths
    try:
        runs = {label: load_metrics(d) for label, d in zip(labels, args.runs)}
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or (Path(args.runs[0]) / "report.png" if len(args.runs) == 1 else Path("report_compare.png"))
    learning = [label for label, rows in runs.items() if learning_kind(rows)]
    if learning:
        if len(runs) > 1:
            print(f"error: {', '.join(learning)}: an SFT, DPO or reward-model run is drawn on its own", file=sys.stderr)
            return 2
        print(f"report: {draw_learning(*runs.values(), out, labels[0])}")
        return 0
    draw(runs, out)
    for label, rows in runs.items():
        print(summary(rows, label))
    print(f"report: {out}")
    return 0


def timeline_main(args) -> int:
    """``--timeline STEPS``: one run's trace drawn (rlhf_ray.run.timeline.draw_timeline)."""
    from rlhf_ray.run.timeline import draw_timeline, load_trace

    if len(args.runs) != 1:
        print("error: --timeline draws one run", file=sys.stderr)
        return 2
    trace = Path(args.runs[0]) / "trace.json"
    try:
        out = draw_timeline(load_trace(trace), args.out or Path(args.runs[0]) / "timeline.png", args.timeline)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {trace}: {err}", file=sys.stderr)
        return 2
    print(f"timeline: {out}")
    return 0

