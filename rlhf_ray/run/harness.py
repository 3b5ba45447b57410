"""The run harness every training entry point shares (train, train_rm, train_sft, train_dpo: rlhf_ray.cli.training):
hold the output dir, claim it, start the driver and step it to the end, then end the run cleanly however it ends —
finished, stopped by a signal, failed (a checkpoint saved where it can) or out of disk.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from rlhf_ray.config import dump_config
from rlhf_ray.run.alarms import EXIT_CODE as ALARM_EXIT_CODE

log = logging.getLogger("rlhf_ray.train")


def run(cfg, title: str, make_trainer) -> int:
    """Hold the output dir for the whole run (rlhf_ray.run.output_lock: a second run into it is refused in one line
    naming the holder), then claim it, start the trainer and step it to the end (``_run_holding``). The lock is
    released however the run ends. Shared by every driver (PPO, reward-model training)."""
    from rlhf_ray.run.output_lock import LOCK_NAME, OutputDirBusy, OutputDirLock, default_command
    from rlhf_ray.run.preflight import PreflightError, check_output_dir
    from rlhf_ray.runtime.signals import STOP_SIGNALS, RunStopped

    try:
        out = check_output_dir(cfg.output_dir)
        lock = OutputDirLock(out, default_command())
        lock.acquire()  # before claim_output_dir: overwrite=true removes the earlier run's outputs
    except (PreflightError, OutputDirBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: output_dir={str(cfg.output_dir)!r}: cannot take its lock ({LOCK_NAME}): {err}", file=sys.stderr)
        return 2
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # SIGTERM is RunStopped from here on (as SIGINT is KeyboardInterrupt), so that a run stopped while it starts
        # up releases its lock too; connect() installs the handler again after ray.init replaced it
        STOP_SIGNALS.install()
        return _run_holding(cfg, title, make_trainer, out, lock)
    except (RunStopped, KeyboardInterrupt) as stop:  # before the trainer's own handling began
        return _stopped(stop, None, 0)
    finally:
        lock.release()
        for sig, handler in handlers.items():  # (a run started in-process, by a test say, leaves them as they were)
            signal.signal(sig, handler)


def _run_holding(cfg, title: str, make_trainer, out, lock) -> int:
    """Claim the output dir, start the trainer, step it to the end with a progress bar, finish; a stop signal
    checkpoints and exits 143/130, an error is one line (``_failed``) and exit 1. A trainer has ``step_count``,
    ``num_steps``, ``saved_step``, ``startup_seconds``, ``step()``, ``progress(metrics)``, ``finish()``, ``stop()``,
    ``unsaveable_after(err)``, ``save_checkpoint()``, ``closing()``, ``metrics_log`` and ``shutdown()``."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlhf_ray.run.console import setup_console
    from rlhf_ray.run.preflight import PreflightError, claim_output_dir
    from rlhf_ray.runtime.signals import RunStopped

    try:
        claim_output_dir(out, cfg.resume, cfg.overwrite)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    driver_log = setup_console(cfg.logging.console, out)
    log.info("%s → %s%s", title, out, f" (engine, Ray and DeepSpeed output: {driver_log.parent}/)" if driver_log else "")
    if lock.took_over:
        log.warning("%s", lock.took_over)
    trainer, code, tracked = None, 0, []
    try:
        trainer = make_trainer()
        (out / "config.yaml").write_text(dump_config(cfg))  # only now: a run refused above leaves the old one
        log.info("roles ready in %.1f s; %s%d %s steps", trainer.startup_seconds,
                 f"{trainer.step_count} done, " if trainer.step_count else "", trainer.num_steps, trainer.unit)
        with logging_redirect_tqdm():
            bar = tqdm(total=trainer.num_steps, initial=trainer.step_count, desc=trainer.unit, dynamic_ncols=True,
                       disable=not cfg.logging.progress_bar)
            while trainer.step_count < trainer.num_steps:
                metrics = trainer.step()
                lock.check()  # another run took the output dir (this one was paused too long): write nothing more
                if metrics:
                    bar.set_postfix(trainer.progress(metrics), refresh=False)
                if trainer.step_count >= bar.n:
                    bar.update(trainer.step_count - bar.n)
                else:  # a learner restart took the run back to a checkpoint
                    bar.n = trainer.step_count
                    bar.refresh()
                if trainer.stopping_alarm is not None:
                    break
            bar.close()
        if trainer.stopping_alarm is not None:
            code = ALARM_EXIT_CODE
            log.error("stopped by the alarm %s (logging.alarms=stop) after %d of %d steps; %s",
                      trainer.stopping_alarm.rule, trainer.step_count, trainer.num_steps, trainer.stop_on_alarm())
        else:
            final = trainer.finish()
            if final:
                log.info("final %s saved to %s", trainer.exported, final)
            tracked = trainer.metrics_log.finish(final)
    except (RunStopped, KeyboardInterrupt) as stop:
        return _stopped(stop, trainer, trainer.num_steps if trainer else 0)
    except Exception as err:  # RoleError, ValueError, OSError (e.g. a model path or hub name not found), …
        stop = _stop_in(err)
        if stop is not None:  # a stop signal that surfaced inside a library call, wrapped by it
            return _stopped(stop, trainer, trainer.num_steps if trainer else 0)
        if _failed(err, trainer, out) is None:
            raise
        return 1
    finally:
        _clean_up(trainer)
    for line in [*trainer.closing(), *(f"tracked: {where}" for where in tracked)]:
        log.info("%s", line)
    return code


def _failed(err: Exception, trainer, out) -> int | None:
    """An error ends the run: its line (a full disk's says which path filled up and what is still valid, its
    traceback going to driver.log only), then the finished steps checkpointed where that is valid
    (checkpoint.on_error) in a second line that says where to resume from. Returns 1, or None for an error of an
    unexpected kind (a bug: its traceback is for the console too)."""
    from rlhf_ray.cluster.roles import RoleError
    from rlhf_ray.run.console import FILE_ONLY
    from rlhf_ray.run.disk_full import disk_full_message, is_disk_full
    from rlhf_ray.run.output_lock import OutputDirLost
    from rlhf_ray.run.trackers import TrackerError

    steps = f"after {trainer.step_count if trainer else 0} of {trainer.num_steps if trainer else 0} steps"
    # an error that says nothing of the disk (an actor that died writing) counts as the full disk's when the run was
    # running and its output dir has no room left; nothing is saved then: it would only fill the disk again
    if is_disk_full(err, out if trainer is not None else None):
        log.error("error: %s", disk_full_message(err, out))
        log.error("the full disk's error", exc_info=err, extra=FILE_ONLY)
        return 1
    expected = isinstance(err, (RoleError, ValueError, OSError, OutputDirLost, TrackerError))
    if expected:
        log.error("error: %s", err)
    if trainer is not None and not isinstance(err, OutputDirLost):  # a lost output dir is another run's now
        log.error("stopped %s; %s", steps, _save_on_error(trainer, err, out))
    return 1 if expected else None


def _save_on_error(trainer, err: Exception, out) -> str:
    """Checkpoint the finished steps if that is valid (checkpoint.on_error); what happened, and where a rerun with
    resume=auto continues from."""
    from rlhf_ray.run import checkpoint

    latest = checkpoint.latest_complete(out)
    last = (f"rerun with resume=auto to continue from the last checkpoint (step {int(latest.name.split('-')[-1])}, "
            f"{latest})" if latest else "there is no checkpoint yet: a rerun starts from the beginning")
    if trainer.saved_step == trainer.step_count:
        return f"the last checkpoint is current: {last}" if latest else f"no step was finished: {last}"
    if not trainer.cfg.checkpoint.on_error:
        return f"nothing saved (checkpoint.on_error=false): {last}"
    why = trainer.unsaveable_after(err)
    if why:
        return f"no checkpoint is saved now, as {why}: {last}"
    try:
        saved = trainer.save_checkpoint()
    except Exception as save_err:
        return f"the checkpoint could not be saved ({str(save_err).splitlines()[0]}): {last}"
    return f"checkpoint of step {trainer.step_count} saved to {saved}: rerun with resume=auto to continue from it"


def _stop_in(err: BaseException):
    """The RunStopped/KeyboardInterrupt in ``err``'s chain of causes, if any."""
    from rlhf_ray.runtime.signals import RunStopped

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (RunStopped, KeyboardInterrupt)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _stopped(stop: BaseException, trainer, num_steps: int) -> int:
    """Checkpoint what can be, say so in one line; the exit code of the signal (143 / 130)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = getattr(stop, "signal_name", "SIGINT")
    log.error("stopped by %s after %d of %d steps; %s; the roles and the Ray processes this run started are "
              "shut down", name, trainer.step_count if trainer else 0, num_steps, _save_on_stop(trainer))
    return 128 + getattr(signal, name)


CLEAN_UP_S = 30.0


def _clean_up(trainer) -> None:
    """Shut the roles and the local Ray down. When Ray's own processes were signalled too (a scheduler
    stopping the whole process group), every Ray call waits for a GCS that is gone: then, or after
    CLEAN_UP_S in any case, the run leaves without waiting (os._exit in __main__) and rlhf_ray.cluster.reaper
    stops what is left."""
    import threading
    import time

    from rlhf_ray.cluster.connection import abandon_ray, local_ray_down, stop_ray
    from rlhf_ray.run.console import FILE_ONLY

    stage = ["roles"]

    def work():
        try:
            if trainer is not None:
                trainer.shutdown()
        except Exception as err:  # e.g. the last flush of the metrics on a full disk, which the run has reported
            log.warning("shutting the roles down: %s", err, exc_info=err, extra=FILE_ONLY)
        stage[0] = "ray"
        stop_ray()

    worker = threading.Thread(target=work, name="clean-up", daemon=True)
    worker.start()
    deadline = time.monotonic() + CLEAN_UP_S
    while True:
        worker.join(0.5)
        if not worker.is_alive():
            return
        if stage[0] == "roles" and local_ray_down():
            why = "this run's Ray was stopped from outside (its GCS or raylet is gone)"
        elif time.monotonic() >= deadline:
            why = f"Ray did not shut down within {CLEAN_UP_S:.0f} s"
        else:
            continue
        log.warning("%s; rlhf_ray.cluster.reaper stops the processes that are left", why)
        abandon_ray()
        return


def _save_on_stop(trainer) -> str:
    """Checkpoint the finished steps if possible; what happened, for the stop message."""
    from rlhf_ray.cluster.roles import RoleError

    if trainer is None:  # stopped while starting up
        return "nothing to save yet"
    try:
        saved = trainer.stop()
    except (RoleError, OSError, ValueError) as err:
        return f"the checkpoint could not be saved ({err})"
    if saved:
        return f"checkpoint saved to {saved} (resume=auto continues from it)"
    return f"the last checkpoint (step {trainer.saved_step}) is current" if trainer.saved_step else "no checkpoint saved"


def exit_with(code: int) -> None:
    """End an entry point's process with ``code``."""
    from rlhf_ray.cluster.connection import ray_abandoned

    if ray_abandoned():  # Ray's exit hooks would wait 60 s for a GCS that is gone, then abort
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
