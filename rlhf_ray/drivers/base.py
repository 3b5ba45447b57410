"""What every driver (PPO: rlhf_ray.drivers.ppo, reward-model training: rlhf_ray.drivers.reward_model, …) does the
same way: the startup sequence (``start_up``), checkpoints of its finished steps, resume, the learner group back to
the last checkpoint when a rank dies, the last checkpoint on a stop signal or an error. A driver has ``cfg`` (with
output_dir, resume, seed, checkpoint, recovery, logging), ``roles``, ``sampler``, ``metrics_log``, ``step_count``,
``saved_step`` and ``num_steps``, and says what is its own through hooks: the startup steps (``resolve_models``,
``load_data``, ``before_cluster``, ``start_roles``, ``after_roles``), ``driver_state`` (saved in trainer.json),
``restore`` and ``reset_to_start``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from rlhf_ray.cluster.connection import connect
from rlhf_ray.cluster.roles import ActorLost
from rlhf_ray.config import dump_config
from rlhf_ray.config.sections import field_default
from rlhf_ray.run import checkpoint
from rlhf_ray.run.alarms import AlarmMonitor
from rlhf_ray.run.disk_full import DiskFull, is_disk_full
from rlhf_ray.run.metrics import MetricsLogger, logged_steps
from rlhf_ray.run.prometheus import PrometheusExport
from rlhf_ray.run.timeline import Timeline
from rlhf_ray.run.trackers import RunInfo, Trackers
from rlhf_ray.runtime import waiting
from rlhf_ray.runtime.spans import RECORDER, clock
from rlhf_ray.runtime.stacks import HangDoctor

log = logging.getLogger(__name__)


class CheckpointedDriver:
    # True from the start of a step's update until the step is recorded: an error meanwhile leaves the learners
    # between steps (ahead of step_count), a state no checkpoint may hold
    updating = False
    stopping_alarm = None  # logging.alarms=stop: the alarm that ends the run after this step (rlhf_ray.run.harness)
    prometheus = None      # the run's Prometheus export (watch_roles)

    # ------------------------------------------------------------------------------------ startup
    def start_up(self) -> None:
        """The one startup sequence of every driver, in this order:

            resolve the models and check them (preflight) → load the data → the checkpoint to resume from,
            checked against this config → what comes before the cluster (the plan) → a partial checkpoint
            removed → the metrics and trackers opened at the checkpoint's step → connect to Ray → start the roles →
            restore

        Everything that can be checked without a cluster fails before one starts (a required tracker too)."""
        self.step_count = 0
        self.resolve_models()
        self.load_data()
        self.resume_from = self.checkpoint_to_resume()
        self.before_cluster()
        checkpoint.remove_partial(self.cfg.output_dir)
        self.metrics_log = self.open_metrics(checkpoint.read_state(self.resume_from)["step"] if self.resume_from else 0)
        connect(self.cfg)
        start = time.perf_counter()
        self.roles = self.start_roles()
        self.watch_roles()
        self.after_roles()
        if self.resume_from:
            self.restore(self.resume_from)
        self.startup_seconds = time.perf_counter() - start
        self.saved_step = self.step_count
        self.alarms = AlarmMonitor(self.cfg.logging.alarm_thresholds, self.cfg.logging.alarms,
                                   history=logged_steps(self.cfg.output_dir) if self.step_count else [])
        self.timeline = Timeline(self.cfg.output_dir, self.cfg.logging.trace, self.cfg.logging.trace_max_events)
        RECORDER.take()  # the driver's spans from here on
        self.window_start = clock()

    def open_metrics(self, step: int) -> MetricsLogger:
        """metrics.jsonl, samples.jsonl and the trackers (logging.trackers: rlhf_ray.run.trackers), each holding the
        steps up to ``step`` (a resumed run's checkpoint) and nothing after."""
        out = Path(self.cfg.output_dir)
        run = RunInfo(out, out.resolve().name, self.cfg.logging.group, self.cfg.model_dump(mode="json"))
        return MetricsLogger(out, Trackers(self.cfg.logging, run), resume_step=step)

    def watch_roles(self) -> None:
        """For every wait on the roles from now on: the hang doctor (rlhf_ray.runtime.stacks; timeouts.hang_dump_at)
        and the count of calls in flight; and the Prometheus export (rlhf_ray.run.prometheus; logging.prometheus),
        which ``record`` feeds each step."""
        timeouts, out = self.cfg.timeouts, Path(self.cfg.output_dir)
        doctor = HangDoctor(self.roles.processes, out / "logs", lambda: self.step_count + 1, timeouts.hang_dump_at,
                            timeouts.hang_dump_tool) if timeouts.hang_dump_at else None
        self.prometheus = PrometheusExport(out.resolve().name) if self.cfg.logging.prometheus else None
        waiting.watch(doctor, self.prometheus.in_flight if self.prometheus else None)

    def record(self, metrics: dict) -> None:
        """A finished step's metrics, read by the alarms (rlhf_ray.run.alarms: they add alarm/<rule> where one fires),
        logged (metrics.jsonl, the trackers), exported (Prometheus)."""
        metrics.update(self.timeline_step(int(metrics["step"])))
        alarms = self.alarms.check(metrics)
        self.metrics_log.log(metrics)
        if self.prometheus is not None:
            self.prometheus.export(metrics)
        if alarms and self.alarms.mode == "stop" and self.stopping_alarm is None:
            self.stopping_alarm = alarms[0]

    def timeline_step(self, step: int) -> dict[str, float]:
        """The step's spans — the driver's and those the actors handed over with their memory readings — onto the
        timeline (trace.json, rlhf_ray.run.timeline), from the end of the last step's record to now; its idle share
        per role (``idle/<role>``)."""
        now, actors = clock(), {}
        for name, (taken, sent, received) in self.roles.take_spans().items():
            self.timeline.observe_clock(name, sent, taken["clock"], received, taken.get("pid"))
            actors[name] = self.timeline.aligned(name, taken["spans"])
        shares = self.timeline.add_step(step, self.window_start, now, RECORDER.take()["spans"], actors)
        self.window_start = now
        return shares

    def resolve_models(self) -> None:
        """Local paths of the run's models (hub names downloaded, 'tiny:'/'real:' built), checked (preflight)."""
        raise NotImplementedError

    def load_data(self) -> None:
        """The tokenizer and the data (bad rows counted and skipped; unusable data one line); sets ``sampler``."""
        raise NotImplementedError

    def adopt_saved(self, saved: dict, path) -> None:
        """Settings a resumed run takes from its checkpoint's config (``saved``) before the two are compared (PPO: the
        Serve RM version that NAME@latest resolved to when the run started)."""

    def before_cluster(self) -> None:
        """Last checks and warnings before Ray is joined or started (PPO: the plan)."""

    def start_roles(self):
        """The run's roles (rlhf_ray.cluster.roles.Roles), started."""
        raise NotImplementedError

    def after_roles(self) -> None:
        """What needs the roles and must be there before a restore (PPO: the score normaliser)."""

    # ------------------------------------------------------------------------------------ durability
    def driver_state(self) -> dict:
        """The driver's own state after ``step_count`` steps, beyond the step and the data position."""
        return {}

    def restore(self, path) -> None:
        """Everything from checkpoint ``path``: the learners' state, then the driver's."""
        raise NotImplementedError

    def reset_to_start(self) -> None:
        """The state before the first step, after the learners restarted without a checkpoint."""

    def save_driver_files(self, directory: Path) -> None:
        """Files of the driver's own to keep in a checkpoint being written to ``directory`` (hashed with the rest)."""

    # ------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Checkpoint the finished steps (atomically; see rlhf_ray.run.checkpoint). Returns its path."""
        start = time.perf_counter()
        staging = checkpoint.begin(self.cfg.output_dir, self.step_count)
        try:
            self.roles.save_state(str(staging.resolve()))
            self.save_driver_files(staging)
            state = {"step": self.step_count, "sampler": self.sampler.state_dict(self.step_count),
                     "seed": self.cfg.seed, "restarts": dict(self.roles.restarts), **self.driver_state()}
            path = checkpoint.commit(staging, self.step_count, state, dump_config(self.cfg),
                                     self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_policies)
        except BaseException as err:
            full = isinstance(err, Exception) and is_disk_full(err, staging)  # judged before the partial save goes
            checkpoint.abort(staging)  # the earlier checkpoints stay as they were
            if full:
                raise DiskFull(checkpoint.checkpoints_dir(self.cfg.output_dir) / checkpoint.step_name(self.step_count),
                               err) from err
            raise
        self.saved_step = self.step_count
        log.info("checkpoint of step %d saved to %s in %.1f s", self.step_count, path, time.perf_counter() - start)
        return str(path)

    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint named by ``resume``, checked against this config before any cluster starts."""
        path = checkpoint.resolve(self.cfg.resume, self.cfg.output_dir)
        if path is None:
            return None
        state = checkpoint.read_state(path)  # resolve() has verified it
        saved = checkpoint.saved_config(path)
        self.adopt_saved(saved, path)
        blocking, changed = checkpoint.differences(saved, self.cfg.model_dump(mode="json"),
                                                   default=lambda key: field_default(self.cfg, key))
        if blocking:
            raise checkpoint.CheckpointError(f"cannot resume from {path}: the config differs in what a checkpoint "
                                             f"cannot be continued under: {'; '.join(blocking)}")
        if changed:
            log.info("resuming with changed settings: %s", "; ".join(changed))
        self.sampler.check_state(state["sampler"], state["step"])
        return path

    def restore_learners(self, path) -> dict:
        """The learners' state and the step counter from checkpoint ``path``; its driver state."""
        self.roles.load_state(str(Path(path).resolve()))
        state = checkpoint.read_state(path)
        self.step_count = state["step"]
        return state

    def step(self) -> dict[str, float]:
        """One step (the driver's ``_step``), recorded and checkpointed when due; returns its metrics. A lost learner
        rank restarts the group from the last valid checkpoint (``recover_learner``), which drops the step under way:
        then it returns no metrics, and the loop goes on from the restored step."""
        try:
            return self._step()
        except ActorLost as lost:
            if lost.role != "learner":
                raise
            self.recover_learner(lost)
            return {}

    def _step(self) -> dict[str, float]:
        raise NotImplementedError

    def recover_learner(self, lost: ActorLost) -> None:
        """A learner rank died: the whole group restarts from the last valid checkpoint (or from the start)."""
        if self.roles.restarts["learner"] >= self.cfg.recovery.max_learner_restarts:
            raise lost
        latest = self.recovery_checkpoint()
        log.warning("recovery: %s; restarting the learner group from %s (restart %d of at most %d)", lost,
                    latest or "the beginning (no checkpoint yet)", self.roles.restarts["learner"] + 1,
                    self.cfg.recovery.max_learner_restarts)
        self.roles.restart_learners()
        if latest:
            self.restore(latest)
        else:
            self.step_count = 0
            self.reset_to_start()
        self.updating = False  # the learners hold a recorded step again
        self.metrics_log.rewind(self.step_count)
        self.alarms.rewind(self.step_count)

    def recovery_checkpoint(self) -> Path | None:
        """Where a restarted learner group continues: the newest valid checkpoint of the steps finished so far, in
        ``output_dir`` or the one this run resumed from (which may be another run's; None: from the beginning)."""
        saved = checkpoint.latest_valid(self.cfg.output_dir, at_most_step=self.step_count)
        # by the step each holds (its state), not its name: ``resume=`` may name a copied or renamed checkpoint
        candidates = [path for path in (saved, self.resume_from) if path]
        return max(candidates, key=lambda path: checkpoint.read_state(path)["step"], default=None)

    def due(self, every: int) -> bool:
        """Something done every ``every`` steps (0: never) is due after this step — but not after the last one,
        which the end of the run covers."""
        return bool(every) and self.step_count % every == 0 and self.step_count < self.num_steps

    def checkpoint_at_end(self) -> None:
        if self.cfg.checkpoint.at_end and self.saved_step != self.step_count:
            self.save_checkpoint()

    def stop_on_alarm(self) -> str:
        """logging.alarms=stop: the finished steps checkpointed (whatever checkpoint.on_signal says); what happened,
        for the console."""
        saved = self.save_checkpoint() if self.saved_step != self.step_count else None
        return (f"checkpoint saved to {saved} (resume=auto continues from it)" if saved
                else f"the last checkpoint (step {self.saved_step}) is current")

    def stop(self) -> str | None:
        """After a stop signal: checkpoint the finished steps if there are new ones (checkpoint.on_signal)."""
        if self.cfg.checkpoint.on_signal and self.saved_step != self.step_count:
            return self.save_checkpoint()
        return None

    def unsaveable_after(self, err: BaseException) -> str | None:
        """Why no checkpoint may be saved after ``err`` ended the run (None: the learners hold exactly the last
        finished step, and a checkpoint of it is valid)."""
        if isinstance(err, ActorLost) and err.role == "learner":
            return "a learner rank is lost"
        if self.updating:
            return f"the error came during step {self.step_count + 1}'s update, which leaves the learner between steps"
        return None

    def drawn_report(self) -> list[str]:
        """A learner run's report picture (logging.report; rlhf_ray.run.report.draw_learning), for the closing lines."""
        from rlhf_ray.run.report import draw_learning, load_metrics

        if not self.cfg.logging.report:
            return []
        out = Path(self.cfg.output_dir)
        return [f"report: {draw_learning(load_metrics(out), out / 'report.png', out.resolve().name)}"]

    def shutdown(self) -> None:
        waiting.watch(None)
        try:
            if hasattr(self, "metrics_log"):
                self.metrics_log.close()
        finally:  # (a full disk can fail the last flush:) the roles must go in any case
            if hasattr(self, "roles"):
                self.roles.shutdown()


EVAL_CHUNKS = 4  # micro-batches per rank in one evaluation call


def evaluate_rows(roles, lengths: list[int], make_batch, micro_batch_size: int):
    """The learner objective's ``evaluate`` over rows 0 … len(lengths)-1, joined in row order (a tensor with a row
    each). Rows go in order of ``lengths`` (less padding), in calls every rank gets an equal share of (ZeRO-3 forwards
    are collectives); ``make_batch(indices)`` builds the batch of those rows."""
    import torch

    ranks = len(roles.learners)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunk = ranks * micro_batch_size * EVAL_CHUNKS
    out = None
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        padded = rows + [rows[-1]] * (-len(rows) % (ranks * micro_batch_size))
        parts, _ = roles.evaluate(make_batch(padded))
        result = torch.cat(parts)[:len(rows)]
        if out is None:
            out = torch.empty((len(lengths), *result.shape[1:]), dtype=result.dtype)
        out[rows] = result
    return out
