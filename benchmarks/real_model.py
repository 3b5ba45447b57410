"""PPO on the real SmolLM2-135M config: phase times, peak memory per role, weight-sync exactness, reward.

    python benchmarks/real_model.py [--config configs/smollm2_cpu.yaml] [--steps 12] [key=value ...]

Runs a real job (all roles as Ray actors, the real engines) for ``--steps`` PPO steps and records:
- the mean seconds of each phase (the first step, which includes warm-up, is left out of the means);
- each role's peak resident memory (max over steps; the shared object-store pages a role had mapped are
  reported beside it, they count in every process that touched them), next to what the learner's state must take:
  fp32 weights + gradients + Adam moments of what trains (16 bytes per parameter; with models.lora the adapters and
  the critic) plus the frozen weights (a LoRA policy's base: 4 bytes per parameter), and the activations autograd
  keeps for one micro-batch of the longest rows (ppo.micro_batch_size × (data.max_prompt_tokens +
  generation.max_new_tokens) tokens, measured by the learner: LearnerActor.activation_bytes);
- the largest ``kl/sampler_vs_learner`` over all steps (mean |vLLM − learner| logprob of the sampled
  tokens before each update), and the engine-vs-learner logprob gap on a fixed chat response before the
  first and after the last update (the weight-sync check on a model with tied embeddings);
- reward and score of the first and the last steps (and the means of the first/last three).
Writes benchmarks/results/real_model_<config>.json and the run's report PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_ray.config import load_config  # noqa: E402

PHASES = ["time/generate", "time/score_wall", "time/reward", "time/reference", "time/values", "time/learn",
          "time/weight_sync", "time/step", "time/overhead"]
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def sync_gap(trainer) -> float:
    """max |engine − learner| logprob over the tokens of a fixed chat response."""
    tok = trainer.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    response = tok(ANSWER + tok.eos_token, add_special_tokens=False)["input_ids"]
    learner = trainer.roles.learner_logprobs(prompt, response)
    return max(abs(a - b) for engine in trainer.roles.generator_logprobs(prompt, response)
               for a, b in zip(engine, learner))


def longest_micro_batch(trainer):
    """ppo.micro_batch_size rows of the longest prompt and response the run allows, random tokens, with the fields the
    PPO loss reads (zeros): the largest micro-batch the learner can get."""
    import torch

    from rlhf_ray.data.batch import RolloutBatch

    cfg, rows = trainer.cfg, trainer.cfg.ppo.micro_batch_size
    prompt_len, response_len = cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens
    ids = torch.randint(100, len(trainer.tokenizer) - 1, (rows, prompt_len + response_len),
                        generator=torch.Generator().manual_seed(0)).tolist()
    batch = RolloutBatch.from_samples([r[:prompt_len] for r in ids], [r[prompt_len:] for r in ids],
                                      [[0.0] * response_len] * rows, ["length"] * rows, [[]] * rows, [""] * rows,
                                      [""] * rows, pad_token_id=trainer.tokenizer.pad_token_id or 0)
    zeros = torch.zeros(rows, response_len)
    return batch.with_(old_logprobs=zeros, ref_logprobs=zeros, values=zeros, returns=zeros, advantages=zeros)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    name = Path(args.config).stem
    run_dir = ROOT / "runs" / f"bench_real_model_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    batch = load_config(args.config, args.overrides).ppo.rollout_batch_size
    cfg = load_config(args.config, [*args.overrides, f"ppo.total_episodes={args.steps * batch}",
                                    f"output_dir={run_dir}", "logging.progress_bar=false"])
    import ray

    from rlhf_ray.drivers.ppo import PPOTrainer
    from rlhf_ray.run.console import setup_console
    from rlhf_ray.run.report import draw, summary

    setup_console(cfg.logging.console, run_dir)
    started = time.perf_counter()
    trainer = PPOTrainer(cfg)
    startup = time.perf_counter() - started
    steps = []
    try:
        gap_before = sync_gap(trainer)
        for i in range(args.steps):
            steps.append(trainer.step())
            print(f"step {i + 1}/{args.steps}: {steps[-1]['time/step']:.1f} s, reward "
                  f"{steps[-1]['reward/mean']:.3f}, learner peak {steps[-1]['memory/learner_peak_gb']:.2f} GB",
                  flush=True)
        gap_after = sync_gap(trainer)
        learner_params = trainer.roles.learner_parameters()
        frozen_params = ray.get(trainer.roles.learners[0].num_parameters.remote(trainable=False))
        activations_gb = ray.get(trainer.roles.learners[0].activation_bytes.remote(longest_micro_batch(trainer))) / 2**30
    finally:
        trainer.shutdown()
    measured = steps[1:] if len(steps) > 1 else steps
    mean = {k: statistics.fmean(s[k] for s in measured) for k in PHASES}
    peaks = {k.split("/")[1].removesuffix("_peak_gb"): max(s[k] for s in steps)
             for k in steps[0] if k.startswith("memory/") and k.endswith("_peak_gb")}
    shared = {k.split("/")[1].removesuffix("_shared_gb"): max(s[k] for s in steps)
              for k in steps[0] if k.startswith("memory/") and k.endswith("_shared_gb")}
    state_gb = (learner_params * 16 + frozen_params * 4) / 2**30
    window = min(3, len(steps))
    first_last = {key: {"first": steps[0][key], "last": steps[-1][key],
                        f"first_{window}_mean": statistics.fmean(s[key] for s in steps[:window]),
                        f"last_{window}_mean": statistics.fmean(s[key] for s in steps[-window:])}
                  for key in ("reward/mean", "score/mean", "response/length_mean", "response/eos_fraction")}
    result = {
        "config": Path(args.config).name, "overrides": args.overrides, "steps": len(steps), "startup_s": startup,
        "phases_mean_s_excluding_first_step": mean,
        "peak_memory_gb": peaks,
        "shared_memory_gb_max": shared,  # object-store pages in a role's resident size (part of its peak)
        "learner_parameters": learner_params,
        "learner_frozen_parameters": frozen_params,
        "learner_state_gb_fp32_weights_grads_adam": state_gb,
        "learner_peak_over_state": peaks["learner"] / state_gb,
        "learner_activations_gb_one_longest_micro_batch": activations_gb,
        "learner_peak_over_state_plus_activations": peaks["learner"] / (state_gb + activations_gb),
        "max_kl_sampler_vs_learner": max(s["kl/sampler_vs_learner"] for s in steps),
        "sync_gap_fixed_response": {"before_first_update": gap_before, "after_last_update": gap_after},
        "first_vs_last": first_last,
        "tokens_per_s": statistics.fmean(s["throughput/tokens_per_s"] for s in measured),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "resources": cfg.resources.model_dump(),
    }
    print(f"{'phase':<22}{'mean s':>10}{'share of step':>16}")
    for key in PHASES:
        print(f"{key:<22}{mean[key]:>10.3f}{mean[key] / mean['time/step']:>15.1%}")
    print("peak memory GB: " + ", ".join(f"{role} {gb:.2f} (shared {shared[role]:.2f})" for role, gb in peaks.items()
                                         if role in shared)
          + f" (learner state, fp32 weights + grads + Adam of what trains + frozen weights: {state_gb:.2f} GB; "
            f"one longest micro-batch's activations {activations_gb:.2f} GB; peak / (state + activations) "
            f"{result['learner_peak_over_state_plus_activations']:.2f}, peak / state {result['learner_peak_over_state']:.2f})")
    print(f"max kl/sampler_vs_learner {result['max_kl_sampler_vs_learner']:.2e}; fixed-response engine-vs-learner "
          f"gap before {gap_before:.2e}, after {len(steps)} updates {gap_after:.2e}")
    print(summary(steps))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"real_model_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    draw({name: steps}, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
