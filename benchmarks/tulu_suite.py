"""The Tulu suite end to end on a real small model (SmolLM2-135M-Instruct), each stage the real CLI on the previous
stage's output, as docs/tulu-suite.md shows it:

    SFT (train_sft) → reward model from the SFT model (train_rm) → PPO from the SFT model against that RM (train)
                    → DPO from the SFT model (train_dpo) → evaluate base, SFT, DPO and PPO (evaluate)

    python benchmarks/tulu_suite.py [--stages sft,rm,ppo,dpo,evaluate] [--out runs/tulu_suite]

The comparison is AlpacaEval-style on held-out prompts (the prompts of ../shared/data/starter/
prefs_eval_alpacaeval.tulu25.jsonl, never trained on), judged by the suite's own RM: mean RM score, win rate against
the SFT policy, response length and EOS rate, per policy. Every stage's wall time and its own figures (held-out SFT
loss, RM accuracy, PPO score, DPO accuracy) go to benchmarks/results/tulu_suite.{json,md}. A stage left out of
--stages reuses its earlier output in --out. About an hour on a 2-core CPU machine; the stage sizes (below) are what
fits that hour, not what makes good models.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from cli import run_cli  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"
STARTER = ROOT.parent / "shared" / "data" / "starter"
HELD_OUT_PROMPTS = STARTER / "prefs_eval_alpacaeval.tulu25.jsonl"
STAGES = ("sft", "rm", "ppo", "dpo", "evaluate")
QUIET = ["logging.progress_bar=false"]


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sft(out: Path) -> dict:
    wall = run_cli("rlhf_ray.train_sft", ["--config", "configs/sft_smollm2_cpu.yaml", f"output_dir={out}",
                                          "overwrite=true", "data.limit=240", *QUIET])
    rows = metric_rows(out)
    return {"wall_s": wall, "heldout_before": rows[0].get("eval/heldout/loss"),
            "heldout_after": json.loads((out / "eval.json").read_text())["sets"]["heldout"],
            "steps": sum("loss/sft" in r for r in rows)}


def reward_model(out: Path, sft_model: Path) -> dict:
    wall = run_cli("rlhf_ray.train_rm", ["--config", "configs/rm_smollm2_cpu.yaml", f"model={sft_model}",
                                         f"output_dir={out}", "overwrite=true", "data.limit=256", "data.eval=[]",
                                         *QUIET])
    evaluation = json.loads((out / "eval.json").read_text())["sets"]
    before = next(r for r in metric_rows(out) if r["step"] == 0)
    return {"wall_s": wall, "heldout_accuracy_before": before.get("eval/heldout/accuracy"),
            "heldout_accuracy_after": evaluation["heldout"]["accuracy"], "heldout_pairs": evaluation["heldout"]["pairs"]}


def ppo(out: Path, sft_model: Path, rm: Path) -> dict:
    wall = run_cli("rlhf_ray.train", [
        "--config", "configs/smollm2_cpu.yaml", f"output_dir={out}", "overwrite=true", f"models.policy={sft_model}",
        "models.reward.kind=model", f"models.reward.model={rm}", "models.reward.template=tokenizer",
        "models.reward.max_length=384", "models.value_init=reward", f"data.prompts={STARTER / 'prompts_ppo.jsonl'}",
        "data.max_prompt_tokens=192", "generation.max_new_tokens=96", "ppo.total_episodes=80",
        "ppo.non_eos_penalty=-2.0", "checkpoint.every_steps=0", *QUIET])
    steps = [r for r in metric_rows(out) if "score/mean" in r]
    return {"wall_s": wall, "steps": len(steps), "score_per_step": [round(r["score/mean"], 4) for r in steps],
            "kl_last": steps[-1]["kl/mean"], "seconds_per_step": sum(r["time/step"] for r in steps) / len(steps)}


def dpo(out: Path, sft_model: Path) -> dict:
    wall = run_cli("rlhf_ray.train_dpo", ["--config", "configs/dpo_smollm2_cpu.yaml", f"model={sft_model}",
                                          f"output_dir={out}", "overwrite=true", "data.limit=128",
                                          "data.holdout_fraction=0.05", "data.eval=[]",
                                          *QUIET])
    rows = metric_rows(out)
    return {"wall_s": wall, "heldout_accuracy_before": rows[0].get("eval/heldout/accuracy"),
            "heldout_after": json.loads((out / "eval.json").read_text())["sets"]["heldout"],
            "steps": sum("loss/dpo" in r for r in rows)}


def evaluate(out: Path, policies: dict[str, str], rm: Path) -> dict:
    args = [arg for name, spec in policies.items() for arg in ("--policy", f"{name}={spec}")]
    wall = run_cli("rlhf_ray.evaluate", [*args, "--baseline", "sft", "--prompts", str(HELD_OUT_PROMPTS),
                                         "--limit", "48", "--reward", f"model={rm}", "--template", "tokenizer",
                                         "--max-new-tokens", "128", "--out", str(out)])
    return {"wall_s": wall, "evaluation": json.loads((out / "evaluation.json").read_text())}


def markdown(results: dict) -> str:
    """The stage table and the comparison table of benchmarks/results/tulu_suite.md."""
    lines = ["# The Tulu suite on SmolLM2-135M (benchmarks/tulu_suite.py)", "",
             f"Machine: {results.get('machine', {})}.", "", "| stage | wall time | result |", "|---|---:|---|"]
    describe = {
        "sft": lambda r: f"{r['steps']} steps; held-out loss on assistant tokens {r['heldout_before']:.3f} → "
                         f"{r['heldout_after']['loss']:.3f}",
        "rm": lambda r: f"held-out pairwise accuracy {r['heldout_accuracy_before']:.3f} → "
                        f"{r['heldout_accuracy_after']:.3f} ({r['heldout_pairs']} pairs)",
        "ppo": lambda r: f"{r['steps']} steps, {r['seconds_per_step']:.0f} s each; RM score per step "
                         f"{', '.join(f'{x:.2f}' for x in r['score_per_step'])}",
        "dpo": lambda r: f"{r['steps']} steps; held-out implicit-reward accuracy {r['heldout_accuracy_before']:.3f} → "
                         f"{r['heldout_after']['accuracy']:.3f} ({r['heldout_after']['pairs']} pairs), margin "
                         f"{r['heldout_after']['margin']:+.3f}",
        "evaluate": lambda r: f"{len(r['evaluation']['policies'])} policies on "
                              f"{next(iter(r['evaluation']['policies'].values()))['groups']['all']['prompts']} "
                              "held-out prompts",
    }
    for stage in STAGES:
        if stage in results:
            lines.append(f"| {stage} | {results[stage]['wall_s'] / 60:.1f} min | {describe[stage](results[stage])} |")
    if "evaluate" in results:
        evaluation = results["evaluate"]["evaluation"]
        lines += ["", f"Held-out prompts (AlpacaEval prompts of prefs_eval_alpacaeval), judged by the suite's RM; "
                      f"baseline **{evaluation['baseline']}**; greedy, at most "
                      f"{evaluation['settings']['max_new_tokens']} new tokens.", "",
                  "| policy | mean RM score | win rate vs SFT (RM-judged) | same answer as SFT | mean tokens | EOS rate |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, policy in evaluation["policies"].items():
            g = policy["groups"]["all"]
            lines.append(f"| {name} | {g['mean_score']:.3f} | {g['win_rate']:.3f} | {g['same_as_baseline']:.2f} | "
                         f"{g['mean_tokens']:.1f} | {g['eos_rate']:.2f} |")
        lines += ["", "A tie (an equal score; an answer equal to SFT's is one) counts half."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order: " + ",".join(STAGES))
    parser.add_argument("--out", default=str(ROOT / "runs" / "tulu_suite"))
    args = parser.parse_args(argv)
    if not HELD_OUT_PROMPTS.is_file():
        print(f"skipped: {HELD_OUT_PROMPTS} is not present (../shared/data is optional)")
        return 0
    stages, out = args.stages.split(","), Path(args.out).resolve()
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.exit(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    results_file = RESULTS / "tulu_suite.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    sft_model, rm = out / "sft" / "final_model", out / "rm" / "final_model"
    for stage in stages:
        if stage == "sft":
            results["sft"] = sft(out / "sft")
        elif stage == "rm":
            results["rm"] = reward_model(out / "rm", sft_model)
        elif stage == "ppo":
            results["ppo"] = ppo(out / "ppo", sft_model, rm)
        elif stage == "dpo":
            results["dpo"] = dpo(out / "dpo", sft_model)
        else:
            policies = {"base": "real:smollm2-135m", "sft": str(sft_model), "dpo": str(out / "dpo" / "final_model"),
                        "ppo": str(out / "ppo" / "final_model")}
            results["evaluate"] = evaluate(out / "evaluate", policies, rm)
        results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                              "cpus": __import__("os").cpu_count()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # after every stage: a later failure keeps it
        (RESULTS / "tulu_suite.md").write_text(markdown(results))
    print("\n" + markdown(results) + f"\nresults: {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
