"""GAE vs GRPO vs RLOO on a real small model (SmolLM2-135M-Instruct) and the shipped arithmetic task: the same
config (configs/grpo_smollm2_cpu.yaml), seed, prompts and steps, only ppo.advantage differs (GAE's critic starts from
the policy: models.value_init=policy). Each run is the real CLI, as a user runs it; then every final policy answers
the 128 held-out problems (configs/data/arithmetic_test.jsonl, never trained on) greedily, judged by the task's
reward with format_bonus=0, so the mean score is the accuracy.

    python benchmarks/critic_free.py [--estimators gae,grpo,rloo] [--steps 12] [--out runs/critic_free]

Per estimator: seconds per step (and its learn and values phases), the learner's peak resident memory, the planner's
expected learner memory, training score per step, held-out accuracy before vs after. Writes
benchmarks/results/critic_free.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's rlhf_ray (the planner), not another one the venv may point at
from cli import run_cli  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "grpo_smollm2_cpu.yaml"
TEST = ROOT / "configs" / "data" / "arithmetic_test.jsonl"
ESTIMATORS = ("gae", "grpo", "rloo")
QUIET = ["logging.progress_bar=false", "checkpoint.every_steps=0", "checkpoint.at_end=false"]


def expected_learner_gb(overrides: list[str]) -> float:
    """The planner's learner memory on this machine for the run's config (rlhf_ray.planning), GB."""
    from rlhf_ray.config import load_config
    from rlhf_ray.planning import plan_experiment

    plan = plan_experiment(load_config(CONFIG, overrides), "cpu", search=False)
    return next(r for r in plan.roles if r.role == "learner").device_bytes / 1e9


def train(estimator: str, steps: int, out: Path, reuse: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """One run (``reuse``: summarise the finished run already in ``out`` instead); ``extra``: further overrides."""
    overrides = [f"ppo.advantage={estimator}", f"ppo.total_episodes={8 * steps}", f"output_dir={out}",
                 "overwrite=true", "models.value_init=policy", *QUIET, *extra]
    if reuse and (out / "final_model").is_dir():
        wall = None
    else:
        wall = run_cli("rlhf_ray.train", ["--config", str(CONFIG.relative_to(ROOT)), *overrides])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "score/mean" in r]
    mean = lambda key: sum(r.get(key, 0.0) for r in rows[1:]) / max(len(rows) - 1, 1)  # noqa: E731 (step 1 warms up)
    return {"wall_s": wall, "estimator": estimator, "overrides": list(extra), "steps": len(rows), "seconds_per_step": mean("time/step"),
            "learn_s_per_step": mean("time/learn"), "values_s_per_step": mean("time/values"),
            "learner_peak_gb": max(r["memory/learner_peak_gb"] for r in rows),
            "learner_expected_gb": expected_learner_gb(overrides),
            "score_per_step": [round(r["score/mean"], 4) for r in rows],
            "eos_fraction_per_step": [round(r["response/eos_fraction"], 3) for r in rows]}


def evaluate(policies: dict[str, str], out: Path) -> dict:
    args = [arg for name, spec in policies.items() for arg in ("--policy", f"{name}={spec}")]
    wall = run_cli("rlhf_ray.evaluate", [
        *args, "--prompts", str(TEST), "--label-field", "answer", "--template", "tokenizer",
        "--reward", "function=rlhf_ray.tasks.arithmetic:reward", "--reward-option", "function_kwargs.format_bonus=0",
        "--max-new-tokens", "64", "--max-prompt-tokens", "128", "--out", str(out)])
    report = json.loads((out / "evaluation.json").read_text())
    return {"wall_s": wall, "accuracy": {name: p["groups"]["all"]["mean_score"] for name, p in report["policies"].items()},
            "prompts": next(iter(report["policies"].values()))["groups"]["all"]["prompts"]}


def markdown(results: dict) -> str:
    runs = results.get("runs", {})
    accuracy = results.get("evaluate", {}).get("accuracy", {})
    lines = ["# Critic-free RL on SmolLM2-135M: GAE vs GRPO vs RLOO (benchmarks/critic_free.py)", "",
             f"Machine: {results.get('machine', {})}. Config: configs/grpo_smollm2_cpu.yaml, "
             f"{next(iter(runs.values()))['steps'] if runs else '?'} steps of 8 prompts × 4 samples; only "
             "`ppo.advantage` differs.", "",
             "| estimator | s/step | learn s | values s | learner peak GB (measured) | learner GB (planner) | "
             "peak vs GAE | held-out accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    gae_peak = runs.get("gae", {}).get("learner_peak_gb")
    if "base" in accuracy:
        lines.append(f"| (before: SmolLM2-135M-Instruct) | | | | | | | {accuracy['base']:.3f} |")
    for name, r in runs.items():
        ratio = f"{r['learner_peak_gb'] / gae_peak:.0%}" if gae_peak else "–"
        acc = f"{accuracy[name]:.3f}" if name in accuracy else "–"
        label = name + "".join(f" `{o}`" for o in r.get("overrides", []))
        lines.append(f"| {label} | {r['seconds_per_step']:.1f} | {r['learn_s_per_step']:.1f} | {r['values_s_per_step']:.1f}"
                     f" | {r['learner_peak_gb']:.2f} | {r['learner_expected_gb']:.2f} | {ratio} | {acc} |")
    if runs:
        lines += ["", "Training score (mean reward, 0.9·correct + 0.1·format) per step:", ""]
        lines += [f"- {name}: {', '.join(f'{s:.2f}' for s in r['score_per_step'])}" for name, r in runs.items()]
    if results.get("note"):
        lines += ["", results["note"]]
    if "evaluate" in results:
        lines += ["", f"Held-out accuracy: {results['evaluate']['prompts']} problems of configs/data/arithmetic_test.jsonl, "
                      "greedy, at most 64 new tokens, the final answer checked against the label."]
    return "\n".join(lines) + "\n"


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs", {})
    accuracy = results.get("evaluate", {}).get("accuracy", {})
    fig, (ax_score, ax_time, ax_memory, ax_acc) = plt.subplots(1, 4, figsize=(18, 4.2))
    for name, r in runs.items():
        ax_score.plot(range(1, len(r["score_per_step"]) + 1), r["score_per_step"], marker="o", label=name)
    ax_score.set(title="training score per step", xlabel="step", ylabel="mean reward")
    ax_score.legend()
    names = list(runs)
    learn = [runs[n]["learn_s_per_step"] for n in names]
    values = [runs[n]["values_s_per_step"] for n in names]
    rest = [runs[n]["seconds_per_step"] - l - v for n, l, v in zip(names, learn, values)]
    ax_time.bar(names, learn, label="learn")
    ax_time.bar(names, values, bottom=learn, label="values pass")
    ax_time.bar(names, rest, bottom=[a + b for a, b in zip(learn, values)], label="generate, score, sync")
    ax_time.set(title="seconds per step", ylabel="s")
    ax_time.legend(fontsize=8)
    x = range(len(names))
    ax_memory.bar([i - 0.2 for i in x], [runs[n]["learner_peak_gb"] for n in names], width=0.4, label="measured peak")
    ax_memory.bar([i + 0.2 for i in x], [runs[n]["learner_expected_gb"] for n in names], width=0.4, label="planner")
    ax_memory.set_xticks(list(x), names)
    ax_memory.set(title="learner memory", ylabel="GB")
    ax_memory.legend(fontsize=8)
    acc_names = [n for n in ["base", *names] if n in accuracy]
    bars = ax_acc.bar(acc_names, [accuracy[n] for n in acc_names], color=["grey"] + ["C0"] * (len(acc_names) - 1))
    ax_acc.bar_label(bars, fmt="%.3f")
    ax_acc.set(title="held-out accuracy (128 problems)", ylim=(0, max([0.1, *accuracy.values()]) * 1.25))
    for ax in (ax_time, ax_memory, ax_acc):
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle("SmolLM2-135M on the arithmetic task: GAE vs critic-free estimators, same steps and prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "runs" / "critic_free"))
    parser.add_argument("--skip-evaluate", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="summarise finished runs in --out instead of training")
    parser.add_argument("--name", help="with one estimator: the run's name (default: the estimator)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="with --name: a config override of that run (repeatable)")
    args = parser.parse_args(argv)
    estimators, out = args.estimators.split(","), Path(args.out).resolve()
    results_file = RESULTS / "critic_free.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("runs", {})

    def save() -> None:
        results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                              "cpus": os.cpu_count()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # after every stage: a later failure keeps it
        (RESULTS / "critic_free.md").write_text(markdown(results))
        draw(results, RESULTS / "critic_free.png")

    if (args.name or args.override) and len(estimators) != 1:
        sys.exit("--name and --override go with a single --estimators value")
    for estimator in estimators:
        name = args.name or estimator
        results["runs"][name] = train(estimator, args.steps, out / name, args.reuse, tuple(args.override))
        save()
    if not args.skip_evaluate:
        policies = {"base": "real:smollm2-135m", **{name: str(out / name / "final_model") for name in results["runs"]
                                                     if (out / name / "final_model").is_dir()}}
        results["evaluate"] = evaluate(policies, out / "evaluate")
        save()
    print("\n" + markdown(results) + f"\nresults: {results_file}, {RESULTS / 'critic_free.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
