"""Which reward makes the better policy (rlhf_ray.compare_rewards): every evaluated policy's proxy score, gold score and
KL from the initial policy on held-out prompts, with intervals; where each reward's gold score peaks; the best
checkpoint by gold; written as compare_rewards.md, compare_rewards.json and compare_rewards.png.

Over-optimisation (Gao et al., 2022, "Scaling laws for reward model overoptimization"): as a policy moves away from
its initial policy (KL grows), the score of the reward it trains on (the proxy) keeps rising, while a reward it never
sees (the gold) rises, peaks and falls. The gold curve's turn is the point to stop.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

INTERVAL = 0.95         # the intervals' coverage
BOOTSTRAP_SAMPLES = 2000


def prompt_means(values: list[float], samples_per_prompt: int) -> torch.Tensor:
    """Per-sample values (a prompt's samples adjacent) -> one mean per prompt: the prompts are the independent draws."""
    t = torch.tensor(values, dtype=torch.float64)
    if samples_per_prompt < 1 or t.numel() % samples_per_prompt:
        raise ValueError(f"{t.numel()} values do not group into prompts of {samples_per_prompt} samples")
    return t.view(-1, samples_per_prompt).mean(1)


def bootstrap_interval(per_prompt: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean over prompts: the central ``INTERVAL`` of the means of BOOTSTRAP_SAMPLES
    resamples (prompts drawn with replacement). For a paired difference, pass the per-prompt differences.
    One prompt gives a zero-width interval (nothing to resample)."""
    n = per_prompt.numel()
    if n == 0:
        raise ValueError("an interval of no prompts")
    generator = torch.Generator().manual_seed(seed)
    draws = per_prompt[torch.randint(n, (BOOTSTRAP_SAMPLES, n), generator=generator)].mean(1)
    tail = (1 - INTERVAL) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=draws.dtype)).tolist()
    return low, high


def summary(values: list[float], samples_per_prompt: int, seed: int = 0) -> dict:
    """Mean over all samples and its bootstrap interval over prompts."""
    per_prompt = prompt_means(values, samples_per_prompt)
    low, high = bootstrap_interval(per_prompt, seed)
    return {"mean": float(per_prompt.mean()), "low": low, "high": high}


def paired_change(values: list[float], initial: list[float], samples_per_prompt: int, seed: int = 0) -> dict:
    """Mean of (policy − initial policy) over the same prompts, with its paired bootstrap interval: tighter than the
    two intervals apart, since a prompt's difficulty cancels."""
    difference = prompt_means(values, samples_per_prompt) - prompt_means(initial, samples_per_prompt)
    low, high = bootstrap_interval(difference, seed)
    return {"mean": float(difference.mean()), "low": low, "high": high}


def peak(points: list[dict]) -> dict:
    """The evaluated point of highest gold score (the earlier one on a tie) among ``points`` of one reward, and what
    follows it: ``overoptimized`` when a later point's gold score is below the peak's by more than the peak's paired
    interval allows (its upper end under the peak's mean) while its proxy score is higher than at the peak."""
    best = max(points, key=lambda p: (p["gold"]["mean"], -p["step"]))
    later = [p for p in points if p["step"] > best["step"]]
    turned = [p for p in later
              if p["gold_change"]["high"] < best["gold_change"]["mean"] and p["proxy"]["mean"] > best["proxy"]["mean"]]
    return {"step": best["step"], "kl": best["kl"]["mean"], "gold": best["gold"], "gold_change": best["gold_change"],
            "overoptimized": bool(turned), "turned_at_step": turned[0]["step"] if turned else None,
            "turned_at_kl": turned[0]["kl"]["mean"] if turned else None}


def conclusions(runs: dict[str, dict]) -> dict:
    """Per reward its gold peak; overall the best checkpoint by gold and whether it beats the initial policy (its
    paired interval above 0)."""
    peaks = {name: peak(run["points"]) for name, run in runs.items() if run["points"]}
    trained = {name: p for name, p in peaks.items() if p["step"] > 0}
    best_name = max(trained, key=lambda n: trained[n]["gold"]["mean"]) if trained else None
    best = None
    if best_name is not None:
        point = next(p for p in runs[best_name]["points"] if p["step"] == trained[best_name]["step"])
        best = {"reward": best_name, "step": point["step"], "policy": point["policy"], "gold": point["gold"],
                "gold_change": point["gold_change"], "kl": point["kl"]["mean"],
                "improves_on_initial": point["gold_change"]["low"] > 0}
    return {"peaks": peaks, "best": best}


# --------------------------------------------------------------------------------------------------------- write

def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} [{s['low']:.{digits}f}, {s['high']:.{digits}f}]"


def markdown(report: dict) -> str:
    """The table (one row per evaluated policy), the peaks and the best checkpoint."""
    settings, gold = report["settings"], report["gold"]
    lines = [
        "# Which reward makes the better policy (rlhf_ray.compare_rewards)", "",
        f"Base config `{report['config']}`; {len(report['runs'])} rewards; gold judge: {gold['label']}. "
        f"Held-out prompts: {settings['prompts']} ({', '.join(settings['prompt_files'])}), "
        f"{settings['samples_per_prompt']} sample(s) each at temperature {settings['temperature']}, at most "
        f"{settings['max_new_tokens']} new tokens. Intervals: {INTERVAL:.0%} bootstrap over prompts; Δ gold is paired "
        "with the initial policy on the same prompts. KL: Σ over response tokens of log π − log π_init on the "
        "policy's own samples (nats per response).", "",
        "| reward | step | KL from initial | proxy score | gold score | Δ gold vs initial | mean tokens | EOS rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in report["runs"].items():
        if run.get("error"):
            lines.append(f"| {name} | – | – | – | – | – | – | failed: {run['error'][:200]} |")
        for p in run["points"]:
            lines.append(f"| {name} | {p['step']} | {fmt(p['kl'], 2)} | {p['proxy']['mean']:.3f} | {fmt(p['gold'])} "
                         f"| {fmt(p['gold_change'])} | {p['mean_tokens']:.1f} | {p['eos_rate']:.2f} |")
    lines += ["", "## Where the gold score peaks", ""]
    for name, p in report["conclusions"]["peaks"].items():
        turn = (f"over-optimised: at step {p['turned_at_step']} (KL {p['turned_at_kl']:.2f}) the gold score is below "
                "the peak by more than its interval while the proxy score is higher" if p["overoptimized"]
                else "no significant turn after it among the evaluated checkpoints")
        lines.append(f"- **{name}**: gold peaks at step {p['step']}, KL {p['kl']:.2f}: {fmt(p['gold'])} "
                     f"(Δ {fmt(p['gold_change'])}); {turn}.")
    best = report["conclusions"]["best"]
    lines += ["", "## Best checkpoint by gold", ""]
    if best is None:
        lines.append("No run has an evaluated checkpoint after step 0.")
    else:
        verdict = ("above the initial policy beyond its interval" if best["improves_on_initial"]
                   else "NOT above the initial policy beyond its interval")
        lines.append(f"**{best['reward']}, step {best['step']}** (`{best['policy']}`): gold {fmt(best['gold'])}, "
                     f"Δ {fmt(best['gold_change'])} — {verdict}.")
    return "\n".join(lines) + "\n"


def draw(report: dict, path: Path) -> None:
    """Gold score (left) and proxy score (right) against KL from the initial policy, a line per reward; intervals as
    error bars. Each proxy is on its own scale, so the right panel shows its change from the initial policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in report["runs"].items():
        points = run["points"]
        if not points:
            continue
        kl = [p["kl"]["mean"] for p in points]
        gold = [p["gold"]["mean"] for p in points]
        errors = [[p["gold"]["mean"] - p["gold"]["low"] for p in points],
                  [p["gold"]["high"] - p["gold"]["mean"] for p in points]]
        line = gold_ax.errorbar(kl, gold, yerr=errors, marker="o", capsize=3, label=name)
        peak_point = report["conclusions"]["peaks"][name]
        gold_ax.plot([peak_point["kl"]], [peak_point["gold"]["mean"]], marker="*", markersize=14,
                     color=line[0].get_color())
        proxy_ax.plot(kl, [p["proxy"]["mean"] - points[0]["proxy"]["mean"] for p in points], marker="o", label=name)
    gold_ax.set(xlabel="KL from the initial policy (nats per response)", ylabel="gold score",
                title=f"gold: {report['gold']['label']}"[:70])
    proxy_ax.set(xlabel="KL from the initial policy (nats per response)", ylabel="proxy score − at step 0",
                 title="each reward's own score (the proxy)")
    for ax in (gold_ax, proxy_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Proxy and gold reward against KL (★: gold peak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, report: dict, responses: list[dict]) -> list[Path]:
    """compare_rewards.md, compare_rewards.json, compare_rewards.png and responses.jsonl into ``out``, together."""
    from rlhf_ray.evaluation.comparison import write_together

    return write_together(out, {"compare_rewards.md": markdown(report),
                                "compare_rewards.json": json.dumps(report, indent=1) + "\n",
                                "responses.jsonl": "".join(json.dumps(r) + "\n" for r in responses)},
                          {"compare_rewards.png": lambda path: draw(report, path)})
