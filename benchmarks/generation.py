"""Generation throughput: the vLLM engine (set up as the generation role does) vs Hugging Face ``generate``.

    python benchmarks/generation.py [--models tiny,20m,smollm2] [--engines vllm,hf] [--batch-sizes 16,64]
        [--new-tokens 32,128] [--grid smollm2=16x32,64x32,16x128] [--reps 3] [--threads 2[,1]] [--out-dir DIR]

    e.g. a quick check: python benchmarks/generation.py --models tiny,20m --batch-sizes 16 --new-tokens 32 --reps 1

Generated tokens per second for the same prompt token ids at each (batch, new tokens) point, per model:
- ``tiny`` = ``tiny:policy`` with the prompts and data settings of configs/tiny_cpu.yaml;
- ``20m`` = ``scaled:llama-20m`` and ``smollm2`` = ``real:smollm2-135m``, both with those of
  configs/smollm2_cpu.yaml (chat prompts rendered with the tokenizer's chat template);
  prompts go through ``rlhf_ray.data.sources.load_prompts``, so the ids are exactly what PPO generates from. A batch of
  B prompts is the first B of the file (repeated when B exceeds it).
- vLLM: ``LLM(...)`` with the generation role's arguments and CPU environment (actors/generation.py: in-process
  V1 engine, 1 GiB KV cache, fp32, eager, processed logprobs, max_model_len = max_prompt_tokens + the largest
  new-token count), one ``SamplingParams`` per prompt with its own seed (``rlhf_ray.drivers.rollout.sampling_seeds``),
  ``logprobs=0``, temperature 1, top_p 1, ``ignore_eos=True, max_tokens=N``; the prefix cache is reset before
  every run (as after each weight load in PPO), so no run reuses an earlier run's prefill.
- HF: ``AutoModelForCausalLM`` in fp32 on the CPU, all prompts of the batch in one left-padded ``generate``
  call: ``do_sample=True, temperature=1, top_k=0, top_p=1`` (top_k=0: generate's default would be 50, vLLM
  samples from the full vocabulary), ``min_new_tokens=max_new_tokens=N``; by default with
  ``output_scores=True`` and the sampled tokens' logprobs gathered from them inside the timed region, the
  work vLLM does for ``logprobs=0`` (``--no-hf-logprobs`` times bare ``generate``).
Both sides must produce exactly B x N tokens (checked). Each engine of each model runs in its own subprocess
(they never share a process, its thread pools or memory) with ``torch.set_num_threads(--threads)`` before
anything else (default: all usable cores; a list, e.g. 2,1, runs each). Per point: one warm-up run (not counted),
``--reps`` timed runs, median tokens/s; vLLM's engine start (``LLM(...)``) and HF's model load are timed
separately. A failed point (or a failed or timed-out worker) is recorded with its error and the run goes on.
Defaults: tiny and 20m at batch 16, 64 x 32, 128 new tokens, smollm2 (slow under HF) at 16x32, 64x32, 16x128.

Run it on an otherwise idle machine: with as many threads as cores, every other process taking a core makes
OpenMP's barriers wait for a descheduled thread and the timings collapse (seen: 17-85x slower). The CPU that
other processes took while each engine ran is measured (/proc/stat minus the worker's own CPU time), recorded,
shown in the table, and warned about.

Writes a Markdown table (printed too) to <out-dir>/generation.md and every raw timing plus the machine
(CPU model, cores, RAM, load, torch/transformers/vllm versions, date, git commit) to <out-dir>/generation.json
(default out-dir: benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (model spec, config whose data section and seed the prompts come from)
MODELS = {
    "tiny": ("tiny:policy", ROOT / "configs" / "tiny_cpu.yaml"),
    "20m": ("scaled:llama-20m", ROOT / "configs" / "smollm2_cpu.yaml"),
    "smollm2": ("real:smollm2-135m", ROOT / "configs" / "smollm2_cpu.yaml"),
}
ENGINES = ("vllm", "hf")
DEFAULT_BATCH_SIZES, DEFAULT_NEW_TOKENS = [16, 64], [32, 128]
# SmolLM2's HF generate is the slow corner of the grid: fewer points by default (--grid overrides).
DEFAULT_GRIDS = {"smollm2": "16x32,64x32,16x128"}
# The LLM(...) arguments of GenerationActor.__init__ (actors/generation.py has no constant for them: keep in step);
# its CPU environment is shared with every engine (rlhf_ray.runtime.engines.CPU_ENV).
VLLM_ROLE_ARGS = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.85,
                      logprobs_mode="processed_logprobs")


# ---------------------------------------------------------------------------------------------- workers

def load_batch_prompts(model: str, batch_sizes: list[int]):
    """(model path, tokenizer, {batch size: prompt token id lists}, config) for ``model``."""
    from transformers import AutoTokenizer

    from rlhf_ray.config import load_config
    from rlhf_ray.data.sources import load_prompts
    from rlhf_ray.models.specs import resolve_model

    spec, config = MODELS[model]
    cfg = load_config(config)
    path = resolve_model(spec, cfg.models.cache_dir, cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [p.token_ids for p in load_prompts(cfg.data, tokenizer).prompts]
    batches = {b: [prompts[i % len(prompts)] for i in range(b)] for b in batch_sizes}
    return path, tokenizer, batches, cfg


def prompt_stats(batch: list[list[int]]) -> dict:
    lengths = [len(p) for p in batch]
    return {"prompt_tokens_mean": statistics.fmean(lengths), "prompt_tokens_min": min(lengths),
            "prompt_tokens_max": max(lengths)}


def run_worker(args) -> None:
    """One engine for one model over all its points; the result JSON is rewritten after every point."""
    import torch

    result = {"engine": args.worker, "model": args.model, "points": []}
    out = Path(args.result)
    # progress to the driver's stdout (this process's own output, vLLM's logs included, goes to its log file)
    progress = os.fdopen(args.progress_fd, "w", buffering=1) if args.progress_fd is not None else sys.stdout

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")

    torch.set_num_threads(args.threads)
    points = [tuple(map(int, p.split("x"))) for p in args.points.split(",")]
    path, tokenizer, batches, cfg = load_batch_prompts(args.model, sorted({b for b, _ in points}))
    max_model_len = cfg.data.max_prompt_tokens + max(n for _, n in points)
    result.update(model_path=path, spec=MODELS[args.model][0], config=MODELS[args.model][1].name, seed=cfg.seed,
                  data=cfg.data.model_dump(), max_model_len=max_model_len)
    try:
        prepare, generate = (setup_vllm if args.worker == "vllm" else setup_hf)(path, tokenizer, cfg, max_model_len,
                                                                               args, result)
    except Exception as err:  # the engine did not start: every point fails with its error
        result["setup_error"] = f"{type(err).__name__}: {err}"
        result["setup_traceback"] = traceback.format_exc()
        save()
        raise
    result["torch_threads"] = torch.get_num_threads()
    save()
    start_s = result.get("engine_start_s", result.get("load_s"))
    print(f"[{args.worker} {args.model}] {'engine start' if args.worker == 'vllm' else 'model load'} {start_s:.1f} s, "
          f"{result['torch_threads']} torch threads", file=progress, flush=True)
    for batch_size, new_tokens in points:
        batch = batches[batch_size]
        point = {"batch": batch_size, "new_tokens": new_tokens, **prompt_stats(batch), "runs": []}
        result["points"].append(point)
        try:
            for rep in range(args.reps + 1):  # rep 0: warm-up
                prepared = prepare(batch, new_tokens, rep)  # untimed: seeds, sampling params, cache reset
                start = time.perf_counter()
                produced = generate(batch, new_tokens, prepared)
                seconds = time.perf_counter() - start
                if produced != batch_size * new_tokens:
                    raise RuntimeError(f"generated {produced} tokens, expected {batch_size} x {new_tokens}")
                run = {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}
                if rep == 0:
                    point["warmup"] = run
                else:
                    point["runs"].append(run)
                print(f"[{args.worker} {args.model}] {batch_size}x{new_tokens} {'warm-up' if rep == 0 else rep}: "
                      f"{seconds:.2f} s, {produced / seconds:.0f} tokens/s", file=progress, flush=True)
            point["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in point["runs"])
            point["median_seconds"] = statistics.median(r["seconds"] for r in point["runs"])
        except Exception as err:
            point["error"] = f"{type(err).__name__}: {err}"
            point["traceback"] = traceback.format_exc()
            print(f"[{args.worker} {args.model}] {batch_size}x{new_tokens} failed: {point['error']}", file=progress,
                  flush=True)
        point["torch_threads"] = torch.get_num_threads()
        save()


def setup_vllm(path, tokenizer, cfg, max_model_len, args, result):
    from rlhf_ray.runtime.engines import CPU_ENV

    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    result["env"] = {k: os.environ.get(k) for k in (*CPU_ENV, "OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                                                   "LD_PRELOAD")}
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rlhf_ray.drivers.rollout import sampling_seeds

    start = time.perf_counter()
    llm = LLM(model=path, seed=cfg.seed, max_model_len=max_model_len, **VLLM_ROLE_ARGS)
    result["engine_start_s"] = time.perf_counter() - start
    result["engine_args"] = {"seed": cfg.seed, "max_model_len": max_model_len, **VLLM_ROLE_ARGS}
    # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op: threads are fixed from here on
    result["torch_set_num_threads_patched_by_vllm"] = torch.set_num_threads.__name__ != "set_num_threads"
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        result["scheduler"] = {"max_num_seqs": sched.max_num_seqs,
                               "max_num_batched_tokens": sched.max_num_batched_tokens}
    except AttributeError:
        pass

    def prepare(batch, new_tokens, rep):
        # every PPO step follows a weight load, which empties the prefix cache: no run reuses the last one's prefill
        llm.reset_prefix_cache()
        seeds = sampling_seeds(cfg.seed, rep, len(batch)) if args.vllm_seeds == "per-request" else [None] * len(batch)
        return [SamplingParams(n=1, max_tokens=new_tokens, temperature=1.0, top_p=1.0, ignore_eos=True, logprobs=0,
                               seed=seed) for seed in seeds]

    def generate(batch, new_tokens, params):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        produced = 0
        for out in outputs:
            sample = out.outputs[0]
            if sample.logprobs is None or len(sample.logprobs) != len(sample.token_ids):
                raise RuntimeError("vLLM returned no logprob for some sampled token")
            produced += len(sample.token_ids)
        return produced

    return prepare, generate


def setup_hf(path, tokenizer, cfg, max_model_len, args, result):
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result["load_s"] = time.perf_counter() - start
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result["generate_args"] = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                               "min_new_tokens": "N", "max_new_tokens": "N", "padding": "left", "pad_token_id": pad,
                               "output_scores": args.hf_logprobs, "logprobs_gathered": args.hf_logprobs}

    def prepare(batch, new_tokens, rep):
        torch.manual_seed(cfg.seed + rep)

    def generate(batch, new_tokens, _):
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad, output_scores=args.hf_logprobs,
                                 return_dict_in_generate=True)
            tokens = out.sequences[:, width:]
            if args.hf_logprobs:  # the sampled tokens' logprobs after temperature, as vLLM's processed logprobs
                logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                                        for t, s in enumerate(out.scores)], 1)
                if logprobs.shape != tokens.shape:
                    raise RuntimeError(f"{logprobs.shape[1]} scores for {tokens.shape[1]} tokens")
        return tokens.numel()

    return prepare, generate


# ------------------------------------------------------------------------------------------------ driver

def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), or None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_engine(engine: str, model: str, threads: int, points: list[tuple[int, int]], args, log_dir: Path) -> dict:
    """Run one worker subprocess; its result, with every point it did not record marked failed, and how much CPU
    other processes took meanwhile (machine busy time − the worker's own CPU time: the contention)."""
    tag = f"{model}_{engine}_{threads}t"
    result_file, log_file = log_dir / f"{tag}.json", log_dir / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model", model,
           "--points", ",".join(f"{b}x{n}" for b, n in points), "--reps", str(args.reps),
           "--threads", str(threads), "--result", str(result_file), "--vllm-seeds", args.vllm_seeds,
           "--hf-logprobs" if args.hf_logprobs else "--no-hf-logprobs"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    sys.stdout.flush()
    progress_fd = os.dup(sys.stdout.fileno())  # the worker's progress lines; its own output goes to the log
    cmd += ["--progress-fd", str(progress_fd)]
    start, busy_before, own_before = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(progress_fd,),
                                  timeout=args.worker_timeout)
            failure = f"worker exited with status {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            failure = f"worker timed out after {args.worker_timeout} s"
        finally:
            os.close(progress_fd)
    wall, busy_after, own = time.perf_counter() - start, busy_cpu_seconds(), children_cpu_seconds() - own_before
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"engine": engine, "model": model, "points": []}
    result.update(engine=engine, model=model, threads=threads, worker_wall_s=wall, worker_cpu_s=own,
                  load_average_after=load_average())
    if busy_before is not None and busy_after is not None:
        result["other_processes_cores"] = max(0.0, (busy_after - busy_before - own) / wall)
        if result["other_processes_cores"] > args.busy_warning:
            print(f"[{engine} {model}] WARNING: other processes used {result['other_processes_cores']:.2f} cores on "
                  f"average meanwhile: these timings are contended", flush=True)
    if failure:
        tail = log_file.read_text(errors="replace").splitlines()[-args.log_tail:]
        result.update(worker_error=failure, log_tail=tail)
        print(f"[{engine} {model}] {failure}; last log lines:\n  " + "\n  ".join(tail), flush=True)
    reason = result.get("setup_error") or failure or "not run"
    for p in result["points"]:  # a point the worker died in
        if "median_tokens_per_s" not in p and "error" not in p:
            p["error"] = reason
    recorded = {(p["batch"], p["new_tokens"]) for p in result["points"]}
    result["points"] += [{"batch": b, "new_tokens": n, "runs": [], "error": reason}
                         for b, n in points if (b, n) not in recorded]
    for p in result["points"]:
        if "median_tokens_per_s" in p:
            print(f"[{engine} {model}] {p['batch']}x{p['new_tokens']}: median {p['median_tokens_per_s']:.0f} tokens/s",
                  flush=True)
        else:
            print(f"[{engine} {model}] {p['batch']}x{p['new_tokens']}: FAILED ({p['error']})", flush=True)
    return result


def fmt(value, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(workers: list[dict], machine: dict, settings: dict) -> str:
    from rlhf_ray.cluster.machine import describe

    lines = ["# Generation throughput: vLLM engine vs HF generate", "",
             f"{describe(machine)} (at the start); torch threads {machine['torch_threads']}.",
             "",
             f"Generated tokens/s, median of {settings['reps']} timed runs after one warm-up; every response is "
             "exactly N tokens (vLLM `ignore_eos`, HF `min_new_tokens`). vLLM: the generation role's engine "
             f"(in-process V1, fp32, eager), {'one' if settings['vllm_seeds'] == 'per-request' else 'no'} seed per "
             "request, `logprobs=0`. HF: one left-padded `generate` per batch, fp32, top_k=0, "
             + ("`output_scores=True` and the sampled tokens' logprobs gathered." if settings["hf_logprobs"]
                else "no scores or logprobs.")
             + " Each engine in its own process with the given torch threads. Raw timings: generation.json.",
             "",
             "| model | params | threads | batch | new tokens | prompt tokens (mean) | vLLM tokens/s | HF tokens/s |"
             " vLLM / HF | vLLM s | HF s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    errors = []

    def cell(point: dict | None, key: str, spec: str) -> str:
        if point is None:
            return "—"  # engine not run
        if key in point:
            return fmt(point[key], spec)
        if key == "median_tokens_per_s":
            errors.append(" ".join(point.get("error", "not run").split())[:400])
            return f"error [{len(errors)}]"
        return "—"

    groups: dict = {}
    for w in workers:
        groups.setdefault((w["model"], w["threads"]), {})[w["engine"]] = w
    params = {w["model"]: w["parameters"] for w in workers if w.get("parameters")}
    for (model, threads), engines in groups.items():
        by_point: dict = {}
        for engine, w in engines.items():
            for p in w["points"]:
                by_point.setdefault((p["batch"], p["new_tokens"]), {})[engine] = p
        for (batch, new_tokens), pts in sorted(by_point.items()):
            v, h = pts.get("vllm"), pts.get("hf")
            prompt = next((p["prompt_tokens_mean"] for p in pts.values() if "prompt_tokens_mean" in p), None)
            ratio = (f"{v['median_tokens_per_s'] / h['median_tokens_per_s']:.2f}×"
                     if v and h and "median_tokens_per_s" in v and "median_tokens_per_s" in h else "—")
            row = [model, f"{params[model] / 1e6:.1f}M" if model in params else "—", str(threads), str(batch),
                   str(new_tokens), fmt(prompt, ".1f"), cell(v, "median_tokens_per_s", ".0f"),
                   cell(h, "median_tokens_per_s", ".0f"), ratio, cell(v, "median_seconds", ".2f"),
                   cell(h, "median_seconds", ".2f")]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per engine process: start-up (not in the tokens/s: vLLM `LLM(...)`, HF `from_pretrained`), the "
              "torch threads it ran with, and the CPU other processes took while it ran (cores, mean; above "
              f"{settings['busy_warning']} the timings are contended):", "",
              "| model | engine | threads | start-up s | torch threads | other processes' cores | wall s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for w in workers:
        lines.append(f"| {w['model']} | {w['engine']} | {w['threads']} | "
                     f"{fmt(w.get('engine_start_s', w.get('load_s')), '.1f')} | {w.get('torch_threads', '—')} | "
                     f"{fmt(w.get('other_processes_cores'), '.2f')} | {fmt(w.get('worker_wall_s'), '.0f')} |")
    if errors:
        lines += ["", "Errors:", "", *[f"{i}. {e}" for i, e in enumerate(errors, 1)]]
    return "\n".join(lines) + "\n"


def parse_points(text: str) -> list[tuple[int, int]]:
    points = []
    for item in text.split(","):
        batch, sep, new_tokens = item.strip().partition("x")
        if not sep or not batch.isdigit() or not new_tokens.isdigit() or int(batch) < 1 or int(new_tokens) < 1:
            raise argparse.ArgumentTypeError(f"bad point {item!r}: write BATCHxNEW_TOKENS, e.g. 16x32")
        points.append((int(batch), int(new_tokens)))
    return points


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be ≥ 1")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {list(ENGINES)}")
    parser.add_argument("--batch-sizes", type=int_list, default=None,
                        help=f"prompts per batch (default {','.join(map(str, DEFAULT_BATCH_SIZES))})")
    parser.add_argument("--new-tokens", type=int_list, default=None,
                        help=f"tokens generated per prompt (default {','.join(map(str, DEFAULT_NEW_TOKENS))})")
    parser.add_argument("--grid", action="append", default=[], metavar="MODEL=BxN,BxN",
                        help="a model's own points instead of batch-sizes x new-tokens (repeatable); default "
                             + " ".join(f"{m}={g}" for m, g in DEFAULT_GRIDS.items())
                             + " unless --batch-sizes or --new-tokens is given")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per point (one warm-up run is added)")
    parser.add_argument("--threads", type=int_list, default=[usable_cpus()],
                        help=f"torch threads per engine process, a list runs each (default: all usable cores, "
                             f"{usable_cpus()})")
    parser.add_argument("--vllm-seeds", choices=["per-request", "none"], default="per-request",
                        help="per-request seeds as the generation role uses (default), or none")
    parser.add_argument("--hf-logprobs", action=argparse.BooleanOptionalAction, default=True,
                        help="HF: output_scores and gather the sampled tokens' logprobs (default on)")
    parser.add_argument("--busy-warning", type=float, default=0.1,
                        help="warn when other processes took more than this many cores during an engine's run")
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per engine subprocess")
    parser.add_argument("--log-tail", type=int, default=30, help="log lines kept for a failed worker")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    # internal: one engine subprocess
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--points", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--progress-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        run_worker(args)
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for names, known in ((models, MODELS), (engines, ENGINES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}: use some of {list(known)}")
    if args.reps < 1:
        parser.error("--reps must be ≥ 1")
    full = [(b, n) for b in args.batch_sizes or DEFAULT_BATCH_SIZES for n in args.new_tokens or DEFAULT_NEW_TOKENS]
    grids = {m: full for m in models}
    if args.batch_sizes is None and args.new_tokens is None:  # an explicit grid applies to every model
        grids.update({m: parse_points(text) for m, text in DEFAULT_GRIDS.items() if m in grids})
    for item in args.grid:
        model, sep, text = item.partition("=")
        if not sep or model not in MODELS:
            parser.error(f"--grid {item!r}: write MODEL=BxN,BxN with MODEL one of {list(MODELS)}")
        try:
            points = parse_points(text)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
        if model in grids:
            grids[model] = points

    from rlhf_ray.cluster.machine import describe, machine_info

    machine = {**machine_info(), "torch_threads": args.threads}
    settings = {"models": {m: {"spec": MODELS[m][0], "config": MODELS[m][1].name} for m in models},
                "grids": {m: [f"{b}x{n}" for b, n in pts] for m, pts in grids.items()}, "engines": engines,
                "reps": args.reps, "warmup_runs": 1, "threads": args.threads, "vllm_seeds": args.vllm_seeds,
                "hf_logprobs": args.hf_logprobs, "vllm_role_args": VLLM_ROLE_ARGS, "busy_warning": args.busy_warning}
    print(f"{describe(machine)}; torch threads {args.threads}; grid "
          + "; ".join(f"{m}: {','.join(g)}" for m, g in settings["grids"].items()), flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        for model in models:
            for threads in args.threads:
                for engine in engines:
                    workers.append(run_engine(engine, model, threads, grids[model], args, Path(tmp)))
    record = {"machine": machine, "settings": settings, "total_wall_s": time.perf_counter() - started,
              "workers": workers}
    table = markdown(workers, machine, settings)
    print("\n" + table)
    (out_dir / "generation.md").write_text(table)
    (out_dir / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / 'generation.md'} and {out_dir / 'generation.json'} "
          f"({record['total_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
