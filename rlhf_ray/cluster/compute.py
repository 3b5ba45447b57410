"""How many threads each role computes with, on which cores, at which priority.

Ray gives an actor with a fractional CPU reservation one thread (OMP_NUM_THREADS=1) at nice 15. When the
roles run one phase after another that leaves cores idle: the learner computed on one core of two for two
thirds of every step. Here threads follow the phase instead of the reservation:

- phases that do not overlap (``ppo.async_steps: 0``): the roles computing in a phase share their node's
  cores — generation alone during ``generate``; reward, reference and the learner's values/old-logprob pass
  together during ``score`` (in DPO they take turns: a solo phase); the learner ranks alone during ``learn``;
- rollout overlapped with learning (``ppo.async_steps: k``, any k ≥ 1: one rollout thread whatever k is): on a node
  that hosts both sides the rollout roles (generation, reward, reference) get ``resources.rollout_cores`` of its
  cores (default half) and the learner the rest, as disjoint CPU sets (affinity), so neither side slows the other.

``resources.<role>.threads`` fixes a role's thread count in every phase; ``resources.nice`` sets the
priority of every role process (Ray starts workers at nice 15, behind any plain process on the machine).
The plan is logged at startup.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

ROLLOUT_ROLES = ("generation", "reward", "reference")
PHASES = {"generation": ("generate",), "reward": ("score",), "reference": ("score",), "learner": ("score", "learn")}


@dataclass(frozen=True)
class ActorSite:
    """Where an actor runs: its node and the CPUs it may use there (its affinity when it started)."""
    role: str
    index: int
    node: str
    cpus: tuple[int, ...]


@dataclass
class ActorPlan:
    threads: dict[str, int]                  # phase -> torch threads while computing in it
    cpus: list[int] | None = None            # affinity; None: leave it
    nice: int | None = None                  # process priority; None: leave it
    applied: dict = field(default_factory=dict)  # what the actor reported back


def plan_compute(sites: list[ActorSite], overlapped: bool, threads: dict[str, int | None],
                 rollout_cores: int | None = None, nice: int | None = 0,
                 solo_phases: tuple[str, ...] = (), light_roles: tuple[str, ...] = ()) -> dict[tuple[str, int], ActorPlan]:
    """Threads per phase (and CPU sets when rollout and learning overlap) for every actor.

    ``threads``: the per-role override (None: decide). Each phase's roles on a node share its cores evenly
    (at least one thread each); with ``overlapped`` the rollout roles and the learner split a node that hosts
    both into two disjoint CPU sets first. In ``solo_phases`` the roles take turns (DPO's ``score``: the
    reference, then the policy), so each shares the cores only with its own ranks. ``light_roles`` compute
    without torch (a function, HTTP or Serve reward: Python or another process does the work): one thread each,
    and the others in their phase do not share the cores with them.
    """
    by_node: dict[str, list[ActorSite]] = defaultdict(list)
    for site in sites:
        by_node[site.node].append(site)
    plans = {}
    for node_sites in by_node.values():
        cpus = sorted(set().union(*(s.cpus for s in node_sites)))
        sides = {"rollout": [s for s in node_sites if s.role in ROLLOUT_ROLES],
                 "learner": [s for s in node_sites if s.role == "learner"]}
        split = overlapped and all(sides.values())
        if split:
            rollout = min(max(1, rollout_cores or len(cpus) // 2), len(cpus) - 1) if len(cpus) > 1 else 1
            pools = {"rollout": cpus[:rollout], "learner": cpus[rollout:] or cpus}
        else:
            pools = {"rollout": cpus, "learner": cpus}
        for side, side_sites in sides.items():
            pool = pools[side]
            for site in side_sites:
                phase_threads = {}
                for phase in PHASES[site.role]:
                    sharing = [s for s in (side_sites if split else node_sites) if phase in PHASES[s.role]
                               and (phase not in solo_phases or s.role == site.role) and s.role not in light_roles]
                    fair = 1 if site.role in light_roles else max(1, len(pool) // max(1, len(sharing)))
                    phase_threads[phase] = threads.get(site.role) or fair
                plans[(site.role, site.index)] = ActorPlan(phase_threads, list(pool) if split else None, nice)
    return plans


def describe(plans: dict[tuple[str, int], ActorPlan], sites: list[ActorSite]) -> list[str]:
    """One log line per node: each actor's threads per phase, CPU set and priority as applied."""
    lines = []
    nodes = sorted({s.node for s in sites})
    for node in nodes:
        here = [s for s in sites if s.node == node]
        cpus = sorted(set().union(*(s.cpus for s in here)))
        parts = []
        for site in here:
            plan = plans[(site.role, site.index)]
            threads = ", ".join(f"{phase} {n}" for phase, n in plan.threads.items())
            where = f" on CPUs {','.join(map(str, plan.cpus))}" if plan.cpus else ""
            nice = plan.applied.get("nice")
            parts.append(f"{site.role}-{site.index}: {threads} threads{where}"
                         + (f", nice {nice}" if nice is not None else ""))
        label = f"node {node[:8]}" if len(nodes) > 1 else "this node"
        lines.append(f"compute plan, {label} ({len(cpus)} CPUs): " + "; ".join(parts))
    return lines
