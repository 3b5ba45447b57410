"""rlhf-ray against TRL's PPO trainer on the same PPO workload: samples/s side by side.

    pip install --no-deps trl==1.12.0     # benchmark-only dependency (TRL 1.12: the last TRL with a PPO trainer)
    python benchmarks/vs_trl.py [--models tiny,20m,smollm2] [--steps 5] [--reps 2] [--ours KEY=VALUE ...]

Models (built offline once, through rlhf_ray.models.specs.resolve_model):
  tiny     policy tiny:policy, reward tiny:reward; the tiny prompts in the Tulu format
  20m      policy scaled:llama-20m, reward scaled:llama-20m-reward; the chat prompts in SmolLM2's chat template
  20m-v1k  policy scaled:llama-20m-v1k, reward scaled:llama-20m-v1k-reward (the same size with the tiny 656-token
           vocabulary: where the vocabulary is not the work); the chat prompts in the Tulu format
  smollm2  policy real:smollm2-135m, reward SmolLM2-135M with a seeded random score head (built once into
           <cache>/bench-smollm2-135m-reward-seed<seed>); the chat prompts in SmolLM2's chat template
On both sides: the same policy, reference (= the initial policy), reward model and critic (initialised from the
reward model: its score head is the value head), the same prompt token ids in the same order (rlhf-ray's loader
and its seeded prompt sampler), the same precision (--precision: fp32, or bf16 on both sides), the same PPO geometry (rollout of --batch prompts x 1 sample,
--response-length new tokens at temperature 1, one PPO epoch, mini-batch --mini-batch, micro-batch
--micro-batch; TRL: per_device_train_batch_size=micro, gradient_accumulation_steps=batch/micro (TRL's rollout
is per_device x accumulation), num_mini_batches=batch/mini, and its Accelerator set to accumulate mini/micro
micro-batches so that it takes an optimizer step per mini-batch as rlhf-ray does, instead of one per rollout),
the same lr (constant, no warmup), KL coefficient, clip ranges, vf_coef, gamma,
lambda, k1 KL, whitened advantages, unwhitened rewards, no EOS penalty, no gradient clipping (TRL's PPO does
not clip), AdamW (fused) with the same betas/eps and no weight decay.

Three variants per model, each measurement in a fresh Python process (its own thread pools and memory):
  rlhf-ray   PPOTrainer(cfg) driven in that process as benchmarks/ppo_step.py does (all roles Ray actors,
             vLLM generation); a step's time is its metrics["time/step"]. ``--ours KEY=VALUE`` adds overrides
             on this side only (meant for resources/thread settings).
  trl        TRL's experimental PPOTrainer as shipped (its loop calls gc.collect() twice per update);
  trl-nogc   the same with gc.collect patched to a no-op in trl.experimental.ppo.ppo_trainer.
With --lora RANK both sides train the policy as LoRA adapters (PEFT, alpha 2×RANK, every linear layer) and take the
reference from the base with the adapters off (TRL: peft_config and no ref_model; rlhf-ray: models.lora, the
adapters alone synced to vLLM's LoRA support); the critics stay fully trained.
TRL runs with torch's default thread count (reported). A TRL step's time is the interval between successive
``on_step_end`` callbacks (the first from ``on_train_begin``): one whole iteration of its update loop.
TRL's sample generations, evaluation, checkpoints and reporting are off.

The first --warmup step(s) of every measurement are left out; --steps steps are measured, --reps times per
(variant, model), the repetitions interleaved. Reported per (variant, model): the median step seconds over all
measured steps, samples/s = rollout sequences / median step, generated tokens/s = mean generated tokens per
measured step / median step, and rlhf-ray's samples/s over TRL's. A measurement that fails is recorded with its
error and the run goes on. Prints a Markdown table; writes benchmarks/results/vs_trl.json (machine, versions,
every per-step time) and the table beside it as vs_trl.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRL_VERSION = "1.12.0"
INSTALL_TRL = f"pip install --no-deps trl=={TRL_VERSION}"
BASE_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
MODELS = {
    "tiny": {"policy": "tiny:policy", "reward": "tiny:reward", "prompts": "configs/data/tiny_prompts.jsonl",
             "template": "tulu", "max_prompt_tokens": 64},
    "20m": {"policy": "scaled:llama-20m", "reward": "scaled:llama-20m-reward",
            "prompts": "configs/data/chat_prompts.jsonl", "template": "tokenizer", "max_prompt_tokens": 128},
    "20m-v1k": {"policy": "scaled:llama-20m-v1k", "reward": "scaled:llama-20m-v1k-reward",
                "prompts": "configs/data/chat_prompts.jsonl", "template": "tulu", "max_prompt_tokens": 128},
    "smollm2": {"policy": "real:smollm2-135m", "reward": "bench:smollm2-135m-reward",
                "prompts": "configs/data/chat_prompts.jsonl", "template": "tokenizer", "max_prompt_tokens": 128},
}
VARIANTS = {"rlhf-ray": "rlhf-ray", "trl": "TRL (as shipped)", "trl-nogc": "TRL (gc.collect off)"}
WORKLOAD_SECTIONS = ("models.", "data.", "generation.", "ppo.", "optimizer.", "deepspeed.", "seed")
DIFFERENCES = [
    "Generation: rlhf-ray samples with vLLM (CPU backend, unpadded prompts, paged KV cache) in its own actor; TRL "
    "with Hugging Face generate() on the left-padded batch (output_scores kept for the old logprobs).",
    "Processes: rlhf-ray runs every role as a Ray actor (generation, reward, reference, learner; reward, reference "
    "and the learner's value pass concurrently) and syncs the new policy weights into the engine after each update; "
    "TRL runs everything one after another in one process.",
    "Old logprobs: TRL takes them from the generation logits; rlhf-ray from vLLM's sampling logprobs "
    "(ppo.old_logprobs=auto: weights synced exactly, fp32, untruncated sampling), checked against the learner's "
    "on the update's first mini-batch. TRL runs its policy forwards with output_hidden_states=True.",
    "Stop token: TRL (stop_token='eos') truncates each response after its first EOS and scores the truncated text; "
    "rlhf-ray's vLLM stops a sequence at EOS. The random models rarely sample EOS, so nearly every response is "
    "--response-length tokens on both sides.",
    "Reward input: TRL scores the policy's own token ids (prompt + response); rlhf-ray's reward actor re-renders "
    "(prompt, response text) in models.reward.template (set to data.template here) with the RM's tokenizer.",
    "Padding: SmolLM2's tokenizer pads with its EOS (<|im_end|>), which also ends every chat turn; TRL masks by the "
    "pad id, so its side gets a separate [PAD] token, as TRL's own PPO example does (ids masked to 0 before any "
    "model call, the embeddings are not resized).",
    "Optimizer: both torch AdamW (fused); rlhf-ray's inside a DeepSpeed engine (ZeRO stage 0; in bf16 ZeRO-1, "
    "DeepSpeed's BF16_Optimizer with fp32 master weights), TRL's through Accelerate. rlhf-ray still computes the "
    "gradient norm for its metrics (no clipping on either side).",
    "Bookkeeping: rlhf-ray writes metrics.jsonl each step (samples and TensorBoard off); TRL logs its metrics "
    "through its callbacks (no reporting integrations).",
]


TRL_SETUP = [
    "trl.experimental.ppo.PPOTrainer (TRL 1.12.0), models loaded with from_pretrained in fp32 ({precision}), "
    "gradient_checkpointing=False, optim=adamw_torch_fused, lr_scheduler_type=constant, stop_token='eos', "
    "missing_eos_penalty=None, local_rollout_forward_batch_size=rollout batch, num_sample_generations=0, "
    "save_strategy='no', eval_strategy='no', report_to=[], disable_tqdm=True.",
    "Its shuffled train loader is replaced by a plain one over the prompt ids in rlhf-ray's order (same batches "
    "at the same steps); a plain loader also never sets Accelerate's end-of-dataloader flag, which would make "
    "every micro-batch an optimizer step in the last batch of an epoch.",
    "accelerator.gradient_accumulation_steps = mini-batch / micro-batch after construction: one optimizer step per "
    "mini-batch (TRL as configured would take one per rollout). optimizer_steps_per_update in each run checks it.",
]
TRL_PRECISION = {"fp32": "bf16=False",
                 "bf16": "bf16=True: Accelerate's bf16 autocast, with fp32 weights, gradients and optimizer"}


def trl_setup(precision: str) -> list[str]:
    """How the TRL side is built (TRL_SETUP in this precision), as recorded with each result."""
    return [TRL_SETUP[0].format(precision=TRL_PRECISION[precision])] + TRL_SETUP[1:]


# ------------------------------------------------------------------------------------------- models

def bench_reward_dir(seed: int, cache_dir=None) -> Path:
    from rlhf_ray.models.tiny import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / f"bench-smollm2-135m-reward-seed{seed}"


def build_smollm2_reward(seed: int, cache_dir=None) -> str:
    """SmolLM2-135M as a sequence-classification RM with a seeded random score head, built once."""
    root = bench_reward_dir(seed, cache_dir)
    if (root / "COMPLETE").exists():
        return str(root)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.models.real import save_model_dir
    from rlhf_ray.models.specs import resolve_model

    source = resolve_model("real:smollm2-135m", cache_dir, seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.normal(0.0, model.config.initializer_range, model.score.weight.shape,
                                              generator=generator))
    model.config.pad_token_id = tokenizer.pad_token_id
    save_model_dir(root, model, tokenizer, f"SmolLM2-135M + random score head, seed={seed}")
    return str(root)


def prepare_model(key: str, seed: int) -> dict:
    """The model entry with the reward spec resolved to something a config takes; builds what is missing."""
    from rlhf_ray.models.specs import resolve_model

    entry = dict(MODELS[key])
    if entry["reward"] == "bench:smollm2-135m-reward":
        entry["reward"] = build_smollm2_reward(seed)
    for spec in (entry["policy"], entry["reward"]):
        resolve_model(spec, None, seed)  # built now, not inside a measurement's startup
    return entry


def workload_overrides(entry: dict, args, total_steps: int, output_dir: str) -> list[str]:
    """The config overrides (on configs/tiny_cpu.yaml) that describe the workload; both sides read them."""
    return [
        f"output_dir={output_dir}", f"seed={args.seed}",
        f"models.policy={entry['policy']}", "models.reference=null", "models.reward.kind=model",
        f"models.reward.model={entry['reward']}", f"models.reward.template={entry['template']}",
        "models.value_init=reward", "models.value_model=null",
        f"models.dtype={'bfloat16' if args.precision == 'bf16' else 'float32'}",
        f"data.prompts={ROOT / entry['prompts']}", f"data.template={entry['template']}",
        f"data.max_prompt_tokens={entry['max_prompt_tokens']}",
        f"generation.max_new_tokens={args.response_length}", f"generation.temperature={args.temperature}",
        "generation.top_p=1.0", "generation.n_samples_per_prompt=1", "generation.stop=[]",
        f"ppo.rollout_batch_size={args.batch}", f"ppo.total_episodes={total_steps * args.batch}",
        f"ppo.mini_batch_size={args.mini_batch}", f"ppo.micro_batch_size={args.micro_batch}", "ppo.epochs=1",
        f"ppo.kl_coef={args.kl_coef}", "ppo.kl_estimator=k1", "ppo.non_eos_penalty=null", "ppo.reward_clip=null",
        "ppo.whiten_advantages=true", "ppo.whiten_rewards=false", "ppo.gamma=1.0", "ppo.lam=0.95",
        "ppo.clip_range=0.2", "ppo.value_clip_range=0.2", "ppo.vf_coef=0.1", "ppo.entropy_coef=0.0",
        f"optimizer.lr={args.lr}", "optimizer.schedule=constant", "optimizer.warmup_ratio=0.0",
        "optimizer.weight_decay=0.0", "optimizer.max_grad_norm=null",
        # bf16: ZeRO-1 is DeepSpeed's BF16_Optimizer (fp32 master weights and gradient accumulation) on one rank
        f"deepspeed.precision={args.precision}", f"deepspeed.zero_stage={1 if args.precision == 'bf16' else 0}",
        "deepspeed.gradient_checkpointing=false",
        "checkpoint.every_steps=0", "checkpoint.at_end=false", "checkpoint.on_signal=false",
        "logging.progress_bar=false", "logging.trackers=[]", "logging.samples_per_step=0",
        "logging.report=false", "logging.save_final_model=false",
        # --lora: the policy as LoRA adapters on both sides (TRL: peft_config, its reference = adapters off)
        *([f"models.lora.rank={args.lora}", f"models.lora.alpha={2 * args.lora}", "models.lora.target_modules=all-linear"]
          if args.lora else []),
    ]


# ------------------------------------------------------------------------------------------ workers

def run_ours(spec: dict) -> dict:
    """rlhf-ray: PPOTrainer driven in this process, as benchmarks/ppo_step.py does."""
    from rlhf_ray.config import load_config
    from rlhf_ray.drivers.ppo import PPOTrainer

    cfg = load_config(BASE_CONFIG, spec["overrides"] + spec["ours"])
    started = time.perf_counter()
    trainer = PPOTrainer(cfg)
    out = {"startup_s": time.perf_counter() - started, "step_s": [], "tokens": [], "phases": [],
           "resources": cfg.resources.model_dump(), "overrides_ours": spec["ours"]}
    try:
        for _ in range(spec["warmup"] + spec["steps"]):
            metrics = trainer.step()
            if not metrics:
                raise RuntimeError("a step returned no metrics (the learner was restarted)")
            out["step_s"].append(metrics["time/step"])
            out["tokens"].append(metrics["response/tokens"])
            out["phases"].append({k: v for k, v in metrics.items() if k.startswith("time/")})
    finally:
        trainer.shutdown()
        import ray

        ray.shutdown()
    return out


def run_trl(spec: dict, no_gc: bool) -> dict:
    """TRL 1.12's PPOTrainer on the same models, prompts (ids and order) and hyper-parameters."""
    import gc
    import types

    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    from rlhf_ray.config import load_config
    from rlhf_ray.data.sources import PromptSampler, load_prompts
    from rlhf_ray.models.specs import resolve_model

    cfg = load_config(BASE_CONFIG, spec["overrides"])
    ppo, gen, opt = cfg.ppo, cfg.generation, cfg.optimizer
    total_steps = spec["warmup"] + spec["steps"]
    policy_path = resolve_model(cfg.models.policy, cfg.models.cache_dir, cfg.seed)
    reward_path = resolve_model(cfg.models.reward.model, cfg.models.cache_dir, cfg.seed)

    # the prompts rlhf-ray would read at steps 0..total_steps-1, as token ids, in that order
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    prompts = load_prompts(cfg.data, tokenizer)
    sampler = PromptSampler(len(prompts), ppo.rollout_batch_size, cfg.seed, cfg.data.shuffle)
    ids = [prompts.prompts[i].token_ids for step in range(total_steps) for i in sampler.batch(step)]
    # TRL masks by the pad id: a pad that is also the EOS (SmolLM2's <|im_end|>, in every chat turn) would mask
    # prompt tokens, so give TRL its own pad token as its PPO example does (pad ids are set to 0 before any forward)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id \
            or any(tokenizer.pad_token_id in row for row in ids):
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    dataset = Dataset.from_dict({"input_ids": ids})

    dtype = torch.float32
    started = time.perf_counter()  # startup: loading the four models and building the trainer
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, dtype=dtype)

    output_dir = tempfile.mkdtemp(prefix="bench_vs_trl_trl_")
    config = PPOConfig(
        output_dir=output_dir, seed=cfg.seed, report_to=[], save_strategy="no", eval_strategy="no",
        push_to_hub=False, num_sample_generations=0, logging_steps=1, disable_tqdm=True,
        # bf16: Accelerate's bf16 mixed precision (autocast; fp32 weights and optimizer), as TRL users run it
        bf16=cfg.deepspeed.precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        # TRL's rollout (its local batch) is per_device_train_batch_size x gradient_accumulation_steps
        per_device_train_batch_size=ppo.micro_batch_size,
        gradient_accumulation_steps=ppo.rollout_batch_size // ppo.micro_batch_size,
        num_mini_batches=ppo.rollout_batch_size // ppo.mini_batch_size, num_ppo_epochs=ppo.epochs,
        total_episodes=total_steps * ppo.rollout_batch_size, local_rollout_forward_batch_size=ppo.rollout_batch_size,
        response_length=gen.max_new_tokens, temperature=gen.temperature, stop_token="eos",
        missing_eos_penalty=None, kl_coef=ppo.kl_coef, kl_estimator=ppo.kl_estimator, cliprange=ppo.clip_range,
        cliprange_value=ppo.value_clip_range, vf_coef=ppo.vf_coef, gamma=ppo.gamma, lam=ppo.lam,
        whiten_rewards=ppo.whiten_rewards,
        learning_rate=opt.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps, optim="adamw_torch_fused",
    )

    # instrumentation: step boundaries, gc.collect, generated tokens and generation time per update
    clock: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock.append(time.perf_counter())

    gc_calls: list[float] = []

    def collect(*a, **k):
        if no_gc:
            gc_calls.append(0.0)
            return 0
        t = time.perf_counter()
        found = gc.collect(*a, **k)
        gc_calls.append(time.perf_counter() - t)
        return found

    ppo_module.gc = types.SimpleNamespace(collect=collect)  # only the PPO trainer module's gc.collect()
    tokens: list[int] = []
    generate_s: list[float] = []
    batch_generation = ppo_module.batch_generation
    eos = tokenizer.eos_token_id

    def timed_generation(model, queries, *a, **k):
        t = time.perf_counter()
        query_responses, logits = batch_generation(model, queries, *a, **k)
        generate_s.append(time.perf_counter() - t)
        responses = query_responses[:, queries.shape[1]:]
        hit = responses == eos  # length up to and including the first EOS (TRL truncates after it)
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, responses.shape[1])
        tokens.append(int(lengths.sum()))
        return query_responses, logits

    ppo_module.batch_generation = timed_generation

    peft = {}
    if cfg.models.lora is not None:  # TRL wraps the policy itself and disables the adapters for its reference
        from peft import LoraConfig

        lora = cfg.models.lora
        reference, peft = None, {"peft_config": LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                            target_modules=lora.target_modules, task_type="CAUSAL_LM")}
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[StepClock()], **peft)
    # rlhf-ray's prompt order instead of TRL's shuffled loader (same ids, same batches, same steps)
    trainer.dataloader = DataLoader(dataset, batch_size=ppo.rollout_batch_size, shuffle=False,
                                    collate_fn=trainer.data_collator, drop_last=True)
    # TRL's Accelerator accumulates gradient_accumulation_steps micro-batches (= the whole rollout) per optimizer
    # step whatever num_mini_batches is; step once per mini-batch instead, as rlhf-ray (and PPO) does
    trainer.accelerator.gradient_accumulation_steps = ppo.mini_batch_size // ppo.micro_batch_size
    optimizer_steps: list[float] = []
    torch_optimizer = trainer.optimizer.optimizer  # under Accelerate's wrapper, which skips non-sync steps
    torch_optimizer.register_step_pre_hook(lambda *_: optimizer_steps.append(time.perf_counter()))
    startup = time.perf_counter() - started
    gc_before = len(gc_calls)
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    step_s = [b - a for a, b in zip(clock, clock[1:])]
    if len(step_s) != total_steps:
        raise RuntimeError(f"TRL ran {len(step_s)} updates, expected {total_steps}")
    calls = gc_calls[gc_before:]
    per_step = len(calls) // total_steps if total_steps else 0
    per_update = [sum(a <= t < b for t in optimizer_steps) for a, b in zip(clock, clock[1:])]
    return {"startup_s": startup, "step_s": step_s, "tokens": tokens, "generate_s": generate_s,
            "optimizer_steps_per_update": per_update, "optimizer": type(torch_optimizer).__name__,
            "optimizer_fused": bool(torch_optimizer.defaults.get("fused")),
            "torch_threads": torch.get_num_threads(), "gc_collect_calls_per_step": per_step,
            "gc_collect_s": [sum(calls[i * per_step:(i + 1) * per_step]) for i in range(total_steps)]
            if per_step else [], "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "tokenizer_padding_side": tokenizer.padding_side}


def worker(variant: str, spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    try:
        result = run_ours(spec) if variant == "rlhf-ray" else run_trl(spec, no_gc=variant == "trl-nogc")
        result["ok"] = True
    except BaseException as err:  # recorded, the driver goes on with the next measurement
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(result_file).write_text(json.dumps(result) + "\n")
    if not result["ok"]:
        print(result["traceback"], file=sys.stderr)
        sys.exit(1)


# -------------------------------------------------------------------------------------------- driver

def measure(variant: str, spec: dict, timeout: float, log_dir: Path, tag: str) -> dict:
    """One measurement in a fresh Python process; its stdout/stderr go to log_dir/<tag>.log."""
    spec_file, result_file, log_file = (log_dir / f"{tag}.spec.json", log_dir / f"{tag}.result.json",
                                        log_dir / f"{tag}.log")
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", str(spec_file),
               "--result", str(result_file)]
    started = time.perf_counter()
    error = None
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env=env)
            if proc.returncode and not result_file.exists():
                error = f"worker exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - started
    if error is None and result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {"ok": False, "error": error or "no result written"}
    if not result["ok"]:
        result["log_tail"] = log_file.read_text(errors="replace")[-4000:]
        result.pop("traceback", None)
    result["process_wall_s"] = wall
    return result


def summarize(runs: list[dict], rollout: int, warmup: int) -> dict:
    ok = [r for r in runs if r["ok"]]
    steps = [s for r in ok for s in r["step_s"][warmup:]]
    tokens = [t for r in ok for t in r["tokens"][warmup:]]
    out = {"measurements": len(runs), "failed": len(runs) - len(ok), "measured_steps": len(steps)}
    if steps:
        median = statistics.median(steps)
        out.update({"median_step_s": median, "mean_step_s": statistics.fmean(steps),
                    "min_step_s": min(steps), "max_step_s": max(steps),
                    "per_rep_median_step_s": [statistics.median(r["step_s"][warmup:]) for r in ok],
                    "samples_per_s": rollout / median,
                    "generated_tokens_per_step": statistics.fmean(tokens),
                    "generated_tokens_per_s": statistics.fmean(tokens) / median})
    return out


def markdown(result: dict) -> str:
    from rlhf_ray.cluster.machine import describe

    rows = ["| model | framework | median step s | samples/s | generated tokens/s | rlhf-ray samples/s ÷ this |"
            " steps (failed runs) |", "|---|---|---:|---:|---:|---:|---|"]
    for model, variants in result["summary"].items():
        ours = variants.get("rlhf-ray", {}).get("samples_per_s")
        for variant, s in variants.items():
            if "median_step_s" in s:
                ratio = f"{ours / s['samples_per_s']:.2f}×" if ours and variant != "rlhf-ray" else ""
                cells = [f"{s['median_step_s']:.3f}", f"{s['samples_per_s']:.2f}",
                         f"{s['generated_tokens_per_s']:.0f}", ratio]
            else:
                cells = ["failed", "", "", ""]
            rows.append(f"| {model} | {VARIANTS[variant]} | " + " | ".join(cells)
                        + f" | {s['measured_steps']} ({s['failed']}) |")
    w = result["workload"]
    notes = [f"Rollout {w['rollout_batch']} prompts × 1 sample, {w['response_length']} new tokens, temperature "
             f"{w['temperature']}, 1 PPO epoch, mini-batch {w['mini_batch']}, micro-batch {w['micro_batch']}, "
             f"{w.get('precision', 'fp32')}, "
             + (f"LoRA rank {w['lora_rank']} (alpha {2 * w['lora_rank']}, all linear layers) on both sides, "
                if w.get("lora_rank") else "") +
             f"lr {w['lr']}, KL coef {w['kl_coef']}; {w['warmup']} warm-up step(s) dropped, {w['steps']} measured × "
             f"{w['reps']} rep(s). TRL torch threads: {result.get('trl_torch_threads')}. "
             f"rlhf-ray overrides: {' '.join(w['ours']) or 'none'}.",
             f"TRL: per_device_train_batch_size={w['trl']['per_device_train_batch_size']}, "
             f"gradient_accumulation_steps={w['trl']['gradient_accumulation_steps']}, "
             f"num_mini_batches={w['trl']['num_mini_batches']}, its Accelerator accumulating "
             f"{w['trl']['accelerator_gradient_accumulation_steps']} micro-batches (an optimizer step per mini-batch), "
             "the prompts in rlhf-ray's order; gc.collect off = patched to a no-op in "
             "trl.experimental.ppo.ppo_trainer (TRL calls it twice per update).",
             f"Machine: {describe(result['machine'])}."]
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes) + "\n\nStill different:\n" + "".join(
        f"- {d}\n" for d in result["differences"])


def trl_missing() -> str | None:
    """Why TRL's PPO trainer cannot be used here, or None."""
    import importlib.metadata as md
    import importlib.util

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # find_spec imports trl.experimental
    try:
        installed = md.version("trl")
    except md.PackageNotFoundError:
        return "TRL is not installed"
    if installed != TRL_VERSION:
        return f"TRL {installed} is installed; this benchmark uses TRL {TRL_VERSION}, the last with a PPO trainer"
    if importlib.util.find_spec("trl.experimental.ppo") is None:
        return f"TRL {installed} has no trl.experimental.ppo"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,20m,smollm2", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps left out of every measurement")
    parser.add_argument("--reps", type=int, default=2, help="measurements per (variant, model), interleaved")
    parser.add_argument("--batch", type=int, default=16, help="prompts per rollout (1 sample each)")
    parser.add_argument("--response-length", type=int, default=32, help="new tokens per response")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--mini-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both sides: rlhf-ray's learner in DeepSpeed bf16 (ZeRO-1) with the engine and frozen "
                             "models in bf16; TRL with bf16=True (Accelerate's autocast)")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="train the policy as LoRA adapters of this rank (alpha 2×rank, every linear layer) on "
                             "both sides; the critic stays fully trained on both; 0: full fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for the rlhf-ray side only (e.g. resources.learner.num_cpus=1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds to wait between measurements (a finished run's Ray processes are reaped)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_trl.json"))
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs (their folder is printed)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.spec, args.result)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, known, flag in ((models, MODELS, "--models"), (variants, VARIANTS, "--variants")):
        unknown = [n for n in name if n not in known]
        if unknown or not name:
            parser.error(f"{flag}: unknown {unknown or 'empty'}; use some of {', '.join(known)}")
    if any(v.startswith("trl") for v in variants):
        why = trl_missing()
        if why:
            print(f"{why}. Install it (a benchmark-only dependency, without its dependencies) with:\n\n"
                  f"    {INSTALL_TRL}\n", file=sys.stderr)
            sys.exit(2)
    if args.batch % args.mini_batch or args.mini_batch % args.micro_batch:
        parser.error("--mini-batch must divide --batch and --micro-batch must divide --mini-batch")
    workload_keys = [o for o in args.ours if o.split("=", 1)[0].startswith(WORKLOAD_SECTIONS)]
    if workload_keys:
        print(f"warning: --ours {' '.join(workload_keys)} changes the workload on the rlhf-ray side only: "
              "the comparison is no longer like for like", file=sys.stderr)

    total_steps = args.warmup + args.steps
    if os.getloadavg()[0] > 0.5:
        print(f"warning: 1-minute load average {os.getloadavg()[0]:.1f} before starting: other work on this machine "
              "skews the timings (each run records the load average before and after it)", file=sys.stderr)
    entries, runs = {}, []
    for model in models:
        try:
            entries[model] = prepare_model(model, args.seed)
        except Exception as err:
            print(f"{model}: could not prepare the models: {type(err).__name__}: {err}", file=sys.stderr)
            for rep in range(args.reps):
                runs += [{"model": model, "variant": v, "rep": rep, "ok": False,
                          "error": f"preparing the models: {type(err).__name__}: {err}"} for v in variants]
    from rlhf_ray.config import load_config

    for model, entry in entries.items():  # a bad --ours key or geometry fails here, not in every measurement
        try:
            load_config(BASE_CONFIG, workload_overrides(entry, args, total_steps, "unused") + args.ours)
        except ValueError as err:
            parser.error(f"{model}: {err}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench_vs_trl_logs_"))
    plan = [(rep, model, variant) for rep in range(args.reps) for model in models if model in entries
            for variant in variants]
    for i, (rep, model, variant) in enumerate(plan, 1):
        output_dir = tempfile.mkdtemp(prefix="bench_vs_trl_ours_")
        spec = {"overrides": workload_overrides(entries[model], args, total_steps, output_dir), "ours": args.ours,
                "warmup": args.warmup, "steps": args.steps}
        if i > 1:
            time.sleep(args.pause)
        print(f"[{i}/{len(plan)}] {model} {variant} rep {rep + 1}/{args.reps} ...", end=" ", flush=True)
        load_before = os.getloadavg()[0]
        result = measure(variant, spec, args.timeout, log_dir, f"{model}-{variant}-{rep}")
        result["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
        shutil.rmtree(output_dir, ignore_errors=True)
        if result["ok"]:
            measured = result["step_s"][args.warmup:]
            print(f"median {statistics.median(measured):.3f} s/step over {len(measured)} steps "
                  f"(warm-up {sum(result['step_s'][:args.warmup]):.2f} s, startup {result['startup_s']:.1f} s)",
                  flush=True)
        else:
            print(f"FAILED: {result['error']}", flush=True)
        runs.append({"model": model, "variant": variant, "rep": rep, **result})

    rollout = args.batch
    summary = {model: {variant: summarize([r for r in runs if r["model"] == model and r["variant"] == variant],
                                          rollout, args.warmup) for variant in variants} for model in models}
    for variants_summary in summary.values():
        ours = variants_summary.get("rlhf-ray", {}).get("samples_per_s")
        for variant, s in variants_summary.items():
            if variant != "rlhf-ray" and ours and s.get("samples_per_s"):
                s["rlhf_ray_speedup"] = ours / s["samples_per_s"]
    threads = sorted({r["torch_threads"] for r in runs if r.get("torch_threads")})
    from rlhf_ray.cluster.machine import machine_info

    result = {
        "benchmark": "vs_trl", "machine": machine_info(),
        "workload": {"models": {m: {k: MODELS[m][k] if k != "reward" else entries.get(m, MODELS[m])[k]
                                    for k in MODELS[m]} for m in models},
                     "rollout_batch": args.batch, "samples_per_prompt": 1, "response_length": args.response_length,
                     "temperature": args.temperature, "mini_batch": args.mini_batch, "micro_batch": args.micro_batch,
                     "ppo_epochs": 1, "lr": args.lr, "kl_coef": args.kl_coef, "seed": args.seed,
                     "precision": args.precision, "lora_rank": args.lora,
                     "warmup": args.warmup, "steps": args.steps, "reps": args.reps, "ours": args.ours,
                     "trl": {"per_device_train_batch_size": args.micro_batch,
                             "gradient_accumulation_steps": args.batch // args.micro_batch,
                             "accelerator_gradient_accumulation_steps": args.mini_batch // args.micro_batch,
                             "num_mini_batches": args.batch // args.mini_batch, "num_ppo_epochs": 1,
                             "setup": trl_setup(args.precision)}},
        "trl_torch_threads": threads[0] if len(threads) == 1 else threads or None,
        "summary": summary, "differences": DIFFERENCES, "runs": runs,
    }
    table = markdown(result)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.keep_logs or any(not r["ok"] for r in runs):
        print(f"worker logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
