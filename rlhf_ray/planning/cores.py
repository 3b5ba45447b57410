"""One CPU machine's cores shared by the roles: how many threads each actor computes with in each phase, on which of
the cores, and how long each phase takes there (the planner's CPU model).

Threads and cores are the run's own, from the same config (rlhf_ray.cluster.compute.plan_compute): in a phase that
overlaps nothing, the roles computing in it share all P cores of the machine; with ppo.async_steps ≥ 1 the rollout
roles (generation, reward, reference) compute on resources.rollout_cores of them (default half) and the learner on
the others. A role computing without torch (a function, HTTP or Serve reward) takes one thread and no core from the
others.

rlhf_ray.planning.timing prices each actor's work as if it had all P cores to itself: ``a`` seconds (the machine's
all-core peak and bandwidth, hardware.this_machine). With t threads and a serial share σ of its work — what no thread
speeds up: Python, kernel dispatch, single-threaded copies — an actor alone takes (Amdahl's law around the all-core
figure)

    alone = a · (σ + (1 − σ) · P / t)        for   W = a · (σ + (1 − σ) · P)   core-seconds of work,

so it can use at most R = W / alone cores at once. Actors computing at the same time on a pool of C cores share them
max-min fairly (the OS scheduler's time slices): each running actor gets min(R, its fair share of what the others
leave), and an actor that ends gives its cores to the rest (``finish_times``). A pool that all of them keep busy ends
after Σ W / C; an actor with less work than the others ends earlier; one alone ends after ``alone``.

σ is what a calibration measures (WorkFactors.serial, from probes at two thread counts: rlhf_ray.planning.calibration).
Without one, SERIAL_SHARE_PRIOR. On GPUs every actor has its own devices: a group of pool 0, each actor its ``a``.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.cluster.compute import ActorSite, plan_compute
from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.models import Architecture
from rlhf_ray.planning.timing import (PhaseTime, Placement, frozen_forward_time, generate_time, learn_time, values_time,
                                      weight_sync_time)

# σ without a calibration. Compute: 0 — the planner's CPU rates are the machine's matmul peak and copy bandwidth
# measured with all its cores, taken to scale linearly with the cores an actor has. The weight sync: 1 — its rates are
# whole transfers (OBJECT_STORE_BYTES_PER_S, GLOO_LOOPBACK_BYTES_PER_S: one copy after another), not per core.
SERIAL_SHARE_PRIOR = {"generate": 0.0, "reward": 0.0, "reference": 0.0, "values": 0.0, "learn": 0.0,
                      "weight_sync": 1.0}
NODE = "this machine"


@dataclass(frozen=True)
class Work:
    """One actor's work in a phase: ``seconds`` at all of the machine's cores (on GPUs: on its own devices), computed
    with ``threads`` threads; ``light``: no torch (it takes no core from the others)."""
    role: str
    kind: str        # hardware.WORK_KINDS
    seconds: float
    threads: int = 1
    light: bool = False


@dataclass(frozen=True)
class Group:
    """Actors computing at the same time on one pool of ``pool`` of the machine's ``cores`` (0: each on its own
    devices, as on GPUs)."""
    works: tuple[Work, ...]
    pool: int = 0
    cores: int = 1

    def seconds(self, kind: str, factors: dict[str, float] | None = None,
                serials: dict[str, float] | None = None) -> float:
        """When the last actor of ``kind`` in this group ends, each actor's work × ``factors[kind]`` (default 1) with
        serial shares ``serials`` (default SERIAL_SHARE_PRIOR): the module docstring's sharing of the pool."""
        ends = self.ends(factors, serials)
        return max((end for w, end in zip(self.works, ends) if w.kind == kind), default=0.0)

    def ends(self, factors: dict[str, float] | None = None, serials: dict[str, float] | None = None) -> list[float]:
        """When each actor ends (seconds from the phase's start)."""
        factors, serials = factors or {}, {**SERIAL_SHARE_PRIOR, **(serials or {})}
        alone = [w.seconds * factors.get(w.kind, 1.0) * (1.0 if not self.pool else
                 serials[w.kind] + (1 - serials[w.kind]) * self.cores / w.threads) for w in self.works]
        if not self.pool:
            return alone
        shared = [i for i, w in enumerate(self.works) if not w.light and alone[i] > 0]
        work = [w.seconds * factors.get(w.kind, 1.0) * (serials[w.kind] + (1 - serials[w.kind]) * self.cores)
                for w in self.works]
        ends = list(alone)   # light actors take no core: they end as if alone
        for i, end in zip(shared, finish_times([work[i] for i in shared], [work[i] / alone[i] for i in shared],
                                               self.pool)):
            ends[i] = end
        return ends

    def describe(self, kind: str, serials: dict[str, float]) -> str:
        works = [w for w in self.works if w.kind == kind]
        if not self.pool or not works:
            return ""
        first, s = works[0], {**SERIAL_SHARE_PRIOR, **serials}[kind]
        alone = first.seconds * (s + (1 - s) * self.cores / first.threads)
        limit = "its own work" if alone >= self.seconds(kind, serials=serials) - 1e-12 else "the shared cores"
        return (f"{len(works)} {first.role} actor{'s' * (len(works) > 1)} × {first.threads} thread"
                f"{'s' * (first.threads > 1)} on {self.pool} of {self.cores} cores, bound by {limit} (serial share "
                f"{s:.2f})")


def finish_times(work: list[float], most: list[float], cores: float) -> list[float]:
    """When each of several jobs ends on ``cores`` shared max-min fairly: job i needs work[i] core-seconds and runs
    on at most most[i] cores; while they run, the one with the smallest need gets min(its most, an equal share of the
    cores), the next an equal share of what is left, and so on (water-filling); each time one ends, the rest share
    again."""
    left, ends, now = list(work), [0.0] * len(work), 0.0
    running = [i for i in range(len(work)) if work[i] > 0]
    while running:
        rates, free = {}, float(cores)
        for n, i in enumerate(sorted(running, key=lambda j: most[j])):
            rates[i] = min(most[i], free / (len(running) - n))
            free -= rates[i]
        step = min(left[i] / rates[i] for i in running)
        now += step
        for i in running:
            left[i] -= rates[i] * step
        done = [i for i in running if left[i] <= 1e-12 * max(work[i], 1e-30)]
        for i in done:
            ends[i] = now
        running = [i for i in running if i not in done]
    return ends


# ------------------------------------------------------------------------------------------- threads

@dataclass(frozen=True)
class Threads:
    """Threads per (role, index) in each phase, and the cores of each side (``rollout``: generation, reward,
    reference; ``learner``), as rlhf_ray.cluster.compute.plan_compute assigns them on one machine."""
    plans: dict
    rollout: int
    learner: int
    light: tuple[str, ...]

    def of(self, role: str, index: int, phase: str) -> int:
        return self.plans[(role, index)].threads[phase]


def thread_plan(cfg, cores: int) -> Threads:
    """The run's own compute plan for ``cfg`` on one machine of ``cores`` cores, every actor on it."""
    res = cfg.resources
    roles = ("generation", "reward", "learner") + (("reference",) if cfg.reference_actors else ())
    sites = [ActorSite(role, i, NODE, tuple(range(cores))) for role in roles
             for i in range(getattr(res, role).num_actors)]
    light = ("reward",) if not cfg.models.reward.loads_model else ()
    plans = plan_compute(sites, cfg.ppo.async_steps > 0, {role: getattr(res, role).threads for role in roles},
                         res.rollout_cores, res.nice, (), light)
    rollout_cpus, learner_cpus = plans[("generation", 0)].cpus, plans[("learner", 0)].cpus
    return Threads(plans, len(rollout_cpus) if rollout_cpus else cores, len(learner_cpus) if learner_cpus else cores,
                   light)


# ------------------------------------------------------------------------------------------- the work of a step

def cpu_work(cfg, archs: dict[str, Architecture], hw: Hardware, placement: Placement,
             concurrent: int) -> dict[str, Group]:
    """Each kind of work of a step (WORK_KINDS) -> the group of actors it computes in, on one machine's cores: the
    engines generating; reward ‖ reference ‖ the values pass (overlapped: reward ‖ reference on the rollout side's
    cores, the values pass on the learner's); the learner ranks updating; the engines loading new weights."""
    cores = max(1, hw.cores)
    threads = thread_plan(cfg, cores)
    res, policy, critic = cfg.resources, archs["policy"], archs.get("critic")

    def works(role: str, kind: str, seconds: float, phase: str) -> tuple[Work, ...]:
        return tuple(Work(role, kind, seconds, threads.of(role, i, phase), role in threads.light)
                     for i in range(getattr(res, role).num_actors))

    reward = works("reward", "reward", frozen_forward_time("reward", cfg, archs.get("reward"), hw, False), "score")
    reference = (works("reference", "reference", frozen_forward_time("reference", cfg, archs["reference"], hw, False),
                       "score") if "reference" in archs else ())
    values = works("learner", "values", values_time(cfg, policy, critic, hw, placement), "score")
    sync = weight_sync_time(cfg, policy, hw, placement).seconds
    groups = {"generate": Group(works("generation", "generate", generate_time(cfg, policy, hw, concurrent).seconds,
                                      "generate"), threads.rollout, cores),
              "learn": Group(works("learner", "learn", learn_time(cfg, policy, critic, hw, placement).seconds,
                                   "learn"), threads.learner, cores),
              "weight_sync": Group(works("generation", "weight_sync", sync, "generate"), threads.rollout, cores)}
    if cfg.ppo.async_steps > 0:
        rollout = Group(reward + reference, threads.rollout, cores)
        groups |= {"reward": rollout, "values": Group(values, threads.learner, cores)}
    else:
        groups |= {"reward": Group(reward + reference + values, cores, cores)}
        groups["values"] = groups["reward"]
    if reference:
        groups["reference"] = groups["reward"]
    return groups


def gpu_work(phases: dict[str, PhaseTime]) -> dict[str, Group]:
    """The same structure for a GPU plan: every kind of work on its own devices (its phase's seconds)."""
    score = phases["score"].parts
    groups = {kind: Group((Work(kind, kind, phases[kind].seconds),)) for kind in ("generate", "learn", "weight_sync")}
    groups |= {role: Group((Work(role, role, seconds),)) for role, seconds in score.items()}
    return groups


def work_seconds(work: dict[str, Group], factors: dict[str, float] | None = None,
                 serials: dict[str, float] | None = None) -> dict[str, float]:
    """Each kind of work's seconds in a step, its work × ``factors`` with ``serials`` (the calibration's fit)."""
    return {kind: group.seconds(kind, factors, serials) for kind, group in work.items()}


def phases_of(work: dict[str, Group], hw: Hardware, sync_parts: PhaseTime) -> dict[str, PhaseTime]:
    """The plan's phases from the work of a CPU step (its seconds already calibrated by the timing functions; the
    serial shares the calibration's): generate, score with its parts, learn, weight_sync."""
    serials = hw.factors.serial if hw.factors else {}
    seconds = work_seconds(work, serials=serials)

    def phase(name: str, kind: str) -> PhaseTime:
        return PhaseTime(name, seconds[kind], {}, work[kind].describe(kind, serials))

    parts = {role: seconds[role] for role in ("reward", "reference", "values") if role in work}
    overlapped = work["values"] is not work["reward"]
    where = ("reward ‖ reference on the rollout side's cores, the values pass on the learner's" if overlapped
             else f"reward ‖ reference ‖ values on the same {work['reward'].pool} cores")
    return {"generate": phase("generate", "generate"), "score": PhaseTime("score", max(parts.values()), parts, where),
            "learn": phase("learn", "learn"),
            "weight_sync": PhaseTime("weight_sync", seconds["weight_sync"], sync_parts.parts,
                                     f"{sync_parts.bound}; {work['weight_sync'].describe('weight_sync', serials)}",
                                     sync_parts.alternatives)}


def cpu_phases(cfg, archs: dict[str, Architecture], hw: Hardware, placement: Placement,
               concurrent: int) -> tuple[dict[str, PhaseTime], dict[str, Group]]:
    """(phases, work) of a step on one machine's cores."""
    work = cpu_work(cfg, archs, hw, placement, concurrent)
    return phases_of(work, hw, weight_sync_time(cfg, archs["policy"], hw, placement)), work

