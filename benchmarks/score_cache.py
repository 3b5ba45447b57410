"""The score cache's hit rate where the issue expects hits (models.reward.cache=disk, rlhf_ray/rewards/cache.py):

    a repeated evaluation   ``python -m rlhf_ray.evaluate`` twice, the same policy and prompts (greedy): the second
                            finds every score
    a one-seed sweep        ``python -m rlhf_ray.sweep --grid ppo.async_steps=0,1``: both points sample step 1 with the
                            same weights and seeds, so the second point's first rollout is all hits; later steps are
                            sampled by weights one update apart: hits where they still give the same responses

    python benchmarks/score_cache.py                       # tiny CPU experiment, RM judge tiny:reward, ~4 min
    python benchmarks/score_cache.py --steps 3 --limit 64

Each part starts from an empty cache file. Writes benchmarks/results/score_cache.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlhf_ray.cluster.machine import describe, machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def repeated_evaluation(out: Path, limit: int) -> list[dict]:
    cache = out / "evaluation.sqlite"
    rounds = []
    for i in (1, 2):
        target = out / f"evaluation-{i}"
        wall = run([sys.executable, "-m", "rlhf_ray.evaluate", "--policy", "tiny=tiny:policy", "--prompts",
                    "configs/data/tiny_prompts.jsonl", "--limit", str(limit), "--max-new-tokens", "32",
                    "--reward", "model=tiny:reward", "--reward-option", "cache=disk",
                    "--reward-option", f"cache_path={cache}", "--out", str(target)])
        report = json.loads((target / "evaluation.json").read_text())["policies"]["tiny"]
        rounds.append({"round": i, "wall_s": wall, "score_s": report["seconds"]["score"], **report["judge_stats"]})
    return rounds


def one_seed_sweep(out: Path, steps: int) -> list[dict]:
    cache = out / "sweep.sqlite"
    target = out / "sweep"
    run([sys.executable, "-m", "rlhf_ray.sweep", "--grid", "ppo.async_steps=0,1", "--steps", str(steps), "--warmup",
         "0", "--out", str(target), "models.reward.cache=disk", f"models.reward.cache_path={cache}"])
    points = []
    for point in json.loads((target / "sweep.json").read_text())["points"]:
        rows = [json.loads(line) for line in (Path(point["dir"]) / "metrics.jsonl").read_text().splitlines()]
        hits, misses = sum(r["reward/cache_hits"] for r in rows), sum(r["reward/cache_misses"] for r in rows)
        points.append({"label": point["label"], "hits": hits, "misses": misses, "hit_rate": hits / (hits + misses),
                       "per_step_hit_rate": [r["reward/cache_hit_rate"] for r in rows],
                       "score_s_per_step": [r.get("time/reward") for r in rows]})
    return points


def markdown(result: dict) -> str:
    lines = ["# Score cache: hit rates", "",
             f"Machine: {result['machine']}. `models.reward.cache=disk` (SQLite), judge/RM `tiny:reward`, tiny CPU "
             f"experiment; each part from an empty cache. `python benchmarks/score_cache.py`.", "",
             f"## Repeated evaluation (`rlhf_ray.evaluate` twice, {result['limit']} prompts, greedy)", "",
             "| round | hits | misses | hit rate | scoring s | wall s |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['cache_hits']:.0f} | {r['cache_misses']:.0f} | {r['cache_hit_rate']:.3f} | "
              f"{r['score_s']:.2f} | {r['wall_s']:.0f} |" for r in result["evaluation"]]
    lines += ["", f"## One-seed sweep (`rlhf_ray.sweep --grid ppo.async_steps=0,1`, {result['steps']} steps per "
                  "point, run in this order)", "",
              "| point | hits | misses | hit rate | per step |", "|---|---:|---:|---:|---|"]
    lines += [f"| {p['label']} | {p['hits']:.0f} | {p['misses']:.0f} | {p['hit_rate']:.3f} | "
              f"{', '.join(f'{h:.2f}' for h in p['per_step_hit_rate'])} |" for p in result["sweep"]]
    lines += ["", "Both sweep points sample step 1 with the same weights and seeds, so the second point's first rollout "
                  "is all hits. From step 2 on the weights differ (async_steps=1 samples each step with the weights "
                  "one update older than async_steps=0 does), but one update moves the tiny policy little, so the same "
                  "seeds still give the same response for part of the samples: the hits fall as the weights "
                  "diverge. The evaluation's policy is `tiny:policy` (the experiments' initial policy) both times.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/score_cache")
    parser.add_argument("--steps", type=int, default=3, help="steps per sweep point")
    parser.add_argument("--limit", type=int, default=64, help="evaluation prompts")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = {"machine": describe(machine_info()), "steps": args.steps, "limit": args.limit,
              "evaluation": repeated_evaluation(out, args.limit), "sweep": one_seed_sweep(out, args.steps)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "score_cache.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
