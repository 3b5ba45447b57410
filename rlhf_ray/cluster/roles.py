"""The roles on Ray (PPO: all four; reward-model training: the learner alone): placement from the config,
batch splitting across actors, timeouts, replacing lost actors.

Every remote wait has a timeout from ``timeouts.*`` and fails with a message naming the role and what
it was doing — a dead or stuck actor never hangs the run silently.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.runtime.memory import KEEP_FREED_MEMORY_ENV
from rlhf_ray.actors.generation import GenerationActor
from rlhf_ray.actors.learner import LearnerActor
from rlhf_ray.actors.reference import ReferenceActor
from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.cluster.compute import ActorPlan, ActorSite, describe, plan_compute
from rlhf_ray.cluster.connection import local_ray_down, own_local_ray
from rlhf_ray.cluster.signals import STOP_SIGNALS
from rlhf_ray.config import ExperimentConfig, RoleResources
from rlhf_ray.objectives import LearnerSpec

log = logging.getLogger(__name__)
ROLE_ORDER = ("learner", "generation", "reward", "reference")
NOTICE_S = 120.0  # a wait longer than this is reported on the console, and again every NOTICE_S


class RoleError(RuntimeError):
    """A role failed, died or timed out; the message names the role and what it was doing."""


class NoRoomError(RoleError):
    """Nodes left the cluster with some of the roles, and the remaining nodes cannot host them."""


class ActorLost(RoleError):
    """An actor of ``role`` died (its process is gone) or did not answer within its timeout (``stuck``)."""

    def __init__(self, message: str, role: str, stuck: bool):
        super().__init__(message)
        self.role, self.stuck = role, stuck


WAIT_SLICE_S = 1.0  # how soon a wait notices a stop signal


def wait(refs, role: str, doing: str, timeout_s: float, timeout_key: str, logs: str = ""):
    """``ray.get`` with a timeout; failures become a RoleError naming the role, what it was doing and,
    for errors raised in an actor, the actor's full traceback. ``logs``: where the role's output goes.

    Waits in slices of WAIT_SLICE_S (a stop signal is acted on between them, never inside Ray), and a
    long wait says so every NOTICE_S instead of staying silent until the timeout."""
    see = f" (its output: {logs})" if logs else ""
    start = time.monotonic()
    notice = start + NOTICE_S
    try:
        with STOP_SIGNALS.waiting_on_ray():
            while True:
                STOP_SIGNALS.raise_pending()
                try:
                    return ray.get(refs, timeout=max(0.0, min(WAIT_SLICE_S, start + timeout_s - time.monotonic())))
                except GetTimeoutError:
                    now = time.monotonic()
                    if now - start >= timeout_s:
                        raise
                    if now >= notice:
                        log.info("still waiting for %s (%s): %.0f s of at most %.0f s (%s)", role, doing, now - start,
                                 timeout_s, timeout_key)
                        notice += NOTICE_S
    except GetTimeoutError:
        raise ActorLost(f"{role} did not finish {doing} within {timeout_s:.0f} s; it may be stuck or too slow "
                        f"for its resources (raise {timeout_key} if it is just slow){see}", role, stuck=True) from None
    except RayActorError as err:
        raise ActorLost(f"{role} actor died while {doing}{see}: {str(err).splitlines()[0]}", role,
                        stuck=False) from None
    except RayTaskError as err:
        cause = err.cause
        raise RoleError(f"{role} failed while {doing}: {type(cause).__name__}: {cause}\n"
                        f"--- traceback in the {role} actor{see} ---\n{str(err).rstrip()}") from None


@dataclass
class ModelPaths:
    policy: str
    reference: str
    reward: str | None
    value: str | None


class Roles:
    """All actors of one experiment and the coarse calls the driver makes on them.

    ``cfg`` is the experiment's config (its resources, timeouts, recovery, logging, output_dir sections);
    ``learner`` what the learner group runs; ``roles`` which roles the experiment has; ``solo_phases`` the
    phases whose roles the driver calls one at a time (rlhf_ray.cluster.compute.plan_compute).
    """

    def __init__(self, cfg: ExperimentConfig, paths: ModelPaths | None, learner: LearnerSpec,
                 roles: tuple[str, ...] = ROLE_ORDER, overlapped: bool = False, solo_phases: tuple[str, ...] = ()):
        self.cfg, self.timeouts, self.paths, self.learner_spec = cfg, cfg.timeouts, paths, learner
        self.role_names, self.overlapped, self.solo_phases = roles, overlapped, solo_phases
        self.closing = False  # set when the run ends: a call failing now is not worth replacing actors for
        # overlapped: the weights the engines hold, for a replacement engine (the learner is busy with the next ones)
        self.engine_weights: list | None = None
        self.compute_plans: dict[tuple[str, int], ActorPlan] = {}
        self.actor_nodes: dict[tuple[str, int], str] = {}  # where each actor runs (Ray node id), from its own report
        self.node_names: dict[str, str] = {}                # node id -> "address (labels)", for messages
        self.placement = self._reserve()
        self.groups: dict[str, list] = {role: [] for role in roles}
        self.restarts = {role: 0 for role in roles}
        self.recovery_seconds = 0.0  # spent replacing actors since the driver last read it
        self._sync_reported = False
        self.transport, why = cfg.weight_transport() if "generation" in roles else ("", "")
        if self.transport:
            log.info("weight transport: %s (%s), buckets of %g MiB", self.transport, why, cfg.weights.bucket_mb)
        self._weight_group_formed = False  # weights.transport=collective: formed with the current actors
        try:
            for role in roles:
                self.groups[role] = [self._new_actor(role, i) for i in range(getattr(cfg.resources, role).num_actors)]
            self._start()
            self._plan_compute()
        except BaseException:
            self.shutdown()  # release what did start: a shared cluster must not keep half an experiment
            raise

    @property
    def learners(self):
        return self.groups["learner"]

    @property
    def generators(self):
        return self.groups.get("generation", [])

    @property
    def rewards(self):
        return self.groups.get("reward", [])

    @property
    def references(self):
        return self.groups.get("reference", [])

    def _new_actor(self, role: str, index: int):
        """Actor ``index`` of ``role`` in its own placement-group bundle (also to replace a lost one)."""
        if role == "learner":
            return self._spawn(LearnerActor, role, index, self.learner_spec, index)
        cfg, res, paths = self.cfg, self.cfg.resources, self.paths
        if role == "generation":
            max_model_len = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
            return self._spawn(GenerationActor, role, index, paths.policy, cfg.generation.model_dump(), max_model_len,
                               cfg.seed + index, res.generation.tensor_parallel_size, cfg.models.dtype,
                               res.generation.num_gpus, self.transport,
                               cfg.models.lora.rank if cfg.models.lora else None)
        shard = (index, getattr(res, role).num_actors) if self._sharded(role) else None
        if role == "reward":
            return self._spawn(RewardActor, role, index, cfg.models.reward.model_dump(), paths.reward, cfg.models.dtype,
                               res.reward.num_gpus, shard, self.timeouts.score_s)
        dtype, micro_batch_size, temperature, forward = cfg.reference_forward()
        return self._spawn(ReferenceActor, role, index, paths.reference, dtype, micro_batch_size, temperature,
                           res.reference.num_gpus, shard, self.timeouts.score_s, forward)

    def _sharded(self, role: str) -> bool:
        """The role's actors hold one model between them (ZeRO-3 inference): built together in ``setup``."""
        return role in ("reward", "reference") and getattr(self.cfg.resources, role).sharded

    # ------------------------------------------------------------------------------------ placement
    def _bundles(self) -> list[tuple[str, RoleResources]]:
        res = self.cfg.resources
        return [(role, getattr(res, role)) for role in self.role_names for _ in range(getattr(res, role).num_actors)]

    def _reserve(self):
        """One placement group, a bundle per actor: its CPUs, GPUs and ``node_resources``, on a node with its role's
        ``labels`` (Ray's bundle label selector), the bundles placed by ``resources.placement_strategy``."""
        roles = self._bundles()
        bundles = [{"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {}), **r.node_resources}
                   for _, r in roles]
        need_cpu, need_gpu = sum(b["CPU"] for b in bundles), sum(b.get("GPU", 0) for b in bundles)
        have = ray.cluster_resources()
        if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
            if own_local_ray():  # a Ray of this run's own never grows: say so now, not after placement_s
                raise RoleError(f"the roles need {need_cpu:g} CPUs and {need_gpu:g} GPUs but this run's local Ray has "
                                f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; lower "
                                f"resources.*.num_cpus/num_gpus/num_actors or raise ray.num_cpus")
            log.warning("the roles need %g CPUs and %g GPUs but the cluster has %s now; waiting in case it grows",
                        need_cpu, need_gpu, have)
        labels = [dict(r.labels) for _, r in roles]
        pg = placement_group(bundles, strategy=self.cfg.resources.placement_strategy,
                             **({"bundle_label_selector": labels} if any(labels) else {}))
        if not pg.wait(timeout_seconds=self.timeouts.placement_s):
            remove_placement_group(pg)
            wanted = "; ".join(f"{role}: {r.labels or ''} {r.node_resources or ''}".strip()
                               for role, r in {role: r for role, r in roles}.items() if r.labels or r.node_resources)
            raise RoleError(f"could not reserve the roles' resources ({need_cpu:g} CPUs, {need_gpu:g} GPUs in "
                            f"{len(bundles)} bundles, strategy {self.cfg.resources.placement_strategy}"
                            f"{'; placed by ' + wanted if wanted else ''}); the cluster has {ray.cluster_resources()} "
                            f"on nodes labelled {[n.get('Labels', {}) for n in ray.nodes() if n['Alive']]}. Lower "
                            f"resources.*.num_cpus/num_gpus/num_actors, fix resources.*.labels/node_resources, or start "
                            f"Ray with more (ray.num_cpus); on an autoscaling cluster raise timeouts.placement_s")
        return pg

    def _spawn(self, cls, role: str, index: int, *args):
        bundle = self._bundle_index(role, index)
        res: RoleResources = getattr(self.cfg.resources, role)
        strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle)
        env = {"runtime_env": {"env_vars": KEEP_FREED_MEMORY_ENV}} if self.cfg.resources.keep_freed_memory else {}
        return ray.remote(cls).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, scheduling_strategy=strategy,
                                       **env).remote(*args, log_file=self._log_file(role, index))

    def _log_file(self, role: str, index: int | str) -> str | None:
        """Where an actor's output goes: <output_dir>/logs/<role>-<index>.log (None: the console)."""
        if self.cfg.logging.console != "quiet":
            return None
        return str(Path(self.cfg.output_dir).resolve() / "logs" / f"{role}-{index}.log")

    def _wait(self, refs, role: str, doing: str, timeout: str):
        """``wait`` with the timeout ``timeouts.<timeout>`` and the role's log files in its messages. In a role whose
        actors are ranks of one process group (learner, sharded frozen model) a dead rank makes the others' calls fail
        with a collective's error first: that is the loss of an actor (ActorLost), not an error of the role."""
        logs = self._log_file(role, "*") or ""
        try:
            return wait(refs, role, doing, getattr(self.timeouts, timeout), f"timeouts.{timeout}", logs)
        except ActorLost:
            raise
        except RoleError as err:
            grouped = role == "learner" or self._sharded(role)
            if grouped and role in self.groups and not all(self._alive(a) for a in self.groups[role]):
                raise ActorLost(f"a rank of {role} died while {doing}; the others failed with it: "
                                f"{str(err).splitlines()[0]}", role, stuck=False) from None
            raise

    def _start(self) -> None:
        start = time.perf_counter()
        setups = {role: self._set_up_group(role) for role in self.groups if role == "learner" or self._sharded(role)}
        for role, actors in self.groups.items():
            if role in setups:
                continue
            self._wait([a.__ray_ready__.remote() for a in actors], role, "loading its model", "startup_s")
            log.info("%s ready after %.1f s", role, time.perf_counter() - start)
        for role, refs in setups.items():
            doing = "building the DeepSpeed engine" if role == "learner" else "loading its shards of the model"
            setup_s = self._wait(refs, role, doing, "startup_s")
            log.info("%s ready after %.1f s (%s %.1f s%s)", role, time.perf_counter() - start,
                     "DeepSpeed setup" if role == "learner" else "ZeRO-3 setup", max(s for _, s in setup_s),
                     "" if role == "learner" else f", {len(refs)} ranks holding one model")

    def _set_up_group(self, role: str) -> list:
        """Start ``setup`` on every actor of a group that joins one process group (learner ranks, the ranks of a
        sharded frozen model); rank 0 opens the rendezvous."""
        group = self.groups[role]
        addr, port = self._wait(group[0].master_address.remote(), role, "starting", "startup_s")
        return [actor.setup.remote(addr, port) for actor in group]

    def _plan_compute(self) -> None:
        """Threads per phase, CPU sets and priority for every actor (rlhf_ray.cluster.compute), applied and logged."""
        actors = [(role, i, actor) for role, group in self.groups.items() for i, actor in enumerate(group)]
        places = self._wait([actor.where.remote() for _, _, actor in actors], "all roles", "reporting their node", "startup_s")
        sites = [ActorSite(role, i, p["node"], tuple(p["cpus"])) for (role, i, _), p in zip(actors, places)]
        self._record_placement(sites)
        res = self.cfg.resources
        reward = getattr(getattr(self.cfg, "models", None), "reward", None)
        light = ("reward",) if reward is not None and reward.kind != "model" else ()  # no torch in the reward actor
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

    def _await_room(self, keys: list[tuple[str, int]]) -> None:
        """Before replacing the actors ``keys``: those that lived on a node that has left the cluster come back in
        their bundles once Ray has moved the bundles to live nodes — waited for up to timeouts.placement_s, else
        NoRoomError naming the lost nodes and every role they held."""
        from ray.util.placement_group import placement_group_table

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        lost = {self.actor_nodes.get(key) for key in keys} - alive - {None}
        if not lost:
            return
        held = {node: [f"{r}-{i}" for (r, i), n in sorted(self.actor_nodes.items()) if n == node] for node in lost}
        where = "; ".join(f"node {self.node_names.get(n, n[:8])} left the cluster with {', '.join(h)}"
                          for n, h in held.items())
        log.warning("%s: waiting up to %.0f s (timeouts.placement_s) for room on the other nodes", where,
                    self.timeouts.placement_s)
        bundles = [self._bundle_index(role, i) for role, i in keys]
        deadline = time.monotonic() + self.timeouts.placement_s
        while True:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            table = placement_group_table(self.placement)
            if table["state"] == "CREATED" and all(table["bundles_to_node_id"].get(b) in alive for b in bundles):
                return
            if time.monotonic() > deadline:
                raise NoRoomError(f"{where}; the remaining nodes have no room for them (their resources and labels: "
                                  f"resources.*) within {self.timeouts.placement_s:.0f} s (timeouts.placement_s)")
            STOP_SIGNALS.raise_pending()
            time.sleep(0.5)

    def _bundle_index(self, role: str, index: int) -> int:
        return [i for i, (r, _) in enumerate(self._bundles()) if r == role][index]

    def _configure(self, keys: list[tuple[str, int]]) -> None:
        """Send their compute plans to the actors ``keys`` (also to replacements: same bundle, same node)."""
        refs = [self.groups[role][i].configure_compute.remote(threads=self.compute_plans[(role, i)].threads,
                                                             cpus=self.compute_plans[(role, i)].cpus,
                                                             nice=self.compute_plans[(role, i)].nice)
                for role, i in keys]
        for (role, i), applied in zip(keys, self._wait(refs, "all roles", "setting threads and priority", "startup_s")):
            self.compute_plans[(role, i)].applied = applied

    # ------------------------------------------------------------------------------------ recovery
    def _recoverable(self, role: str, doing: str, timeout: str, submit, refs=None):
        """Wait for ``refs`` (default ``submit()``); when an actor of ``role`` is lost, replace it and
        ``submit()`` again — up to recovery.max_actor_restarts times over the run. Learners are not
        replaced here: a lost rank takes the whole group back to a checkpoint (``restart_learners``)."""
        refs = submit() if refs is None else refs
        while True:
            try:
                return self._wait(refs, role, doing, timeout)
            except ActorLost as lost:
                if role == "learner" or self.closing or self.restarts[role] >= self.cfg.recovery.max_actor_restarts:
                    raise
                self._replace(role, lost, doing)
                refs = submit()

    def _replace(self, role: str, lost: ActorLost, doing: str, bring_up_to_date: bool = True,
                 indices: list[int] | None = None) -> None:
        """Replace the actors of ``role`` that are dead (all of them when ``lost.stuck``), or those at ``indices``."""
        start = time.perf_counter()
        group = self.groups[role]
        replaced = indices if indices is not None else [i for i, actor in enumerate(group)
                                                        if lost.stuck or not self._alive(actor)]
        if self._sharded(role):  # the other ranks may be blocked in a gather with the lost one: the group starts anew
            replaced = list(range(len(group)))
        self._await_room([(role, i) for i in replaced])
        for i in replaced:
            ray.kill(group[i], no_restart=True)
            group[i] = self._new_actor(role, i)
        self.restarts[role] += 1
        if self._sharded(role):
            self._wait(self._set_up_group(role), role, "loading its shards again", "startup_s")
        if role == "generation":
            self._weight_group_formed = False
        self._wait([group[i].__ray_ready__.remote() for i in replaced], role, "starting as a replacement", "startup_s")
        self._settle_replacements([(role, i) for i in replaced])
        if role == "generation" and bring_up_to_date:  # it starts from the initial policy: give it the current one
            self._bring_up_to_date([group[i] for i in replaced])
        seconds = time.perf_counter() - start
        self.recovery_seconds += seconds
        log.warning("recovery: %s; replaced %s in %.1f s (replacement %d of at most %d), redoing %s", lost,
                    ", ".join(f"{role}-{i}" for i in replaced), seconds, self.restarts[role],
                    self.cfg.recovery.max_actor_restarts, doing)

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
            self._configure(keys)

    @staticmethod
    def _alive(actor) -> bool:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
            return True
        except RayActorError:
            return False
        except GetTimeoutError:  # busy with a task: alive
            return True

    def restart_learners(self) -> None:
        """Replace every learner rank (the survivors may be blocked in a collective with the dead one)."""
        start = time.perf_counter()
        for actor in self.learners:
            ray.kill(actor, no_restart=True)
        self._await_room([("learner", i) for i in range(len(self.learners))])
        self.groups["learner"] = [self._new_actor("learner", i) for i in range(len(self.learners))]
        self.restarts["learner"] += 1
        self._weight_group_formed = False
        self._wait(self._set_up_group("learner"), "learner", "building the DeepSpeed engine again", "startup_s")
        self._settle_replacements([("learner", i) for i in range(len(self.learners))])
        self.recovery_seconds += time.perf_counter() - start

    # ---------------------------------------------------------------------------------- the calls
    def generate(self, prompts, seeds: list[int]) -> tuple[RolloutBatch, float]:
        """Prompts (each with its sampling seed) split over the generation actors in order, as evenly as they go (an
        actor may get one more); returns the joined batch, rows in the order of the prompts, and compute seconds."""
        share, extra = divmod(len(prompts), len(self.generators))
        bounds = [i * share + min(i, extra) for i in range(len(self.generators) + 1)]
        # self.generators is read at each call: a retry after a lost actor goes to its replacement
        results = self._recoverable("generation", "sampling a rollout", "generate_s", lambda: [
            g.generate.remote(prompts[bounds[i]:bounds[i + 1]], seeds[bounds[i]:bounds[i + 1]])
            for i, g in enumerate(self.generators) if bounds[i + 1] > bounds[i]])
        return RolloutBatch.concat([b for b, _ in results]), max(s for _, s in results)

    def score(self, batch: RolloutBatch, roles: tuple[str, ...] = ("reward", "reference", "learner"),
              old_logprobs: bool = True) -> tuple[dict, dict]:
        """Of ``roles``, concurrently: reward scores, reference logprobs, the learner's values (and its old logprobs
        unless the sampler's serve: ``old_logprobs=False``). Without reference actors (models.lora) the learner
        computes the reference logprobs, in the same call. Returns the tensors and each role's compute seconds."""
        reference_in_learner = "reference" in roles and "reference" not in self.groups
        learner = "learner" in roles

        def submit(role: str, method: str, **options):
            return lambda: [getattr(a, method).remote(part, **options)
                            for a, part in zip(self.groups[role], batch.chunks(len(self.groups[role])))]

        learner_work = ", ".join(what for what, asked in (("values", learner), ("old logprobs", learner and old_logprobs),
                                                         ("reference logprobs", reference_in_learner)) if asked)
        calls = {"reward": (submit("reward", "score"), "scoring a rollout", "score_s"),
                 "reference": (submit("reference", "logprobs"), "computing logprobs", "score_s"),
                 "learner": (submit("learner", "evaluate", logprobs=learner and old_logprobs, values=learner,
                                    reference=reference_in_learner), f"computing {learner_work}", "learn_s")}
        wanted = set(roles)
        if reference_in_learner:
            wanted = (wanted - {"reference"}) | {"learner"}
        calls = {role: call for role, call in calls.items() if role in wanted}
        pending = {role: call[0]() for role, call in calls.items()}  # all at the same time
        results = {role: self._recoverable(role, doing, timeout, again, pending[role])
                   for role, (again, doing, timeout) in calls.items()}
        out = {}
        if "reward" in results:
            out["scores"] = torch.cat([scores for scores, _ in results["reward"]])
        if "reference" in results:
            out["ref_logprobs"] = torch.cat([logprobs for logprobs, _ in results["reference"]])
        if "learner" in results:  # the objective's evaluate: a dict of what it computed
            for key in results["learner"][0][0]:
                out[key] = torch.cat([part[key] for part, _ in results["learner"]])
        seconds = {("values" if role == "learner" else role): max(s for _, s in parts) for role, parts in results.items()}
        return out, seconds

    def stored_reward_statistics(self) -> dict | None:
        """The RM's saved score statistics (reward_stats.json), as the reward backend reads them."""
        return self._wait(self.rewards[0].stored_statistics.remote(), "reward", "reading the RM's stored statistics",
                          "score_s")

    def learn(self, batch) -> tuple[dict, float]:
        """The objective's update on equal shards of ``batch``; its stats summed over ranks (each rank reports
        its share of the global means), ``optim/*`` as rank 0 has them."""
        parts = self._wait([a.train.remote(part) for a, part in zip(self.learners, batch.chunks(len(self.learners)))],
                           "learner", f"running the {self.learner_spec.objective} update", "learn_s")
        stats = {key: value if key.startswith("optim/") else sum(p[key] for p, _ in parts)
                 for key, value in parts[0][0].items()}
        return stats, max(s for _, s in parts)

    def evaluate(self, batch) -> tuple[list, float]:
        """The objective's forward passes (no update) on equal shards of ``batch``: each rank's result."""
        parts = self._wait([a.evaluate.remote(part) for a, part in zip(self.learners, batch.chunks(len(self.learners)))],
                           "learner", "evaluating", "learn_s")
        return [out for out, _ in parts], max(s for _, s in parts)

    def sync_weights(self, generators: list | None = None) -> dict:
        """The learner's current policy into every generation actor (or those given) by ``weights.transport``."""
        if self.transport == "collective":
            result = self._broadcast_weights()
        else:
            result = self._publish_weights(generators)
        report = result["report"]
        if not self._sync_reported:  # the same every step: say it once
            log.info("weight sync: %d tensors sent, %d engine parameters loaded, re-processed shared layers: %s",
                     report["received"], report["loaded"], ", ".join(report["reprocessed"]) or "none")
            self._sync_reported = True
        return result

    def _publish_weights(self, generators: list | None) -> dict:
        """object_store / files: the learner publishes once; every engine (or those given) loads the same objects."""
        published = self._wait([a.publish_weights.remote(transport=self.transport, bucket_mb=self.cfg.weights.bucket_mb)
                                for a in self.learners], "learner", "publishing weights", "weight_sync_s")
        buckets = published[0][0]
        if self.overlapped:
            self.engine_weights = buckets
        load = lambda: [g.load_weights.remote(buckets, self.timeouts.weight_sync_s, transport=self.transport)  # noqa: E731
                        for g in (generators or self.generators)]
        if generators:  # a replacement being brought up to date: no recovery inside a recovery
            loads = self._wait(load(), "generation", "loading the current weights", "weight_sync_s")
        else:
            loads = self._recoverable("generation", "loading new weights", "weight_sync_s", load)
        return {"publish": max(s for _, s in published), "load": max(s for _, s in loads), "report": loads[0][0]}

    def _broadcast_weights(self) -> dict:
        """collective: learner rank 0 broadcasts to every engine at once (a replacement engine too: it is in the new
        group). An engine lost on the way — its peers' transfers fail with it — is replaced, the group formed again
        and the broadcast redone; a lost learner rank goes to learner recovery like any learner failure."""
        while True:
            sends, loads = [], []
            try:
                if not self._weight_group_formed:  # (an engine lost meanwhile shows here first)
                    self._form_weight_group()
                sends = [a.publish_weights.remote(transport="collective", bucket_mb=self.cfg.weights.bucket_mb)
                         for a in self.learners]
                loads = [g.load_weights.remote(self._weight_layout, self.timeouts.weight_sync_s,
                                               transport="collective") for g in self.generators]
                loaded = self._wait(loads, "generation", "receiving new weights", "weight_sync_s")
            except RoleError as err:
                self._weight_group_formed = False
                transfer_failed = not self._settle(sends)  # raises ActorLost when the learner itself is gone
                if not all(self._alive(a) for a in self.learners):  # (gone while the group was being formed)
                    raise ActorLost(f"a learner rank died while forming the weight group: {str(err).splitlines()[0]}",
                                    "learner", stuck=False) from None
                # an engine whose update stopped half-way holds some new and some old weights (and vLLM's reload
                # is left open): it is replaced like a dead one. An engine's own error with the transfer intact
                # (a weight it did not get) would only come back: it ends the run.
                broken = self._unfinished(loads) if loads else [i for i, g in enumerate(self.generators)
                                                                if not self._alive(g)]
                dead = not all(self._alive(g) for g in self.generators)
                if (self.closing or self.restarts["generation"] >= self.cfg.recovery.max_actor_restarts or not broken
                        or not (dead or transfer_failed)):
                    raise
                lost = err if isinstance(err, ActorLost) else ActorLost(str(err), "generation", stuck=False)
                self._replace("generation", lost, "receiving new weights", bring_up_to_date=False, indices=broken)
                continue
            sent = self._wait(sends, "learner", "broadcasting weights", "weight_sync_s")
            return {"publish": max(s for _, s in sent), "load": max(s for _, s in loaded), "report": loaded[0][0]}

    def _unfinished(self, loads: list) -> list[int]:
        """Indices of the engines whose load did not complete (failed, died, or still hanging after the timeout)."""
        ray.wait(loads, num_returns=len(loads), timeout=self.timeouts.weight_sync_s)
        broken = []
        for i, ref in enumerate(loads):
            try:
                ray.get(ref, timeout=0)
            except Exception:  # its error, its death, or not ready
                broken.append(i)
        return broken

    def _settle(self, sends: list) -> bool:
        """After a failed broadcast: wait for the learner's side to end too (bounded by the group's timeout), so that
        the learner is free again. Returns whether its sending succeeded; its death is raised (learner recovery)."""
        try:
            self._wait(sends, "learner", "broadcasting weights", "weight_sync_s")
            return True
        except ActorLost:
            raise
        except RoleError:
            return False

    def _form_weight_group(self) -> None:
        """(Re-)form the broadcast group: learner rank 0 (rank 0) and every worker of every engine."""
        workers = self.cfg.resources.generation.tensor_parallel_size
        world = 1 + workers * len(self.generators)
        timeout = self.timeouts.weight_sync_s
        host, port = self._wait(self.learners[0].open_weight_group.remote(), "learner", "opening the weight group",
                                "weight_sync_s")
        joins = [self.learners[0].join_weight_group.remote(world_size=world, timeout_s=timeout)]
        joins += [g.join_weight_group.remote(host=host, port=port, first_rank=1 + i * workers, world_size=world,
                                             timeout_s=timeout) for i, g in enumerate(self.generators)]
        self._wait(joins, "generation", "joining the weight group", "weight_sync_s")
        self._weight_layout = self._wait(self.learners[0].weight_layout.remote(self.cfg.weights.bucket_mb), "learner",
                                         "listing its weights", "weight_sync_s")
        self._weight_group_formed = True
        log.info("weight group formed: learner rank 0 and %d engine worker(s) at %s:%d", world - 1, host, port)

    def _bring_up_to_date(self, engines: list) -> None:
        """Replacement engines get the weights the others hold. Overlapped, those are the last published ones (kept
        for this): the learner may be inside an update, and new weights from it would mix two policies in a batch.
        A broadcast goes to every engine, in a group formed anew with the replacement."""
        if self.transport == "collective":
            self._broadcast_weights()
        elif not self.overlapped:
            self.sync_weights(engines)
        elif self.engine_weights is not None:  # None: nothing published yet, the initial policy is current
            self._wait([g.load_weights.remote(self.engine_weights, self.timeouts.weight_sync_s, transport=self.transport)
                        for g in engines],
                       "generation", "loading the current weights", "weight_sync_s")

    def learner_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        results = self._wait([a.sequence_logprobs.remote(prompt_ids, response_ids) for a in self.learners], "learner",
                             "computing logprobs of a response", "learn_s")
        return results[0][0]

    def generator_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[list[float]]:
        return self._wait([g.sequence_logprobs.remote(prompt_ids, response_ids) for g in self.generators],
                          "generation", "computing logprobs of a response", "generate_s")

    def learner_parameters(self, trainable: bool = True) -> int:
        """The learner's trainable parameters, or with ``trainable=False`` its frozen ones (a LoRA policy's base)."""
        return self._wait(self.learners[0].num_parameters.remote(trainable=trainable), "learner", "counting parameters",
                          "learn_s")

    def memory(self) -> dict[str, float]:
        """Each role's peak resident memory since the last call and the shared (object-store) part of its
        resident memory now, max over its actors, in GB."""
        refs = {role: [a.memory.remote() for a in group] for role, group in self.groups.items()}
        out = {}
        for role, role_refs in refs.items():
            try:
                timeout = "learn_s" if role == "learner" else "score_s"  # a learner-only run has no score_s
                readings = self._wait(role_refs, role, "reading its memory", timeout)
            except ActorLost as lost:  # the next phase that needs the role replaces it
                log.warning("%s", lost)
                continue
            out[f"memory/{role}_peak_gb"] = max(r["peak_gb"] for r in readings)
            out[f"memory/{role}_shared_gb"] = max(r["shared_gb"] for r in readings)
        return out

    def save(self, path: str) -> str:
        results = self._wait([a.save.remote(path) for a in self.learners], "learner", "saving the model", "learn_s")
        return results[0]

    def save_state(self, directory: str) -> None:
        self._wait([a.save_state.remote(directory) for a in self.learners], "learner", "saving a checkpoint", "learn_s")

    def load_state(self, directory: str) -> None:
        self._wait([a.load_state.remote(directory) for a in self.learners], "learner", "loading a checkpoint",
                   "learn_s")

    def shutdown(self) -> None:
        if local_ray_down():  # every call would hang on the dead GCS (rlhf_ray.train then leaves at once)
            return
        refs = [a.shutdown.remote() for role in self.groups if role == "learner" or self._sharded(role)
                for a in self.groups[role]] + [g.close.remote() for g in self.generators]
        ray.wait(refs, num_returns=len(refs), timeout=15)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except RayActorError:  # already gone (the reason was reported when it happened)
                pass
            except Exception as err:  # the run is ending anyway; report and release resources
                log.warning("clean shutdown of the roles failed: %s", str(err).splitlines()[0])
        for actor in self.learners + self.generators + self.rewards + self.references:
            ray.kill(actor)
        remove_placement_group(self.placement)
