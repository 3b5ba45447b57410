"""Layout search: each role's options sized on their own, then the fastest combinations that fit the GPUs.

A role's option is a set of config overrides with the GPUs it takes and the seconds it adds. Roles interact only
through the step's sum: generate + max(reward, reference, values) + learn + weight sync, so combining the
per-role lists is cheap (a few thousand sums) and only the best few combinations are planned in full.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from rlhf_ray.planning.changes import with_overrides
from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.memory import (GPU_RESERVED_BYTES, PROCESS_BASELINE_BYTES, frozen_memory, generation_memory,
                                      learner_memory)
from rlhf_ray.planning.timing import (Placement, frozen_forward_time, generate_time, learn_time, lengths, values_time,
                                      weight_sync_time)

POWERS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Option:
    role: str
    overrides: list[str]
    gpus: int
    seconds: dict[str, float] = field(default_factory=dict)


def role_options(cfg, hw: Hardware, gpus: int, archs: dict) -> dict[str, list[Option]]:
    """Every role's options that fit their devices on their own."""
    def valid(overrides):
        try:
            return with_overrides(cfg, overrides)
        except ValueError:
            return None

    spare = gpus - 2 - (1 if "reward" in archs else 0)   # room for this role when each other takes one GPU
    options = {"learner": _learner_options(cfg, hw, spare, archs, valid),
               "generation": _generation_options(cfg, hw, spare, archs, valid),
               }
    for role in ("reference", "reward"):  # no reward model, or a LoRA run's reference in the learner: no actors
        options[role] = (_frozen_options(role, cfg, hw, spare, archs, valid) if role in archs
                         else [Option(role, [], 0, {"score": 0.0})])
    return options


def _fits_device(role_memory, hw: Hardware) -> bool:
    return role_memory.device_bytes + GPU_RESERVED_BYTES <= hw.memory_bytes


DEEPSPEED_STEPS = (  # escalating memory savings, each applied on top of the config's own settings
    [], ["deepspeed.gradient_checkpointing=true"], ["deepspeed.zero_stage=3"],
    ["deepspeed.zero_stage=3", "deepspeed.gradient_checkpointing=true"],
    ["deepspeed.zero_stage=3", "deepspeed.gradient_checkpointing=true", "deepspeed.offload_optimizer=true"],
    ["deepspeed.zero_stage=3", "deepspeed.gradient_checkpointing=true", "deepspeed.offload_optimizer=true",
     "deepspeed.offload_params=true"],
)


def _learner_options(cfg, hw, spare, archs, valid) -> list[Option]:
    prompt, response = lengths(cfg)
    options = []
    for world in (w for w in POWERS if w <= spare):
        seen = []
        for ds in DEEPSPEED_STEPS:
            ds = [o for o in ds if not _already(cfg, o)]
            overrides = [f"resources.learner.num_actors={world}", "resources.learner.num_gpus=1", *ds]
            changed = valid(overrides)
            if changed is None or changed.deepspeed in seen:
                continue
            seen.append(changed.deepspeed)
            memory = learner_memory(archs["policy"], archs.get("critic"), changed, prompt + response)
            ranks_per_node = min(world, hw.devices_per_node)
            host = (memory.actor_bytes(0, "host") + memory.actor_bytes(1, "host") * (ranks_per_node - 1)
                    + PROCESS_BASELINE_BYTES * ranks_per_node)
            if not _fits_device(memory, hw) or host > hw.host_memory_bytes:
                continue
            placement = Placement(learner_crosses_nodes=world > hw.devices_per_node, learner_ranks_per_node=ranks_per_node)
            options.append(Option("learner", overrides, world, {
                "learn": learn_time(changed, archs["policy"], archs.get("critic"), hw, placement).seconds,
                "values": values_time(changed, archs["policy"], archs.get("critic"), hw, placement),
                "sync_same_node": weight_sync_time(changed, archs["policy"], hw, placement).seconds,
                "sync_other_node": weight_sync_time(changed, archs["policy"], hw, Placement(
                    learner_crosses_nodes=placement.learner_crosses_nodes, engines_off_learner_node=True)).seconds}))
    return options


def _already(cfg, override: str) -> bool:
    """True when ``override`` (a deepspeed.* key) sets what the config already has."""
    key, _, value = override.partition("=")
    current = getattr(cfg.deepspeed, key.split(".")[-1])
    return str(current).lower() == value.lower()


def _generation_options(cfg, hw, spare, archs, valid) -> list[Option]:
    options = []
    for tp in (t for t in (1, 2, 4, 8) if t <= hw.devices_per_node):
        for engines in (e for e in range(1, spare // tp + 1) if cfg.ppo.rollout_batch_size % e == 0):
            overrides = [f"resources.generation.num_actors={engines}", f"resources.generation.num_gpus={tp}",
                         f"resources.generation.tensor_parallel_size={tp}"]
            changed = valid(overrides)
            if changed is None:
                continue
            _, kv = generation_memory(archs["policy"], changed, True, hw.memory_bytes)
            if kv["sequences_that_fit"] < 1:
                continue
            options.append(Option("generation", overrides, engines * tp, {
                "generate": generate_time(changed, archs["policy"], hw, kv["concurrent"]).seconds}))
    return options


def _frozen_options(role, cfg, hw, spare, archs, valid) -> list[Option]:
    prompt, response = lengths(cfg)
    seq = prompt + response
    options = []
    for count, sharded in itertools.product((c for c in POWERS if c <= spare), (False, True)):
        if sharded and count == 1:
            continue
        prefix = f"resources.{role}"
        overrides = [f"{prefix}.num_actors={count}", f"{prefix}.num_gpus=1", f"{prefix}.sharded={str(sharded).lower()}"]
        changed = valid(overrides)
        if changed is None:
            continue
        res = getattr(changed.resources, role)
        batch = changed.models.reward.batch_size if role == "reward" else changed.ppo.micro_batch_size
        length = min(seq, changed.models.reward.max_length) if role == "reward" else seq
        spec = changed.models.reward.model if role == "reward" else changed.models.reference_path
        if not _fits_device(frozen_memory(role, archs[role], spec, res, changed, batch, length), hw):
            continue
        crosses = count > hw.devices_per_node
        options.append(Option(role, overrides, count,
                              {"score": frozen_forward_time(role, changed, archs[role], hw, crosses)}))
    return options


# Offload puts a run at the mercy of host RAM (peers' users report 70B runs killed by host OOM with optimizer
# offload, DESIGN §3): in the ranking, each offload setting costs this share of the step, so it is chosen only
# where it wins by more.
OFFLOAD_PENALTY = 0.05


def best_combinations(options: dict[str, list[Option]], gpus: int, per_node: int, keep: int) -> list[list[str]]:
    """The ``keep`` best combinations (one option per role) within ``gpus``, as override lists: the fastest
    predicted step (offload penalised by OFFLOAD_PENALTY), then the fewest GPUs."""
    best: list[tuple[float, int, int, list[str]]] = []
    counter = itertools.count()
    for learner, gen, reward, ref in itertools.product(options["learner"], options["generation"], options["reward"],
                                                       options["reference"]):
        used = learner.gpus + gen.gpus + reward.gpus + ref.gpus
        if used > gpus:
            continue
        # PACK puts the learner first: the engines share its node only if both fit in one
        same_node = learner.gpus + gen.gpus <= per_node
        sync = learner.seconds["sync_same_node" if same_node else "sync_other_node"]
        step = (gen.seconds["generate"] + max(reward.seconds["score"], ref.seconds["score"], learner.seconds["values"])
                + learner.seconds["learn"] + sync)
        offloads = sum("offload" in o and o.endswith("=true") for o in learner.overrides)
        rank = step * (1 + OFFLOAD_PENALTY * offloads)
        item = (-rank, -used, -next(counter), learner.overrides + gen.overrides + reward.overrides + ref.overrides)
        if len(best) < keep:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    return [item[-1] for item in sorted(best, reverse=True)]
