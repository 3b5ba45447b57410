"""Rules that read more than one section, each written once, grouped by concern. The run kinds call the ones that
apply from their own validator; keys are full dotted paths (the run's top level is their root).

Imports of the registries (estimators, transports) are deferred: they pull in torch, which reading a config must not
need for a default value. They import neither actors nor the cluster.
"""
from __future__ import annotations

from rlhf_ray.config.errors import ConfigKeyError, require

# ------------------------------------------------------------------------------------------ overlap

def updates_behind(async_steps: int) -> str:
    """How far behind the learner the engines sample with ppo.async_steps=k, for messages: 'one update', 'up to 3
    updates'."""
    return "one update" if async_steps == 1 else f"up to {async_steps} updates"


# ------------------------------------------------------------------------------------------ batch split

def check_batch_split(batch_key: str, batch_size: int, micro_key: str, micro_batch_size: int, learners: int) -> None:
    """A global batch is split evenly over the learner ranks, and each rank's share into whole micro-batches."""
    per_rank, rest = divmod(batch_size, learners)
    require(rest == 0, batch_key, f"{batch_size} is not divisible by resources.learner.num_actors={learners}")
    require(per_rank % micro_batch_size == 0, micro_key,
            f"{micro_batch_size} does not divide the per-rank batch {per_rank} (= {batch_key} / "
            "resources.learner.num_actors)")


def check_rollout_split(cfg) -> None:
    """PPO: a rollout splits evenly into mini-batches and over the actors of each rollout role."""
    ppo, resources = cfg.ppo, cfg.resources
    require(cfg.rollout_sequences % ppo.mini_batch_size == 0, "ppo.mini_batch_size",
            f"{ppo.mini_batch_size} does not divide the rollout of {cfg.rollout_sequences} sequences "
            "(= ppo.rollout_batch_size × generation.n_samples_per_prompt)")
    require(ppo.rollout_batch_size % resources.generation.num_actors == 0, "resources.generation.num_actors",
            f"{resources.generation.num_actors} does not divide ppo.rollout_batch_size={ppo.rollout_batch_size}")
    for role in ("reward", "reference") if cfg.reference_actors else ("reward",):  # (no reference: nothing to split)
        actors = getattr(resources, role).num_actors
        require(cfg.rollout_sequences % actors == 0, f"resources.{role}.num_actors",
                f"{actors} does not divide the rollout of {cfg.rollout_sequences} sequences")


def check_planning_lengths(cfg) -> None:
    """PPO: the planner's mean lengths (planning.*) are at most the caps they average under."""
    planning = cfg.planning
    for key, mean, cap_key, cap in (
            ("planning.prompt_tokens_mean", planning.prompt_tokens_mean, "data.max_prompt_tokens",
             cfg.data.max_prompt_tokens),
            ("planning.response_tokens_mean", planning.response_tokens_mean, "generation.max_new_tokens",
             cfg.generation.max_new_tokens)):
        require(mean is None or mean <= cap, key, f"{mean} is above {cap_key}={cap}: a mean cannot exceed its cap")


# ------------------------------------------------------------------------------------------------ lora

def check_lora(deepspeed, lora_key: str, reference_key: str | None = None, reference: str | None = None,
               policy: str | None = None) -> None:
    """A LoRA learner (``lora_key`` set): no ZeRO-3; a run with a reference (at ``reference_key``) takes the base with
    the adapters off for it, so ``reference`` is left unset (or names ``policy``)."""
    if reference_key is not None:
        require(reference in (None, policy), reference_key, f"with {lora_key} the reference is the policy's base "
                                                            f"weights (its adapters off); leave {reference_key} unset")
    require(deepspeed.zero_stage < 3, "deepspeed.zero_stage",
            f"3 is not supported with {lora_key}: the frozen base would be partitioned and gathered for every "
            "forward while only the adapters train; use 0–2 (ZeRO-1/2 partition the adapters' optimizer state)")


# ------------------------------------------------------------------------------------- weight transport

def check_transport_name(name: str) -> str:
    """weights.transport: 'auto', a transport registered in rlhf_ray.weights.TRANSPORTS, or a Transport class of one's
    own as 'module:Class' (a new transport needs no config change). The registry answers; registered names are checked
    without importing their module."""
    from rlhf_ray.weights import check_transport_name as registry_check

    try:
        return registry_check(name)
    except ValueError as err:
        raise ConfigKeyError("", str(err).removeprefix(f"weights.transport={name!r}: ")) from None


def check_weights_transport(cfg) -> None:
    """PPO: the chosen transport can reach these engines from this learner (each transport says what it refuses)."""
    from rlhf_ray.weights import transport_problem

    problem = transport_problem(cfg)
    require(problem is None, "weights.transport", problem)


# ------------------------------------------------------------------------------------------ reward (PPO)

def check_reward_use(cfg) -> None:
    """PPO: what the run asks of its reward beyond the reward section itself (scoring time, the critic's start,
    sharding)."""
    reward = cfg.models.reward
    for i, http in enumerate([reward, *reward.components]):  # a composite's HTTP components too
        key = "models.reward" if i == 0 else f"models.reward.components.{i - 1}"
        require(http.kind != "http" or http.outage_s + http.timeout_s <= cfg.timeouts.score_s,
                f"{key}.outage_s", f"{http.outage_s:g} s of riding out an outage plus one request "
                f"({key}.timeout_s={http.timeout_s:g}) must fit in timeouts.score_s={cfg.timeouts.score_s:g}, "
                "or the reward actor would be replaced as stuck meanwhile: raise timeouts.score_s or lower outage_s")
    require(not cfg.ppo.needs_critic or cfg.models.value_init != "reward" or reward.kind == "model"
            or cfg.models.value_model,
            "models.value_init", "'reward' needs a reward model (models.reward.kind='model') or "
            f"models.value_model; use 'policy' with a {reward.kind} reward")
    require(not cfg.resources.reward.sharded or reward.kind == "model", "resources.reward.sharded",
            f"only a reward model in the reward actors can be sharded, not models.reward.kind='{reward.kind}'")
    require(not reward.compares_with_reference or cfg.data.label_field,
            "data.label_field", "models.reward.judge.mode=pairwise compares each response with its prompt's "
            "reference answer: name the data field that holds it (data.label_field), or a policy whose answers are the "
            "reference (models.reward.judge.baseline)")
    require(not cfg.resources.reward.sharded or reward.cache == "off", "models.reward.cache",
            "must be 'off' with resources.reward.sharded: every rank of a sharded RM runs each forward together, and "
            "a rank whose samples all hit the cache would leave the others waiting")


# ----------------------------------------------------------------------------------- sampling (PPO)

def check_sampling(cfg) -> None:
    """PPO: the samples the engines draw suit the estimator and the loss."""
    from rlhf_ray.algorithms.advantages import ADVANTAGE_ESTIMATORS

    ppo, generation = cfg.ppo, cfg.generation
    require(generation.temperature > 0, "generation.temperature", "must be > 0: PPO needs sampled (on-policy) responses")
    require(not ADVANTAGE_ESTIMATORS[ppo.advantage].grouped or generation.n_samples_per_prompt >= 2,
            "generation.n_samples_per_prompt", f"ppo.advantage={ppo.advantage} compares the samples of one prompt: "
            "it needs at least 2 per prompt (GRPO papers use 4–16)")
    require(ppo.overlong_buffer is None or ppo.overlong_buffer < generation.max_new_tokens,
            "ppo.overlong_buffer", f"{ppo.overlong_buffer} must be below generation.max_new_tokens="
            f"{generation.max_new_tokens}")
    require(ppo.is_correction in ("auto", "none") or cfg.old_logprobs_source()[0] == "learner",
            "ppo.is_correction", f"'{ppo.is_correction}' weighs the learner's old log-probs against the sampler's, "
            "but ppo.old_logprobs=sampler makes them the same: set ppo.old_logprobs=learner (or auto)")


# ------------------------------------------------------------------------------------- resources (PPO)

def check_overlap_resources(cfg) -> None:
    """PPO: resources.rollout_cores splits a node between overlapped phases, so it needs the overlap."""
    require(cfg.resources.rollout_cores is None or cfg.ppo.async_steps, "resources.rollout_cores",
            "only applies when rollout and learning overlap (ppo.async_steps ≥ 1); with ppo.async_steps=0 each "
            "phase's roles share all of a node's cores")
