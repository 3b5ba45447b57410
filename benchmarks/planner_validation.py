"""The planner's predicted PPO step against measured and published times (rlhf_ray.planning).

    .venv/bin/python benchmarks/planner_validation.py

Cases:
- this project's CPU runs (2 cores, fp32): benchmarks/results/ppo_step_tiny_cpu.json, vs_trl.json (rlhf-ray's
  tiny, 20m and smollm2 rows), learner_profile_llama-20m.json, real_model_smollm2_cpu.json: per phase;
- published PPO/GRPO runs: benchmarks/published_runs.yaml, one entry per published step time with its layout,
  source, quote and assumptions, planned by benchmarks/published_runs.py. Per case: the predicted and published
  step, the phase split (predicted, and published where given), the signed error, what the planner lacks for it
  ('needs'), and the median absolute error over the cases.

The planner's efficiencies are not fitted to any of these cases; nothing here feeds back into the planner.

Writes benchmarks/results/planner_validation.json and planner_validation.md.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from published_runs import CASES_FILE, PHASES, run_all  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.planning import plan_experiment, with_overrides  # noqa: E402
from rlhf_ray.planning.hardware import this_machine  # noqa: E402
from rlhf_ray.planning.timing import ROLE_CALL_OVERHEAD_S  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = ROOT / "configs" / "tiny_cpu.yaml"
MEASURED_KEYS = {"generate": "time/generate", "score": "time/score_wall", "learn": "time/learn",
                 "weight_sync": "time/weight_sync", "step": "time/step"}
# The CPU benchmarks ran on a 2-core AMD EPYC VM, not on the machine running this script. Its memory bandwidth was
# never measured: a 2-core slice of a DDR5 server is assumed to stream ~20 GB/s (read + write).
BENCHMARK_MACHINE_MEMORY_BANDWIDTH = 20e9
# The learner profile's settings planned here (benchmarks/learner_profile.py): 'before' pads its ragged batch and
# computes the logits whole, 'after' packs it (deepspeed.padding_free) and chunks the LM head: both fp32, ZeRO-0.
PROFILED_SETTINGS = ("before", "after")


# ------------------------------------------------------------------------------------------------ CPU

def benchmark_machine() -> tuple:
    """The 2-core machine the CPU benchmarks ran on: its fp32 and bf16 matmul peaks as the learner profile measured
    them (2 threads), 2 cores, the assumed memory bandwidth."""
    profile = json.loads((RESULTS / "learner_profile_llama-20m.json").read_text())
    peaks = profile["matmul_peak_gflops"]
    fp32, bf16 = peaks["fp32"] * 1e9, peaks["bf16"] * 1e9
    hw = this_machine(peak_flops_fp32=fp32, peak_flops_16bit=bf16, memory_bandwidth=BENCHMARK_MACHINE_MEMORY_BANDWIDTH,
                      cores=2)
    note = (f"fp32 / bf16 peaks = the matmul peaks learner_profile_llama-20m.json measured on that machine "
            f"({fp32 / 1e9:.0f} / {bf16 / 1e9:.0f} GFLOP/s, {profile['shape']['threads']} threads); memory "
            f"bandwidth assumed {BENCHMARK_MACHINE_MEMORY_BANDWIDTH / 1e9:.0f} GB/s")
    return hw, note


def padded_prompt_tokens(cfg) -> int:
    """Mean over seeded random rollout batches of the longest prompt in the batch: what the learner pads to."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.sources import load_prompts
    from rlhf_ray.models.specs import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.models.policy, cfg.models.cache_dir, cfg.seed))
    lengths = [len(p.token_ids) for p in load_prompts(cfg.data, tokenizer).prompts]
    rng, size = random.Random(0), cfg.ppo.rollout_batch_size
    return round(statistics.fmean(max(rng.sample(lengths, min(size, len(lengths)))) for _ in range(200)))


def vs_trl_overrides(workload: dict, model: str) -> list[str]:
    """The workload of benchmarks/vs_trl.py (its workload_overrides) as far as the planner reads it."""
    entry = workload["models"][model] if model in workload["models"] else {
        "policy": "real:smollm2-135m", "prompts": "configs/data/chat_prompts.jsonl", "template": "tokenizer",
        "max_prompt_tokens": 128}
    # smollm2's bench RM is SmolLM2-135M with a score head: the same architecture as real:smollm2-135m
    reward = entry.get("reward", "real:smollm2-135m")
    return [f"models.policy={entry['policy']}", "models.reference=null", "models.reward.kind=model",
            f"models.reward.model={reward}", f"models.reward.template={entry['template']}", "models.value_init=reward",
            "models.value_model=null", "models.dtype=float32", f"data.prompts={ROOT / entry['prompts']}",
            f"data.template={entry['template']}", f"data.max_prompt_tokens={entry['max_prompt_tokens']}",
            f"generation.max_new_tokens={workload['response_length']}", "generation.n_samples_per_prompt=1",
            f"ppo.rollout_batch_size={workload['rollout_batch']}", f"ppo.total_episodes={workload['rollout_batch']}",
            f"ppo.mini_batch_size={workload['mini_batch']}", f"ppo.micro_batch_size={workload['micro_batch']}",
            "ppo.epochs=1", "deepspeed.precision=fp32", "deepspeed.zero_stage=0",
            "deepspeed.gradient_checkpointing=false"]


def measured_phases(phase_dicts: list[dict]) -> dict:
    return {name: statistics.fmean(p[key] for p in phase_dicts) for name, key in MEASURED_KEYS.items()}


def cpu_cases() -> list[dict]:
    """(name, source, config path, overrides, measured phases) of each CPU measurement."""
    cases = []
    tiny = json.loads((RESULTS / "ppo_step_tiny_cpu.json").read_text())
    cases.append({"name": "tiny_cpu.yaml PPO step", "source": "benchmarks/results/ppo_step_tiny_cpu.json",
                  "config": "configs/tiny_cpu.yaml", "overrides": [],
                  "measured": {n: tiny["phases_mean_s"][k] for n, k in MEASURED_KEYS.items()}})
    trl = json.loads((RESULTS / "vs_trl.json").read_text())
    for model in ("tiny", "20m", "smollm2"):
        runs = [r for r in trl["runs"] if r["variant"] == "rlhf-ray" and r["model"] == model and r.get("phases")]
        if not runs:
            continue
        steps = [p for r in runs for p in r["phases"][trl["workload"]["warmup"]:]]
        cases.append({"name": f"vs_trl {model} (rlhf-ray side)", "source": "benchmarks/results/vs_trl.json",
                      "config": "configs/tiny_cpu.yaml", "overrides": vs_trl_overrides(trl["workload"], model),
                      "measured": measured_phases(steps)})
    real = json.loads((RESULTS / "real_model_smollm2_cpu.json").read_text())
    cases.append({"name": "smollm2_cpu.yaml PPO step", "source": "benchmarks/results/real_model_smollm2_cpu.json",
                  "config": "configs/smollm2_cpu.yaml", "overrides": [],
                  "measured": {n: real["phases_mean_s_excluding_first_step"][k] for n, k in MEASURED_KEYS.items()},
                  "measured_memory_gb": real["peak_memory_gb"]})
    return cases


def run_cpu_case(case: dict, hw) -> dict:
    # these runs synced weights through the object store (before the collective transport existed)
    cfg = load_config(ROOT / case["config"], case["overrides"] + ["weights.transport=object_store"])
    prompt = padded_prompt_tokens(cfg)
    cfg = with_overrides(cfg, [f"data.max_prompt_tokens={prompt}"])
    plan = plan_experiment(cfg, hw, search=False)
    predicted = {name: phase.seconds for name, phase in plan.phases.items()} | {"step": plan.step_seconds}
    out = {**case, "assumed": {"prompt_tokens (mean longest prompt of a batch)": prompt,
                               "response_tokens": cfg.generation.max_new_tokens,
                               "weights.transport": "object_store"},
           "predicted": predicted, "relative_error": _errors(predicted, case["measured"])}
    if "measured_memory_gb" in case:
        out["memory"] = _memory_check(plan, case["measured_memory_gb"])
    return out


def _memory_check(plan, measured_gb: dict) -> dict:
    """Predicted resident memory per role process (device + host items + process baseline) vs the measured peak."""
    from rlhf_ray.planning.memory import PROCESS_BASELINE_BYTES

    rows = {}
    for role in plan.roles:
        if role.role in measured_gb:
            predicted = (role.actor_bytes(0, "device") + role.actor_bytes(0, "host") + PROCESS_BASELINE_BYTES) / 2**30
            rows[role.role] = {"predicted_gib": predicted, "measured_gb": measured_gb[role.role],
                               "relative_error": predicted * 2**30 / (measured_gb[role.role] * 1e9) - 1}
    return rows


def learner_profile_case(hw, setting: str) -> dict:
    """The 20M learner's update and values pass alone (2 threads) in one of the profile's settings, planned with its
    ragged batch's real lengths. Not independent: the CPU peak is this profile's matmul measurement."""
    profile = json.loads((RESULTS / "learner_profile_llama-20m.json").read_text())
    shape = profile["shape"]
    row = next(r for r in profile["settings"] if r["setting"] == setting)
    # its ragged batch (benchmarks/learner_profile.py ragged_batch): prompts of prompt/2…prompt tokens, responses
    # making up the rest of the real tokens it reports
    prompt_mean = round(0.75 * shape["prompt"])
    response_mean = round(row["real_tokens"] / shape["batch"]) - prompt_mean
    chunk = "null" if row["logits_chunk_tokens"] is None else row["logits_chunk_tokens"]
    cfg = load_config(BASE, [
        f"planning.prompt_tokens_mean={prompt_mean}", f"planning.response_tokens_mean={response_mean}",
        f"models.policy={profile['model']}", f"models.reward.model={profile['critic']}", "models.value_init=reward",
        "models.value_model=null", f"data.max_prompt_tokens={shape['prompt']}",
        f"generation.max_new_tokens={shape['response']}", f"ppo.rollout_batch_size={shape['batch']}",
        f"ppo.total_episodes={shape['batch']}", f"ppo.mini_batch_size={shape['mini']}",
        f"ppo.micro_batch_size={shape['micro']}", f"deepspeed.zero_stage={row['zero_stage']}",
        f"deepspeed.precision={row['precision']}", f"deepspeed.padding_free={str(row['padding_free']).lower()}",
        f"deepspeed.logits_chunk_tokens={chunk}"])
    plan = plan_experiment(cfg, hw, search=False)
    predicted = {"learn (update)": plan.phases["learn"].seconds - ROLE_CALL_OVERHEAD_S,
                 # alone with both threads, as profiled: the pass's own work (not its share of a score phase)
                 "values pass": next(w.seconds for w in plan.work["values"].works if w.kind == "values")
                 - ROLE_CALL_OVERHEAD_S}
    measured = {"learn (update)": row["update_s"], "values pass": row["values_pass_s"]}
    return {"name": f"learner profile 20M (update, values pass; '{setting}': "
                    f"{'packed' if row['padding_free'] else 'padded'})",
            "source": "benchmarks/results/learner_profile_llama-20m.json", "config": "configs/tiny_cpu.yaml",
            "overrides": [], "independent": False, "measured": measured, "predicted": predicted,
            "relative_error": _errors(predicted, measured),
            "assumed": {"prompt_tokens (cap, mean)": (shape["prompt"], prompt_mean),
                        "response_tokens (cap, mean)": (shape["response"], response_mean)}}


# ------------------------------------------------------------------------------------------------ errors

# What changed in the planner after its first validation run, so that a reader can discount for it.
CHANGES_AFTER_FIRST_RUN = [
    "CPU decoding: the memory bandwidth is no longer discounted by the GPU's 0.6 decode efficiency (a CPU's "
    "bandwidth is a measured copy rate already). Before: generate +48 % (vs_trl 20m), +95 % (vs_trl smollm2), "
    "+78 % (smollm2_cpu.yaml); now within +18 … +51 %.",
    "Inter-node collectives: bounded by the node's NICs together (NCCL runs a ring per NIC), not by one NIC; "
    "and the published cases compare with the published system's own weight path instead of rlhf-ray's 'files' "
    "transport (kept in the JSON). Before both: median |error| of the published cases 165 %.",
    "vLLM prefills each prompt once for all its samples (n_samples_per_prompt).",
    "The planner's inputs of issue 27, merged: the published mean lengths go in as planning.* (compute by the means, "
    "memory and KV room by the caps, generation by the tail), causal attention FLOPs, packed learner tokens, "
    "Qwen3-30B-A3B as a mixture of experts (30.5B total, 3.3B active; was 3.3B dense), H20 / MI300X from the "
    "catalogue. Before (caps only): median |error| 47 % over the 30 cases, 38 % over the 27 with published lengths; "
    "after: 39 % and 38 %. No constant changed.",
    "CPU runs (issue 27, the balancer): roles sharing one machine's cores are planned with the run's own threads per "
    "phase (rlhf_ray.planning.cores), sharing a phase's cores max-min fairly, instead of adding up their work at all "
    "cores; overlapped steps put reward and reference on the rollout side. Score before: tiny -43 %, vs_trl tiny "
    "-40 %, 20m +21 %, smollm2 +33 %, smollm2_cpu.yaml -1 %; steps -39 / -27 / +24 / +24 / -28 %.",
]
# How the comparison itself changed when the cases moved to published_runs.yaml (no planner constant changed).
METHOD_CHANGES = [
    "DeepSpeed-Chat is planned as it ran, every role time-sharing the same GPUs (scoring passes added up), instead "
    "of the planner's own layout of separate roles; its errors were +80 / +47 / +109 / +242 % (8 GPUs) that way.",
    "OpenRLHF's learner offloads Adam to the CPU, as its scripts of the time did (--adam_offload); before: no offload "
    "(+56 / +18 / −12 / −29 % on the README cases).",
    "Generation in the published system's static batches where its source states them (NeMo-Aligner's rollout "
    "micro-batches of 8 / 16 per inference DP rank; OpenRLHF's micro_rollout_batch_size per actor rank in 2024): "
    "each batch waits for its longest response. NeMo-Aligner 8+4 / 16+8 / 32+16 / 64+32 nodes: −78 / −73 / −67 / "
    "−56 % before, −23 / −29 / −35 / −56 % after; OpenRLHF bench 7B / 13B / 34B / 70B: +66 / +23 / −39 / +11 % "
    "before, +101 / +68 / +6 / +11 % after (their responses are planned at the 1024 cap). Median |error| 39 % -> 34 % "
    "(all), 38 % -> 31 % (published lengths).",
    "DeepSpeed-Chat where the README's train.py ran the case, as its script ran it (DeepSpeedExamples e468799f, the "
    "release): OPT-6.7B on 8 GPUs by single_node/run_6.7b.sh (4 prompts per GPU, not 16: 32 per step; no gradient "
    "checkpointing), OPT-13B on 8 GPUs by single_node/run_13b.sh (16 per GPU, generation TP 2, not 1), OPT-66B on 64 "
    "GPUs by multi_node/run_66b.sh (README Example 3, 'Step 3 7.5hr': 4 per GPU, 256 per step, generation TP 8, not "
    "16 per GPU and TP 4). The published step is the run's hours over its steps, so the smaller batches shorten it; "
    "memory-bound decoding costs nearly as much per step for 4 sequences as for 16, so the prediction shortens less. "
    "6.7B / 13B / 66B-64: -18 / -31 / -59 % before, +51 / -39 / -47 % after; median |error| 34 % -> 38 % (all), "
    "31 % -> 35 % (published lengths). Kept although it moves the median away: it is how the source ran them.",
]


# Why a case misses by more than MISS_BEYOND, by the phase that misses (read off the results above; nothing here
# feeds back into the planner). A case beyond it without a note is listed as such.
MISS_BEYOND = 0.6
MISSES = {
    "openrlhf-readme-llama2-7b-16xa800":
        "no split published; planned with every answer at its 1024 cap (OpenRLHF published the caps only), which "
        "sizes generate and learn alike; the same workload's 8-GPU bench case shows both phases over",
    "openrlhf-bench-llama2-7b-8xa800":
        "generate+score +128 %, learn +68 %: both are sized by the response length, planned at the 1024 cap, and each "
        "static batch of 16 runs to it. OpenRLHF's own training-throughput column (75 TFLOPS per GPU over 403 s on "
        "the 4 actor and critic GPUs ≈ 1.2e17 FLOP) is about 0.7 of 6·N per token for 1024 sequences of 2048 tokens, "
        "if it counts that way: the real sequences were likely shorter than the caps. Needs the mean response length",
    "openrlhf-bench-llama2-13b-8xa800":
        "generate+score +89 %, learn +37 %: the 7B bench case's cause (every answer planned at the 1024 cap)",
    "dschat-opt-30b-64xa100":
        "no split published. The planner gives the same step on 8 and 64 GPUs (16 prompts per GPU either way: 42 s), "
        "the published step grows from 63 s to 112 s; what grows across nodes (the hybrid engine's gathers, ZeRO-3 "
        "traffic over the NICs) is small in the model at 8 × 200 Gb/s per node. Which phase is not known. No script "
        "of the release ran OPT-30B on 64 GPUs (train.py offers 66B only there), so its batch (16 per GPU, the "
        "footnote's maximum) and TP (2) are assumptions; with the 66B script's 4 per GPU the published step would be "
        "a quarter and the miss larger, not smaller",
    "dschat-opt-6.7b-8xa100":
        "no split published; planned as single_node/run_6.7b.sh ran it (4 prompts per GPU). At 4 sequences per GPU the "
        "step is mostly generation (3.7 of 5.4 s: 256 decode steps, each reading the 13 GB of weights once, bandwidth-"
        "bound); the hybrid engine's DeepSpeed-Inference kernels are not priced apart from vLLM's, which is the likely "
        "miss",
    "miles-qwen3-30b-a3b-grpo-8xmi300x":
        "generate −14 % holds; what misses is the rest, each phase of a 3.3B-active MoE on MI300X: score −90 % "
        "(31.5 s published, 3.3 s planned) and learn −82 % (95 s vs 17.5 s), because the planner prices a MoE's "
        "forward and backward at the dense MFUs (FORWARD_MFU / TRAIN_MFU of active-parameter FLOPs) and knows nothing "
        "of expert-parallel all-to-all, grouped expert GEMMs of 768-wide experts, or ROCm Megatron kernels; "
        "weight_sync −99 % (33.9 s vs 0.23 s), because SGLang's weight update moves the model tensor by tensor (48 "
        "layers × 128 experts × 3 matrices ≈ 18k tensors) and the planner prices one bandwidth-bound broadcast of "
        "the bytes; 'other' (75 s: data, rewards, Miles' own bookkeeping) is not modelled at all. No sourced "
        "constant for MoE efficiency or a per-tensor sync latency outside the validation cases was found in the time "
        "given, so none was added",
    "verl-qwen2.5-math-7b-dapo-32xh20":
        "every phase over (generate ×14, score ×50, learn ×53): no mean length published, so planned at the caps, "
        "2K + 28K tokens per sequence; the plan also flags the 4096 context the run raised to 32768",
    "verl-qwen2.5-math-7b-dapo-128xh20": "every phase over: the 32-GPU case's cause (planned at the 28K cap)",
    "verl-qwen3-30b-a3b-grpo-128xh20":
        "score +351 %, learn +597 %, generate −7 %: no mean length published, so scoring and learning are planned on "
        "10K-token sequences; generation runs to the longest response of a batch, near the cap either way",
}


def _errors(predicted: dict, measured: dict) -> dict:
    return {k: predicted[k] / measured[k] - 1 for k in measured if k in predicted and measured[k]}


def summary(cases: list[dict]) -> dict:
    """Median |error| over every case, over those whose response lengths are published, and over those that need no
    input the planner lacks; the geometric mean of predicted / published (the bias, not applied anywhere)."""
    def median_abs(rows):
        return statistics.median(abs(c["error"]) for c in rows) if rows else None

    published_lengths = [c for c in cases if c["lengths_published"]]
    complete = [c for c in published_lengths if not c["needs"]]
    return {"cases": len(cases), "median_abs_error": median_abs(cases),
            "cases_lengths_published": len(published_lengths),
            "median_abs_error_lengths_published": median_abs(published_lengths),
            "cases_needing_nothing": len(complete), "median_abs_error_needing_nothing": median_abs(complete),
            "beyond_60_percent": sum(abs(c["error"]) > 0.6 for c in published_lengths),
            "geometric_mean_predicted_over_published": math.exp(
                statistics.fmean(math.log(1 + c["error"]) for c in published_lengths))}


# ------------------------------------------------------------------------------------------------ output

def markdown(result: dict) -> str:
    lines = ["# Planner validation", "", "Predicted (rlhf_ray.planning) vs measured or published. Relative error = "
             "predicted / measured − 1. The planner's efficiencies are literature values, not fitted here.", ""]
    lines += cpu_markdown(result) + [""] + published_markdown(result)
    lines += ["", "## Changes made after seeing errors", "", *[f"- {c}" for c in result["changes_after_first_run"]],
              "", "Changes to the comparison (not the planner) when the cases moved to published_runs.yaml:", "",
              *[f"- {c}" for c in result["method_changes"]]]
    return "\n".join(lines) + "\n"


def cpu_markdown(result: dict) -> list[str]:
    lines = ["## This project's CPU runs (2 cores, fp32)", "", f"Machine: {result['cpu_machine']}", "",
             "| case | phase | measured s | predicted s | error |", "|---|---|---:|---:|---:|"]
    for case in result["cpu_cases"]:
        for phase, measured in case["measured"].items():
            lines.append(f"| {case['name']} | {phase} | {measured:.3f} | {case['predicted'][phase]:.3f} | "
                         f"{case['relative_error'][phase]:+.0%} |")
    for case in result["cpu_cases"]:
        for role, row in case.get("memory", {}).items():
            lines.append(f"| {case['name']} | peak memory {role} (GB) | {row['measured_gb']:.2f} | "
                         f"{row['predicted_gib'] * 2**30 / 1e9:.2f} | {row['relative_error']:+.0%} |")
    return lines


def published_markdown(result: dict) -> list[str]:
    s, cases = result["summary"], result["published_cases"]
    lines = ["## Published PPO/GRPO runs", "",
             f"{s['cases']} cases from `{CASES_FILE.name}` (models, layouts, lengths, batches, sources, quotes and "
             "assumptions are there). Step = one step of the case's rollout (whole runs divided by their steps). "
             "Split = generate / score / learn / weight sync (/ other) in seconds.", "",
             "| case | system | algo | model | GPUs | published step | predicted | error | published split | "
             "predicted split | needs |", "|---|---|---|---|---|---:|---:|---:|---|---|---|"]
    for c in cases:
        needs = "; ".join(c["needs"]) + ("" if c["lengths_published"] else "; lengths not published")
        lines.append(f"| {c['id']} | {c['system']} | {c['algorithm']} | {c['model']} | {c['gpus']} × {c['gpu']} | "
                     f"{_dur(c['published_step_s'])} | {_dur(c['predicted_step_s'])} | {c['error']:+.0%} | "
                     f"{_split(c['published_phases_s'])} | {_split(c['predicted_phases_s'])} | "
                     f"{needs.strip('; ') or '—'} |")
    lines += ["", f"Median |error|: all {s['cases']} cases {s['median_abs_error']:.0%}; the "
              f"{s['cases_lengths_published']} whose response lengths are published (a mean, or padded to the cap) "
              f"{s['median_abs_error_lengths_published']:.0%} ({s['beyond_60_percent']} beyond ±60 %); the "
              f"{s['cases_needing_nothing']} of those needing no input the planner lacks "
              f"{_pct(s['median_abs_error_needing_nothing'])}. Geometric mean of predicted / published (published "
              f"lengths): {s['geometric_mean_predicted_over_published']:.2f}.", "",
              "### Phases where the split is published", "",
              "| case | phase | published s | predicted s | error |", "|---|---|---:|---:|---:|"]
    for c in cases:
        for phase, row in c["phase_errors"].items():
            predicted = f"{row['predicted_s']:.1f}" if row["predicted_s"] is not None else "—"
            error = f"{row['error']:+.0%}" if row["error"] is not None else "—"
            lines.append(f"| {c['id']} | {phase} | {row['published_s']:.1f} | {predicted} | {error} |")
    lines += ["", "### Cases beyond ±60 %: which phase misses and why", ""]
    for c in (c for c in cases if abs(c["error"]) > MISS_BEYOND):
        lines.append(f"- {c['id']} ({c['error']:+.0%}): {MISSES.get(c['id'], 'no note yet')}")
    lines += ["", "How a case is planned: its config is tiny_cpu.yaml with the case's models, lengths (caps, and the "
              "published means as planning.prompt_tokens_mean / planning.response_tokens_mean), batches, DeepSpeed "
              "settings and role layout as overrides, on the case's GPUs (the catalogue's figures). Colocated runs "
              "(every role on the same GPUs) are planned with each role on the GPUs it time-shares, and their scoring "
              "passes added up. Where the source states that the system generates in static batches (NeMo-Aligner's "
              "rollout micro-batches, OpenRLHF's micro_rollout_batch_size of 2024), each engine's batch waits for its "
              "longest response before the next: the planner's generate phase of one batch, once per batch (the JSON "
              "keeps the continuous-batching figure beside it). Weights move by the planner's price of the broadcast, "
              "'collective' (the published "
              "systems broadcast or reshard over NCCL; rlhf-ray's own transport is in the JSON). An architecture "
              "missing from the planner's table is read from its config.json values in the case file (a mixture of "
              "experts by its MoE fields). These are other systems: an error includes what differs between them and "
              "rlhf-ray, not only the planner's.", "", "### Sources", ""]
    for c in cases:
        lines.append(f"- {c['id']}: {c['source']['url']} — {c['source']['where']}")
    return lines


def _split(phases: dict | None) -> str:
    if not phases:
        return "—"
    return " / ".join(f"{k} {_num(v)}" for k, v in phases.items())


def _num(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.3g}"


def _dur(seconds: float) -> str:
    return f"{_num(seconds)} s" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def main() -> None:
    hw, machine_note = benchmark_machine()
    cpu = [run_cpu_case(case, hw) for case in cpu_cases()] + [learner_profile_case(hw, s) for s in PROFILED_SETTINGS]
    published = run_all()
    result = {"cpu_machine": machine_note, "cpu_cases": cpu, "published_cases": published,
              "summary": summary(published), "phases": list(PHASES),
              "changes_after_first_run": CHANGES_AFTER_FIRST_RUN, "method_changes": METHOD_CHANGES}
    out = RESULTS / "planner_validation.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "planner_validation.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {out} and planner_validation.md")


if __name__ == "__main__":
    main()
