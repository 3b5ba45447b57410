"""Fix candidates: every combination of the changes that can shrink a role that does not fit, the cheapest first.

A role's knobs (``knobs``) each offer a few settings, the config's own first:

    learner      ZeRO stage up to 3; optimizer offload, then parameter offload too; gradient checkpointing; bf16 for
                 an fp32 learner on GPUs; more ranks (any count dividing ppo.mini_batch_size, up to MORE_RANKS times);
                 a micro-batch down to 1 (any divisor of a rank's share, so 1 is reached directly)
    generation   tensor parallelism up to a node; more engines (dividing ppo.rollout_batch_size); bf16 weights
    reward /     more actors (dividing the rollout's sequences), sharded; a smaller forward batch; bf16 weights
    reference

Their product is sized from the memory functions on unvalidated config copies (rlhf_ray.planning.search.variant),
and what fits is ordered by the GPUs it needs beyond those the config reserves, then by the role's own predicted
seconds, then by the number of changes. The planner plans the first few in full and keeps the cheapest
(rlhf_ray.planning.planner.smallest_fix).
"""
from __future__ import annotations

import itertools
import math

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.memory import (GPU_RESERVED_BYTES, VLLM_GPU_MEMORY_UTILIZATION, GiB, frozen_role_memory,
                                      generation_memory, learner_memory, node_host_bytes)
from rlhf_ray.planning.search import as_overrides, divisors, learner_placement, setting, variant
from rlhf_ray.planning.timing import frozen_forward_time, generate_time, learn_time, values_time

# More learner ranks, engines or frozen actors are tried up to this many times the configured count: a fix that
# needs more than that is a different cluster, which the layout search (--gpus) answers.
MORE_RANKS = 8


def fix_candidates(cfg, role: str, hw: Hardware, archs: dict) -> list[list[str]]:
    """The combinations of ``role``'s knobs that fit its devices (and, for the learner, the node's host memory), as
    override lists: the fewest GPUs beyond those the config reserves first, then the fastest for the role, then the
    fewest changes."""
    fitting, seen, reserved = [], set(), _reserved(cfg, archs)
    for changes in combinations(cfg, role, hw):
        if tuple(changes.items()) in seen:
            continue
        seen.add(tuple(changes.items()))
        changed = variant(cfg, changes)
        seconds = _role_seconds(role, changed, hw, archs) if _fits(role, changed, hw, archs) else None
        if seconds is not None:
            extra = max(0, _reserved(changed, archs) - reserved) if hw.is_gpu else 0
            fitting.append((extra, seconds, len(changes), as_overrides(changes)))
    fitting.sort(key=lambda f: f[:3])
    return [overrides for *_, overrides in fitting]


def combinations(cfg, role: str, hw: Hardware):
    """Every change set of ``role``'s knobs (dotted key -> value) that the config's rules allow, none empty."""
    for choice in itertools.product(*knobs(cfg, role, hw)):
        merged = {k: v for part in choice for k, v in part.items() if setting(cfg, k) != v}
        for changes in _with_batches(cfg, role, merged):
            if changes and allowed(cfg, changes):
                yield changes


def knobs(cfg, role: str, hw: Hardware) -> list[list[dict]]:
    """Each knob's settings for ``role``, the config's own ({}) first. Batch sizes come after (``_with_batches``):
    which divide depends on the counts chosen here."""
    if role == "learner":
        return _learner_knobs(cfg, hw)
    if role == "generation":
        return _generation_knobs(cfg, hw)
    return _frozen_knobs(cfg, role)


def _learner_knobs(cfg, hw: Hardware) -> list[list[dict]]:
    ds, world = cfg.deepspeed, cfg.resources.learner.num_actors
    top_stage = 2 if cfg.models.lora is not None else 3
    offload = [{}]
    if not ds.offload_optimizer:
        offload.append({"deepspeed.offload_optimizer": True})
    if not ds.offload_params:
        offload.append({"deepspeed.offload_optimizer": True, "deepspeed.offload_params": True})
    return [
        [{}] + [{"deepspeed.zero_stage": z} for z in range(ds.zero_stage + 1, top_stage + 1)],
        offload,
        [{}] + ([{"deepspeed.gradient_checkpointing": True}] if not ds.gradient_checkpointing else []),
        [{}] + ([{"deepspeed.precision": "bf16"}] if ds.precision == "fp32" and hw.is_gpu else []),
        [{}] + [{"resources.learner.num_actors": w} for w in divisors(cfg.ppo.mini_batch_size, world * MORE_RANKS)
                if w > world],
    ]


def _generation_knobs(cfg, hw: Hardware) -> list[list[dict]]:
    gen = cfg.resources.generation
    tps = [t for t in (2, 4, 8) if t > gen.tensor_parallel_size and t <= hw.devices_per_node] if hw.is_gpu else []
    return [
        [{}] + [{"resources.generation.tensor_parallel_size": t, "resources.generation.num_gpus": t} for t in tps],
        [{}] + [{"resources.generation.num_actors": e}
                for e in divisors(cfg.ppo.rollout_batch_size, gen.num_actors * MORE_RANKS) if e > gen.num_actors],
        [{}] + ([{"models.dtype": "bfloat16"}] if cfg.models.dtype == "float32" else []),
    ]


def _frozen_knobs(cfg, role: str) -> list[list[dict]]:
    res, prefix = getattr(cfg.resources, role), f"resources.{role}"
    more = [{f"{prefix}.num_actors": k, f"{prefix}.sharded": True, f"{prefix}.num_gpus": 1}
            for k in divisors(cfg.rollout_sequences, res.num_actors * MORE_RANKS) if k > res.num_actors]
    if res.num_actors > 1 and not res.sharded:
        more.insert(0, {f"{prefix}.sharded": True, f"{prefix}.num_gpus": 1})
    return [[{}] + more, [{}] + ([{"models.dtype": "bfloat16"}] if cfg.models.dtype == "float32" else [])]


def allowed(cfg, changes: dict) -> bool:
    """The config's rules these knobs touch: parameter offload needs ZeRO-3, optimizer offload ZeRO ≥ 1, and the
    micro-batch divides a learner rank's share of ppo.mini_batch_size."""
    value = lambda key: changes.get(key, setting(cfg, key))  # noqa: E731
    stage = value("deepspeed.zero_stage")
    if value("deepspeed.offload_params") and stage != 3 or value("deepspeed.offload_optimizer") and stage < 1:
        return False
    share = cfg.ppo.mini_batch_size // value("resources.learner.num_actors")
    return share % value("ppo.micro_batch_size") == 0


def _with_batches(cfg, role: str, changes: dict):
    """``changes`` with each smaller batch that divides what it must: the learner's micro-batch (any divisor of a
    rank's share of ppo.mini_batch_size, down to 1), the reference's (the same key) or the reward model's."""
    yield changes
    if role == "generation":
        return
    if role == "reward":
        for batch in range(cfg.models.reward.batch_size // 2, 0, -1):
            if cfg.models.reward.batch_size % batch == 0:
                yield changes | {"models.reward.batch_size": batch}
        return
    world = changes.get("resources.learner.num_actors", cfg.resources.learner.num_actors)
    for micro in reversed(divisors(cfg.ppo.mini_batch_size // world, cfg.ppo.micro_batch_size - 1)):
        yield changes | {"ppo.micro_batch_size": micro}


# ------------------------------------------------------------------------------------------- sizing

def _fits(role: str, changed, hw: Hardware, archs: dict) -> bool:
    if role == "learner":
        device, host = learner_bytes(changed, hw, archs)
        return _on_device(device, hw) and (not hw.is_gpu or host <= hw.host_memory_bytes)
    if role == "generation":
        memory, kv = generation_memory(archs["policy"], changed, hw.is_gpu, hw.memory_bytes)
        room = VLLM_GPU_MEMORY_UTILIZATION * hw.memory_bytes if hw.is_gpu else hw.memory_bytes
        return kv["sequences_that_fit"] >= 1 and memory.device_bytes <= room
    return _on_device(frozen_role_memory(role, archs[role], changed).device_bytes, hw)


def learner_bytes(changed, hw: Hardware, archs: dict) -> tuple[float, float]:
    """(bytes on a learner rank's device, host bytes of the first node's ranks — PACK fills it with up to a node's —
    running or while they load their models, whichever is more: memory.node_host_bytes)."""
    memory = learner_memory(archs["policy"], archs.get("critic"), changed)
    ranks = min(changed.resources.learner.num_actors, hw.devices_per_node) if hw.is_gpu else 1
    return memory.device_bytes, node_host_bytes(memory, ranks)


def host_bound(cfg, hw: Hardware, gpus: int, archs: dict) -> str | None:
    """Why no learner fix fits within ``gpus``, where host memory is why: the first combination within them that fits
    the devices, and the host memory its node's ranks would need (running, or loading their models: whichever is
    more)."""
    for changes in combinations(cfg, "learner", hw):
        changed = variant(cfg, changes)
        if _reserved(changed, archs) <= gpus:
            device, host = learner_bytes(changed, hw, archs)
            if _on_device(device, hw) and host > hw.host_memory_bytes:
                return (f"within {gpus} GPUs, {' '.join(as_overrides(changes))} fits the GPUs, but the learner ranks "
                        f"of one node would need {host / GiB:.0f} GiB of its {hw.host_memory_bytes / GiB:.0f} GiB host "
                        "memory at their peak (running, or each rank loading its whole models in fp32)")
    return None


def _on_device(device_bytes: float, hw: Hardware) -> bool:
    return device_bytes + (GPU_RESERVED_BYTES if hw.is_gpu else 0) <= hw.memory_bytes


def _role_seconds(role: str, changed, hw: Hardware, archs: dict) -> float:
    """The role's own predicted seconds with the change (what a fix costs besides GPUs)."""
    if role == "learner":
        placement = learner_placement(changed.resources.learner.num_actors, hw)
        policy, critic = archs["policy"], archs.get("critic")
        return (learn_time(changed, policy, critic, hw, placement).seconds
                + values_time(changed, policy, critic, hw, placement))
    if role == "generation":
        _, kv = generation_memory(archs["policy"], changed, hw.is_gpu, hw.memory_bytes)
        return generate_time(changed, archs["policy"], hw, kv["concurrent"]).seconds
    res = getattr(changed.resources, role)
    return frozen_forward_time(role, changed, archs[role], hw, res.num_actors > hw.devices_per_node)


def _reserved(changed, archs: dict) -> int:
    """GPUs the changed config reserves for the roles the plan has."""
    res = changed.resources
    roles = [res.learner, res.generation] + [getattr(res, r) for r in ("reward", "reference") if r in archs]
    return math.ceil(sum(r.num_actors * r.num_gpus for r in roles) - 1e-9)
