"""An LLM judge's throughput and parse rate beside a sequence-classification RM's, on the same samples and machine.

    python benchmarks/judge_throughput.py [--judge real:smollm2-135m] [--rm real:smollm2-135m] [--samples 16] \
        [--pairs FILE] [--reply-prefix]

The samples are real: the first ``--samples`` pairs of the AlpacaEval hold-out set (../shared/data/starter; the tiny
prompts with made-up answers where it is absent), each pair's chosen response the one scored. Scored, in this order,
each backend through the same code PPO's reward actor runs (rlhf_ray.rewards.backends), one warm-up call first:

  rm                   the model backend (--rm: a sequence-classification RM; a causal LM gets a fresh score head,
                       which costs the same), models.reward.batch_size 8, max_length --max-length
  judge_pointwise      the judge, shipped pointwise_helpfulness template, ratings 1–5, greedy, score=parsed
  judge_expected       the same verdicts, score=expected (top-20 logprobs at the rating token)
  judge_pairwise       shipped pairwise_preference template, the pair's rejected response as the reference, both
                       orders (two verdicts per sample)
  *_prefixed           (--reply-prefix) the same three with the judge's reply begun for it (judge.reply_prefix
                       'Rating:' / 'Preferred:')

and records samples/s, the share of verdicts that parsed, the mean score, the pairwise accuracy (chosen preferred) and
the first verdicts as the judge wrote them. Writes benchmarks/results/judge_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = ROOT.parent / "shared" / "data" / "starter" / "prefs_eval_alpacaeval.tulu25.jsonl"


def load_samples(n: int, pairs_file: Path):
    from rlhf_ray.data.sources import load_preferences, render_tulu
    from rlhf_ray.rewards.base import RewardSample

    if pairs_file.is_file():
        pairs = load_preferences(str(pairs_file)).pairs[:n]
        return ([RewardSample.of(p.prompt, render_tulu(p.prompt), p.chosen, p.rejected) for p in pairs],
                pairs_file.name)
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "tiny_prompts.jsonl").read_text().splitlines()]
    samples = [RewardSample.of(r["messages"], render_tulu(r["messages"]), "I am not sure.", "Here is a clear answer.")
               for r in rows[:n]]
    return samples, "configs/data/tiny_prompts.jsonl (made-up answers)"


def timed_scores(backend, samples) -> tuple[list[float], float]:
    backend.score(samples[:2])  # warm-up (first-call allocations, oneDNN kernels)
    backend.take_stats()  # what the warm-up recorded (a judge's verdict shares) is not the timed call's
    if hasattr(backend, "llm"):  # every variant judges the same prompts: no KV blocks cached from the one before
        backend.llm.reset_prefix_cache()
    start = time.perf_counter()
    scores = backend.score(samples).tolist()
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="real:smollm2-135m")
    parser.add_argument("--rm", default="real:smollm2-135m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--pairs", type=Path, default=PAIRS, help="Tulu 2.5 preference pairs (default: the "
                                                                   "AlpacaEval hold-out set in ../shared/data)")
    parser.add_argument("--reply-prefix", action="store_true", help="also judge with judge.reply_prefix "
                                                                    "('Rating:' / 'Preferred:')")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=4096, help="models.reward.max_length of both: the RM keeps "
                                                                     "the end of longer inputs, the judge does not "
                                                                     "judge longer prompts (counted as overlong)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_throughput"))
    args = parser.parse_args()

    import torch

    from rlhf_ray.config import RewardConfig
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.rewards.backends import build_backend
    from rlhf_ray.runtime.devices import set_num_threads_as_before_vllm

    set_num_threads_as_before_vllm(args.threads)
    samples, source = load_samples(args.samples, args.pairs)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": args.threads,
               "samples": len(samples), "source": source, "judge": args.judge, "rm": args.rm, "runs": {}}

    rm_cfg = RewardConfig(kind="model", model=args.rm, batch_size=8, max_length=args.max_length)
    rm = build_backend(rm_cfg, model_path=resolve_model(args.rm))
    scores, seconds = timed_scores(rm, samples)
    results["runs"]["rm"] = {"seconds": seconds, "samples_per_s": len(samples) / seconds,
                             "mean_score": sum(scores) / len(scores)}
    del rm

    judge_path = resolve_model(args.judge)
    variants = {"judge_pointwise": {}, "judge_expected": {"score": "expected"},
                "judge_pairwise": {"mode": "pairwise"}}
    if args.reply_prefix:  # the judge's reply begun for it: a small judge states its verdict at once
        variants |= {"judge_pointwise_prefixed": {"reply_prefix": "Rating:"},
                     "judge_expected_prefixed": {"score": "expected", "reply_prefix": "Rating:"},
                     "judge_pairwise_prefixed": {"mode": "pairwise", "reply_prefix": "Preferred:"}}
    backend = None
    for name, judge in variants.items():
        cfg = RewardConfig(kind="judge", model=args.judge, max_length=args.max_length,
                           judge={"max_tokens": args.max_tokens, **judge})
        backend = build_backend(cfg, model_path=judge_path) if backend is None else same_engine(backend, cfg)
        scores, seconds = timed_scores(backend, samples)
        recorded = backend.take_stats().metrics()  # the timed call's verdict shares (rlhf_ray.rewards.stats)
        run = {"seconds": seconds, "samples_per_s": len(samples) / seconds,
               "verdicts_per_sample": 2 if cfg.compares_with_reference else 1,
               "parsed_fraction": 1 - recorded["reward/judge_unparsed"], "mean_score": sum(scores) / len(scores),
               "overlong_fraction": recorded["reward/judge_overlong"],
               "first_verdicts": [backend.last_outputs.get(i, "") for i in range(3)]}
        if cfg.compares_with_reference:
            run["chosen_preferred_fraction"] = sum(s > 0.5 for s in scores) / len(scores)
        results["runs"][name] = run
        print(name, json.dumps({k: v for k, v in run.items() if k != "first_verdicts"}), flush=True)
    write(results, Path(args.out))


def same_engine(backend, cfg):
    """``backend``'s judge engine under the judging rules of ``cfg`` (one engine start for every variant)."""
    import re

    from rlhf_ray.rewards.judge import load_template

    backend.cfg, backend.judge = cfg, cfg.judge
    backend.template, backend.rule = load_template(cfg.judge.template, cfg.judge.mode), re.compile(cfg.judge.parse_rule)
    return backend


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# LLM judge vs sequence-classification RM: throughput ({results['machine']}, {results['threads']} "
             f"threads)", "", f"{results['samples']} samples from {results['source']}; judge {results['judge']}, RM "
             f"{results['rm']} (benchmarks/judge_throughput.py).", "",
             "| backend | samples/s | verdicts per sample | parsed | not judged (too long) | mean score | chosen preferred |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in results["runs"].items():
        parsed = f"{run['parsed_fraction']:.2f}" if "parsed_fraction" in run else "–"
        chosen = f"{run['chosen_preferred_fraction']:.2f}" if "chosen_preferred_fraction" in run else "–"
        overlong = f"{run['overlong_fraction']:.2f}" if "overlong_fraction" in run else "–"
        lines.append(f"| {name} | {run['samples_per_s']:.2f} | {run.get('verdicts_per_sample', 1)} | {parsed} | "
                     f"{overlong} | {run['mean_score']:.3f} | {chosen} |")
    lines.append("")
    for name, run in results["runs"].items():
        for i, verdict in enumerate(run.get("first_verdicts", [])):
            lines.append(f"- {name} verdict {i}: `{verdict.strip()[:200]!r}`")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
