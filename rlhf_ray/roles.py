"""The four roles on Ray: placement from the config, batch splitting across actors, timeouts.

Every remote wait has a timeout from ``timeouts.*`` and fails with a message naming the role and what
it was doing — a dead or stuck actor never hangs the run silently.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generation import GenerationActor
from actors.learner import LearnerActor
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import ExperimentConfig, RoleResources

log = logging.getLogger(__name__)
ROLE_ORDER = ("learner", "generation", "reward", "reference")
SUMMED_LEARNER_STATS = ("loss/", "ppo/", "entropy")  # per-rank shares of a global token mean


class RoleError(RuntimeError):
    """A role failed, died or timed out; the message names the role and what it was doing."""


class RunStopped(BaseException):
    """SIGTERM (what a scheduler sends before pre-empting) reached the driver; like KeyboardInterrupt it is
    not an Exception, so nothing on the way catches it by accident."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _stop_on_sigterm() -> None:
    """Ray's core worker replaces the driver's SIGTERM handler with a native one that dumps a stack and
    kills the process: nothing is cleaned up. Take SIGTERM back: raise RunStopped in the main thread (it
    interrupts a pending ray.get like Ctrl-C does)."""
    def stop(signum, frame):
        raise RunStopped(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def wait(refs, role: str, doing: str, timeout_s: float, timeout_key: str, logs: str = ""):
    """``ray.get`` with a timeout; failures become a RoleError naming the role, what it was doing and,
    for errors raised in an actor, the actor's full traceback. ``logs``: where the role's output goes."""
    see = f" (its output: {logs})" if logs else ""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RoleError(f"{role} did not finish {doing} within {timeout_s:.0f} s; it may be stuck or too slow "
                        f"for its resources (raise {timeout_key} if it is just slow){see}") from None
    except RayActorError as err:
        raise RoleError(f"{role} actor died while {doing}{see}: {err}") from None
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


def connect(cfg: ExperimentConfig) -> None:
    """Join the cluster named by ``ray.address`` or RAY_ADDRESS (``ray job submit`` sets it); otherwise
    start a local Ray of this run's own — never another run's cluster that happens to be on the machine
    (it would die with that run)."""
    if ray.is_initialized():
        return
    # quiet: the actors write their output to <output_dir>/logs/ and Ray's own records go through the
    # driver's logging (rlhf_ray.console), not straight to the terminal
    quiet = {"log_to_driver": False, "configure_logging": False} if cfg.logging.console == "quiet" else {}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        log.info("joined the Ray cluster at %s", address)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **quiet)
    _stop_on_sigterm()


def stop_ray() -> None:
    """Disconnect from Ray; a local Ray this run started (GCS, raylet, agents, workers) stops with it."""
    if ray.is_initialized():
        ray.shutdown()


class Roles:
    """All actors of one experiment and the coarse calls the driver makes on them."""

    def __init__(self, cfg: ExperimentConfig, paths: ModelPaths):
        self.cfg, self.timeouts = cfg, cfg.timeouts
        self.placement = self._reserve()
        self.learners, self.generators, self.rewards, self.references = [], [], [], []
        self._sync_reported = False
        try:
            self._launch(paths)
        except BaseException:
            self.shutdown()  # release what did start: a shared cluster must not keep half an experiment
            raise

    def _launch(self, paths: ModelPaths) -> None:
        cfg, res, models = self.cfg, self.cfg.resources, self.cfg.models
        self.learners = [self._spawn(LearnerActor, "learner", i, cfg.model_dump(), i, paths.policy, paths.value)
                         for i in range(res.learner.num_actors)]
        max_model_len = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
        self.generators = [
            self._spawn(GenerationActor, "generation", i, paths.policy, cfg.generation.model_dump(), max_model_len,
                        cfg.seed + i, res.generation.tensor_parallel_size, models.dtype, res.generation.num_gpus)
            for i in range(res.generation.num_actors)]
        self.rewards = [self._spawn(RewardActor, "reward", i, models.reward.model_dump(), paths.reward,
                                    models.dtype, res.reward.num_gpus) for i in range(res.reward.num_actors)]
        self.references = [self._spawn(ReferenceActor, "reference", i, paths.reference, models.dtype,
                                       cfg.ppo.micro_batch_size, cfg.generation.temperature, res.reference.num_gpus)
                           for i in range(res.reference.num_actors)]
        self._start()

    # ------------------------------------------------------------------------------------ placement
    def _bundles(self) -> list[tuple[str, RoleResources]]:
        res = self.cfg.resources
        return [(role, getattr(res, role)) for role in ROLE_ORDER for _ in range(getattr(res, role).num_actors)]

    def _reserve(self):
        bundles = [{"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})} for _, r in self._bundles()]
        need_cpu, need_gpu = sum(b["CPU"] for b in bundles), sum(b.get("GPU", 0) for b in bundles)
        have = ray.cluster_resources()
        if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
            log.warning("the roles need %g CPUs and %g GPUs but the cluster has %s now; waiting in case it grows",
                        need_cpu, need_gpu, have)
        pg = placement_group(bundles, strategy=self.cfg.resources.placement_strategy)
        if not pg.wait(timeout_seconds=self.timeouts.placement_s):
            remove_placement_group(pg)
            raise RoleError(f"could not reserve the roles' resources ({need_cpu:g} CPUs, {need_gpu:g} GPUs in "
                            f"{len(bundles)} bundles, strategy {self.cfg.resources.placement_strategy}); the "
                            f"cluster has {ray.cluster_resources()}. Lower resources.*.num_cpus/num_gpus/num_actors "
                            f"or start Ray with more (ray.num_cpus); on an autoscaling cluster raise timeouts.placement_s")
        return pg

    def _spawn(self, cls, role: str, index: int, *args):
        bundle = [i for i, (r, _) in enumerate(self._bundles()) if r == role][index]
        res: RoleResources = getattr(self.cfg.resources, role)
        strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=bundle)
        return ray.remote(cls).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, scheduling_strategy=strategy
                                       ).remote(*args, log_file=self._log_file(role, index))

    def _log_file(self, role: str, index: int | str) -> str | None:
        """Where an actor's output goes: <output_dir>/logs/<role>-<index>.log (None: the console)."""
        if self.cfg.logging.console != "quiet":
            return None
        return str(Path(self.cfg.output_dir).resolve() / "logs" / f"{role}-{index}.log")

    def _wait(self, refs, role: str, doing: str, timeout: str):
        """``wait`` with the timeout ``timeouts.<timeout>`` and the role's log files in its messages."""
        logs = self._log_file(role, "*") or ""
        return wait(refs, role, doing, getattr(self.timeouts, timeout), f"timeouts.{timeout}", logs)

    def _start(self) -> None:
        start = time.perf_counter()
        addr, port = self._wait(self.learners[0].master_address.remote(), "learner", "starting", "startup_s")
        setups = [learner.setup.remote(addr, port) for learner in self.learners]
        for role, actors in (("generation", self.generators), ("reward", self.rewards),
                             ("reference", self.references)):
            self._wait([a.__ray_ready__.remote() for a in actors], role, "loading its model", "startup_s")
            log.info("%s ready after %.1f s", role, time.perf_counter() - start)
        setup_s = self._wait(setups, "learner", "building the DeepSpeed engine", "startup_s")
        log.info("learner ready after %.1f s (DeepSpeed setup %.1f s)", time.perf_counter() - start,
                 max(s for _, s in setup_s))

    # ---------------------------------------------------------------------------------- the calls
    def generate(self, prompts) -> tuple[RolloutBatch, float]:
        """Prompts split evenly over the generation actors; returns the joined batch and compute seconds."""
        n = len(self.generators)
        size = len(prompts) // n
        refs = [g.generate.remote(prompts[i * size:(i + 1) * size]) for i, g in enumerate(self.generators)]
        results = self._wait(refs, "generation", "sampling a rollout", "generate_s")
        return RolloutBatch.concat([b for b, _ in results]), max(s for _, s in results)

    def score(self, batch: RolloutBatch) -> tuple[dict, dict]:
        """Reward scores, reference logprobs and the learner's old logprobs/values — concurrently."""
        reward_refs = [a.score.remote(part) for a, part in zip(self.rewards, batch.chunks(len(self.rewards)))]
        ref_refs = [a.logprobs.remote(part) for a, part in zip(self.references, batch.chunks(len(self.references)))]
        value_refs = [a.values_and_logprobs.remote(part)
                      for a, part in zip(self.learners, batch.chunks(len(self.learners)))]
        rewards = self._wait(reward_refs, "reward", "scoring a rollout", "score_s")
        refs = self._wait(ref_refs, "reference", "computing logprobs", "score_s")
        values = self._wait(value_refs, "learner", "computing values and old logprobs", "learn_s")
        out = {"scores": torch.cat([s for s, _ in rewards]), "ref_logprobs": torch.cat([r for r, _ in refs]),
               "old_logprobs": torch.cat([lv[0] for lv, _ in values]), "values": torch.cat([lv[1] for lv, _ in values])}
        seconds = {"reward": max(s for _, s in rewards), "reference": max(s for _, s in refs),
                   "values": max(s for _, s in values)}
        return out, seconds

    def learn(self, batch: RolloutBatch) -> tuple[dict, float]:
        parts = self._wait([a.train.remote(part) for a, part in zip(self.learners, batch.chunks(len(self.learners)))],
                           "learner", "running the PPO update", "learn_s")
        stats = dict(parts[0][0])
        for key in stats:
            if key.startswith(SUMMED_LEARNER_STATS):
                stats[key] = sum(p[key] for p, _ in parts)
        return stats, max(s for _, s in parts)

    def sync_weights(self) -> dict:
        """Learner publishes once (object store); every generation actor loads the same objects."""
        published = self._wait([a.publish_weights.remote() for a in self.learners], "learner", "publishing weights",
                               "weight_sync_s")
        buckets = published[0][0]
        loads = self._wait([g.load_weights.remote(buckets, self.timeouts.weight_sync_s) for g in self.generators],
                           "generation", "loading new weights", "weight_sync_s")
        report = loads[0][0]
        if not self._sync_reported:  # the same every step: say it once
            log.info("weight sync: %d tensors published, %d engine parameters loaded, re-processed shared layers: %s",
                     report["received"], report["loaded"], ", ".join(report["reprocessed"]) or "none")
            self._sync_reported = True
        return {"publish": max(s for _, s in published), "load": max(s for _, s in loads), "report": report}

    def learner_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        results = self._wait([a.sequence_logprobs.remote(prompt_ids, response_ids) for a in self.learners], "learner",
                             "computing logprobs of a response", "learn_s")
        return results[0][0]

    def generator_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[list[float]]:
        return self._wait([g.sequence_logprobs.remote(prompt_ids, response_ids) for g in self.generators],
                          "generation", "computing logprobs of a response", "generate_s")

    def learner_parameters(self) -> int:
        return self._wait(self.learners[0].num_parameters.remote(), "learner", "counting parameters", "learn_s")

    def memory(self) -> dict[str, float]:
        """Each role's peak resident memory since the last call and the shared (object-store) part of its
        resident memory now, max over its actors, in GB."""
        actors = {"learner": self.learners, "generation": self.generators, "reward": self.rewards,
                  "reference": self.references}
        refs = {role: [a.memory.remote() for a in group] for role, group in actors.items()}
        out = {}
        for role, role_refs in refs.items():
            readings = self._wait(role_refs, role, "reading its memory", "score_s")
            out[f"memory/{role}_peak_gb"] = max(r["peak_gb"] for r in readings)
            out[f"memory/{role}_shared_gb"] = max(r["shared_gb"] for r in readings)
        return out

    def save(self, path: str) -> str:
        results = self._wait([a.save.remote(path) for a in self.learners], "learner", "saving the policy", "learn_s")
        return results[0]

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.learners] + [g.close.remote() for g in self.generators],
                    timeout=60)
        except Exception as err:  # the run is ending anyway; report and release resources
            log.warning("clean shutdown of the roles failed: %s", err)
        for actor in self.learners + self.generators + self.rewards + self.references:
            ray.kill(actor)
        remove_placement_group(self.placement)
