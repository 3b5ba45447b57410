"""The sections only PPO has: models, data, generation, ppo, weights, and PPO's larger resources, timeouts and
logging (the learner-only sections they extend are in ``sections``)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from rlhf_ray.config import rules
from rlhf_ray.config.errors import require
from rlhf_ray.config.reward import RewardConfig
from rlhf_ray.config.sections import (LearnerResourcesConfig, LearnerTimeouts, LoRAConfig, ModelDtype, RoleResources,
                                      RunLogging, StrictSection)


class ModelsConfig(StrictSection):
    policy: str = Field(description="Policy (SFT) model: hub name, local path, or 'tiny:policy' (built offline).")
    reference: Optional[str] = Field(
        None, description="Frozen reference policy for the KL penalty; defaults to the policy. Unused where the KL "
                          "weighs nothing (ppo.kl_coef=0) and ppo.reference=auto.")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    value_model: Optional[str] = Field(
        None, description="Sequence-classification model the critic starts from when value_init='reward'; "
                          "default: the reward model (Tulu 2.5 with a 70B RM used a 13B RM here).")
    value_init: Literal["policy", "reward"] = Field(
        "reward", description="Initialise the value model from the policy or from the RM (Tulu 2.5: the RM). "
                              "'reward' needs reward.kind='model' with a tokenizer equal to the policy's.")
    dtype: ModelDtype = Field(
        "float32", description="Weights dtype of the frozen roles (reference, reward) and of generation.")
    cache_dir: Optional[str] = Field(
        None, description="Where 'tiny:*' models are built; default ~/.cache/rlhf_ray.")
    lora: Optional[LoRAConfig] = Field(
        None, description="Train the policy as LoRA adapters (rlhf_ray.models.lora). The reference is then the policy "
                          "with its adapters off, computed in the learner: no reference actors (resources.reference is "
                          "unused). The engines get merged weights (any full-weight transport; 'auto' picks one as "
                          "without LoRA) or the adapters alone (weights.transport=adapter: vLLM's LoRA support). Checkpoints hold the adapters; saved "
                          "models are the merged weights (and the adapter in <model>/adapter). null: full fine-tuning.")

    @model_validator(mode="after")
    def _check_reward_model(self) -> "ModelsConfig":
        # here rather than in RewardConfig: RewardConfig() is the section's default when the YAML has none, and it
        # has kind='model' with no model until one is given
        require(not self.reward.loads_model or self.reward.model, "reward.model",
                f"is required when models.reward.kind='{self.reward.kind}'"
                + (": the judge, a causal LM (e.g. tiny:policy, real:smollm2-135m, a hub name)"
                   if self.reward.kind == "judge" else ""))
        return self

    @property
    def reference_path(self) -> str:
        return self.reference or self.policy

    @property
    def value_model_path(self) -> str | None:
        return self.value_model or self.reward.model


class DataConfig(StrictSection):
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


MAX_SAMPLES_PER_PROMPT = 1024  # the sampling seeds a prompt's samples take (rlhf_ray.drivers.rollout.sampling_seeds)


class GenerationConfig(StrictSection):
    max_new_tokens: int = Field(256, gt=0, description="Response length cap in tokens.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (PPO needs > 0 for on-policy samples).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling. Below 1 the samples come from a truncated "
                         "distribution while PPO's ratio and KL use the full softmax: slightly off-policy.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    n_samples_per_prompt: int = Field(1, gt=0, le=MAX_SAMPLES_PER_PROMPT, description="Responses sampled per prompt "
                                      "(at most 1024: a prompt's samples take seeds seed, seed+1, …).")


class PPOConfig(StrictSection):
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
    async_steps: int = Field(
        0, ge=0, description="k ≥ 1: the engines generate up to k batches ahead of the learner, batch s sampled by the "
                             "weights of update s − k (k updates off-policy, logged as async/staleness; published "
                             "weights wait in the object store until the engines load them, about k + 1 copies; "
                             "the driver and each checkpoint hold k batches; docs/throughput.md: overlapped rollout "
                             "and learning); 0: one phase after another.")
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
    kl_coef: float = Field(0.05, ge=0.0, description="KL coefficient β (where ppo.kl_in says); 0: no KL, and no "
                                                     "reference model unless ppo.reference=keep.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator (rlhf_ray.algorithms.ppo_math.kl_penalty).")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="'reward': −β·KL is added to each token's reward (PPO, REINFORCE++); 'loss': β·KL is a "
                              "term of the loss, the rewards carry no KL (GRPO, with kl_estimator k3).")
    reference: Literal["auto", "keep"] = Field(
        "auto", description="The reference model where the KL weighs nothing (kl_coef=0: DAPO, Dr. GRPO, many GRPO "
                            "runs). 'auto': none — no reference actors (resources.reference is unused and reserves "
                            "nothing), no reference pass in a LoRA learner, and no KL metrics (the console and the "
                            "report say so); 'keep': keep it to monitor the drift from the reference (kl/mean is "
                            "computed and logged, weighing 0). With kl_coef > 0 the reference is always there.")
    reward_clip: Optional[float] = Field(None, gt=0.0, description="Clamp RM scores to ±reward_clip; null disables.")
    non_eos_penalty: Optional[float] = Field(
        -10.0, description="For responses that do not end with EOS (cut at generation.max_new_tokens); null disables. "
                           "See non_eos_penalty_mode.")
    non_eos_penalty_mode: Literal["replace", "subtract"] = Field(
        "replace", description="'replace': a cut response's score becomes non_eos_penalty (open-instruct: −10; it must "
                               "be below the scores of finished responses, or cutting pays: the penalty_pays alarm); 'subtract': "
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
                            "learner's (ppo.async_steps ≥ 1, bf16, truncated sampling: ppo.old_logprobs resolves to "
                            "'learner'), else 'none' (w is 1 up to rounding).")
    is_cap: float = Field(2.0, gt=1.0, description="The importance weight's cap C for 'tis' / 'mis'.")
    whiten_advantages: bool = Field(
        True, description="Whiten GAE's advantages over the whole batch (token-masked); the critic-free estimators set "
                          "their own scale (rlhf_ray.algorithms.advantages) and are not whitened again.")
    whiten_rewards: bool = Field(False, description="Whiten shaped per-token rewards before GAE.")

    @model_validator(mode="after")
    def _check_ppo(self) -> "PPOConfig":
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        require(self.advantage in ADVANTAGE_ESTIMATORS, "advantage",
                f"unknown estimator {self.advantage!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
        require(not (self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0), "kl_estimator",
                "k1 as a loss term has an expected gradient of 0 (E_π[∇ log π] = 0), so it would not hold the policy "
                "near the reference: use k3 (GRPO's low-variance estimator) or k2 with ppo.kl_in=loss")
        require(self.total_episodes >= self.rollout_batch_size, "total_episodes",
                f"{self.total_episodes} is smaller than ppo.rollout_batch_size={self.rollout_batch_size}: no step "
                "would run")
        require(self.total_episodes % self.rollout_batch_size == 0, "total_episodes",
                f"{self.total_episodes} is not a multiple of ppo.rollout_batch_size={self.rollout_batch_size}: "
                "the remainder would be silently dropped")
        require(not self.dynamic_sampling or ADVANTAGE_ESTIMATORS[self.advantage].grouped, "dynamic_sampling",
                f"drops groups whose samples score the same, which only a grouped estimator (grpo, dr_grpo, rloo, "
                f"reinforce_pp_baseline) learns nothing from; ppo.advantage is {self.advantage}")
        require(not (self.old_logprobs == "sampler" and self.async_steps), "old_logprobs",
                f"'sampler' with ppo.async_steps={self.async_steps} would take the ratio against the policy "
                f"{rules.updates_behind(self.async_steps)} behind the learner's; use 'learner' or 'auto'")
        return self

    @property
    def needs_critic(self) -> bool:
        from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

        return ADVANTAGE_ESTIMATORS[self.advantage].needs_critic


class ResourcesConfig(LearnerResourcesConfig):
    generation: RoleResources = Field(default_factory=RoleResources)
    reward: RoleResources = Field(default_factory=RoleResources)
    reference: RoleResources = Field(default_factory=RoleResources)
    learner: RoleResources = Field(default_factory=RoleResources)
    rollout_cores: Optional[int] = Field(
        None, gt=0, description="With ppo.async_steps ≥ 1, the CPUs of a node given to the rollout roles (generation, "
                                "reward, reference) while the learner computes on the others; null: half.")

    @model_validator(mode="after")
    def _check_roles(self) -> "ResourcesConfig":
        gen = self.generation
        require(gen.num_gpus == 0 or gen.num_gpus >= gen.tensor_parallel_size, "generation.num_gpus",
                f"{gen.num_gpus} GPUs cannot host tensor_parallel_size={gen.tensor_parallel_size}")
        require(gen.num_gpus > 0 or gen.tensor_parallel_size <= max(1, int(gen.num_cpus)),
                "generation.tensor_parallel_size",
                f"on CPU each of the {gen.tensor_parallel_size} tensor-parallel workers needs a core of its own: "
                "raise resources.generation.num_cpus to at least tensor_parallel_size (or give it GPUs)")
        for role in ("generation", "learner"):
            require(not getattr(self, role).sharded, f"{role}.sharded",
                    "only the frozen roles (reward, reference) can be sharded; the learner shards with "
                    "deepspeed.zero_stage=3, generation with tensor_parallel_size")
        return self


class WeightsConfig(StrictSection):
    transport: str = Field(
        "auto", description="How new policy weights go from the learner to the engines after each update "
                            "(rlhf_ray.weights): 'object_store': buckets put once into Ray's object store, read in "
                            "place by every engine on the node; 'collective': a bucketed, pipelined broadcast from learner "
                            "rank 0 to every engine over a process group of their own (gloo on CPU, NCCL on GPU); 'files': "
                            "buckets written as safetensors (in /dev/shm) and reloaded by path — for engines that run "
                            "in other processes (tensor_parallel_size > 1, vLLM multiprocessing); 'adapter': with "
                            "models.lora, the LoRA adapters alone through the object store, loaded as a vLLM LoRA adapter (its kernels "
                            "tripled SmolLM2's generation time on CPU, so 'auto' sends a LoRA policy merged). 'auto': "
                            "'object_store' for in-process engines (fastest on one node: benchmarks/results/weight_sync.md), "
                            "'collective' for engines in other processes (overlapped too: sent once the engines end "
                            "their rollouts ahead); logged. Or a "
                            "transport of one's own: 'package.module:Class', a rlhf_ray.weights.Transport subclass "
                            "every role can import.")
    bucket_mb: float = Field(
        256.0, gt=0, description="Size of one weight bucket in MiB: the unit that is sent, and loaded while the next "
                                 "one is in flight (a tensor larger than this goes alone).")

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, name: str) -> str:
        return rules.check_transport_name(name)


class TimeoutsConfig(LearnerTimeouts):
    generate_s: float = Field(600.0, gt=0, description="One rollout on the generation actors.")
    score_s: float = Field(600.0, gt=0, description="Reward scoring and reference logprobs of one rollout.")
    weight_sync_s: float = Field(300.0, gt=0, description="Publishing and loading new policy weights.")


class LoggingConfig(RunLogging):
    samples_per_step: int = Field(
        4, ge=0, description="(prompt, response, score) rows per step written to <output_dir>/samples.jsonl.")
    save_final_model: bool = Field(True, description="Save the final policy (HF safetensors) to <output_dir>/final_model.")
    plan: bool = Field(True, description="Before the cluster starts, plan the run on this machine's devices "
                                         "(rlhf_ray.plan): <output_dir>/plan.json, one console line with the predicted "
                                         "step, and a warning with a fix for whatever the planner finds will not fit.")


