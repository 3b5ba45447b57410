"""Policies compared by their judged scores (rlhf_ray.evaluate): win rates against a baseline, per source group, with
sample rows; written as evaluation.md, evaluation.json, evaluation.png and responses.jsonl."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rlhf_ray.evaluation.prompts import EvalPrompt

REWARD_FIELDS = {"model": "model", "function": "function", "http": "url", "serve": "app",  # --reward KIND=VALUE
                 "judge": "model"}


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """AlpacaEval's win rate, judged by scores: per prompt 1 for a higher score than the baseline's, ½ for a tie."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win rate of {len(scores)} scores against {len(baseline)} baseline scores")
    return sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline)) / len(scores)


def summarize(records: list[dict], baseline: list[dict]) -> dict:
    """``same_as_baseline``: the share of prompts answered word for word as the baseline did (ties by construction:
    a policy close to its baseline, e.g. a short DPO run from it, wins or loses only on the rest)."""
    n = len(records)
    return {"prompts": n, "win_rate": win_rate([r["score"] for r in records], [r["score"] for r in baseline]),
            "mean_score": sum(r["score"] for r in records) / n, "mean_tokens": sum(r["tokens"] for r in records) / n,
            "eos_rate": sum(r["finish_reason"] == "stop" for r in records) / n,
            "same_as_baseline": sum(r["response"] == b["response"] for r, b in zip(records, baseline)) / n}


def group_keys(prompts: list[EvalPrompt]) -> dict[str, list[int]]:
    """Report groups -> prompt indices: 'all', each file, and each file/source where rows name their source."""
    groups: dict[str, list[int]] = {"all": list(range(len(prompts)))}
    for i, p in enumerate(prompts):
        groups.setdefault(p.file, []).append(i)
        if p.source is not None:
            groups.setdefault(p.group, []).append(i)
    return groups


def spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` evenly spaced from first to last (all of them when there are fewer)."""
    if count <= 0 or not indices:
        return []
    return sorted({indices[round(i * (len(indices) - 1) / max(1, count - 1))] for i in range(min(count, len(indices)))})


def compare(records: dict[str, list[dict]], prompts: list[EvalPrompt], baseline: str, samples: int) -> dict:
    """Per policy and group: win rate against ``baseline``, mean score, tokens, EOS rate and the share of answers equal
    to the baseline's; a few side-by-sides, from the prompts where the two answered differently."""
    groups = group_keys(prompts)
    base = records[baseline]
    out = {"policies": {}, "samples": {}}
    for name, rows in records.items():
        out["policies"][name] = {g: summarize([rows[i] for i in idx], [base[i] for i in idx])
                                 for g, idx in groups.items()}
        picked = spread([i for i in range(len(prompts)) if rows[i]["response"] != base[i]["response"]], samples)
        out["samples"][name] = [{"group": prompts[i].group, "row": prompts[i].row, "prompt": prompts[i].messages,
                                 "baseline_response": base[i]["response"], "baseline_score": base[i]["score"],
                                 "response": rows[i]["response"], "score": rows[i]["score"]} for i in picked]
    return out


def markdown(report: dict) -> str:
    base, policies = report["baseline"], report["policies"]
    files = report["prompt_files"]
    lines = ["# Policy evaluation", "",
             f"Judge: {judge_label(report['judge'])}. Baseline: **{base}**. "
             f"{sum(f['used'] for f in files.values())} prompts from " + ", ".join(
                 f"{name} ({f['used']} of {f['rows']} rows)" for name, f in files.items())
             + f". Generation: temperature {report['settings']['temperature']:g}, at most "
               f"{report['settings']['max_new_tokens']} new tokens, seed {report['settings']['seed']}.", ""]
    shown = shown_groups(next(iter(policies.values()))["groups"], list(files))
    lines += [f"| group | policy | prompts | win rate vs {base} | mean score | mean tokens | EOS rate | "
              f"same answer as {base} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for g in shown:
        for name, p in policies.items():
            s = p["groups"][g]
            lines.append(f"| {g} | {name} | {s['prompts']} | {s['win_rate']:.3f} | {s['mean_score']:.4f} | "
                         f"{s['mean_tokens']:.1f} | {s['eos_rate']:.2f} | {s['same_as_baseline']:.2f} |")
    lines += ["", f"A win rate counts a tie as half, and an answer equal to {base}'s is a tie."]
    for name, items in report["samples"].items():
        if name == base:
            continue
        lines += ["", f"## {name} vs {base}: samples"]
        if not items:
            lines += ["", f"{name} answered every prompt as {base} did."]
        for s in items:
            lines += ["", f"**{s['group']} row {s['row']}** — {cell(s['prompt'][-1]['content'])}", "",
                      "| policy | score | response |", "|---|---:|---|",
                      f"| {base} | {s['baseline_score']:.4f} | {cell(s['baseline_response'])} |",
                      f"| {name} | {s['score']:.4f} | {cell(s['response'])} |"]
    return "\n".join(lines) + "\n"


def shown_groups(groups: dict[str, dict], files: list[str]) -> list[str]:
    """The groups worth a row: one that holds the same prompts as a narrower one (all = the only file, a file = its
    only source) is left to the narrower one."""
    def narrower(g: str) -> list[str]:
        return files if g == "all" else [c for c in groups if c.startswith(f"{g}/")] if g in files else []

    return [g for g in groups if not any(groups[c]["prompts"] == groups[g]["prompts"] for c in narrower(g))]


def judge_label(judge: dict) -> str:
    """'function rlhf_ray.rewards:char_frequency', 'model runs/rm/final_model', 'composite of math, chat', …"""
    if judge["kind"] not in REWARD_FIELDS:  # a composite (or a kind named by its own keys)
        parts = [c["name"] for c in judge.get("components", [])]
        return f"{judge['kind']}" + (f" of {', '.join(parts)}" if parts else "")
    label = f"{judge['kind']} {judge[REWARD_FIELDS[judge['kind']]]}"
    if judge["kind"] == "judge" and judge.get("judge", {}).get("mode") == "pairwise":
        baseline = judge["judge"].get("baseline")
        label += f" (pairwise against {baseline}'s answers)" if baseline else " (pairwise against the references)"
    return label


def cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def draw(report: dict, out: Path) -> None:
    """Two bar panels, one bar per policy: win rate against the baseline, and mean score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])
    overall = [report["policies"][n]["groups"]["all"] for n in names]
    colors = ["0.6" if n == report["baseline"] else "C0" for n in names]
    fig, (ax_win, ax_score) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 5), 4.2))
    bars = ax_win.bar(names, [s["win_rate"] for s in overall], color=colors)
    ax_win.bar_label(bars, fmt="%.3f")
    ax_win.axhline(0.5, color="k", linestyle="--", linewidth=1, label="tie with the baseline")
    ax_win.set_ylim(0, 1.05)
    ax_win.set_title(f"win rate vs {report['baseline']} (ties count ½)")
    ax_win.legend(fontsize=8, loc="upper left")
    bars = ax_score.bar(names, [s["mean_score"] for s in overall], color=colors)
    ax_score.bar_label(bars, fmt="%.4g")
    ax_score.set_title("mean score")
    ax_score.axhline(0.0, color="k", linewidth=0.8)
    ax_score.margins(y=0.12)  # room for the labels
    for ax in (ax_win, ax_score):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"{overall[0]['prompts']} prompts judged by {judge_label(report['judge'])}; baseline "
                 f"{report['baseline']} in grey", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write(out: Path, report: dict, responses: list[dict]) -> list[Path]:
    """evaluation.md, evaluation.json, evaluation.png and responses.jsonl into ``out``, together."""
    return write_together(out, {"evaluation.md": markdown(report), "evaluation.json": json.dumps(report, indent=1) + "\n",
                                "responses.jsonl": "".join(json.dumps(r) + "\n" for r in responses)},
                          {"evaluation.png": lambda path: draw(report, path)})


def write_together(out: Path, texts: dict[str, str], figures: dict) -> list[Path]:
    """Text files (name -> text) and figures (name -> a function drawing into a path) written into a staging folder,
    then moved into ``out``: a failure leaves no partial set behind."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        for name, text in texts.items():
            (staging / name).write_text(text)
        for name, drawing in figures.items():
            drawing(staging / name)
        for name in [*texts, *figures]:
            os.replace(staging / name, out / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return [out / name for name in [*texts, *figures]]
