"""The balancer's choice: the layouts a cluster allows, each predicted by the planner on calibrated hardware, fastest
first (python -m rlhf_ray.plan --calibrate; the probing and the files are rlhf_ray.cli.balance's).

On a CPU machine, a grid of layout options (``default_grid``: engines, learner ranks, ppo.async_steps,
resources.rollout_cores and threads per role, what python -m rlhf_ray.sweep varies; any config key can be an axis),
every combination the config accepts, with Ray's CPU reservations scaled down where they would not fit the machine's
cores (``reservations``); each layout is planned in full (rlhf_ray.planning.cores prices the cores it shares). Layouts
that would run alike (the same actors, threads per phase and cores) are listed once. On GPUs: the layout as
configured, and the planner's layout search (planner.recommend_layout) on the GPUs given.

``choose``: the fastest predicted step; among the layouts within ``tolerance`` of it, the fewest actors, then the
least staleness (the smallest ppo.async_steps), then the fewest changes to the config. The tolerance is what the
planner cannot tell apart: search.MIN_GAIN_FOR_MORE_GPUS, or the calibration's own step error at its probes where
that is larger (Calibration.step_error: a prediction is no closer than the fit came to what it was fitted to).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from rlhf_ray.planning.changes import with_overrides
from rlhf_ray.planning.cores import thread_plan
from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.search import MIN_GAIN_FOR_MORE_GPUS, RoleShare, as_overrides, divisors, role_shares, setting

ROLES = ("generation", "reward", "reference", "learner")
# Ray reserves at least this many CPUs per actor where the config's reservations are scaled down to fit the machine
# (Ray schedules fractions down to 1/10,000 of a CPU; a hundredth keeps the figures readable).
MIN_ACTOR_CPUS = 0.01


@dataclass(eq=False)
class Candidate:
    """One layout: its settings (dotted key -> value), the overrides that make it from the config (the settings and
    any reservations scaled to fit), and its plan; or why the config refuses it."""
    settings: dict
    overrides: list[str]
    plan: object = None            # rlhf_ray.planning.planner.Plan
    error: str = ""
    roles: list[RoleShare] = field(default_factory=list)

    @property
    def step(self) -> float:
        return self.plan.step_seconds if self.plan is not None else math.inf

    @property
    def actors(self) -> int:
        return sum(r.actors for r in self.plan.roles) if self.plan is not None else 0

    @property
    def async_steps(self) -> int:
        return self.plan.async_steps if self.plan is not None else 0

    def bound_by(self) -> str:
        """The side (overlapped) or phase that bounds the predicted step."""
        phases = self.plan.phases
        if self.async_steps:
            parts = phases["score"].parts
            rollout = phases["generate"].seconds + max(parts.get("reward", 0.0), parts.get("reference", 0.0))
            learner = parts.get("values", 0.0) + phases["learn"].seconds
            return "rollout (generate + score)" if rollout > learner else "learner (values + update)"
        return max(phases, key=lambda name: phases[name].seconds)


def default_grid(cfg, cores: int) -> dict[str, list]:
    """The layout options of a CPU machine of ``cores`` cores: engines dividing ppo.rollout_batch_size and learner
    ranks dividing ppo.mini_batch_size, at most one per core; ppo.async_steps 0 and 1 (and the config's own);
    rollout cores 1 … cores − 1 under overlap (null: half); each role's threads null (the phase's share) or 1."""
    ppo = cfg.ppo
    return {"resources.generation.num_actors": divisors(ppo.rollout_batch_size, cores),
            "resources.learner.num_actors": divisors(ppo.mini_batch_size, cores),
            "ppo.async_steps": sorted({0, 1, ppo.async_steps}),
            "resources.rollout_cores": [None] + [c for c in range(1, cores) if c != cores // 2],
            "resources.generation.threads": [None, 1] if cores > 1 else [None],
            "resources.learner.threads": [None, 1] if cores > 1 else [None]}


def reservations(cfg, cores: int) -> list[str]:
    """Overrides that scale every role's resources.<role>.num_cpus down by one factor where the actors' reservations
    would exceed the machine's cores (Ray would not place them); none where they fit. Threads do not follow the
    reservations (rlhf_ray.cluster.compute), so this changes where Ray may put actors, not how fast they compute."""
    res = cfg.resources
    roles = [r for r in ROLES if r != "reference" or cfg.reference_actors]
    reserved = sum(getattr(res, r).num_actors * getattr(res, r).num_cpus for r in roles)
    if reserved <= cores + 1e-9:
        return []
    scale = cores / reserved
    return [f"resources.{r}.num_cpus={max(MIN_ACTOR_CPUS, math.floor(getattr(res, r).num_cpus * scale * 100) / 100):g}"
            for r in roles]


def cpu_candidates(cfg, hw: Hardware, grid: dict[str, list], plan) -> list[Candidate]:
    """Every combination of ``grid`` on this machine, planned with ``plan(cfg) -> Plan``; those the config refuses or
    whose plan does not fit (memory) with why; layouts that run alike once (the first found)."""
    keys, found, seen = list(grid), [], set()
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = {k: v for k, v in zip(keys, values)}
        changes = as_overrides({k: ("null" if v is None else v) for k, v in settings.items() if setting(cfg, k) != v})
        try:
            changed = with_overrides(cfg, changes)
            fitted = reservations(changed, hw.cores)
            changed = with_overrides(changed, fitted) if fitted else changed
        except ValueError as err:
            found.append(Candidate(settings, changes, error=str(err).splitlines()[0]))
            continue
        same = _runs_alike(changed, hw.cores)
        if same in seen:
            continue
        seen.add(same)
        planned = plan(changed)
        if not planned.fits:   # memory: the plan says what does not fit
            found.append(Candidate(settings, changes + fitted, error="does not fit: " + planned.problems[0].message))
            continue
        found.append(Candidate(settings, changes + fitted, planned,
                               roles=role_shares(planned.roles, planned.phases, planned.step_seconds)))
    return found


def _runs_alike(cfg, cores: int) -> tuple:
    """What makes two CPU layouts run the same: actors per role, overlap, and each actor's threads per phase and
    cores."""
    threads = thread_plan(cfg, cores)
    per_actor = tuple(sorted((key, tuple(sorted(p.threads.items())), tuple(p.cpus or ()))
                             for key, p in threads.plans.items()))
    return cfg.ppo.async_steps, per_actor


def choose(candidates: list[Candidate], tolerance: float = MIN_GAIN_FOR_MORE_GPUS) -> Candidate | None:
    """The module docstring's choice among the planned candidates: ties within ``tolerance`` (a share of the
    fastest step) go to the simplest layout."""
    planned = sorted((c for c in candidates if c.plan is not None), key=lambda c: c.step)
    if not planned:
        return None
    near = [c for c in planned if c.step <= planned[0].step * (1 + max(tolerance, MIN_GAIN_FOR_MORE_GPUS))]
    return min(near, key=lambda c: (c.actors, c.async_steps, len(c.overrides), c.step))


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Planned candidates fastest first, then the refused ones."""
    return sorted(candidates, key=lambda c: (c.plan is None, c.step))
