"""The driver's side of weight sync: the calls that move the learner's current policy into the generation engines,
bringing a replacement engine up to date, and recovering from an engine lost on the way. A transport names its own
(``Transport.driver``): ``WeightSync`` for the transports that publish once and let every engine load (object_store,
files, adapter), ``BroadcastSync`` for those where learner rank 0 and every engine take part in one collective.

Both work on a ``rlhf_ray.cluster.roles.Roles`` (its actors, its waits with their timeouts, its replacing of a lost
actor); the Roles hold one, ``Roles.weights``, and tell it when engines or learners were replaced.
"""
from __future__ import annotations

import logging

import ray

from rlhf_ray.runtime.waiting import RoleError

log = logging.getLogger("rlhf_ray.cluster.roles")  # its lines are the roles' (same logger as before the move)


class EnginesBehind(RoleError):
    """Overlapped with a broadcast: a replacement engine needs the weights the other engines sample by, which only
    learner rank 0 could send, and it is already in its next update. The rollout fails with this; the driver sends
    the learner's next weights to every engine at its next sync and samples that rollout and the later ones again by
    them (rlhf_ray.drivers.ppo)."""


class WeightSync:
    """object_store / files / adapter: the learner publishes once; every engine (or those given) loads the same
    objects. Overlapped (ppo.async_steps ≥ 1) the two halves run apart: the driver publishes after each update
    (``publish``) and the rollout thread has the engines load it between their rollouts (``load``); the payload the
    engines hold is kept for a replacement engine."""

    engines_take_part = False  # publishing needs no engine (BroadcastSync: every engine, between its rollouts)

    def __init__(self, roles, transport: type, name: str):
        self.roles, self.transport, self.name = roles, transport, name
        self.engine_weights = None  # overlapped: the payload the engines hold, for a replacement engine
        self._reported = False

    def sync(self, generators: list | None = None) -> dict:
        """The learner's current policy into every generation actor (or those given); returns the seconds of the
        learner's publish and of the slowest load, and the first engine's load report."""
        result = self._send(generators)
        self._report_once(result["report"])
        return result

    def publish(self) -> tuple[object, float]:
        """The learner's current policy published once, for the engines to load later (``load``); returns what their
        load gets and the learner's seconds."""
        published = self.roles._wait(self._publishes(), "learner", "publishing weights", "weight_sync_s")
        return published[0][0], max(s for _, s in published)

    def load(self, payload, generators: list | None = None) -> dict:
        """Every generation actor (or those given) loads the published ``payload``; an engine lost on the way is
        replaced, given ``payload`` too, and the load redone. Returns the slowest load's seconds and the first
        engine's report."""
        roles = self.roles
        if roles.overlapped:  # set first: an engine replaced during this load gets these weights
            self.engine_weights = payload
        load = lambda: self._loads(payload, generators or roles.generators)  # noqa: E731
        if generators:  # a replacement being brought up to date: no recovery inside a recovery
            loads = roles._wait(load(), "generation", "loading the current weights", "weight_sync_s")
        else:
            loads = roles._recoverable("generation", "loading new weights", "weight_sync_s", load)
        self._report_once(loads[0][0])
        return {"load": max(s for _, s in loads), "report": loads[0][0]}

    def _report_once(self, report: dict) -> None:
        if not self._reported:  # the same every step: say it once
            log.info("weight sync: %d tensors sent, %d engine parameters loaded, re-processed shared layers: %s",
                     report["received"], report["loaded"], ", ".join(report["reprocessed"]) or "none")
            self._reported = True

    def bring_up_to_date(self, engines: list) -> None:
        """Replacement engines get the weights the others hold. Overlapped, those are the last loaded ones (kept
        for this): the learner may be inside an update, or ahead of the engines by several published updates, and
        new weights from it would mix two policies in a batch."""
        roles = self.roles
        if not roles.overlapped:
            self.sync(engines)
        elif self.engine_weights is not None:  # None: nothing loaded yet, the initial policy is current
            roles._wait(self._loads(self.engine_weights, engines), "generation", "loading the current weights",
                        "weight_sync_s")

    def engines_replaced(self) -> None:
        """Some engines are new actors."""

    def learners_replaced(self) -> None:
        """Every learner rank is a new actor."""

    def _publishes(self) -> list:
        roles = self.roles
        return [a.publish_weights.remote(transport=self.name, bucket_mb=roles.cfg.weights.bucket_mb)
                for a in roles.learners]

    def _loads(self, payload, engines: list) -> list:
        return [g.load_weights.remote(payload, self.roles.timeouts.weight_sync_s, transport=self.name) for g in engines]

    def _send(self, generators: list | None) -> dict:
        payload, publish_s = self.publish()
        return {"publish": publish_s, **self.load(payload, generators)}


class BroadcastSync(WeightSync):
    """collective: learner rank 0 broadcasts to every engine at once, in a group of its own (a replacement engine too:
    it is in the group formed anew). An engine lost on the way — its peers' transfers fail with it — is replaced, the
    group formed again and the broadcast redone; a lost learner rank goes to learner recovery like any learner
    failure.

    Overlapped (ppo.async_steps ≥ 1) the broadcast is the publish: the driver lets the engines finish the rollouts ahead
    (``engines_take_part``), then sends; the engines hold the weights at once, so their later load has nothing to do.
    The learner waits for the engines only where the rollout side is the slower one, where it would wait for the next
    rollout anyway. A replacement engine during a rollout cannot be given the weights the others sample by (the learner
    has moved on; nothing keeps them): ``EnginesBehind``."""

    engines_take_part = True

    def __init__(self, roles, transport: type, name: str):
        super().__init__(roles, transport, name)
        self.formed = False  # the group is formed with the current actors
        self.layout = None

    def bring_up_to_date(self, engines: list) -> None:
        """A broadcast goes to every engine, in a group formed anew with the replacements; overlapped, only between
        updates (``EnginesBehind``)."""
        if self.roles.overlapped:
            raise EnginesBehind(f"engine(s) replaced during a rollout under ppo.async_steps={self.roles.cfg.ppo.async_steps}"
                                " with weights.transport=collective: the weights the other engines sample by are "
                                "no longer the learner's; this rollout and those after it are sampled again by the "
                                "weights of the next update")
        self._send(None)

    def publish(self) -> tuple[None, float]:
        """Overlapped: the broadcast to every engine (the driver has let them finish their rollouts); returns no
        payload (the engines hold the weights already) and the broadcast's seconds."""
        result = self.sync()
        return None, max(result["publish"], result["load"])

    def load(self, payload, generators=None) -> dict:
        """Overlapped: the engines took the weights in ``publish``."""
        return {"load": 0.0, "report": None}

    def engines_replaced(self) -> None:
        self.formed = False

    def learners_replaced(self) -> None:
        self.formed = False

    def _send(self, generators: list | None) -> dict:
        from rlhf_ray.runtime.waiting import ActorLost, RoleError

        roles = self.roles
        while True:
            sends, loads = [], []
            try:
                if not self.formed:  # (an engine lost meanwhile shows here first)
                    self._form_group()
                sends = self._publishes()
                loads = self._loads(self.layout, roles.generators)
                loaded = roles._wait(loads, "generation", "receiving new weights", "weight_sync_s")
            except RoleError as err:
                self.formed = False
                transfer_failed = not self._settle(sends)  # raises ActorLost when the learner itself is gone
                if not all(roles._alive(a) for a in roles.learners):  # (gone while the group was being formed)
                    raise ActorLost(f"a learner rank died while forming the weight group: {str(err).splitlines()[0]}",
                                    "learner", stuck=False) from None
                # an engine whose update stopped half-way holds some new and some old weights (and vLLM's reload
                # is left open): it is replaced like a dead one. An engine's own error with the transfer intact
                # (a weight it did not get) would only come back: it ends the run.
                broken = self._unfinished(loads) if loads else [i for i, g in enumerate(roles.generators)
                                                                if not roles._alive(g)]
                dead = not all(roles._alive(g) for g in roles.generators)
                if (roles.closing or roles.restarts["generation"] >= roles.cfg.recovery.max_actor_restarts
                        or not broken or not (dead or transfer_failed)):
                    raise
                lost = err if isinstance(err, ActorLost) else ActorLost(str(err), "generation", stuck=False)
                roles._replace("generation", lost, "receiving new weights", bring_up_to_date=False, indices=broken)
                continue
            sent = roles._wait(sends, "learner", "broadcasting weights", "weight_sync_s")
            return {"publish": max(s for _, s in sent), "load": max(s for _, s in loaded), "report": loaded[0][0]}

    def _unfinished(self, loads: list) -> list[int]:
        """Indices of the engines whose load did not complete (failed, died, or still hanging after the timeout)."""
        ray.wait(loads, num_returns=len(loads), timeout=self.roles.timeouts.weight_sync_s)
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
        from rlhf_ray.runtime.waiting import ActorLost, RoleError

        try:
            self.roles._wait(sends, "learner", "broadcasting weights", "weight_sync_s")
            return True
        except ActorLost:
            raise
        except RoleError:
            return False

    def _form_group(self) -> None:
        """(Re-)form the broadcast group: learner rank 0 (rank 0) and every worker of every engine."""
        roles = self.roles
        workers = roles.cfg.resources.generation.tensor_parallel_size
        world = 1 + workers * len(roles.generators)
        timeout = roles.timeouts.weight_sync_s
        host, port = roles._wait(roles.learners[0].open_weight_group.remote(), "learner", "opening the weight group",
                                 "weight_sync_s")
        joins = [roles.learners[0].join_weight_group.remote(world_size=world, timeout_s=timeout)]
        joins += [g.join_weight_group.remote(host=host, port=port, first_rank=1 + i * workers, world_size=world,
                                             timeout_s=timeout) for i, g in enumerate(roles.generators)]
        roles._wait(joins, "generation", "joining the weight group", "weight_sync_s")
        self.layout = roles._wait(roles.learners[0].weight_layout.remote(roles.cfg.weights.bucket_mb,
                                                                        adapter=self.transport.adapter),
                                  "learner", "listing its weights", "weight_sync_s")
        self.formed = True
        log.info("weight group formed: learner rank 0 and %d engine worker(s) at %s:%d", world - 1, host, port)
