"""Which proxy reward makes the better policy, on SmolLM2-135M-Instruct, measured by a gold reward no policy trains on
(rlhf_ray.compare_rewards), in Gao et al.'s synthetic set-up (2022): the gold RM labels the pairs the proxy RMs learn
from, so a proxy is the gold seen through a finite, noisy sample of its preferences, as a human-labelled RM is the
humans seen through theirs.

    python benchmarks/compare_rewards.py [--stages split,gold,label,proxies,compare] [--out runs/compare_rewards]

Stages (a stage left out reuses its output in --out; the harness itself reuses finished runs and evaluations):

    split    the 1,574 Tulu 2.5-format starter pairs (../shared/data/starter/prefs_train.tulu25.jsonl) into two
             disjoint pools: 2 rows in 5 for the gold, the other 3 for the proxies
    gold     the gold RM: SmolLM2-135M + a scalar head trained on 512 of its pool's human-labelled pairs
             (configs/rm_smollm2_cpu.yaml, the Tulu suite's RM recipe); its held-out accuracy against the humans
    label    the proxy pool's pairs relabelled by the gold (chosen: the response the gold scores higher); how often
             the gold agrees with the humans there
    proxies  proxy RMs trained on the first 64 and 512 gold-labelled pairs; their held-out agreement with the gold
    compare  PPO from SmolLM2-135M-Instruct (configs/smollm2_cpu.yaml on the 412 starter prompts) against each proxy
             RM and against the SmolLM2 LLM judge as one more proxy; checkpoints scored by the gold on held-out
             AlpacaEval prompts that no stage trains on

Writes benchmarks/results/compare_rewards.{json,md,png} (the harness's report with every stage's figures). Sized for
~2-3 hours of a 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from cli import run_cli  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"
STARTER = ROOT.parent / "shared" / "data" / "starter"
PAIRS = STARTER / "prefs_train.tulu25.jsonl"
HELD_OUT_PROMPTS = STARTER / "prefs_eval_alpacaeval.tulu25.jsonl"
STAGES = ("split", "gold", "label", "proxies", "compare")
PROXY_PAIRS = (64, 512)
QUIET = ["logging.progress_bar=false"]
# every run of the comparison (the harness's key=value overrides): PPO as configs/smollm2_cpu.yaml runs it, on the
# starter prompts, for 20 steps at 3× its learning rate (to move the policy far enough from the initial one within the
# budget), with no penalty of its own for cut-off answers (the proxy alone decides what pays); each proxy's scores
# are normalised (normalize: stored / running), since their scales differ
PPO = [f"data.prompts={STARTER / 'prompts_ppo.jsonl'}", "data.max_prompt_tokens=192", "generation.max_new_tokens=64",
       "ppo.total_episodes=160", "ppo.non_eos_penalty=null", "optimizer.lr=3.0e-5", *QUIET]


def split(out: Path) -> dict:
    rows = PAIRS.read_text().splitlines()
    pools = {"gold": [r for i, r in enumerate(rows) if i % 5 < 2], "proxy": [r for i, r in enumerate(rows) if i % 5 >= 2]}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, pool in pools.items():
        (out / "data" / f"{name}_pool.jsonl").write_text("\n".join(pool) + "\n")
    return {name: len(pool) for name, pool in pools.items()}


def train_rm(out: Path, pairs: Path, limit: int, max_length: int) -> dict:
    wall = run_cli("rlhf_ray.train_rm", ["--config", "configs/rm_smollm2_cpu.yaml", f"data.train={pairs}",
                                         f"output_dir={out}", "overwrite=true", f"data.limit={limit}", "data.eval=[]",
                                         f"data.max_length={max_length}", "checkpoint.every_steps=0", *QUIET])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["step"] == 0)
    after = json.loads((out / "eval.json").read_text())["sets"]["heldout"]
    return {"wall_s": wall, "pairs": limit, "max_length": max_length,
            "heldout_accuracy_before": before.get("eval/heldout/accuracy"), "heldout_accuracy_after": after["accuracy"],
            "heldout_pairs": after["pairs"]}


def label(out: Path) -> dict:
    """Each proxy-pool pair scored by the gold; chosen := the response it scores higher (a tie keeps the humans')."""
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.rewards.base import RewardSample
    from rlhf_ray.rewards.model import ModelBackend

    gold = str(out / "gold" / "final_model")
    backend = ModelBackend(RewardConfig(kind="model", model=gold, template="tokenizer", max_length=384, batch_size=16),
                           model_path=gold)
    rows = [json.loads(line) for line in (out / "data" / "proxy_pool.jsonl").read_text().splitlines()]

    def sample(turns):
        return RewardSample.of(turns[:-1], "", turns[-1]["content"])

    scores = backend.score([sample(r[side]) for r in rows for side in ("chosen", "rejected")]).view(-1, 2).tolist()
    labelled, agree = [], 0
    for row, (chosen, rejected) in zip(rows, scores):
        agree += chosen >= rejected
        first, second = (row["chosen"], row["rejected"]) if chosen >= rejected else (row["rejected"], row["chosen"])
        labelled.append({"chosen": first, "rejected": second, "source": row.get("source"),
                         "gold_margin": abs(chosen - rejected)})
    (out / "data" / "gold_labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    return {"pairs": len(rows), "gold_agrees_with_humans": agree / len(rows)}


def compare(out: Path, proxies: dict[str, Path], limit: int, evaluations: int) -> dict:
    rewards, options = [], []
    for name, path in proxies.items():
        rewards += ["--reward", f"{name}=model={path}"]
        options += ["--reward-option", f"{name}:normalize=stored", "--reward-option", f"{name}:max_length=384"]
    rewards += ["--reward", "judge=judge=real:smollm2-135m"]
    options += ["--reward-option", "judge:judge.score=expected", "--reward-option", "judge:judge.reply_prefix='Rating:'",
                "--reward-option", "judge:normalize=running"]
    wall = run_cli("rlhf_ray.compare_rewards", [
        "--config", "configs/smollm2_cpu.yaml", *rewards, *options, "--gold", f"model={out / 'gold' / 'final_model'}",
        "--gold-option", "max_length=384", "--prompts", str(HELD_OUT_PROMPTS), "--limit", str(limit),
        "--samples-per-prompt", "2", "--evaluations", str(evaluations), "--out", str(out / "comparison"), *PPO])
    return {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", default=str(ROOT / "runs" / "compare_rewards"))
    parser.add_argument("--limit", type=int, default=64, help="held-out prompts the gold scores")
    parser.add_argument("--evaluations", type=int, default=4, help="checkpoints evaluated along each run")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        sys.exit(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures_path = out / "stages.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    proxies = {f"rm{n}": out / f"proxy{n}" / "final_model" for n in PROXY_PAIRS}
    for stage in stages:
        if stage == "split":
            figures["split"] = split(out)
        elif stage == "gold":
            figures["gold"] = train_rm(out / "gold", out / "data" / "gold_pool.jsonl", 512, 384)
        elif stage == "label":
            figures["label"] = label(out)
        elif stage == "proxies":
            for n in PROXY_PAIRS:
                figures[f"proxy{n}"] = train_rm(out / f"proxy{n}", out / "data" / "gold_labelled.jsonl", n, 256)
        elif stage == "compare":
            figures["compare"] = compare(out, proxies, args.limit, args.evaluations)
        figures_path.write_text(json.dumps(figures, indent=1))
    if (out / "comparison" / "compare_rewards.json").is_file():
        report = json.loads((out / "comparison" / "compare_rewards.json").read_text())
        report["stages"] = figures
        report["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                             "cpus": len(__import__("os").sched_getaffinity(0))}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "compare_rewards.json").write_text(json.dumps(report, indent=1))
        shutil.copy(out / "comparison" / "compare_rewards.png", RESULTS / "compare_rewards.png")
        stage_lines = "\n".join(f"- {name}: {json.dumps(value)}" for name, value in figures.items())
        (RESULTS / "compare_rewards.md").write_text(
            (out / "comparison" / "compare_rewards.md").read_text() + "\n## Stages (benchmarks/compare_rewards.py)\n\n"
            + stage_lines + "\n")
        print(f"written: {RESULTS / 'compare_rewards.md'}")


if __name__ == "__main__":
    main()
