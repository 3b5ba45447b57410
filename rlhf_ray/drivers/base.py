"""What every driver (PPO: rlhf_ray.drivers.ppo, reward-model training: rlhf_ray.drivers.reward_model) does the same way:
checkpoints of its finished steps, resume, the learner group back to the last checkpoint when a rank dies,
the last checkpoint on a stop signal. A driver has ``cfg`` (with output_dir, resume, seed, checkpoint, recovery),
``roles``, ``sampler``, ``metrics_log``, ``step_count``, ``saved_step`` and ``num_steps``, and says what is
its own through three hooks: ``driver_state`` (saved in trainer.json), ``restore`` and ``reset_to_start``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from rlhf_ray import checkpoint
from rlhf_ray.config import dump_config
from rlhf_ray.cluster.roles import ActorLost

log = logging.getLogger(__name__)


class CheckpointedDriver:
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
        """Checkpoint the finished steps (atomically; see rlhf_ray.checkpoint). Returns its path."""
        start = time.perf_counter()
        staging = checkpoint.begin(self.cfg.output_dir, self.step_count)
        try:
            self.roles.save_state(str(staging.resolve()))
            self.save_driver_files(staging)
            state = {"step": self.step_count, "sampler": self.sampler.state_dict(self.step_count),
                     "seed": self.cfg.seed, "restarts": dict(self.roles.restarts), **self.driver_state()}
            path = checkpoint.commit(staging, self.step_count, state, dump_config(self.cfg),
                                     self.cfg.checkpoint.keep_last)
        except BaseException:
            checkpoint.abort(staging)  # the earlier checkpoints stay as they were
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
        blocking, changed = checkpoint.differences(checkpoint.saved_config(path), self.cfg.model_dump(mode="json"))
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

    def recover_learner(self, lost: ActorLost) -> None:
        """A learner rank died: the whole group restarts from the last valid checkpoint (or from the start)."""
        if self.roles.restarts["learner"] >= self.cfg.recovery.max_learner_restarts:
            raise lost
        latest = checkpoint.latest_valid(self.cfg.output_dir)
        log.warning("recovery: %s; restarting the learner group from %s (restart %d of at most %d)", lost,
                    latest or "the beginning (no checkpoint yet)", self.roles.restarts["learner"] + 1,
                    self.cfg.recovery.max_learner_restarts)
        self.roles.restart_learners()
        if latest:
            self.restore(latest)
        else:
            self.step_count = 0
            self.reset_to_start()
        self.metrics_log.rewind(self.step_count)

    def due(self, every: int) -> bool:
        """Something done every ``every`` steps (0: never) is due after this step — but not after the last one,
        which the end of the run covers."""
        return bool(every) and self.step_count % every == 0 and self.step_count < self.num_steps

    def checkpoint_at_end(self) -> None:
        if self.cfg.checkpoint.at_end and self.saved_step != self.step_count:
            self.save_checkpoint()

    def stop(self) -> str | None:
        """After a stop signal: checkpoint the finished steps if there are new ones (checkpoint.on_signal)."""
        if self.cfg.checkpoint.on_signal and self.saved_step != self.step_count:
            return self.save_checkpoint()
        return None

    def shutdown(self) -> None:
        if hasattr(self, "metrics_log"):
            self.metrics_log.close()
        if hasattr(self, "roles"):
            self.roles.shutdown()
