"""Reward-model accuracy on a real backbone, then PPO with that RM.

    python benchmarks/rm_accuracy.py [--config configs/rm_smollm2_cpu.yaml] [--ppo-steps 4] [--skip-ppo] [key=value ...]

RM part (the real CLI, ``python -m rlhf_ray.train_rm``): a Bradley–Terry RM from the SmolLM2-135M backbone on
../shared/data/starter/prefs_train.tulu25.jsonl (10 % of each source held out), evaluated before and after
training on the held-out pairs (overall and per source) and on prefs_eval_alpacaeval.tulu25.jsonl; training
seconds, pairs/s and tokens/s from metrics.jsonl. ``key=value`` overrides go to the RM config (e.g.
``data.limit=400`` for a shorter run on fewer training pairs).

PPO part (the real CLI, ``python -m rlhf_ray.train``): configs/smollm2_cpu.yaml for ``--ppo-steps`` steps with
the trained RM as its reward (``models.reward.kind=model``) and as the critic's start (``value_init=reward``,
Tulu 2.5); the RM score per step. Writes benchmarks/results/rm_accuracy_<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli import run_cli  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

from rlhf_ray.config import RewardTrainingConfig, load_config  # noqa: E402


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rm(config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides, RewardTrainingConfig)
    missing = [p for p in [cfg.data.train, *cfg.data.eval] if not (ROOT / p).exists() and not Path(p).exists()]
    if missing:
        sys.exit(f"skipped: {', '.join(missing)} not present (../shared/data is optional)")
    out = ROOT / "runs" / f"bench_{Path(config).stem}"
    wall = run_cli("rlhf_ray.train_rm", ["--config", config, *overrides, f"output_dir={out}", "overwrite=true",
                                         "logging.progress_bar=false"], echo=False)
    rows = read_rows(out)
    steps = [r for r in rows if "loss/bradley_terry" in r]
    before = next((r for r in rows if r["step"] == 0 and "loss/bradley_terry" not in r), {})
    seconds = sum(r["time/step"] for r in steps)
    pairs = sum(r["throughput/pairs_per_s"] * r["time/step"] for r in steps)
    tokens = sum(r["throughput/tokens_per_s"] * r["time/step"] for r in steps)
    evaluation = json.loads((out / "eval.json").read_text())["sets"]
    return {"config": config, "overrides": overrides, "output_dir": str(out), "wall_s": wall,
            "train_pairs_seen": round(pairs), "steps": len(steps), "train_seconds": seconds,
            "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
            "loss_first_last": [steps[0]["loss/bradley_terry"], steps[-1]["loss/bradley_terry"]],
            "train_batch_accuracy_last5": sum(r["rm/accuracy"] for r in steps[-5:]) / len(steps[-5:]),
            "accuracy_before": {k[len("eval/"):]: v for k, v in before.items() if k.startswith("eval/")},
            "accuracy_after": evaluation,
            "reward_stats": json.loads((out / "final_model" / "reward_stats.json").read_text())}


def ppo_with_rm(rm_dir: str, steps: int, template: str, max_length: int) -> dict:
    config = "configs/smollm2_cpu.yaml"
    batch = load_config(config).ppo.rollout_batch_size
    out = ROOT / "runs" / "bench_ppo_with_rm"
    wall = run_cli("rlhf_ray.train", ["--config", config, f"output_dir={out}", "overwrite=true",
                                      f"ppo.total_episodes={steps * batch}", "models.reward.kind=model",
                                      f"models.reward.model={rm_dir}", f"models.reward.template={template}",
                                      f"models.reward.max_length={max_length}", "models.value_init=reward",
                                      "checkpoint.every_steps=0", "logging.progress_bar=false"], echo=False)
    rows = [r for r in read_rows(out) if "score/mean" in r]
    return {"config": config, "steps": len(rows), "wall_s": wall, "output_dir": str(out),
            "score_mean": [r["score/mean"] for r in rows], "reward_mean": [r["reward/mean"] for r in rows],
            "kl_mean": [r["kl/mean"] for r in rows], "eos_fraction": [r["response/eos_fraction"] for r in rows],
            "step_s": [r["time/step"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/rm_smollm2_cpu.yaml")
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = {"rm": train_rm(args.config, args.overrides)}
    rm = result["rm"]
    print(f"\nRM ({rm['steps']} steps, {rm['train_pairs_seen']} pairs): {rm['train_seconds']:.0f} s training, "
          f"{rm['pairs_per_s']:.2f} pairs/s, {rm['tokens_per_s']:.0f} tokens/s")
    for name, table in rm["accuracy_after"].items():
        before = rm["accuracy_before"].get(f"{name}/accuracy", float("nan"))
        print(f"  {name}: accuracy {before:.3f} before → {table['accuracy']:.3f} after ({table['pairs']} pairs)")
        for source, row in table["per_source"].items():
            print(f"    {source}: {rm['accuracy_before'].get(f'{name}/accuracy/{source}', float('nan')):.3f} → "
                  f"{row['accuracy']:.3f} ({row['pairs']} pairs)")
    if not args.skip_ppo:
        cfg = load_config(args.config, args.overrides, RewardTrainingConfig)
        result["ppo"] = ppo_with_rm(str(Path(rm["output_dir"]) / "final_model"), args.ppo_steps, cfg.data.template,
                                    cfg.data.max_length)
        print(f"PPO with this RM, score per step: {', '.join(f'{s:.3f}' for s in result['ppo']['score_mean'])}")
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "gpu": None}
    path = ROOT / "benchmarks" / "results" / f"rm_accuracy_{Path(args.config).stem}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
