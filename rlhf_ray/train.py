"""Entry point: python -m rlhf_ray.train --config configs/tiny_cpu.yaml [key=value ...]

Joins the Ray cluster named by ``ray.address`` or RAY_ADDRESS (``ray job submit`` sets it), otherwise
starts a local one of its own. Writes <output_dir>/config.yaml, metrics.jsonl, samples.jsonl, tensorboard/, logs/,
report.png, checkpoints/ and final_model/, and ends with a one-line summary of the run.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from rlhf_ray.config import DEFAULT_CONFIG, ConfigError, dump_config, load_config

log = logging.getLogger("rlhf_ray.train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run PPO on Ray.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: tiny CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.kl_coef=0.1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def make_trainer():
        from rlhf_ray.drivers.ppo import PPOTrainer

        return PPOTrainer(cfg)

    return run(cfg, f"rlhf-ray PPO: {args.config}", make_trainer)


def run(cfg, title: str, make_trainer) -> int:
    """Claim the output dir, start the trainer, step it to the end with a progress bar, finish; a stop signal
    checkpoints and exits 143/130, a known error is one line and exit 1. Shared by every driver (PPO,
    reward-model training): a trainer has ``step_count``, ``num_steps``, ``saved_step``, ``startup_seconds``,
    ``step()``, ``progress(metrics)``, ``finish()``, ``stop()``, ``closing()`` and ``shutdown()``."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlhf_ray.console import setup_console
    from rlhf_ray.preflight import PreflightError, check_output_dir, claim_output_dir
    from rlhf_ray.cluster.roles import RoleError
    from rlhf_ray.cluster.signals import RunStopped

    try:
        out = check_output_dir(cfg.output_dir)
        claim_output_dir(out, cfg.resume, cfg.overwrite)
    except PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    driver_log = setup_console(cfg.logging.console, out)
    log.info("%s → %s%s", title, out, f" (engine, Ray and DeepSpeed output: {driver_log.parent}/)" if driver_log else "")
    trainer = None
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
                if metrics:
                    bar.set_postfix(trainer.progress(metrics), refresh=False)
                if trainer.step_count >= bar.n:
                    bar.update(trainer.step_count - bar.n)
                else:  # a learner restart took the run back to a checkpoint
                    bar.n = trainer.step_count
                    bar.refresh()
            bar.close()
        final = trainer.finish()
        if final:
            log.info("final %s saved to %s", trainer.exported, final)
    except (RunStopped, KeyboardInterrupt) as stop:
        return _stopped(stop, trainer, trainer.num_steps if trainer else 0)
    except Exception as err:  # RoleError, ValueError, OSError (e.g. a model path or hub name not found), …
        stop = _stop_in(err)
        if stop is not None:  # a stop signal that surfaced inside a library call, wrapped by it
            return _stopped(stop, trainer, trainer.num_steps if trainer else 0)
        if not isinstance(err, (RoleError, ValueError, OSError)):
            raise
        log.error("error: %s", err)
        return 1
    finally:
        _clean_up(trainer)
    for line in trainer.closing():
        log.info("%s", line)
    return 0


def _stop_in(err: BaseException):
    """The RunStopped/KeyboardInterrupt in ``err``'s chain of causes, if any."""
    from rlhf_ray.cluster.signals import RunStopped

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

    stage = ["roles"]

    def work():
        if trainer is not None:
            trainer.shutdown()
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


if __name__ == "__main__":
    code = main()
    from rlhf_ray.cluster.connection import ray_abandoned

    if ray_abandoned():  # Ray's exit hooks would wait 60 s for a GCS that is gone, then abort
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
