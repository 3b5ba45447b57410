"""PPO (python -m rlhf_ray.train): ExperimentConfig composes the shared sections with PPO's own, and the decisions
derived from them ('auto' weight transport, where old log-probs come from, off-policy correction)."""
from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_ray.config import rules
from rlhf_ray.config.planning import PlanningConfig
from rlhf_ray.config.ppo_sections import (DataConfig, GenerationConfig, LoggingConfig, ModelsConfig, PPOConfig,
                                          ResourcesConfig, TimeoutsConfig, WeightsConfig)
from rlhf_ray.config.sections import (CheckpointSection, DeepSpeedConfig, OptimizerConfig, RaySection, RecoverySection,
                                      RunConfig)

# what a run without a reference says in its log, its console summary and its report (where no KL is logged)
NO_REFERENCE = "no reference (ppo.kl_coef=0, ppo.reference=auto)"


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
    planning: PlanningConfig = Field(default_factory=PlanningConfig)
    checkpoint: CheckpointSection
    recovery: RecoverySection
    ray: RaySection

    @model_validator(mode="after")
    def _check_combinations(self) -> "ExperimentConfig":
        ppo = self.ppo
        rules.check_batch_split("ppo.mini_batch_size", ppo.mini_batch_size, "ppo.micro_batch_size",
                                ppo.micro_batch_size, self.resources.learner.num_actors)
        rules.check_rollout_split(self)
        rules.check_sampling(self)
        rules.check_reward_use(self)
        rules.check_weights_transport(self)
        rules.check_overlap_resources(self)
        rules.check_planning_lengths(self)
        if self.models.lora is not None:
            rules.check_lora(self.deepspeed, "models.lora", reference_key="models.reference",
                             reference=self.models.reference, policy=self.models.policy)
        return self

    @property
    def in_process_engines(self) -> bool:
        """vLLM runs inside each generation actor's own process (CPU, tensor_parallel_size 1): the actor can take
        tensors from a transport directly."""
        gen = self.resources.generation
        return gen.num_gpus == 0 and gen.tensor_parallel_size == 1

    def weight_transport(self) -> tuple[str, str]:
        """(transport, why): the transport this run syncs weights with ('auto' decided by rlhf_ray.weights)."""
        from rlhf_ray.weights import choose_transport

        return choose_transport(self)

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

    def reference_source(self) -> tuple[str, str]:
        """('actors' | 'learner' | 'none', why): who computes the reference log-probs — the reference actors, the learner
        (models.lora: the policy's base with its adapters off), or no one. The KL enters a step only through
        ppo.kl_coef (−β·KL in the token rewards or β·KL in the loss, as ppo.kl_in says; no advantage estimator adds one
        of its own), so at kl_coef=0 a reference serves only to monitor the KL: ppo.reference=keep."""
        ppo = self.ppo
        if ppo.kl_coef == 0 and ppo.reference == "auto":
            return "none", NO_REFERENCE
        why = f"ppo.kl_coef={ppo.kl_coef:g}" if ppo.kl_coef else "ppo.reference=keep: the KL is logged, weighing 0"
        if self.models.lora is not None:
            return "learner", f"models.lora: the policy's base with its adapters off; {why}"
        return "actors", why

    @property
    def reference_actors(self) -> bool:
        """The run has reference actors (resources.reference reserves and places them)."""
        return self.reference_source()[0] == "actors"

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
            (ppo.async_steps > 0, f"the engines sample {rules.updates_behind(ppo.async_steps)} behind "
                                  f"(ppo.async_steps={ppo.async_steps})"),
            (gen.top_p < 1.0, "sampling is truncated (generation.top_p<1)"),
            (self.models.dtype != "float32" or self.deepspeed.precision != "fp32",
             "engine or learner is not fp32 (models.dtype, deepspeed.precision)")) if broken]


