"""Where the roles' actors run and how they compute there: each actor's node and CPUs as Ray placed it (logged, and
written to <output_dir>/placement.json), and the compute plans (threads per phase, CPU sets, priority:
rlhf_ray.cluster.compute) sent to them — at start, and again for replacements."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from rlhf_ray.cluster.compute import ActorPlan, ActorSite, describe, plan_compute

log = logging.getLogger("rlhf_ray.cluster.roles")  # (its records have always been the roles')


class ActorSites:
    """The part of ``rlhf_ray.cluster.roles.Roles`` that records where its actors run and plans their compute."""

    compute_plans: dict[tuple[str, int], ActorPlan]
    actor_nodes: dict[tuple[str, int], str]  # where each actor runs (Ray node id), from its own report
    node_names: dict[str, str]                # node id -> "address (labels)", for messages

    def _plan_compute(self) -> None:
        """Threads per phase, CPU sets and priority for every actor (rlhf_ray.cluster.compute), applied and logged."""
        actors = [(role, i, actor) for role, group in self.groups.items() for i, actor in enumerate(group)]
        places = self._wait([actor.where.remote() for _, _, actor in actors], "all roles", "reporting their node", "startup_s")
        sites = [ActorSite(role, i, p["node"], tuple(p["cpus"])) for (role, i, _), p in zip(actors, places)]
        self._record_processes([(role, i) for role, i, _ in actors], places)
        self._record_placement(sites)
        res = self.cfg.resources
        reward = getattr(getattr(self.cfg, "models", None), "reward", None)
        light = ("reward",) if reward is not None and not reward.hosts_model else ()  # no torch in the reward actor
        self.compute_plans = plan_compute(sites, self.overlapped, {role: getattr(res, role).threads for role in self.groups},
                                          getattr(res, "rollout_cores", None), res.nice, self.solo_phases, light)
        self._configure([(role, i) for role, i, _ in actors])
        for line in describe(self.compute_plans, sites):
            log.info("%s", line)
        refused = {p.applied["nice_error"] for p in self.compute_plans.values() if "nice_error" in p.applied}
        if refused:
            log.warning("could not set the role processes to nice %s (%s); they run at nice %s. Start Ray as a user "
                        "allowed to, or set resources.nice=null", res.nice, refused.pop(),
                        max(p.applied.get("nice", 0) for p in self.compute_plans.values()))

    def _record_placement(self, sites: list[ActorSite]) -> None:
        """Remember and log where every actor runs (the placement the config asked for, as Ray made it)."""
        self.actor_nodes = {(site.role, site.index): site.node for site in sites}
        for node in ray.nodes():
            labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
            shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            self.node_names[node["NodeID"]] = f"{node['NodeManagerAddress']} {node['NodeID'][:8]}" + (
                f" ({shown})" if shown else "")
        nodes = {}
        for (role, i), node in sorted(self.actor_nodes.items()):
            nodes.setdefault(node, []).append(f"{role}-{i}")
        if len(nodes) > 1 or any(getattr(self.cfg.resources, r).labels for r in self.groups):
            for node, held in nodes.items():
                log.info("node %s: %s", self.node_names.get(node, node[:8]), ", ".join(held))
        self._write_placement()

    def _write_placement(self) -> None:
        """<output_dir>/placement.json: each actor's node (id, address and labels), rewritten when one moves."""
        import json

        labels = {n["NodeID"]: {k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")}
                  for n in ray.nodes()}
        actors = {f"{role}-{i}": {"node": node, "name": self.node_names.get(node, node), "labels": labels.get(node, {})}
                  for (role, i), node in sorted(self.actor_nodes.items())}
        out = Path(self.cfg.output_dir)
        if out.is_dir():
            (out / "placement.json").write_text(json.dumps({"actors": actors, "time": time.time()}, indent=1) + "\n")

    def _configure(self, keys: list[tuple[str, int]]) -> None:
        """Send their compute plans to the actors ``keys`` (also to replacements: same bundle, same node)."""
        refs = [self.groups[role][i].configure_compute.remote(threads=self.compute_plans[(role, i)].threads,
                                                             cpus=self.compute_plans[(role, i)].cpus,
                                                             nice=self.compute_plans[(role, i)].nice)
                for role, i in keys]
        for (role, i), applied in zip(keys, self._wait(refs, "all roles", "setting threads and priority", "startup_s")):
            self.compute_plans[(role, i)].applied = applied

    def _settle_replacements(self, keys: list[tuple[str, int]]) -> None:
        """Compute plans for replacements: their old ones where they run on the same node, a new plan for every
        actor where one moved (threads and CPU sets are per node)."""
        if not self.compute_plans:
            return
        places = self._wait([self.groups[role][i].where.remote() for role, i in keys], "all roles",
                            "reporting their node", "startup_s")
        if any(place["node"] != self.actor_nodes.get(key) for key, place in zip(keys, places)):
            self._plan_compute()
        else:
            self._record_processes(keys, places)
            self._configure(keys)

    def _record_processes(self, keys: list[tuple[str, int]], places: list[dict]) -> None:
        """Each actor's node, process and stack-dump file (``processes``: the hang doctor, rlhf_ray.runtime.stacks)."""
        self.actor_processes = {**getattr(self, "actor_processes", {}), **{
            (role, i): {"role": role, "node": p["node"], "pid": p.get("pid"), "stacks_file": p.get("stacks_file")}
            for (role, i), p in zip(keys, places)}}

    def processes(self) -> dict[str, dict]:
        """{'<role>-<i>': its node, pid and stack-dump file} of the actors running now."""
        return {f"{role}-{i}": p for (role, i), p in sorted(getattr(self, "actor_processes", {}).items())
                if p.get("pid") is not None and i < len(self.groups.get(role, []))}
