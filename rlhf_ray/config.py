"""One typed, validated config tree for a whole experiment.

Loaded from YAML (``configs/*.yaml``) with ``key=value`` overrides (dotted paths, values parsed as
YAML: ``ppo.kl_coef=0.1``, ``generation.stop=['\\n\\n']``). A dotted path changes one key and keeps the rest of
its section; a mapping value replaces the whole mapping (``models.reward.function_kwargs={}`` drops the YAML's
arguments; ``models.reward.function_kwargs.max_words=40`` changes one). Every field is documented once, here.
Unknown keys, wrong types and impossible combinations fail before anything starts, with a one-line
message naming the key. Nothing is silently rewritten.

    python -m rlhf_ray.config configs/tiny_cpu.yaml ppo.kl_coef=0.1   # prints the resolved tree
    python -m rlhf_ray.config --rm --help                             # reward-model training keys (--sft, --dpo)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and says how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardConfig(_Strict):
    kind: Literal["model", "function", "http", "serve"] = Field(
        "model", description="Reward backend (rlhf_ray.rewards.backends): 'model': a frozen HF sequence-classification RM "
                             "in the reward actors; 'function': a Python callable; 'http': a remote endpoint speaking "
                             "the rlhf-ray/reward/v1 JSON schema (rlhf_ray.rewards.http); 'serve': an RM deployed as a "
                             "shared Ray Serve application (python -m rlhf_ray.rm serve).")
    model: Optional[str] = Field(
        None, description="RM hub name, local path or 'tiny:reward'. Required when kind='model'.")
    function: Optional[str] = Field(
        None, description="'module:function' taking (prompt: str, response: str) -> float. Required when kind='function'.")
    function_kwargs: dict = Field(
        default_factory=dict, description="Extra keyword arguments for the reward function (e.g. {char: 'e'}).")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How (prompt, response) text is rendered for the RM: Tulu chat format or the RM tokenizer's own chat template.")
    max_length: int = Field(1024, gt=0, description="RM input tokens; longer inputs keep their end (the response).")
    batch_size: int = Field(
        8, gt=0, description="Sequences per RM forward pass (kind='model'); samples per request (kind='http').")
    url: Optional[str] = Field(
        None, description="kind='http': the endpoint samples are POSTed to (http:// or https://), e.g. "
                          "http://127.0.0.1:8001/ or a Serve RM's http://127.0.0.1:8000/NAME.")
    timeout_s: float = Field(
        60.0, gt=0, description="kind='http': seconds one request may take; kind='serve': seconds one scoring call "
                                "may take. A slow answer is an error naming the endpoint (not retried).")
    retries: int = Field(
        3, ge=0, description="kind='http': retries of a request after a connection error or HTTP 429/500/502/503/504.")
    backoff_s: float = Field(
        0.5, ge=0, description="kind='http': exponential back-off between retries (urllib3: the first retry at once, the "
                              "n-th after backoff_s × 2^(n-1) seconds; a Retry-After header is honoured).")
    outage_s: float = Field(
        300.0, ge=0, description="kind='http': how long an outage of the endpoint is ridden out. When a request still "
                                 "fails after its `retries` (a connection error, HTTP 429/500/502/503/504), it is tried "
                                 "again with back-off (up to 10 s and outage_s / 10 apart) until the endpoint has been "
                                 "unreachable for this long, and the driver's console says so once a minute; then the "
                                 "run stops, checkpointing its finished steps (checkpoint.on_error). 0: stop after "
                                 "`retries`. outage_s + timeout_s must fit in timeouts.score_s.")
    token_env: Optional[str] = Field(
        None, description="kind='http': name of an environment variable holding a bearer token, sent as "
                          "'Authorization: Bearer …' (the token itself never goes into the config). It must be set "
                          "where the reward actors run (the driver's environment for a Ray the run starts itself).")
    app: Optional[str] = Field(
        None, description="kind='serve': name of the Ray Serve RM application (python -m rlhf_ray.rm list). The run "
                          "must join that cluster: ray.address or RAY_ADDRESS.")
    normalize: Literal["none", "stored", "running"] = Field(
        "none", description="Score normalisation before PPO: 'stored': (score - mean) / std with the statistics saved "
                            "with the RM (<RM dir>/reward_stats.json, written by RM training; kind='model' or "
                            "'serve'); 'running': with the running mean/std of every score seen so far in the run "
                            "(kept in checkpoints); 'none': raw scores.")
    clip: Optional[float] = Field(
        None, gt=0, description="Clamp normalised scores to ±clip; null disables. Applied after normalize (and before "
                                "ppo.reward_clip, which clamps what comes out of here).")


class LoRAConfig(_Strict):
    """The policy trained as low-rank adapters on its frozen weights (PEFT): W x + (alpha / rank) · B A x."""
    rank: int = Field(16, gt=0, description="The adapters' rank r.")
    alpha: float = Field(32.0, gt=0.0, description="Scale numerator: the adapters' output is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training. Above 0 the "
                                                            "learner's log-probs in training differ from the sampler's.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="Layers that get adapters: 'all-linear' (every linear layer but the output head) or "
                                  "module names such as [q_proj, v_proj].")


class ModelsConfig(_Strict):
    policy: str = Field(description="Policy (SFT) model: hub name, local path, or 'tiny:policy' (built offline).")
    reference: Optional[str] = Field(
        None, description="Frozen reference policy for the KL penalty; defaults to the policy.")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    value_model: Optional[str] = Field(
        None, description="Sequence-classification model the critic starts from when value_init='reward'; "
                          "default: the reward model (Tulu 2.5 with a 70B RM used a 13B RM here).")
    value_init: Literal["policy", "reward"] = Field(
        "reward", description="Initialise the value model from the policy or from the RM (Tulu 2.5: the RM). "
                              "'reward' needs reward.kind='model' with a tokenizer equal to the policy's.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype of the frozen roles (reference, reward) and of generation.")
    cache_dir: Optional[str] = Field(
        None, description="Where 'tiny:*' models are built; default ~/.cache/rlhf_ray.")
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the policy as LoRA adapters (rlhf_ray.models.lora). The reference is then the policy "
                          "with its adapters off, computed in the learner: no reference actors (resources.reference is "
                          "unused). The engines get merged weights (any full-weight transport; 'auto' picks one as "
                          "without LoRA) or the adapters alone (weights.transport=adapter: vLLM's LoRA support). Checkpoints hold the adapters; saved "
                          "models are the merged weights (and the adapter in <model>/adapter). null: full fine-tuning.")

    @property
    def reference_path(self) -> str:
        return self.reference or self.policy

    @property
    def value_model_path(self) -> str | None:
        return self.value_model or self.reward.model


class DataConfig(_Strict):
    prompts: str = Field(description="Prompt data: a local .jsonl/.json/.parquet file or a hub dataset name.")
    split: str = Field("train", description="Split to read (for local files: 'train').")
    messages_field: str = Field("messages", description="Column with a list of {role, content} messages.")
    prompt_field: Optional[str] = Field(
        None, description="Column with a plain user prompt string, used instead of messages_field when set.")
    label_field: Optional[str] = Field(
        None, description="Column with each prompt's reference answer (verifiable tasks, e.g. 'answer'): it reaches "
                          "models.reward.function as label=… (as text); a row without one is skipped and counted.")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="Render with the Tulu chat format (<|user|>\\n…\\n<|assistant|>\\n) or the tokenizer's chat template.")
    max_prompt_tokens: int = Field(512, gt=0, description="Longest prompt in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "drop", description="Over-long prompts: drop them (counted) or keep their last max_prompt_tokens tokens.")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch, deterministically from the seed.")
    limit: Optional[int] = Field(None, gt=0, description="Use only the first N valid prompts (debugging).")


MAX_SAMPLES_PER_PROMPT = 1024  # the sampling seeds a prompt's samples take (rlhf_ray.drivers.ppo.sampling_seeds)


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(256, gt=0, description="Response length cap in tokens.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (PPO needs > 0 for on-policy samples).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling. Below 1 the samples come from a truncated "
                         "distribution while PPO's ratio and KL use the full softmax: slightly off-policy.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    n_samples_per_prompt: int = Field(1, gt=0, le=MAX_SAMPLES_PER_PROMPT, description="Responses sampled per prompt "
                                      "(at most 1024: a prompt's samples take seeds seed, seed+1, …).")


class PPOConfig(_Strict):
    total_episodes: int = Field(64, gt=0, description="Prompts consumed in the run (steps = total_episodes / rollout_batch_size).")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts per PPO step (Tulu 2.5: 64).")
    mini_batch_size: int = Field(64, gt=0, description="Sequences per optimizer step (global, across learner ranks).")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward on one learner rank.")
    epochs: int = Field(1, gt=0, description="PPO epochs over each rollout batch.")
    old_logprobs: Literal["auto", "sampler", "learner"] = Field(
        "auto", description="Where the PPO ratio's old logprobs come from: 'learner' runs a policy forward pass before "
                            "the update; 'sampler' takes the engine's own, equal to the learner's when weights are synced "
                            "exactly, sampling is untruncated and both compute in fp32 (still checked on the update's "
                            "first mini-batch: kl/sampler_vs_learner); 'auto' picks 'sampler' exactly then (logged).")
    async_steps: Literal[0, 1] = Field(
        0, description="1: the engines generate batch k+1 while the learner trains on batch k (one step off-policy; "
                       "README: overlapped rollout and learning); 0: one phase after another.")
    advantage: str = Field(
        "gae", description="Advantage estimator (rlhf_ray.algorithms.advantages, formulas there): 'gae' (a critic: PPO), or "
                           "critic-free — no value model is built and no values pass runs: 'grpo', 'dr_grpo', 'rloo', "
                           "'reinforce_pp_baseline' (compare the samples of one prompt: generation.n_samples_per_prompt "
                           "≥ 2) and 'reinforce_pp'.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount γ.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ.")
    clip_range: float = Field(0.2, gt=0.0, description="Policy ratio clip ε: the ratio is kept in [1−ε, 1+ε_high].")
    clip_range_high: Optional[float] = Field(
        None, gt=0.0, description="ε_high, the upper clip (DAPO's clip-higher: e.g. 0.28 with clip_range 0.2, so rare "
                                  "tokens can gain probability); null: clip_range.")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = Field(
        "token_mean", description="How per-token losses become the loss: 'token_mean' (every token of the mini-batch "
                                  "weighs the same; DAPO), 'seq_mean_token_mean' (each sequence's token mean, then the "
                                  "mean over sequences; GRPO), 'seq_mean_token_sum' (each sequence's token sum divided by "
                                  "generation.max_new_tokens, then the mean over sequences; Dr. GRPO: no length bias).")
    value_clip_range: Optional[float] = Field(0.2, gt=0.0, description="Value clip around old values; null disables.")
    vf_coef: float = Field(0.1, ge=0.0, description="Value-loss coefficient.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    kl_coef: float = Field(0.05, ge=0.0, description="KL coefficient β (where ppo.kl_in says).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator (rlhf_ray.algorithms.ppo_math.kl_penalty).")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="'reward': −β·KL is added to each token's reward (PPO, REINFORCE++); 'loss': β·KL is a "
                              "term of the loss, the rewards carry no KL (GRPO, with kl_estimator k3).")
    reward_clip: Optional[float] = Field(None, gt=0.0, description="Clamp RM scores to ±reward_clip; null disables.")
    non_eos_penalty: Optional[float] = Field(
        -10.0, description="For responses that do not end with EOS (cut at generation.max_new_tokens); null disables. "
                           "See non_eos_penalty_mode.")
    non_eos_penalty_mode: Literal["replace", "subtract"] = Field(
        "replace", description="'replace': a cut response's score becomes non_eos_penalty (open-instruct: −10; it must "
                               "be below the scores of finished responses, or cutting pays: warned once); 'subtract': "
                               "|non_eos_penalty| is taken off its score (TRL's missing_eos_penalty), whatever the "
                               "reward's scale.")
    overlong_buffer: Optional[int] = Field(
        None, gt=0, description="DAPO's soft overlong punishment: a response longer than max_new_tokens − "
                                "overlong_buffer tokens loses overlong_penalty × (its excess / overlong_buffer) of score, "
                                "linearly up to overlong_penalty at max_new_tokens; null disables.")
    overlong_penalty: float = Field(1.0, ge=0.0, description="The largest overlong score deduction (see overlong_buffer).")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: a prompt whose samples all score the same teaches a grouped "
                           "estimator nothing; such groups are dropped and more prompts sampled until the batch is "
                           "full again (at most dynamic_sampling_rounds extra rounds; then the batch is filled up with "
                           "dropped groups, counted in sampling/filled_with_equal).")
    dynamic_sampling_rounds: int = Field(3, ge=1, description="Extra generation rounds a step may take to refill.")
    is_correction: Literal["auto", "none", "tis", "mis"] = Field(
        "auto", description="Off-policy correction of the policy loss by w = π_learner(old) / π_sampler per token: "
                            "'tis' multiplies each token's loss by min(w, is_cap), 'mis' by w where w ≤ is_cap and 0 "
                            "elsewhere, 'none' by 1; 'auto': 'tis' where the sampler's log-probs can differ from the "
                            "learner's (ppo.async_steps=1, bf16, truncated sampling: ppo.old_logprobs resolves to "
                            "'learner'), else 'none' (w is 1 up to rounding).")
    is_cap: float = Field(2.0, gt=1.0, description="The importance weight's cap C for 'tis' / 'mis'.")
    whiten_advantages: bool = Field(
        True, description="Whiten GAE's advantages over the whole batch (token-masked); the critic-free estimators set "
                          "their own scale (rlhf_ray.algorithms.advantages) and are not whitened again.")
    whiten_rewards: bool = Field(False, description="Whiten shaped per-token rewards before GAE.")

    @model_validator(mode="after")
    def _check_ppo(self) -> "PPOConfig":
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        _require(self.advantage in ADVANTAGE_ESTIMATORS, "ppo.advantage",
                 f"unknown estimator {self.advantage!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
        _require(not (self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0), "ppo.kl_estimator",
                 "k1 as a loss term has an expected gradient of 0 (E_π[∇ log π] = 0), so it would not hold the policy "
                 "near the reference: use k3 (GRPO's low-variance estimator) or k2 with ppo.kl_in=loss")
        return self

    @property
    def needs_critic(self) -> bool:
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        return ADVANTAGE_ESTIMATORS[self.advantage].needs_critic


class OptimizerConfig(_Strict):
    lr: float = Field(1e-6, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of optimizer steps spent warming up.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0, description="Gradient clipping; null disables.")


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage of the learner. Use 0 with one learner rank: ZeRO 1-2 keep an extra fp32 copy of "
                       "weights and gradients and partition nothing. Communication buckets are sized from the model.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Learner training precision. bf16: weights and activations in bf16, fp32 master weights and "
                            "Adam states in DeepSpeed's optimizer; with zero_stage 1 gradients also accumulate in fp32 "
                            "(BF16_Optimizer), with 0 in bf16. On CPU it needs AMX, AVX512-BF16 or Arm BF16 (refused "
                            "where torch would only emulate it); pair it with models.dtype=bfloat16 for the frozen "
                            "roles and the engine (the sampler-vs-learner gap is then logged as is/mismatch_kl and "
                            "corrected by ppo.is_correction=auto).")
    offload_optimizer: bool = Field(False, description="Optimizer states in host memory (ZeRO ≥ 1).")
    offload_params: bool = Field(False, description="Parameters in host memory (ZeRO-3 only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    padding_free: bool = Field(
        True, description="Forward passes on real tokens only: each micro-batch's sequences packed into one row, "
                          "attention kept within each sequence (Hugging Face's packed position ids: a block-diagonal "
                          "mask on CPU, variable-length kernels with FlashAttention). Results equal the padded rows'. "
                          "Applies to the learner and the reference; a model that does not keep packed sequences "
                          "apart is run padded, with a warning.")
    micro_batch_tokens: Optional[int] = Field(
        None, gt=0, description="Micro-batches by tokens: each mini-batch's rows grouped into as few micro-batches of at "
                                "most this many real tokens as fit (a longer row alone), instead of the objective's "
                                "micro_batch_size rows; results are the same, memory follows the tokens. null: rows.")
    logits_chunk_tokens: Optional[int] = Field(
        None, ge=0, description="Log-probs and entropies from the LM head this many tokens at a time (recomputed in "
                                "backward), so full-vocabulary logits never exist for a whole micro-batch. null: "
                                "2^24 / vocabulary size tokens (64 MiB of fp32 logits); 0: all at once.")

    def forward_options(self) -> dict:
        """rlhf_ray.models.forward.ForwardOptions' fields: how the learner's and the reference's forwards run."""
        return {"padding_free": self.padding_free, "logits_chunk_tokens": self.logits_chunk_tokens}


class ActorResources(_Strict):
    num_actors: int = Field(1, gt=0, description="Actors of this role (learner: data-parallel world size).")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per actor (tensor_parallel_size for TP engines).")
    threads: Optional[int] = Field(
        None, gt=0, description="Torch threads of each actor in every phase; null: its node's cores shared by the roles "
                                "computing at the same time (rlhf_ray.cluster.compute; the plan is logged at startup).")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels every actor of this role must run on (Ray's bundle label "
                                          "selector, e.g. {pool: rollout}; nodes get labels with `ray start --labels`).")
    node_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor of this role reserves besides CPUs and GPUs "
                                          "(e.g. {gen_node: 1}: only nodes started with `--resources "
                                          "'{\"gen_node\": 8}'` can host it).")


class RoleResources(ActorResources):
    tensor_parallel_size: int = Field(
        1, gt=0, description="vLLM tensor parallelism inside one generation actor: its workers are processes of the "
                             "actor, on its GPUs (num_gpus ≥ tensor_parallel_size) or on CPU its cores, one or more per "
                             "worker (vLLM's VLLM_CPU_OMP_THREADS_BIND, set from the actor's CPUs).")
    sharded: bool = Field(
        False, description="reward (kind='model') and reference only: the role's num_actors actors hold ONE model "
                           "between them (ZeRO-3 inference: each keeps ~1/num_actors of the weights and gathers a layer "
                           "at a time in the forward pass), instead of a full copy each. Each still scores its own "
                           "share of the rollout, so all of them compute (a 70B RM over 4 GPUs: 4 × 1/4 of it).")




class LearnerResourcesConfig(_Strict):
    learner: ActorResources = Field(default_factory=ActorResources)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the role bundles.")
    keep_freed_memory: bool = Field(
        True, description="Role processes keep the memory a phase freed for the next one (glibc: every tensor from "
                          "the heap, which is never trimmed): no page faults on fresh memory every step (SmolLM2's "
                          "fp32 update faulted in 0.7 GB a step without it, 5-12 % of its time); false: each phase "
                          "returns it to the OS, so resident memory drops between phases (SmolLM2's learner: ~2.4 GB), "
                          "at that cost.")
    nice: Optional[int] = Field(
        0, ge=-20, le=19, description="Scheduling priority of the role processes (Ray starts workers at nice 15, behind "
                                      "every plain process; lowering it needs the privilege to); null: leave Ray's.")


class ResourcesConfig(LearnerResourcesConfig):
    generation: RoleResources = Field(default_factory=RoleResources)
    reward: RoleResources = Field(default_factory=RoleResources)
    reference: RoleResources = Field(default_factory=RoleResources)
    learner: RoleResources = Field(default_factory=RoleResources)
    rollout_cores: Optional[int] = Field(
        None, gt=0, description="With ppo.async_steps=1, the CPUs of a node given to the rollout roles (generation, "
                                "reward, reference) while the learner computes on the others; null: half.")


class WeightsConfig(_Strict):
    transport: Literal["auto", "object_store", "collective", "files", "adapter"] = Field(
        "auto", description="How new policy weights go from the learner to the engines after each update "
                            "(rlhf_ray.weights): 'object_store': buckets put once into Ray's object store, read in "
                            "place by every engine on the node; 'collective': a bucketed, pipelined broadcast from learner rank "
                            "0 to every engine over a process group of their own (gloo on CPU, NCCL on GPU); 'files': "
                            "buckets written as safetensors (in /dev/shm) and reloaded by path — for engines that run "
                            "in other processes (tensor_parallel_size > 1, vLLM multiprocessing); 'adapter': with models.lora, the "
                            "LoRA adapters alone through the object store, loaded as a vLLM LoRA adapter (its kernels "
                            "tripled SmolLM2's generation time on CPU, so 'auto' sends a LoRA policy merged). 'auto': "
                            "'object_store' "
                            "for in-process engines (fastest on one node: benchmarks/results/weight_sync.md), "
                            "'collective' for engines in other processes ('files' with ppo.async_steps=1); logged.")
    bucket_mb: float = Field(
        256.0, gt=0, description="Size of one weight bucket in MiB: the unit that is sent, and loaded while the next "
                                 "one is in flight (a tensor larger than this goes alone).")


class LearnerTimeouts(_Strict):
    placement_s: float = Field(120.0, gt=0, description="Reserving the roles' resources (raise it on autoscaling clusters).")
    startup_s: float = Field(900.0, gt=0, description="Actors start and load models (first DeepSpeed init JIT-builds ~60 s).")
    learn_s: float = Field(1800.0, gt=0, description="One learner call: an update (PPO: of one rollout, with its values and "
                                                      "old logprobs; RM training: of one batch), an evaluation or a save.")


class TimeoutsConfig(LearnerTimeouts):
    generate_s: float = Field(600.0, gt=0, description="One rollout on the generation actors.")
    score_s: float = Field(600.0, gt=0, description="Reward scoring and reference logprobs of one rollout.")
    weight_sync_s: float = Field(300.0, gt=0, description="Publishing and loading new policy weights.")


class RunLogging(_Strict):
    console: Literal["quiet", "verbose"] = Field(
        "quiet", description="'quiet': the console shows startup milestones, the progress bar, the closing summary and "
                             "errors (in full, actors' tracebacks included), while the engines', Ray's and DeepSpeed's "
                             "output goes to <output_dir>/logs/ (one file per actor, driver.log for the driver); "
                             "'verbose': all of it on the console as well.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to <output_dir>/tensorboard.")
    progress_bar: bool = Field(True, description="Show a tqdm progress bar of the run's steps.")
    report: bool = Field(True, description="Draw <output_dir>/report.png at the end of the run (rlhf_ray.report).")


class LoggingConfig(RunLogging):
    samples_per_step: int = Field(
        4, ge=0, description="(prompt, response, score) rows per step written to <output_dir>/samples.jsonl.")
    save_final_model: bool = Field(True, description="Save the final policy (HF safetensors) to <output_dir>/final_model.")
    plan: bool = Field(True, description="Before the cluster starts, plan the run on this machine's devices "
                                         "(rlhf_ray.plan): <output_dir>/plan.json, one console line with the predicted "
                                         "step, and a warning with a fix for whatever the planner finds will not fit.")


class CheckpointConfig(_Strict):
    every_steps: int = Field(
        0, ge=0, description="Save a checkpoint every N PPO steps (0: only at the end and when stopped by a signal). "
                             "<output_dir>/checkpoints/step-NNNNNN: HF policy (safetensors), DeepSpeed state (weights, "
                             "optimizer, LR schedule, every ZeRO stage), RNGs, step, prompt position, config, manifest.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted after a newer one is complete.")
    at_end: bool = Field(True, description="Save a checkpoint after the last step.")
    on_signal: bool = Field(True, description="On SIGTERM/SIGINT save a checkpoint of the last finished step before exiting.")
    on_error: bool = Field(
        True, description="When the run stops on an error (a reward endpoint unreachable past models.reward.outage_s, a "
                          "role failing for good, …), save a checkpoint of the last finished step first — if the "
                          "learner holds exactly that step: not after an error during the update or with a learner "
                          "lost, and not on a full disk (then the last checkpoint is the one to resume from; the "
                          "console says which).")


class RecoveryConfig(_Strict):
    max_actor_restarts: int = Field(
        3, ge=0, description="Times over the run a dead or unresponsive generation, reward or reference actor is "
                             "replaced (in its placement-group bundle) and its phase redone; 0: such a death ends the run.")
    max_learner_restarts: int = Field(
        2, ge=0, description="Times over the run the learner group is restarted from the last checkpoint (or from the "
                             "start without one) when a learner rank dies; 0: such a death ends the run.")


class RayConfig(_Strict):
    address: Optional[str] = Field(
        None, description="Ray cluster to join ('host:port', 'ray://…', 'auto'); null: the one in RAY_ADDRESS if set "
                          "(ray job submit sets it), otherwise the run starts a local Ray of its own (it never joins "
                          "another run's cluster by accident).")
    num_cpus: Optional[float] = Field(None, gt=0, description="Logical CPUs of a locally started Ray (default: the machine's CPU count; more oversubscribes).")
    loopback_only: bool = Field(
        True, description="A Ray this run starts itself (no address given) and the learner's rendezvous listen on "
                          "127.0.0.1 only; false: on the machine's network address, so that other nodes could join.")


class RunConfig(_Strict):
    """The top-level keys every run has (PPO and reward-model training)."""
    output_dir: str = Field("runs/default", description="Metrics, TensorBoard events, logs, checkpoints and the final "
                                                         "model go here.")
    resume: Optional[str] = Field(
        None, description="'auto': continue from the latest valid checkpoint in output_dir (the one before if the latest "
                          "is damaged; a fresh start if there is none); or a checkpoint directory. null: a new run.")
    overwrite: bool = Field(False, description="Let a new run (resume: null) replace the results in a non-empty output_dir.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation (RM training: the hold-out split, "
                                     "the pair order and the new score head).")


class ExperimentConfig(RunConfig):
    """The whole PPO experiment. Top-level keys: see each section's class."""
    models: ModelsConfig
    data: DataConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "ExperimentConfig":
        ppo, learner = self.ppo, self.resources.learner
        rollout_seqs = ppo.rollout_batch_size * self.generation.n_samples_per_prompt
        per_rank_mini, rest = divmod(ppo.mini_batch_size, learner.num_actors)
        _require(rest == 0, "ppo.mini_batch_size",
                 f"{ppo.mini_batch_size} is not divisible by resources.learner.num_actors={learner.num_actors}")
        _require(per_rank_mini % ppo.micro_batch_size == 0, "ppo.micro_batch_size",
                 f"{ppo.micro_batch_size} does not divide the per-rank mini batch "
                 f"{per_rank_mini} (= ppo.mini_batch_size / resources.learner.num_actors)")
        _require(rollout_seqs % ppo.mini_batch_size == 0, "ppo.mini_batch_size",
                 f"{ppo.mini_batch_size} does not divide the rollout of {rollout_seqs} sequences "
                 f"(= ppo.rollout_batch_size × generation.n_samples_per_prompt)")
        _require(ppo.total_episodes >= ppo.rollout_batch_size, "ppo.total_episodes",
                 f"{ppo.total_episodes} is smaller than ppo.rollout_batch_size={ppo.rollout_batch_size}: no step would run")
        _require(self.generation.temperature > 0, "generation.temperature",
                 "must be > 0: PPO needs sampled (on-policy) responses")
        reward = self.models.reward
        _require(not (self.resume and self.overwrite), "overwrite",
                 "cannot be combined with resume: resume continues the run in output_dir, overwrite replaces it")
        _require(reward.kind != "model" or reward.model, "models.reward.model", "is required when models.reward.kind='model'")
        _require(reward.kind != "function" or (reward.function and ":" in reward.function), "models.reward.function",
                 "must be 'module:function' when models.reward.kind='function'")
        _require(reward.kind != "http" or (reward.url or "").startswith(("http://", "https://")), "models.reward.url",
                 "must be an http:// or https:// URL when models.reward.kind='http' (e.g. http://127.0.0.1:8001/)")
        _require(reward.kind != "http" or reward.outage_s + reward.timeout_s <= self.timeouts.score_s,
                 "models.reward.outage_s", f"{reward.outage_s:g} s of riding out an outage plus one request "
                 f"(models.reward.timeout_s={reward.timeout_s:g}) must fit in timeouts.score_s={self.timeouts.score_s:g}, "
                 "or the reward actor would be replaced as stuck meanwhile: raise timeouts.score_s or lower outage_s")
        _require(reward.kind != "serve" or reward.app, "models.reward.app",
                 "is required when models.reward.kind='serve': the Serve application's name "
                 "(python -m rlhf_ray.rm list shows them)")
        _require(reward.normalize != "stored" or reward.kind in ("model", "serve"), "models.reward.normalize",
                 f"'stored' needs an RM with saved statistics (models.reward.kind='model' or 'serve', not "
                 f"'{reward.kind}'); use 'running' or 'none'")
        _require(not ppo.needs_critic or self.models.value_init != "reward" or reward.kind == "model"
                 or self.models.value_model,
                 "models.value_init", "'reward' needs a reward model (models.reward.kind='model') or "
                 f"models.value_model; use 'policy' with a {reward.kind} reward")
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        _require(not ADVANTAGE_ESTIMATORS[ppo.advantage].grouped or self.generation.n_samples_per_prompt >= 2,
                 "generation.n_samples_per_prompt", f"ppo.advantage={ppo.advantage} compares the samples of one prompt: "
                 "it needs at least 2 per prompt (GRPO papers use 4–16)")
        _require(not ppo.dynamic_sampling or ADVANTAGE_ESTIMATORS[ppo.advantage].grouped, "ppo.dynamic_sampling",
                 f"drops groups whose samples score the same, which only a grouped estimator (grpo, dr_grpo, rloo, "
                 f"reinforce_pp_baseline) learns nothing from; ppo.advantage is {ppo.advantage}")
        _require(ppo.overlong_buffer is None or ppo.overlong_buffer < self.generation.max_new_tokens,
                 "ppo.overlong_buffer", f"{ppo.overlong_buffer} must be below generation.max_new_tokens="
                 f"{self.generation.max_new_tokens}")
        _require(ppo.is_correction in ("auto", "none") or self.old_logprobs_source()[0] == "learner",
                 "ppo.is_correction", f"'{ppo.is_correction}' weighs the learner's old log-probs against the sampler's, "
                 "but ppo.old_logprobs=sampler makes them the same: set ppo.old_logprobs=learner (or auto)")
        _check_learner(self.deepspeed, self.resources.learner)
        gen = self.resources.generation
        _require(gen.num_gpus == 0 or gen.num_gpus >= gen.tensor_parallel_size, "resources.generation.num_gpus",
                 f"{gen.num_gpus} GPUs cannot host tensor_parallel_size={gen.tensor_parallel_size}")
        _require(gen.num_gpus > 0 or gen.tensor_parallel_size <= max(1, int(gen.num_cpus)),
                 "resources.generation.tensor_parallel_size",
                 f"on CPU each of the {gen.tensor_parallel_size} tensor-parallel workers needs a core of its own: "
                 "raise resources.generation.num_cpus to at least tensor_parallel_size (or give it GPUs)")
        _require(self.in_process_engines or self.weights.transport != "object_store", "weights.transport",
                 "'object_store' needs in-process CPU engines (no GPUs, tensor_parallel_size 1): its buckets are read "
                 "in the actor's own process; with engines in other processes use 'collective', 'files' or 'auto'")
        _require(self.weights.transport != "collective" or self.same_devices_for_weights, "weights.transport",
                 "'collective' needs the learner and the engines on the same kind of device (both with GPUs: NCCL, or "
                 "both without: gloo); use 'files' or 'auto'")
        _require(not (ppo.async_steps and self.weights.transport == "collective"), "weights.transport",
                 "'collective' cannot be combined with ppo.async_steps=1: an engine replaced during the overlapped "
                 "rollout needs the weights the others hold, which the learner is already changing (the object store "
                 "keeps them); use 'object_store' or 'auto'")
        for role in ("generation", "learner"):
            _require(not getattr(self.resources, role).sharded, f"resources.{role}.sharded",
                     "only the frozen roles (reward, reference) can be sharded; the learner shards with "
                     "deepspeed.zero_stage=3, generation with tensor_parallel_size")
        _require(not self.resources.reward.sharded or reward.kind == "model", "resources.reward.sharded",
                 f"only a reward model in the reward actors can be sharded, not models.reward.kind='{reward.kind}'")
        _require(ppo.total_episodes % ppo.rollout_batch_size == 0, "ppo.total_episodes",
                 f"{ppo.total_episodes} is not a multiple of ppo.rollout_batch_size={ppo.rollout_batch_size}: "
                 "the remainder would be silently dropped")
        _require(ppo.rollout_batch_size % gen.num_actors == 0, "resources.generation.num_actors",
                 f"{gen.num_actors} does not divide ppo.rollout_batch_size={ppo.rollout_batch_size}")
        for role in ("reward", "reference"):
            actors = getattr(self.resources, role).num_actors
            _require(rollout_seqs % actors == 0, f"resources.{role}.num_actors",
                     f"{actors} does not divide the rollout of {rollout_seqs} sequences")
        _require(self.resources.rollout_cores is None or ppo.async_steps, "resources.rollout_cores",
                 "only applies when rollout and learning overlap (ppo.async_steps=1); without overlap each phase's "
                 "roles share all of a node's cores")
        self._check_lora()
        _require(not (ppo.old_logprobs == "sampler" and ppo.async_steps), "ppo.old_logprobs",
                 "'sampler' with ppo.async_steps=1 would take the ratio against the policy one update behind; use "
                 "'learner' or 'auto'")
        return self

    def _check_lora(self) -> None:
        lora = self.models.lora
        _require(lora is not None or self.weights.transport != "adapter", "weights.transport",
                 "'adapter' sends LoRA adapters: it needs models.lora")
        if lora is not None:
            _check_lora(self.deepspeed, "models.lora", reference_key="models.reference", reference=self.models.reference,
                        policy=self.models.policy)

    @property
    def in_process_engines(self) -> bool:
        """vLLM runs inside each generation actor's own process (CPU, tensor_parallel_size 1): the actor can take
        tensors from a transport directly."""
        gen = self.resources.generation
        return gen.num_gpus == 0 and gen.tensor_parallel_size == 1

    def weight_transport(self) -> tuple[str, str]:
        """(transport, why) with 'auto' decided by benchmarks/weight_sync.py: on one node the object store (one copy
        into shared memory, read in place) beat the gloo broadcast (a socket copy each way plus packing); engines
        whose workers are other processes cannot read the object store, and a broadcast (NCCL on GPUs) is the peers'
        fast path there."""
        if self.weights.transport != "auto":
            return self.weights.transport, "weights.transport"
        if self.in_process_engines:
            return "object_store", "in-process engines: the object store, read in place"
        if self.ppo.async_steps:
            return "files", "engines in other processes, overlapped (a replaced engine reloads the published weights)"
        if not self.same_devices_for_weights:
            return "files", "learner and engines on different kinds of device (one group cannot mix gloo and NCCL)"
        return "collective", "engines in other processes (GPUs or tensor_parallel_size > 1)"

    @property
    def same_devices_for_weights(self) -> bool:
        """The learner and the engines both on GPUs or both on CPUs: a broadcast group is NCCL or gloo, not both."""
        return (self.resources.learner.num_gpus > 0) == (self.resources.generation.num_gpus > 0)

    @property
    def num_steps(self) -> int:
        return self.ppo.total_episodes // self.ppo.rollout_batch_size

    @property
    def rollout_sequences(self) -> int:
        return self.ppo.rollout_batch_size * self.generation.n_samples_per_prompt

    @property
    def optimizer_steps(self) -> int:
        return self.num_steps * self.ppo.epochs * (self.rollout_sequences // self.ppo.mini_batch_size)

    def reference_forward(self) -> tuple[str, int, float, dict]:
        """The reference role's forward passes: (dtype, sequences per micro-batch, the temperature of its logprobs,
        ForwardOptions' fields)."""
        return self.models.dtype, self.ppo.micro_batch_size, self.generation.temperature, self.deepspeed.forward_options()

    def old_logprobs_source(self) -> tuple[str, str]:
        """('sampler' | 'learner', why): the sampler's logprobs serve as the ratio's old logprobs only where they are
        the learner's own up to rounding — the engine holds exactly the learner's weights (weight sync is exact and
        nothing overlaps), samples from the full softmax at the same temperature, and both compute in fp32."""
        if self.ppo.old_logprobs != "auto":
            return self.ppo.old_logprobs, "ppo.old_logprobs"
        reasons = self._sampler_differs()
        if reasons:
            return "learner", "; ".join(reasons)
        return "sampler", "synced fp32 weights, untruncated sampling"

    def is_correction(self) -> tuple[str, str]:
        """('none' | 'tis' | 'mis', why): ppo.is_correction, 'auto' resolved — 'tis' where the sampler's log-probs can
        differ from the learner's, 'none' where they are equal up to rounding (the weights would all be 1)."""
        if self.ppo.is_correction != "auto":
            return self.ppo.is_correction, "ppo.is_correction"
        reasons = self._sampler_differs()
        if not reasons:
            return "none", "the sampler's log-probs are the learner's: synced fp32 weights, untruncated sampling"
        if self.old_logprobs_source()[0] == "sampler":
            return "none", ("ppo.old_logprobs=sampler makes the learner's old log-probs the sampler's, so there is "
                            "nothing to weigh, though " + "; ".join(reasons))
        return "tis", "; ".join(reasons)

    def _sampler_differs(self) -> list[str]:
        """Why the engine's log-probs of a sample may differ from the learner's before the update (none: they do not)."""
        ppo, gen = self.ppo, self.generation
        return [why for broken, why in (
            (ppo.async_steps > 0, "the engines sample one update behind (ppo.async_steps=1)"),
            (gen.top_p < 1.0, "sampling is truncated (generation.top_p<1)"),
            (self.models.dtype != "float32" or self.deepspeed.precision != "fp32",
             "engine or learner is not fp32 (models.dtype, deepspeed.precision)")) if broken]


class PreferenceSourcesConfig(_Strict):
    """Where a preference run's pairs come from (reward-model training, DPO)."""
    train: str = Field(description="Preference pairs in the Tulu 2.5 schema (chosen/rejected message lists sharing the "
                                   "prompt turns, optional source): a local .jsonl/.json/.parquet file or a hub dataset.")
    split: str = Field("train", description="Split of a hub dataset to read.")
    eval: list[str] = Field(default_factory=list, description="Further preference files/datasets, each evaluated and "
                                                               "reported on its own (overall and per source).")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of each source of `train` held out for "
                                    "evaluation ('heldout' in the reports) and never trained on.")
    limit: Optional[int] = Field(None, gt=0, description="Train on N pairs drawn at random (seeded) from all of `train` "
                                 "after the hold-out (a quicker run; the hold-out stays as it is).")


class PreferenceDataConfig(PreferenceSourcesConfig):
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How a conversation is rendered for the RM: Tulu chat format or the tokenizer's chat template "
                            "(the reward backends must use the same: models.reward.template).")
    max_length: int = Field(512, gt=0, description="Tokens per conversation; longer ones keep their end (the response).")
    margin_field: Optional[str] = Field(
        None, description="Column with a per-pair margin m: loss −log σ(r_chosen − r_rejected − m) (Llama 2); null: m = 0.")


class RMTrainingConfig(_Strict):
    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (global, across learner ranks).")
    micro_batch_size: int = Field(4, gt=0, description="Pairs per forward/backward on one rank (2× sequences).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate the untrained RM too (step 0 in metrics.jsonl): the baseline.")


# ------------------------------------------------------------------------------ SFT and DPO (the Tulu suite)

class ConversationDataConfig(_Strict):
    train: str = Field(description="Conversations to imitate: rows with a list of {role, content} messages (system, "
                                   "user, assistant turns, ending with an assistant turn): a local "
                                   ".jsonl/.json/.parquet file or a hub dataset.")
    split: str = Field("train", description="Split of a hub dataset to read.")
    messages_field: str = Field("messages", description="Column with the conversation.")
    eval: list[str] = Field(default_factory=list, description="Further conversation files/datasets, each evaluated "
                                                               "(loss on assistant tokens) and reported on its own.")
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of `train` held out for evaluation "
                                    "('heldout' in the reports) and never trained on.")
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How a conversation is rendered: the Tulu chat format or the tokenizer's chat template "
                            "(ChatML, Llama-3, …). The loss covers the assistant turns only, end-of-turn marker "
                            "included; which tokens those are is found by rendering (rlhf_ray.data.conversations).")
    max_length: int = Field(2048, gt=0, description="Tokens per conversation; longer ones keep their start.")
    packing: bool = Field(False, description="Several conversations per row up to max_length, each attending only to "
                                             "itself (position ids restart): less padding, the same loss.")
    limit: Optional[int] = Field(None, gt=0, description="Train on N conversations drawn at random (seeded) after the "
                                 "hold-out (a quicker run).")


class SFTTrainingConfig(_Strict):
    epochs: int = Field(2, gt=0, description="Passes over the training conversations.")
    batch_size: int = Field(128, gt=0, description="Rows per optimizer step (global, across learner ranks): "
                                                   "conversations, or packed rows with data.packing.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per forward/backward on one rank.")
    loss_mean: Literal["token", "sequence"] = Field(
        "token", description="'token': the mean over every assistant token of the optimizer step (long answers weigh "
                             "more); 'sequence': each conversation's own token mean, averaged over conversations.")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate before training too (step 0 in metrics.jsonl).")


class PreferencePairsConfig(PreferenceSourcesConfig):
    template: Literal["tulu", "tokenizer"] = Field(
        "tulu", description="How the prompt turns are rendered: the Tulu chat format or the tokenizer's chat template; "
                            "each response follows as the assistant's turn, end-of-turn marker included.")
    max_prompt_length: int = Field(512, gt=0, description="Prompt tokens kept (its end, next to the response).")
    max_length: int = Field(1024, gt=0, description="Prompt + response tokens; a longer response is cut at its end.")


class DPOTrainingConfig(_Strict):
    loss: str = Field("sigmoid", description="The preference loss (rlhf_ray.algorithms.preference_math.DPO_LOSSES): 'sigmoid' "
                                             "(DPO), 'ipo', 'length_normalized' (Tulu 3), 'simpo' (no reference), "
                                             "'hinge'.")
    beta: float = Field(0.1, gt=0.0, description="β: how far the policy may move from the reference (Zephyr, Tulu 2 "
                                                  "DPO: 0.1; SimPO: 2.0).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="sigmoid only: the share of pairs assumed "
                                                                    "mislabelled (conservative DPO); 0: plain DPO.")
    simpo_gamma: float = Field(1.0, ge=0.0, description="simpo only: the target reward margin γ (SimPO: γ/β = 0.5).")
    epochs: int = Field(3, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (global, across learner ranks).")
    micro_batch_size: int = Field(1, gt=0, description="Pairs per forward/backward on one rank (2× sequences).")
    eval_every_steps: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only after training).")
    eval_at_start: bool = Field(True, description="Evaluate before training too (step 0 in metrics.jsonl: the starting "
                                                  "policy, equal to the reference: margins ~0, loss log 2 for sigmoid).")

    @model_validator(mode="after")
    def _known_loss(self) -> "DPOTrainingConfig":
        import inspect

        from rlhf_ray.algorithms.preference_math import DPO_LOSSES

        _require(self.loss in DPO_LOSSES, "dpo.loss", f"{self.loss!r} is not a registered loss; known: "
                                                      f"{', '.join(DPO_LOSSES)}")
        takes = inspect.signature(DPO_LOSSES[self.loss]).parameters
        _require(self.label_smoothing == 0 or "label_smoothing" in takes, "dpo.label_smoothing",
                 f"dpo.loss={self.loss!r} has no label smoothing; set it to 0")
        return self


class ReferenceTimeouts(LearnerTimeouts):
    score_s: float = Field(600.0, gt=0, description="The reference role's logprobs of one batch of pairs.")


class LearnerAndReferenceResources(LearnerResourcesConfig):
    reference: RoleResources = Field(default_factory=RoleResources)


class LearnerRunConfig(RunConfig):
    """What every run of the learner on a fixed dataset has (reward-model training, SFT, DPO)."""
    model: str = Field(description="The model the run trains.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved model.")
    cache_dir: Optional[str] = Field(None, description="Where 'tiny:*'/'real:*' models are built.")
    deepspeed: DeepSpeedConfig = Field(default_factory=lambda: DeepSpeedConfig(zero_stage=0))
    resources: LearnerResourcesConfig = Field(default_factory=LearnerResourcesConfig)
    timeouts: LearnerTimeouts = Field(default_factory=LearnerTimeouts)
    logging: RunLogging = Field(default_factory=RunLogging)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def _check_run(self, batch_key: str, batch_size: int, micro_batch_size: int) -> None:
        world = self.resources.learner.num_actors
        per_rank, rest = divmod(batch_size, world)
        _require(rest == 0, batch_key, f"{batch_size} is not divisible by resources.learner.num_actors={world}")
        _require(per_rank % micro_batch_size == 0, batch_key.rsplit(".", 1)[0] + ".micro_batch_size",
                 f"{micro_batch_size} does not divide the per-rank batch {per_rank} "
                 f"(= {batch_key} / resources.learner.num_actors)")
        _require(not (self.resume and self.overwrite), "overwrite", "cannot be combined with resume")
        _check_learner(self.deepspeed, self.resources.learner)


class SFTConfig(LearnerRunConfig):
    """Supervised fine-tuning (python -m rlhf_ray.train_sft): the loss on the assistant turns of conversations.
    Writes <output_dir>/final_model: the fine-tuned causal LM (HF safetensors) with its tokenizer — a policy for
    PPO (models.policy) or DPO (model)."""
    model: str = Field(description="The model to fine-tune: hub name, local path, 'tiny:policy' or 'real:smollm2-135m'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved model.")
    data: ConversationDataConfig
    training: SFTTrainingConfig = Field(default_factory=SFTTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_ratio=0.03))
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the model as LoRA adapters on its frozen weights (rlhf_ray.models.lora). Checkpoints "
                          "hold the adapters; final_model is the merged weights, the adapter in final_model/adapter. "
                          "null: full fine-tuning.")

    @model_validator(mode="after")
    def _check_combinations(self) -> "SFTConfig":
        self._check_run("training.batch_size", self.training.batch_size, self.training.micro_batch_size)
        if self.lora is not None:
            _check_lora(self.deepspeed, "lora")
        return self


class DPOConfig(LearnerRunConfig):
    """Direct preference optimisation (python -m rlhf_ray.train_dpo) and its variants on preference pairs; the
    reference log-probs come from the reference role (shardable, like PPO's), once per pair. Writes
    <output_dir>/final_model: the policy (HF safetensors) with its tokenizer."""
    model: str = Field(description="The policy to train (usually an SFT model): hub name, local path, 'tiny:policy' "
                                   "or 'real:smollm2-135m'.")
    reference: Optional[str] = Field(None, description="The frozen reference policy; null: the starting policy.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the saved policy and of the frozen reference (with lora the reference is the "
                               "learner's own base, in deepspeed.precision).")
    data: PreferencePairsConfig
    dpo: DPOTrainingConfig = Field(default_factory=DPOTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-7, warmup_ratio=0.1))
    resources: LearnerAndReferenceResources = Field(default_factory=LearnerAndReferenceResources)
    timeouts: ReferenceTimeouts = Field(default_factory=ReferenceTimeouts)
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the policy as LoRA adapters on its frozen weights (rlhf_ray.models.lora). The reference "
                          "is then the policy with its adapters off, computed in the learner: no reference actors "
                          "(resources.reference is unused). Checkpoints hold the adapters; final_model is the merged "
                          "weights, the adapter in final_model/adapter. null: full fine-tuning.")

    @model_validator(mode="after")
    def _check_combinations(self) -> "DPOConfig":
        self._check_run("dpo.batch_size", self.dpo.batch_size, self.dpo.micro_batch_size)
        if self.lora is not None:
            _check_lora(self.deepspeed, "lora", reference_key="reference", reference=self.reference, policy=self.model)
        _require(self.data.max_prompt_length < self.data.max_length, "data.max_prompt_length",
                 f"{self.data.max_prompt_length} leaves no room for a response within data.max_length="
                 f"{self.data.max_length}")
        return self

    @property
    def reference_path(self) -> str:
        return self.reference or self.model

    def reference_forward(self) -> tuple[str, int, float, dict]:
        """The reference role's forward passes: (dtype, sequences per micro-batch: both sides of the pairs, the
        temperature of its logprobs: 1, the model's own distribution, ForwardOptions' fields)."""
        return self.dtype, 2 * self.dpo.micro_batch_size, 1.0, self.deepspeed.forward_options()


class RewardTrainingConfig(LearnerRunConfig):
    """Bradley–Terry reward-model training (python -m rlhf_ray.train_rm). Writes <output_dir>/final_model: an HF
    sequence-classification model (safetensors) + reward_stats.json, which the `model` and `serve` reward backends
    load and models.value_model can start a PPO critic from."""
    model: str = Field(description="Backbone: a causal LM (a new scalar head is added) or an RM to train further; hub "
                                   "name, local path, 'tiny:policy' or 'real:smollm2-135m'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the saved RM.")
    data: PreferenceDataConfig
    training: RMTrainingConfig = Field(default_factory=RMTrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_ratio=0.03))

    @model_validator(mode="after")
    def _check_combinations(self) -> "RewardTrainingConfig":
        self._check_run("training.batch_size", self.training.batch_size, self.training.micro_batch_size)
        return self


def _check_learner(ds: DeepSpeedConfig, learner: ActorResources) -> None:
    """What every learner group needs, whatever its objective."""
    _require(ds.offload_params is False or ds.zero_stage == 3, "deepspeed.offload_params",
             "parameter offload needs deepspeed.zero_stage=3")
    _require(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
             "optimizer offload needs deepspeed.zero_stage >= 1")
    _require(learner.num_gpus in (0, 1), "resources.learner.num_gpus",
             f"{learner.num_gpus}: a learner rank uses 0 or 1 whole GPU (scale with resources.learner.num_actors)")


def _check_lora(ds: DeepSpeedConfig, lora_key: str, reference_key: str | None = None, reference: str | None = None,
                policy: str | None = None) -> None:
    """A LoRA learner (``lora_key`` set): no ZeRO-3; a run with a reference (at ``reference_key``) takes the base with
    the adapters off for it, so ``reference`` is left unset (or names ``policy``)."""
    if reference_key is not None:
        _require(reference in (None, policy), reference_key, f"with {lora_key} the reference is the policy's base "
                                                             f"weights (its adapters off); leave {reference_key} unset")
    _require(ds.zero_stage < 3, "deepspeed.zero_stage",
             f"3 is not supported with {lora_key}: the frozen base would be partitioned and gathered for every "
             "forward while only the adapters train; use 0–2 (ZeRO-1/2 partition the adapters' optimizer state)")


def _require(ok, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"[{key}] {why}")


# ---------------------------------------------------------------------------------------- loading

class Replacing(dict):
    """A mapping given whole on the command line (``key={…}``): it replaces the YAML's mapping at that key rather
    than merging into it, so ``models.reward.function_kwargs={}`` drops the old function's arguments."""


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x', 'd={k: 1}'] -> {'a': {'b': 1}, 'c': 'x', 'd': Replacing({'k': 1})}; values are parsed as
    YAML. A dotted path merges into the YAML's tree; a mapping value replaces the one there (``Replacing``)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. ppo.kl_coef=0.1)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err.problem})") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = Replacing(value) if isinstance(value, dict) else value
    return tree


def merge_tree(base: dict, update: dict) -> dict:
    """``base`` with ``update`` (parse_overrides' tree) applied: dotted keys merge, ``Replacing`` mappings replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Replacing):
            merged[key] = dict(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `python -m rlhf_ray.config --help` lists the keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error" and msg.startswith("Value error, ["):
            key, _, msg = msg[len("Value error, ["):].partition("] ")
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{key}: {msg}" if key else msg)
    return "; ".join(lines)


def build_config(tree: dict, schema: type[BaseModel] = ExperimentConfig):
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_format_error(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[BaseModel] = ExperimentConfig):
    """Read YAML ``path`` (default: the tiny CPU PPO config), apply ``key=value`` overrides, validate as ``schema``
    (ExperimentConfig for PPO, RewardTrainingConfig for reward-model training)."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must contain a mapping of config sections, got {type(tree).__name__}")
    return build_config(merge_tree(tree, parse_overrides(overrides or [])), schema)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += _describe(ann, f"{prefix}{name}.")
        else:
            lines.append(f"  {prefix}{name}: {field.description or ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    schema = ExperimentConfig
    kinds = {"--rm": RewardTrainingConfig, "--sft": SFTConfig, "--dpo": DPOConfig}  # rlhf_ray.train_rm / _sft / _dpo
    if argv and argv[0] in kinds:
        schema, argv = kinds[argv[0]], argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m rlhf_ray.config [--rm | --sft | --dpo] [CONFIG.yaml] [key=value ...]\n\n"
              "--rm, --sft, --dpo: a reward-model training, SFT or DPO config (python -m rlhf_ray.train_rm, "
              "train_sft, train_dpo); none: PPO (python -m rlhf_ray.train)\n\n"
              "key=value: the value is YAML. A dotted key changes one entry and keeps the rest of its section; a "
              "mapping value replaces the whole mapping (models.reward.function_kwargs={} drops the file's "
              "arguments, models.reward.function_kwargs.max_words=40 changes one).\n\nkeys:")
        print("\n".join(_describe(schema)))
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides, schema)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
