"""The roles on Ray (PPO: all four; reward-model training: the learner alone): placement from the config, starting
the actors, replacing lost ones. What the driver calls on them is ``rlhf_ray.cluster.calls``; where they run and how
they compute there ``rlhf_ray.cluster.sites``; weight sync ``rlhf_ray.weights.sync`` (``Roles.weights``).

Every remote wait has a timeout from ``timeouts.*`` and fails with a message naming the role and what
it was doing — a dead or stuck actor never hangs the run silently (rlhf_ray.runtime.waiting).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.actors.generation import GenerationActor
from rlhf_ray.actors.learner import LearnerActor
from rlhf_ray.actors.reference import ReferenceActor
from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.cluster.calls import RoleCalls
from rlhf_ray.cluster.connection import local_ray_down, own_local_ray
from rlhf_ray.cluster.sites import ActorSites
from rlhf_ray.config import ExperimentConfig, RoleResources
from rlhf_ray.objectives import LearnerSpec
from rlhf_ray.rewards.composite import with_resolved_models
from rlhf_ray.runtime.memory import KEEP_FREED_MEMORY_ENV
from rlhf_ray.runtime.signals import STOP_SIGNALS
from rlhf_ray.runtime.waiting import NOTICE_S, WAIT_SLICE_S, ActorLost, NoRoomError, RoleError, wait  # noqa: F401
from rlhf_ray.weights import choose_transport, transport_class

log = logging.getLogger(__name__)
ROLE_ORDER = ("learner", "generation", "reward", "reference")


@dataclass
class ModelPaths:
    policy: str
    reference: str | None  # None: no reference (ppo.kl_coef=0, ppo.reference=auto)
    reward: str | None
    value: str | None
    reward_components: dict[str, str] = field(default_factory=dict)  # the reward's other models (other_models) -> paths


class Roles(RoleCalls, ActorSites):
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
        self.compute_plans, self.actor_nodes, self.node_names = {}, {}, {}  # (rlhf_ray.cluster.sites)
        self.placement = self._reserve()
        self.groups: dict[str, list] = {role: [] for role in roles}
        self.restarts = {role: 0 for role in roles}
        self.recovery_seconds = 0.0  # spent replacing actors since the driver last read it
        self.taken_spans = {}  # the actors' spans handed over with their memory readings (RoleCalls.memory)
        self.weights = None  # the driver's side of weight sync (rlhf_ray.weights.sync), with generation actors
        if "generation" in roles:
            name, why = choose_transport(cfg)
            log.info("weight transport: %s (%s), buckets of %g MiB", name, why, cfg.weights.bucket_mb)
            self.transport = name
        try:
            for role in roles:
                self.groups[role] = [self._new_actor(role, i) for i in range(getattr(cfg.resources, role).num_actors)]
            self._start()
            self._plan_compute()
        except BaseException:
            self.shutdown()  # release what did start: a shared cluster must not keep half an experiment
            raise

    @property
    def transport(self) -> str:
        """weights.transport as the run has it ('auto' decided); setting it switches the transport."""
        return self.weights.name if self.weights is not None else ""

    @transport.setter
    def transport(self, name: str) -> None:
        self.weights = transport_class(name).driver(self, name)

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
            reward = with_resolved_models(cfg.models.reward, paths.reward_components.get)
            return self._spawn(RewardActor, role, index, reward.model_dump(), paths.reward, cfg.models.dtype,
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
            self.weights.engines_replaced()
        self._wait([group[i].__ray_ready__.remote() for i in replaced], role, "starting as a replacement", "startup_s")
        self._settle_replacements([(role, i) for i in replaced])
        try:
            if role == "generation" and bring_up_to_date:  # it starts from the initial policy: give it the current one
                self.weights.bring_up_to_date([group[i] for i in replaced])
        finally:  # (it may refuse: rlhf_ray.weights.sync.EnginesBehind; the replacement stands either way)
            seconds = time.perf_counter() - start
            self.recovery_seconds += seconds
            log.warning("recovery: %s; replaced %s in %.1f s (replacement %d of at most %d), redoing %s", lost,
                        ", ".join(f"{role}-{i}" for i in replaced), seconds, self.restarts[role],
                        self.cfg.recovery.max_actor_restarts, doing)

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
        if self.weights is not None:
            self.weights.learners_replaced()
        self._wait(self._set_up_group("learner"), "learner", "building the DeepSpeed engine again", "startup_s")
        self._settle_replacements([("learner", i) for i in range(len(self.learners))])
        self.recovery_seconds += time.perf_counter() - start

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
