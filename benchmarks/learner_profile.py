"""How close the PPO learner runs to this CPU's limit, and where its time goes: padded vs padding-free, full vs chunked
logits, fp32 vs bf16 — the real learner role (DeepSpeed engine, AdamW, PPO loss) on the same ragged rollout.

    python benchmarks/learner_profile.py [--model scaled:llama-20m] [--settings before,after,after-bf16]
                                         [--steps 3] [--batch 16 --mini 8 --micro 4 --prompt 48 --response 48]

Measures first this CPU's matrix-multiply peak (a 2048³ torch.mm on the learner's threads, fp32 and bf16), then runs
each setting in its own process (DeepSpeed sets up once per process):

    before       padded rows, full-vocabulary logits, fp32      (deepspeed.padding_free=false, logits_chunk_tokens=0)
    after        padding-free rows, chunked logits, fp32        (the defaults)
    after-bf16   the same in bf16 (deepspeed.precision=bf16, ZeRO-1: fp32 master weights and gradient accumulation)

For each: the values pass and the update's seconds (mean after a warm-up step), the peak memory of the update, the
learner's achieved GFLOP/s — useful model FLOPs only (6 · parameters · real tokens for an update, 2 · … for a forward;
the LM head counted on response tokens only, attention scores not counted) — and its share of the matmul peak in the
same precision, and one profiled step's time by kind of work: matmuls, the LM head and log-softmax ("logits"),
attention, optimizer, communication, copies, elementwise; "padding" is the compute spent on padded positions (their
share of the positions computed × the compute time). Rollout rows have prompts of prompt/2…prompt and responses of
response/4…response tokens (uniform, seeded), as PPO's responses vary. Writes JSON and a Markdown table
(default benchmarks/results/learner_profile_<model>.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "before": {"padding_free": False, "logits_chunk_tokens": 0, "precision": "fp32", "zero_stage": 0},
    "after": {"padding_free": True, "logits_chunk_tokens": None, "precision": "fp32", "zero_stage": 0},
    "after-bf16": {"padding_free": True, "logits_chunk_tokens": None, "precision": "bf16", "zero_stage": 1},
}
GROUPS = {  # operator name fragments -> what kind of work it is (the first match wins; "logits" is found by shape)
    "communication": ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast", "gloo",
                      "c10d", "record_param_comms"),
    "optimizer": ("adam", "_fused_adamw", "lerp", "_foreach"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "matmul / linear": ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm"),
    "logits": ("log_softmax", "_log_softmax", "logsumexp", "softmax"),
    "copies / fills": ("copy_", "to", "_to_copy", "clone", "contiguous", "fill_", "zero_", "zeros", "empty", "cat",
                       "index", "gather", "scatter", "new_zeros", "masked_scatter", "nonzero"),
    "elementwise": ("mul", "add", "sub", "div", "exp", "log", "silu", "rsqrt", "pow", "mean", "sum", "neg", "sigmoid",
                    "where", "clamp", "max", "min", "abs", "embedding", "tanh"),
}
COMPUTE = ("matmul / linear", "logits", "attention", "elementwise")


def matmul_peak(threads: int, dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n³ matrix product on ``threads`` threads (best of ``repeats``, after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def ragged_batch(vocab: int, batch: int, prompt: int, response: int, pad: int, seed: int = 0):
    """A rollout with prompts of prompt/2…prompt and responses of response/4…response tokens, PPO's fields filled."""
    import torch

    from rlhf_ray.data.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    length = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(3, vocab, (length(prompt // 2, prompt),), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(3, vocab, (length(max(1, response // 4), response),), generator=g).tolist()
                 for _ in range(batch)]
    b = RolloutBatch.from_samples(prompts, responses, [[-3.0] * len(r) for r in responses], ["length"] * batch,
                                  [[]] * batch, [""] * batch, [""] * batch, pad)
    mask = b.response_mask
    return b.with_(old_logprobs=b.gen_logprobs, ref_logprobs=b.gen_logprobs, values=torch.zeros_like(mask),
                   advantages=torch.randn(mask.shape, generator=g) * mask, returns=torch.randn(mask.shape, generator=g) * mask)


def make_learner(model_path: str, reward_path: str, setting: dict, args):
    from rlhf_ray.actors.learner import LearnerActor
    from rlhf_ray.config import DeepSpeedConfig, OptimizerConfig, PPOConfig
    from rlhf_ray.objectives import LearnerSpec
    from rlhf_ray.objectives.ppo import PPOOptions

    ds = DeepSpeedConfig(zero_stage=setting["zero_stage"], precision=setting["precision"],
                         padding_free=setting["padding_free"], logits_chunk_tokens=setting["logits_chunk_tokens"])
    spec = LearnerSpec(objective="ppo", model=model_path,
                       mini_batch_size=args.mini, micro_batch_size=args.micro, epochs=1, optimizer_steps=1000,
                       optimizer=OptimizerConfig(lr=1e-6), deepspeed=ds,
                       export_dtype="bfloat16" if setting["precision"] == "bf16" else "float32",
                       options=PPOOptions(value_model=reward_path, value_init="reward",
                                          ppo=PPOConfig(rollout_batch_size=args.batch, mini_batch_size=args.mini,
                                                        micro_batch_size=args.micro)),
                       num_cpus=args.threads)
    learner = LearnerActor(spec, 0)
    with socket.socket() as s:  # rank 0 of a group of one: a free local port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner._rendezvous = socket.create_server(("127.0.0.1", port))
    learner.setup("127.0.0.1", port)
    learner.configure_compute(threads={"score": args.threads, "learn": args.threads})
    return learner


def useful_gflop(module, batch) -> dict[str, float]:
    """Model GFLOPs the values pass and the update need on this batch's real tokens (see the module docstring)."""
    def body(model) -> int:  # parameters a token passes through, less the input embedding (a lookup)
        return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()

    policy, critic = module.policy, module.value.backbone
    tokens, response = float(batch.attention_mask.sum()), float(batch.response_mask.sum())
    head = policy.get_output_embeddings().weight.numel()
    policy_flops = 2 * (body(policy.base_model) * tokens + head * response)
    critic_flops = 2 * body(critic) * tokens
    return {"values_pass": critic_flops / 1e9, "update": 3 * (policy_flops + critic_flops) / 1e9}


def group_of(name: str, shapes, vocab: int) -> str:
    low = name.lower().removeprefix("aten::")
    for group, fragments in GROUPS.items():
        if any(low == f or low.startswith(f + "_") or (len(f) > 3 and f in low) for f in fragments):
            if group == "matmul / linear" and any(vocab in (s or []) for s in shapes or []):
                return "logits"  # the LM head's product: one of its operands spans the vocabulary
            return group
    return "other"


def profile_step(learner, batch, vocab: int, padding_share: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        learner.evaluate(batch, logprobs=False)
        learner.train(batch)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups: dict[str, float] = {}
    for e in events:
        key = group_of(e.key, e.input_shapes, vocab)
        groups[key] = groups.get(key, 0.0) + e.self_cpu_time_total / 1e6
    groups["padding (estimated)"] = padding_share * sum(groups.get(g, 0.0) for g in COMPUTE)
    return {"self_cpu_s_total": total, "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "shares": {k: v / total for k, v in groups.items()}}


def run_setting(name: str, args) -> dict:
    """One setting in this process: timings, memory, FLOPs, profile."""
    import torch
    from transformers import AutoConfig

    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.runtime.memory import process_memory

    setting = SETTINGS[name]
    model_path, reward_path = resolve_model(args.model), resolve_model(args.critic)
    config = AutoConfig.from_pretrained(model_path)
    batch = ragged_batch(config.vocab_size, args.batch, args.prompt, args.response, config.pad_token_id or 0)
    learner = make_learner(model_path, reward_path, setting, args)
    module = learner.engine.module
    evaluate, train, peaks = [], [], []
    for i in range(args.steps + 1):
        _, e = learner.evaluate(batch, logprobs=False)
        before = process_memory(reset_peak=True)["rss_gb"]
        stats, t = learner.train(batch)
        peaks.append(process_memory()["peak_gb"] - before)
        if i:  # the first is a warm-up
            evaluate.append(e)
            train.append(t)
    real = float(batch.attention_mask.sum())
    padding_share = stats["learn/padding_share"]
    flops = useful_gflop(module, batch)
    row = {"setting": name, **setting, "values_pass_s": statistics.fmean(evaluate), "update_s": statistics.fmean(train),
           "update_peak_gb_above_start": max(peaks[1:]), "real_tokens": real, "padding_share": padding_share,
           "useful_gflop": flops, "parameters": sum(p.numel() for p in module.parameters()),
           "entropy": stats.get("entropy"), "loss_policy": stats.get("loss/policy")}
    row["gflops"] = {"values_pass": flops["values_pass"] / row["values_pass_s"],
                     "update": flops["update"] / row["update_s"]}
    row["profile"] = profile_step(learner, batch, config.vocab_size, padding_share)
    learner.shutdown()
    del torch
    return row


def table(rows: list[dict], peaks: dict) -> str:
    lines = ["| setting | values pass s | update s | update GFLOP/s | of matmul peak | update peak GB | padding share "
             "| time: logits | padding | optimizer | communication |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["profile"]["shares"]
        lines.append(f"| {r['setting']} | {r['values_pass_s']:.3f} | {r['update_s']:.3f} | {r['gflops']['update']:.1f} | "
                     f"{r['gflops']['update'] / peaks[r['precision']]:.1%} | {r['update_peak_gb_above_start']:.2f} | "
                     f"{r['padding_share']:.1%} | {s.get('logits', 0):.1%} | {s.get('padding (estimated)', 0):.1%} | "
                     f"{s.get('optimizer', 0):.1%} | {s.get('communication', 0):.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scaled:llama-20m")
    parser.add_argument("--critic", default=None, help="critic source (default: the model's -reward twin for scaled:, "
                                                       "tiny:reward for tiny:, else the model itself)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mini", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--response", type=int, default=48)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.critic = args.critic or (args.model + "-reward" if args.model.startswith("scaled:") else
                                  "tiny:reward" if args.model.startswith("tiny:") else args.model)
    if args.child:
        print("RESULT" + json.dumps(run_setting(args.child, args)), flush=True)
        return
    from rlhf_ray.cluster.machine import describe, machine_info
    from rlhf_ray.runtime.memory import KEEP_FREED_MEMORY_ENV

    peaks = {dtype: matmul_peak(args.threads, dtype) for dtype in ("fp32", "bf16")}
    print(f"matmul peak on {args.threads} threads: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
          flush=True)
    rows = []
    for name in args.settings.split(","):
        cmd = [sys.executable, *sys.argv, "--child", name]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **KEEP_FREED_MEMORY_ENV})
        results = [line[len("RESULT"):] for line in done.stdout.splitlines() if line.startswith("RESULT")]
        if done.returncode or not results:
            raise SystemExit(f"setting {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        row = json.loads(results[-1])
        rows.append(row)
        print(f"{name}: values pass {row['values_pass_s']:.3f} s, update {row['update_s']:.3f} s "
              f"({row['gflops']['update']:.1f} GFLOP/s = {row['gflops']['update'] / peaks[row['precision']]:.1%} of "
              f"the {row['precision']} peak), update peak +{row['update_peak_gb_above_start']:.2f} GB, padding "
              f"{row['padding_share']:.1%} of computed positions", flush=True)
        for group, seconds in row["profile"]["groups_s"].items():
            print(f"    {group:22s} {seconds:7.3f} s  {row['profile']['shares'][group]:6.1%}")
    machine = machine_info()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"learner_profile_{args.model.split(':')[-1]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = {k: getattr(args, k) for k in ("batch", "mini", "micro", "prompt", "response", "threads", "steps")}
    out.write_text(json.dumps({"model": args.model, "critic": args.critic, "shape": shape, "matmul_peak_gflops": peaks,
                               "settings": rows, "machine": machine}, indent=2) + "\n")
    md = table(rows, peaks)
    out.with_suffix(".md").write_text(
        f"# Learner profile: {args.model} (critic {args.critic})\n\n{md}\n\nMatmul peak ({args.threads} threads, "
        f"2048³): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s. Shape: {shape}.\n\n"
        f"Machine: {describe(machine)}\n")
    print(md)
    print(f"machine: {describe(machine)}\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
