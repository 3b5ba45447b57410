"""Layout search: each role's options sized on their own, the fastest combination that fits the GPUs, and why any GPU
is left over.

Counts are any the config allows, up to the GPUs: learner ranks dividing ppo.mini_batch_size (the micro-batch
lowered where a rank's share needs it), engines dividing ppo.rollout_batch_size (× tensor parallelism 1/2/4/8),
reward and reference actors dividing the rollout's sequences (replicated or sharded). Options are sized and priced by
the plan's own memory and phase functions (means for compute, caps for memory, the tail for generation, a MoE's
active and total parameters; host memory running and at load) on unvalidated copies of the config (``variant``); the
planner validates and plans the finalists in full.

Roles meet only in the step (rlhf_ray.planning.timing.step_seconds): generate + max(reward, reference, values) +
learn + weight sync, or with ppo.async_steps ≥ 1 max(generate, score + learn) + weight sync. So the search walks
learner × generation options (each list cut to those no slower than a smaller option) and gives the GPUs left to the
reward and reference pair that scores fastest, with the fewest GPUs (``FrozenPairs``): a few thousand sums at
thousands of GPUs.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.memory import (GPU_RESERVED_BYTES, frozen_role_memory, generation_memory, learner_memory,
                                      node_host_bytes)
from rlhf_ray.planning.timing import Placement, frozen_forward_time, generate_time, learn_time, values_time, weight_sync_time

TENSOR_PARALLEL = (1, 2, 4, 8)
FROZEN_ROLES = ("reward", "reference")
# Offload puts a run at the mercy of host RAM (peers' users report 70B runs killed by host OOM with optimizer
# offload, DESIGN §3): in the ranking, each offload setting costs this share of the step, so it is chosen only
# where it wins by more.
OFFLOAD_PENALTY = 0.05
# A layout that takes more GPUs is chosen only if its predicted step is shorter by at least this share: the planner's
# own errors are tens of percent (benchmarks/results/planner_validation.md), so a smaller gain is noise, and the GPUs
# are left free instead, each with its reason. A judgement, not fitted to any run.
MIN_GAIN_FOR_MORE_GPUS = 0.01

DEEPSPEED_STEPS = (  # escalating memory savings, each applied on top of the config's own settings
    {}, {"deepspeed.gradient_checkpointing": True}, {"deepspeed.zero_stage": 3},
    {"deepspeed.zero_stage": 3, "deepspeed.gradient_checkpointing": True},
    {"deepspeed.zero_stage": 3, "deepspeed.gradient_checkpointing": True, "deepspeed.offload_optimizer": True},
    {"deepspeed.zero_stage": 3, "deepspeed.gradient_checkpointing": True, "deepspeed.offload_optimizer": True,
     "deepspeed.offload_params": True},
)


# ------------------------------------------------------------------------------------------- config copies

def variant(cfg, changes: dict):
    """A copy of ``cfg`` with dotted keys set, NOT validated (pydantic's model_copy): what the search prices. The
    search keeps to what the config's rules allow; ``with_overrides`` validates the finalists."""
    for key, value in changes.items():
        cfg = _set(cfg, key.split("."), value)
    return cfg


def _set(model, path: list[str], value):
    if len(path) == 1:
        return model.model_copy(update={path[0]: value})
    return model.model_copy(update={path[0]: _set(getattr(model, path[0]), path[1:], value)})


def as_overrides(changes: dict) -> list[str]:
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in changes.items()]


def divisors(n: int, most: int | None = None) -> list[int]:
    """The divisors of ``n`` (at most ``most``), ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small + [n // d for d in small]))
    return [d for d in found if most is None or d <= most]


# ------------------------------------------------------------------------------------------- role options

@dataclass(eq=False)
class Option:
    """One way to run a role: ``count`` actors of ``width`` GPUs, set by ``changes`` (dotted key -> value), with the
    seconds it takes (learner: learn, values; generation: generate; reward / reference: score)."""
    role: str
    count: int
    width: int
    changes: dict
    seconds: dict[str, float]
    cfg: object = field(repr=False, default=None)   # the config with ``changes``, for pricing the weight sync

    @property
    def gpus(self) -> int:
        return self.count * self.width

    @property
    def overrides(self) -> list[str]:
        return as_overrides(self.changes)

    @property
    def offloads(self) -> int:
        return sum(1 for key, value in self.changes.items() if "offload" in key and value is True)


def role_options(cfg, hw: Hardware, gpus: int, archs: dict) -> dict[str, list[Option]]:
    """Every role's options that fit their devices on their own, each within the GPUs the other roles leave at the
    least (one learner rank, one engine, one actor per frozen role). A role without actors (no reward model, no
    reference) has one empty option."""
    spare = gpus - 1 - sum(1 for r in FROZEN_ROLES if r in archs)   # a role's GPUs when the others take one each
    options = {"learner": learner_options(cfg, hw, spare, archs),
               "generation": generation_options(cfg, hw, spare, archs)}
    for role in FROZEN_ROLES:
        options[role] = (frozen_options(role, cfg, hw, spare, archs) if role in archs
                         else [Option(role, 0, 1, {}, {"score": 0.0})])
    return options


def _fits_device(role_memory, hw: Hardware) -> bool:
    return role_memory.device_bytes + GPU_RESERVED_BYTES <= hw.memory_bytes


def learner_options(cfg, hw: Hardware, most: int, archs: dict) -> list[Option]:
    """Per world size dividing ppo.mini_batch_size: each DeepSpeed step (DEEPSPEED_STEPS) with the largest micro-batch
    (up to the config's) that divides a rank's share and fits the device and the node's host memory, running and while
    its ranks load their models (memory.node_host_bytes)."""
    options = []
    for world in divisors(cfg.ppo.mini_batch_size, most):
        micros = [m for m in divisors(cfg.ppo.mini_batch_size // world, cfg.ppo.micro_batch_size)][::-1]
        seen = set()
        for step in DEEPSPEED_STEPS:
            changes = {"resources.learner.num_actors": world, "resources.learner.num_gpus": 1,
                       **{k: v for k, v in step.items() if setting(cfg, k) != v}}
            if cfg.models.lora is not None and changes.get("deepspeed.zero_stage") == 3:
                continue  # a LoRA learner refuses ZeRO-3
            for micro in micros:
                micro_change = {"ppo.micro_batch_size": micro} if micro != cfg.ppo.micro_batch_size else {}
                changed = variant(cfg, changes | micro_change)
                key = (tuple(changed.deepspeed.model_dump().items()), micro)
                if key in seen:
                    break
                seen.add(key)
                if _learner_fits(changed, hw, archs, world):
                    options.append(_learner_option(changed, hw, archs, world, changes | micro_change))
                    break
    return options


def setting(cfg, key: str):
    """The value of a dotted key in ``cfg``."""
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _learner_fits(changed, hw: Hardware, archs: dict, world: int) -> bool:
    memory = learner_memory(archs["policy"], archs.get("critic"), changed)
    host = node_host_bytes(memory, min(world, hw.devices_per_node))   # PACK fills the first node with ranks
    return _fits_device(memory, hw) and host <= hw.host_memory_bytes


def _learner_option(changed, hw: Hardware, archs: dict, world: int, changes: dict) -> Option:
    placement = learner_placement(world, hw)
    policy, critic = archs["policy"], archs.get("critic")
    seconds = {"learn": learn_time(changed, policy, critic, hw, placement).seconds,
               "values": values_time(changed, policy, critic, hw, placement),
               # engines on another node: how options compare (Search.sync_seconds prices each combination's own)
               "sync": weight_sync_time(changed, policy, hw, learner_placement(world, hw, 1)).seconds}
    return Option("learner", world, 1, changes, seconds, changed)


def learner_placement(world: int, hw: Hardware, engines_elsewhere: int = 0) -> Placement:
    """Where PACK puts ``world`` learner ranks (first, from node 0) and engines on ``engines_elsewhere`` other nodes."""
    return Placement(learner_crosses_nodes=world > hw.devices_per_node,
                     learner_ranks_per_node=min(world, hw.devices_per_node),
                     engines_off_learner_node=engines_elsewhere > 0, engine_nodes_elsewhere=max(engines_elsewhere, 1))


def generation_options(cfg, hw: Hardware, most: int, archs: dict) -> list[Option]:
    """Engines × TP: any engine count dividing ppo.rollout_batch_size whose weights and one sequence's KV cache fit."""
    options = []
    for tp in (t for t in TENSOR_PARALLEL if t <= hw.devices_per_node):
        for engines in divisors(cfg.ppo.rollout_batch_size, most // tp):
            changes = {"resources.generation.num_actors": engines, "resources.generation.num_gpus": tp,
                       "resources.generation.tensor_parallel_size": tp}
            changed = variant(cfg, changes)
            _, kv = generation_memory(archs["policy"], changed, True, hw.memory_bytes)
            if kv["sequences_that_fit"] < 1:
                continue
            seconds = generate_time(changed, archs["policy"], hw, kv["concurrent"]).seconds
            options.append(Option("generation", engines, tp, changes, {"generate": seconds}, changed))
    return options


def frozen_options(role: str, cfg, hw: Hardware, most: int, archs: dict) -> list[Option]:
    """Reward or reference actors, one GPU each: any count dividing the rollout's sequences, each holding the model
    (replicated) or a 1/count shard of it (sharded), where that fits."""
    options = []
    for count in divisors(cfg.rollout_sequences, most):
        for sharded in (False, True) if count > 1 else (False,):
            prefix = f"resources.{role}"
            changes = {f"{prefix}.num_actors": count, f"{prefix}.num_gpus": 1, f"{prefix}.sharded": sharded}
            changed = variant(cfg, changes)
            if not _fits_device(frozen_role_memory(role, archs[role], changed), hw):
                continue
            seconds = frozen_forward_time(role, changed, archs[role], hw, count > hw.devices_per_node)
            options.append(Option(role, count, 1, changes, {"score": seconds}, changed))
    return options


def fastest_per_gpus(options: list[Option], keys: tuple[str, ...]) -> list[Option]:
    """The options no other option beats: none with no more GPUs (of the same width) is as fast or faster in every one
    of ``keys`` and no more offloaded. Ascending in GPUs."""
    def measures(o: Option) -> tuple:
        return (o.gpus, o.offloads, *(o.seconds[k] for k in keys))

    def beats(a: Option, b: Option) -> bool:
        return (a.width == b.width and measures(a) != measures(b)
                and all(x <= y for x, y in zip(measures(a), measures(b))))
    kept = [b for b in options if not any(beats(a, b) for a in options)]
    return sorted(kept, key=lambda o: (o.gpus, *(o.seconds[k] for k in keys)))


# ------------------------------------------------------------------------------------------- combinations

class FrozenPairs:
    """The reward and reference options that score fastest within a GPU budget, with the fewest GPUs (``best``)."""

    def __init__(self, reward: list[Option], reference: list[Option]):
        self.reward = _frontier(reward)
        self.reference = _frontier(reference)
        self._ref_gpus = [o.gpus for o in self.reference]
        self._ref_seconds = [-o.seconds["score"] for o in self.reference]  # ascending: the frontier gets faster
        self._best: dict[tuple[int, float], tuple | None] = {}

    def best(self, budget: int, floor: float) -> tuple[float, Option, Option] | None:
        """(score seconds, reward option, reference option): the pair within ``budget`` GPUs whose slower member is
        fastest, no faster than ``floor`` needs (the learner's values pass runs beside them), then the fewest GPUs."""
        if (budget, floor) not in self._best:
            self._best[budget, floor] = self._search(budget, floor)
        return self._best[budget, floor]

    def _search(self, budget: int, floor: float) -> tuple[float, Option, Option] | None:
        fastest = math.inf
        for r in self.reward:
            if r.gpus > budget:
                break
            f = self._fastest_reference(budget - r.gpus)
            if f is not None:
                fastest = min(fastest, max(r.seconds["score"], f.seconds["score"]))
        if fastest == math.inf:
            return None
        score = max(fastest, floor)
        i = bisect.bisect_left(self._ref_seconds, -score)   # the reference with the fewest GPUs as fast as ``score``
        pairs = [(r.gpus + self.reference[i].gpus, r) for r in self.reward
                 if r.seconds["score"] <= score and r.gpus + self.reference[i].gpus <= budget]
        return score, min(pairs, key=lambda p: p[0])[1], self.reference[i]

    def _fastest_reference(self, budget: int) -> Option | None:
        i = bisect.bisect_right(self._ref_gpus, budget)
        return self.reference[i - 1] if i else None


def _frontier(options: list[Option]) -> list[Option]:
    """Ascending in GPUs, each strictly faster than every option with fewer GPUs."""
    kept = []
    for option in sorted(options, key=lambda o: (o.gpus, o.seconds["score"])):
        if not kept or option.seconds["score"] < kept[-1].seconds["score"]:
            kept.append(option)
    return kept


@dataclass(eq=False)
class Candidate:
    """One option per role and the step the search predicts for them."""
    options: dict[str, Option]
    phases: dict[str, float]     # generate, score, learn, weight_sync (the search's own estimate)
    step: float
    rank: float                  # the step, offload penalised

    @property
    def gpus(self) -> int:
        return sum(o.gpus for o in self.options.values())

    @property
    def overrides(self) -> list[str]:
        return [o for role in ("learner", "generation", *FROZEN_ROLES) for o in self.options[role].overrides]


class Search:
    """The combinations of role options on ``gpus`` GPUs of ``hw`` (nodes of hw.devices_per_node), ranked by the step
    ppo.async_steps gives them (``ranked``)."""

    def __init__(self, cfg, hw: Hardware, gpus: int, archs: dict, options: dict[str, list[Option]]):
        self.cfg, self.hw, self.gpus, self.archs = cfg, hw, gpus, archs
        self.options = options
        self.learner = fastest_per_gpus(options["learner"], ("learn", "values", "sync"))
        self.generation = fastest_per_gpus(options["generation"], ("generate",))
        self.frozen = FrozenPairs(options["reward"], options["reference"])
        self.sync_cache: dict[tuple, float] = {}
        self.examined = 0

    def ranked(self, keep: int) -> list[Candidate]:
        """The ``keep`` best combinations: those within MIN_GAIN_FOR_MORE_GPUS of the fastest first, fewest GPUs
        first among them; then the others, fastest first."""
        found = []
        for learner in self.learner:
            for generation in self.generation:
                self.examined += 1
                candidate = self.combine(learner, generation)
                if candidate is not None:
                    found.append(candidate)
        if not found:
            return []
        found.sort(key=lambda c: (c.rank, c.gpus))
        near = sum(1 for c in found if c.rank <= found[0].rank * (1 + MIN_GAIN_FOR_MORE_GPUS))
        return (sorted(found[:near], key=lambda c: (c.gpus, c.rank)) + found[near:])[:keep]

    def combine(self, learner: Option, generation: Option, frozen: tuple[Option, Option] | None = None
                ) -> Candidate | None:
        """The step of ``learner`` and ``generation`` with the best frozen pair for the GPUs left (or ``frozen``);
        None if they do not fit the GPUs or the engines' blocks the nodes."""
        rest = self.gpus - learner.gpus - generation.gpus
        if rest < 0 or not engines_fit(learner.gpus, generation, self.gpus, self.hw.devices_per_node):
            return None
        if frozen is None:
            best = self.frozen.best(rest, learner.seconds["values"])
            if best is None:
                return None
            score, reward, reference = best
        else:
            reward, reference = frozen
            if reward.gpus + reference.gpus > rest:
                return None
            score = max(learner.seconds["values"], reward.seconds["score"], reference.seconds["score"])
        phases = {"generate": generation.seconds["generate"], "score": score, "learn": learner.seconds["learn"],
                  "weight_sync": self.sync_seconds(learner, generation)}
        step = step_of(phases, self.cfg.ppo.async_steps)
        return Candidate({"learner": learner, "generation": generation, "reward": reward, "reference": reference},
                         phases, step, step * (1 + OFFLOAD_PENALTY * learner.offloads))

    def sync_seconds(self, learner: Option, generation: Option) -> float:
        """The weight sync of this learner to these engines: PACK puts the engines on the learner's node only if
        both fit in one; otherwise the engines span about gpus / node nodes of their own."""
        per_node = self.hw.devices_per_node
        elsewhere = 0 if learner.gpus + generation.gpus <= per_node else math.ceil(generation.gpus / per_node)
        key = (id(learner), elsewhere)
        if key not in self.sync_cache:
            placement = learner_placement(learner.count, self.hw, elsewhere)
            self.sync_cache[key] = weight_sync_time(learner.cfg, self.archs["policy"], self.hw, placement).seconds
        return self.sync_cache[key]


def step_of(phases: dict[str, float], async_steps: int) -> float:
    """rlhf_ray.planning.timing.step_seconds on plain seconds."""
    g, s, l, w = phases["generate"], phases["score"], phases["learn"], phases["weight_sync"]
    return (max(g, s + l) if async_steps else g + s + l) + w


def engines_fit(learner_gpus: int, generation: Option, gpus: int, per_node: int) -> bool:
    """Whether PACK finds room for every engine's block of ``generation.width`` GPUs on one node, after the learner
    took its ``learner_gpus`` from node 0 on (rlhf_ray.planning.placement)."""
    width, room = generation.width, 0
    start = learner_gpus // per_node * per_node     # the learner's last node, partly taken (or the first free one)
    if start < gpus:
        room += (min(per_node, gpus - start) - (learner_gpus - start)) // width
        start += per_node
    if start < gpus:                                  # whole nodes, then a partial last one
        full, last = divmod(gpus - start, per_node)
        room += full * (per_node // width) + last // width
    return room >= generation.count


# ------------------------------------------------------------------------------------------- what is left over

UNITS = {  # role -> (one actor, the config value its count must divide, that value)
    "learner": ("learner rank", "ppo.mini_batch_size", lambda cfg: cfg.ppo.mini_batch_size),
    "generation": ("engine", "ppo.rollout_batch_size", lambda cfg: cfg.ppo.rollout_batch_size),
    "reward": ("reward actor", "the rollout's sequences", lambda cfg: cfg.rollout_sequences),
    "reference": ("reference actor", "the rollout's sequences", lambda cfg: cfg.rollout_sequences),
}


def idle_reasons(search: Search, chosen: Candidate) -> list[str]:
    """Why each role does not take the GPUs ``chosen`` leaves idle: its next count would not divide its batch, needs
    more GPUs than are idle, would not fit, or would not shorten the step by MIN_GAIN_FOR_MORE_GPUS."""
    idle = search.gpus - chosen.gpus
    if idle <= 0:
        return []
    return [f"{role}: {_why_not_more(search, chosen, role, idle)}" for role in ("generation", "learner", *FROZEN_ROLES)
            if chosen.options[role].count]


def _why_not_more(search: Search, chosen: Candidate, role: str, idle: int) -> str:
    current = chosen.options[role]
    unit, key, total = UNITS[role][0], UNITS[role][1], UNITS[role][2](search.cfg)
    following = [d for d in divisors(total) if d > current.count]
    if not following:
        return f"{current.count} {unit}s already split {key} = {total} into shares of one"
    count = following[0]
    gap = "" if count == current.count + 1 else (f"a {ordinal(current.count + 1)} {unit} would not divide {key} = "
                                                  f"{total}; ")
    extra = (count - current.count) * current.width
    what = f"{gap}the next count that does, {count} {unit}s," if gap else f"one more {unit}"
    if extra > idle:
        return f"{what} needs {extra} more GPUs and {idle} are idle"
    bigger = [c for c in (_with(search, chosen, o) for o in search.options[role]
                          if o.count == count and o.width == current.width) if c is not None]
    if not bigger:
        return f"{gap}{count} {unit}s do not fit the devices or the nodes"
    better = min(bigger, key=lambda c: c.rank)
    if better.rank >= chosen.rank:
        return f"{what} would not shorten the step: {_why_slower(chosen, better, role)}"
    gain = 1 - better.rank / chosen.rank
    if gain < MIN_GAIN_FOR_MORE_GPUS:
        return f"{what} would shorten the step by only {gain:.1%} (below {MIN_GAIN_FOR_MORE_GPUS:.0%})"
    return (f"{what} would shorten the step by {gain:.1%} by the search's estimate, yet no such layout passed its "
            "full plan")


def _with(search: Search, chosen: Candidate, option: Option) -> Candidate | None:
    """``chosen`` with ``option`` in place of its role's."""
    picked = {**chosen.options, option.role: option}
    return search.combine(picked["learner"], picked["generation"], (picked["reward"], picked["reference"]))


def _why_slower(chosen: Candidate, other: Candidate, role: str) -> str:
    old, new = chosen.phases, other.phases
    if role == "learner":
        zero3 = other.options["learner"].cfg.deepspeed.zero_stage == 3
        return (f"learn {old['learn']:.3g} s -> {new['learn']:.3g} s, weight sync {old['weight_sync']:.3g} s -> "
                f"{new['weight_sync']:.3g} s" + (" (ZeRO-3 gathers)" if zero3 else ""))
    if role == "generation":
        hidden = other.step - new["weight_sync"] > new["generate"]
        return ("generation is already hidden behind score + learn" if hidden
                else f"generate {old['generate']:.3g} s -> {new['generate']:.3g} s")
    return f"scoring waits for the slowest of reward, reference and values ({old['score']:.3g} s)"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass
class RoleShare:
    """One role of a layout: its actors and GPUs, the seconds of a step it works, and the share it waits."""
    role: str
    actors: int
    gpus_per_actor: float
    gpus: int
    busy_seconds: float
    idle_share: float


def role_shares(roles: list, phases: dict, step: float) -> list[RoleShare]:
    """Per role of a plan (its RoleMemory list, PhaseTime by phase, step seconds): the engines work while generating
    and loading weights, the learner through its values pass, the update and the publish, a frozen role while it
    scores; the rest of the step it waits."""
    score, sync = phases["score"].parts, phases["weight_sync"].seconds
    busy = {"generation": phases["generate"].seconds + sync,
            "learner": score.get("values", 0.0) + phases["learn"].seconds + sync,
            "reward": score.get("reward", 0.0), "reference": score.get("reference", 0.0)}
    return [RoleShare(r.role, r.actors, r.gpus_per_actor, math.ceil(r.actors * r.gpus_per_actor - 1e-9),
                      busy.get(r.role, 0.0), max(0.0, 1 - busy.get(r.role, 0.0) / step) if step else 0.0)
            for r in roles]
