"""Where a PPO learner step's time goes: torch.profiler over the real learner (DeepSpeed engine, AdamW, PPO loss).

    python benchmarks/learner_profile.py [--model scaled:llama-20m] [--threads 1,2] [--zero 0] [--steps 3]
                                         [--batch 16 --mini 8 --micro 4 --prompt 40 --response 32]

Runs the learner role's own class in this process (no Ray: nothing else competes for the cores) on a
synthetic rollout of the given shape — a values/old-logprobs pass (``evaluate``) and an update (``train``) per
step — for each thread count and ZeRO stage asked for. Reports the mean seconds of both after a warm-up step,
and for the last setting the top operators by self CPU time, grouped into forward/backward compute, the
optimizer, and what is not compute (copies, fills, DeepSpeed bookkeeping). Writes JSON (default
benchmarks/results/learner_profile_<model>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS = {  # operator name fragments -> what kind of work it is
    "matmul / linear": ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax"),
    "optimizer": ("adam", "_fused_adamw", "lerp", "_foreach"),
    "copies / fills": ("copy_", "to", "_to_copy", "clone", "contiguous", "fill_", "zero_", "zeros", "empty", "cat",
                       "index", "gather", "scatter", "new_zeros"),
    "elementwise": ("mul", "add", "sub", "div", "exp", "log", "silu", "rsqrt", "pow", "mean", "sum", "neg", "sigmoid",
                    "where", "clamp", "max", "min", "abs", "embedding"),
}


def synthetic_batch(vocab: int, batch: int, prompt: int, response: int, pad: int, seed: int = 0):
    import torch

    from rlhf_ray.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt - (i % 4),), generator=g).tolist() for i in range(batch)]
    responses = [torch.randint(3, vocab, (response,), generator=g).tolist() for _ in range(batch)]
    logprobs = [[-3.0] * response for _ in range(batch)]
    b = RolloutBatch.from_samples(prompts, responses, logprobs, ["length"] * batch, [[]] * batch, [""] * batch,
                                  [""] * batch, pad)
    shape = b.response_mask.shape
    return b.with_(old_logprobs=b.gen_logprobs, ref_logprobs=b.gen_logprobs, values=torch.zeros(shape),
                   advantages=torch.randn(shape, generator=g), returns=torch.randn(shape, generator=g))


def make_learner(model_path: str, reward_path: str, zero: int, args):
    from actors.learner import LearnerActor
    from rlhf_ray.config import DeepSpeedConfig, OptimizerConfig, PPOConfig
    from rlhf_ray.objectives import LearnerSpec

    spec = LearnerSpec(objective="ppo", model=model_path, value_model=reward_path, value_init="reward",
                       mini_batch_size=args.mini, micro_batch_size=args.micro, epochs=1, optimizer_steps=1000,
                       optimizer=OptimizerConfig(lr=1e-6), deepspeed=DeepSpeedConfig(zero_stage=zero, precision="fp32"),
                       ppo=PPOConfig(rollout_batch_size=args.batch, mini_batch_size=args.mini,
                                     micro_batch_size=args.micro), num_cpus=1)
    learner = LearnerActor(spec, 0)
    with socket.socket() as s:  # rank 0 of a group of one: a free local port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner._rendezvous = socket.create_server(("127.0.0.1", port))
    learner.setup("127.0.0.1", port)
    return learner


def group_of(name: str) -> str:
    low = name.lower().removeprefix("aten::")
    for group, fragments in GROUPS.items():
        if any(low == f or low.startswith(f + "_") or f in low for f in fragments if len(f) > 3 or low == f):
            return group
    return "other"


def profile_step(learner, batch) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        learner.evaluate(batch, logprobs=False)
        learner.train(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    return {"self_cpu_s_total": total,
            "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scaled:llama-20m")
    parser.add_argument("--reward", default=None, help="critic source (default: the model's -reward twin for scaled:, "
                                                       "tiny:reward for tiny:)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage (one per run: DeepSpeed sets up once a process)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mini", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--response", type=int, default=32)
    parser.add_argument("--out", default=None)
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="as resources.keep_freed_memory=false (default: keep it, as the roles do)")
    args = parser.parse_args()
    from actors.common import KEEP_FREED_MEMORY_ENV

    keeps = all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY_ENV.items())
    if not args.release_freed_memory and not keeps:  # glibc reads its settings at process start: start again
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY_ENV})
    from transformers import AutoConfig

    from rlhf_ray.cluster.machine import describe, machine_info
    from rlhf_ray.models.specs import resolve_model

    reward = args.reward or (args.model + "-reward" if args.model.startswith("scaled:") else "tiny:reward")
    model_path, reward_path = resolve_model(args.model), resolve_model(reward)
    config = AutoConfig.from_pretrained(model_path)
    batch = synthetic_batch(config.vocab_size, args.batch, args.prompt, args.response, config.pad_token_id or 0)
    results = []
    learner = make_learner(model_path, reward_path, args.zero, args)  # one DeepSpeed engine per process
    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        learner.configure_compute(threads={"score": threads, "learn": threads})
        evaluate, train = [], []
        for i in range(args.steps + 1):
            _, e = learner.evaluate(batch, logprobs=False)
            _, t = learner.train(batch)
            if i:  # the first is a warm-up
                evaluate.append(e)
                train.append(t)
        row = {"zero": args.zero, "threads": threads, "values_pass_s": statistics.fmean(evaluate),
               "update_s": statistics.fmean(train)}
        results.append(row)
        print(f"ZeRO-{args.zero}, {threads} thread(s): values pass {row['values_pass_s']:.3f} s, "
              f"update {row['update_s']:.3f} s", flush=True)
    threads = thread_counts[-1]
    profiled = profile_step(learner, batch)
    learner.shutdown()
    print(f"\nprofile (ZeRO-{args.zero}, {threads} threads), self CPU seconds by kind of work:")
    for group, seconds in profiled["groups_s"].items():
        print(f"  {group:16s} {seconds:7.3f}  {seconds / profiled['self_cpu_s_total']:6.1%}")
    print("top operators:")
    for op in profiled["top_ops"][:15]:
        print(f"  {op['op']:40s} {op['self_cpu_s']:7.3f} s  {op['calls']:6d} calls")
    machine = machine_info()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"learner_profile_{args.model.split(':')[-1]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "critic": reward, "keep_freed_memory": not args.release_freed_memory,
                               "shape": {k: getattr(args, k) for k in (
        "batch", "mini", "micro", "prompt", "response")}, "settings": results, "profile": profiled,
        "machine": machine}, indent=2) + "\n")
    print(f"machine: {describe(machine)}\nwrote {out}")


if __name__ == "__main__":
    main()
