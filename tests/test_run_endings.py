"""How a run ends, through the real entry point (rlhf_ray.run.harness.run) with a trainer that needs no cluster: the
output-dir lock held for the whole run and released on every path, a checkpoint of the finished steps on an error
(only when the learner holds exactly them), a full disk told in one line with its traceback in driver.log."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from rlhf_ray.cluster.roles import ActorLost, RoleError
from rlhf_ray.drivers.base import CheckpointedDriver
from rlhf_ray.run import checkpoint
from rlhf_ray.run.output_lock import LOCK_NAME, Holder, OutputDirLock
from tests.conftest import tiny_config


def test_a_run_leaves_a_ray_connection_it_found_as_it_was(monkeypatch):
    """A notebook's (or this suite's shared) Ray session outlives a run inside that process; a Ray the run
    joined or started itself is left at its end."""
    import ray

    from rlhf_ray.cluster import connection

    shutdowns, connected = [], [True]
    monkeypatch.setattr(ray, "is_initialized", lambda: connected[0])
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(ray, "init", lambda **kwargs: connected.__setitem__(0, True))
    cfg = tiny_config("/tmp/unused", None)
    connection.connect(cfg)
    connection.stop_ray()
    assert shutdowns == []
    connected[0] = False
    monkeypatch.setattr(connection.reaper, "start_beside", lambda pid: None)
    monkeypatch.setattr(connection.STOP_SIGNALS, "install", lambda: None)
    monkeypatch.setattr(connection, "local_ray_down", lambda: False)
    monkeypatch.setattr(connection, "_loopback_only", lambda: None)
    connection.connect(cfg)
    connection.stop_ray()
    assert shutdowns == [1]


ENDPOINT_DOWN = RoleError("reward failed while scoring a rollout: RewardEndpointDown: reward endpoint "
                          "http://127.0.0.1:9/ unreachable for 8 s, as long as models.reward.outage_s=8 allows")


class FakeTrainer(CheckpointedDriver):
    """Steps that only count, a checkpoint of real files every 2 steps; ``script[n](trainer)`` runs in step n."""
    unit, exported = "PPO", "policy"

    def __init__(self, cfg, script=None, num_steps: int = 4, shutdown_error: Exception | None = None):
        self.cfg, self.script, self.shutdown_error = cfg, script or {}, shutdown_error
        self.step_count = self.saved_step = 0
        self.num_steps, self.startup_seconds = num_steps, 0.0
        self.lock_seen = []
        self.metrics_log = self.open_metrics(0)

    def step(self) -> dict:
        self.lock_seen.append((self.cfg.output_dir and (os.path.exists(os.path.join(self.cfg.output_dir, LOCK_NAME)))))
        action = self.script.get(self.step_count + 1)
        if action:
            action(self)
        self.step_count += 1
        if self.due(2):
            self.save_checkpoint()
        return {}

    def save_checkpoint(self) -> str:
        staging = checkpoint.begin(self.cfg.output_dir, self.step_count)
        (staging / "state").write_text(str(self.step_count))
        path = checkpoint.commit(staging, self.step_count, {"step": self.step_count}, "", keep_last=2)
        self.saved_step = self.step_count
        return str(path)

    @staticmethod
    def progress(metrics: dict) -> dict:
        return {}

    def finish(self) -> None:
        return None

    def closing(self) -> list[str]:
        return [f"{self.step_count} steps"]

    def shutdown(self) -> None:
        if self.shutdown_error:
            raise self.shutdown_error


def raising(err: Exception, during_update: bool = False):
    def act(trainer):
        trainer.updating = during_update
        raise err
    return act


def start(tmp_path, *overrides, **trainer):
    """Run the fake trainer through rlhf_ray.run.harness.run; -> (exit code, trainer)."""
    from rlhf_ray.run.harness import run

    cfg = tiny_config(tmp_path / "run", None, "logging.trackers=[]", *overrides)
    made = []
    code = run(cfg, "test run", lambda: made.append(FakeTrainer(cfg, **trainer)) or made[0])
    return code, (made[0] if made else None)


def console(capsys) -> list[str]:
    captured = capsys.readouterr()
    return (captured.out + captured.err).splitlines()


def steps_saved(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_the_lock_is_held_for_the_whole_run_and_released_at_its_end(tmp_path, capsys):
    code, trainer = start(tmp_path)
    assert code == 0 and trainer.lock_seen == [True] * 4
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_an_error_outside_the_update_checkpoints_the_last_finished_step(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = start(tmp_path, script={4: raising(ENDPOINT_DOWN)})
    lines = console(capsys)
    assert code == 1 and steps_saved(out) == ["step-000002", "step-000003"]
    assert any(line.endswith(f"error: {ENDPOINT_DOWN}") for line in lines), lines
    assert lines[-1].endswith(f"stopped after 3 of 4 steps; checkpoint of step 3 saved to "
                              f"{out / 'checkpoints' / 'step-000003'}: rerun with resume=auto to continue from it")
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("err, during_update, why", [
    (RoleError("learner failed while running the ppo update: ValueError: nan"), True,
     "the error came during step 4's update, which leaves the learner between steps"),
    (ActorLost("learner actor died while computing values", "learner", stuck=False), False,
     "a learner rank is lost"),
])
def test_no_checkpoint_of_a_half_updated_or_lost_learner(tmp_path, capsys, err, during_update, why):
    out = tmp_path / "run"
    code, _ = start(tmp_path, script={4: raising(err, during_update)})
    assert code == 1 and steps_saved(out) == ["step-000002"]
    assert console(capsys)[-1].endswith(f"stopped after 3 of 4 steps; no checkpoint is saved now, as {why}: rerun with "
                                        f"resume=auto to continue from the last checkpoint (step 2, "
                                        f"{out / 'checkpoints' / 'step-000002'})")


def test_checkpoint_on_error_can_be_turned_off(tmp_path, capsys):
    code, _ = start(tmp_path, "checkpoint.on_error=false", script={4: raising(ENDPOINT_DOWN)})
    assert code == 1 and steps_saved(tmp_path / "run") == ["step-000002"]
    assert "nothing saved (checkpoint.on_error=false): rerun with resume=auto" in console(capsys)[-1]


def test_an_error_before_any_step_says_where_a_rerun_starts(tmp_path, capsys):
    code, _ = start(tmp_path, script={1: raising(ENDPOINT_DOWN)})
    assert code == 1 and console(capsys)[-1].endswith(
        "stopped after 0 of 4 steps; no step was finished: there is no checkpoint yet: a rerun starts from the beginning")


def test_a_full_disk_is_one_line_naming_the_path_and_what_is_still_valid(tmp_path, capsys):
    out = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    code, _ = start(tmp_path, script={4: raising(full, during_update=True)}, shutdown_error=full)
    lines = console(capsys)
    errors = [line for line in lines if "error" in line.lower() or "Errno" in line]
    assert code == 1 and len(errors) == 1, lines
    assert f"error: no space left on the device of {out} (" in errors[0]
    assert errors[0].endswith(f"free now); checkpoints up to step 2 in {out / 'checkpoints'} remain valid; free space "
                              "and rerun with resume=auto"), errors[0]
    assert not any("Traceback" in line or "clean-up" in line for line in lines), lines
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "Traceback" in driver_log and "No space left on device" in driver_log
    assert steps_saved(out) == ["step-000002"] and not (out / LOCK_NAME).exists()


def test_a_failed_checkpoint_save_on_a_full_disk_keeps_the_earlier_ones(tmp_path, monkeypatch):
    """torch.save says nothing of the disk ("unexpected pos …"): the free space left, looked at before the partial
    save is removed, tells it; the save becomes DiskFull naming the checkpoint, and the earlier one stays valid."""
    from rlhf_ray.run import disk_full
    from rlhf_ray.run.disk_full import DiskFull, disk_full_message, is_disk_full

    class Roles:
        restarts = {}

        def save_state(self, directory):
            raise RoleError("learner failed while saving a checkpoint: RuntimeError: [enforce fail at "
                            "inline_container.cc:672] . unexpected pos 576 vs 534")

    class Sampler:
        def state_dict(self, step):
            return {}

    trainer = FakeTrainer(tiny_config(tmp_path / "run", None))
    FakeTrainer.save_checkpoint(trainer)  # step 0: a valid one
    trainer.roles, trainer.sampler, trainer.step_count = Roles(), Sampler(), 3
    monkeypatch.setattr(disk_full, "free_bytes", lambda where: 0)
    with pytest.raises(DiskFull) as err:
        CheckpointedDriver.save_checkpoint(trainer)
    assert is_disk_full(err.value) and err.value.filename == str(tmp_path / "run" / "checkpoints" / "step-000003")
    assert steps_saved(tmp_path / "run") == ["step-000000"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".partial-*"))
    assert f"device of {tmp_path / 'run' / 'checkpoints' / 'step-000003'} (" in disk_full_message(err.value,
                                                                                                   tmp_path / "run")


def test_sigterm_mid_run_checkpoints_and_releases_the_lock(tmp_path, capsys):
    code, _ = start(tmp_path, script={3: lambda trainer: os.kill(os.getpid(), signal.SIGTERM)})
    assert code == 143 and not (tmp_path / "run" / LOCK_NAME).exists()
    assert "stopped by SIGTERM after 2 of 4 steps" in console(capsys)[-1]


def test_an_alarm_set_to_stop_ends_the_run_after_its_step_with_a_checkpoint(tmp_path, capsys):
    """logging.alarms=stop: the step that fired is the last; its checkpoint is saved even with checkpoint.on_signal
    off; one line says which alarm; exit code 3; the closing lines (report, summary) follow."""
    from rlhf_ray.run.alarms import EXIT_CODE, Alarm

    out = tmp_path / "run"
    fire = lambda trainer: setattr(trainer, "stopping_alarm", Alarm("kl_high", 3, "kl/mean 25 is above …"))  # noqa
    code, trainer = start(tmp_path, "logging.alarms=stop", "checkpoint.on_signal=false", script={3: fire})
    lines = console(capsys)
    assert code == EXIT_CODE == 3 and trainer.step_count == 3 and steps_saved(out) == ["step-000002", "step-000003"]
    (stop,) = [line for line in lines if "stopped by the alarm" in line]
    assert stop.endswith(f"stopped by the alarm kl_high (logging.alarms=stop) after 3 of 4 steps; checkpoint saved "
                         f"to {out / 'checkpoints' / 'step-000003'} (resume=auto continues from it)")
    assert lines[-1].endswith("3 steps") and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("overrides", [(), ("resume=auto",), ("overwrite=true",)])
def test_a_second_run_is_refused_while_the_first_holds_the_dir(tmp_path, capsys, overrides):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the first run's results: overwrite must not remove them
    with OutputDirLock(out, "python -m rlhf_ray.train first") as first:
        code, trainer = start(tmp_path, *overrides)
    lines = console(capsys)
    assert code == 2 and trainer is None and len(lines) == 1, lines
    assert lines[0].startswith(f"error: output_dir={str(out)!r} is in use by another run: host ")
    assert f"pid {os.getpid()}, since " in lines[0] and f"first (run {first.me.run_id})" in lines[0]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_run_whose_lock_is_taken_stops_without_writing_more(tmp_path, capsys, monkeypatch):
    from rlhf_ray.run import output_lock

    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    other = Holder.this_process("python -m rlhf_ray.train other")

    def taken(trainer):
        (out / LOCK_NAME).write_text(other.to_json())
        import time
        time.sleep(0.5)  # a heartbeat notices

    code, _ = start(tmp_path, script={3: taken})
    lines = console(capsys)
    assert code == 1 and steps_saved(out) == ["step-000002"], lines
    assert f"error: this run's lock on output_dir {out} was taken: {out / LOCK_NAME} now names host" in lines[-1]
    assert Holder.from_json((out / LOCK_NAME).read_text()) == other  # the other run's lock stays
