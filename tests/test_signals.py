"""SIGTERM (a scheduler pre-empting) and SIGINT (Ctrl-C) stop a run cleanly: one line, every process it
started gone, the metrics of finished steps intact and checkpointed. The run's own Ray listens on loopback only.
SIGINT here; SIGTERM on tests/test_durability.py's stopped run (the same checks, on a run that is then resumed).
SIGKILL cannot be handled: the reaper started beside the driver stops what the driver started."""
from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import listening_addresses, metric_rows, ray_processes, short_tmp, start_run, wait_for_steps

pytestmark = pytest.mark.e2e


def test_sigint_stops_everything_with_one_line_and_sigkill_leaves_no_process_behind(tiny_cache, tmp_path):
    """Two runs side by side, each in a Ray of its own (they were two tests, one after the other): Ctrl-C stops one
    (SIGINT, exit 130) with one line; the other's driver is killed with SIGKILL, and rlhf_ray.cluster.reaper stops
    what it started (Ray leaves its DashboardAgent and RuntimeEnvAgent running otherwise)."""
    import psutil

    out, killed_out = tmp_path / "run", tmp_path / "killed"
    with short_tmp("rs") as ray_tmp, short_tmp("rk") as killed_tmp:
        run = start_run(out, ray_tmp, tiny_cache, "ppo.total_episodes=3200")
        killed = start_run(killed_out, killed_tmp, tiny_cache, "ppo.total_episodes=3200")
        try:
            wait_for_steps(killed, killed_out, 1)
            started = psutil.Process(killed.pid).children(recursive=True)
            names = {p.name() for p in started}
            assert {"raylet", "gcs_server"} <= names and any("DashboardAgent" in " ".join(p.cmdline()) for p in started)
            killed.kill()
            killed.wait()

            wait_for_steps(run, out, 1)
            assert listening_addresses(run.pid) <= {"127.0.0.1"}, listening_addresses(run.pid)
            run.send_signal(signal.SIGINT)
            output = run.communicate(timeout=120)[0]
            _, alive = psutil.wait_procs(started, timeout=30)
            time.sleep(2)  # the raylet and the GCS exit right after the driver
        finally:
            for started_run in (run, killed):
                if started_run.poll() is None:
                    started_run.kill()
        assert alive == [], [(p.pid, " ".join(p.cmdline())[:80]) for p in alive]
        assert ray_processes(killed_tmp) == [], ray_processes(killed_tmp)

        assert run.returncode == 130, output[-3000:]
        assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert "stopped by SIGINT after" in last and "of 200 steps" in last, last
        assert ray_processes(ray_tmp) == [], ray_processes(ray_tmp)
    assert not (out / "run.lock").exists()  # the output dir is free for the next run
    steps = [row["step"] for row in metric_rows(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 200
    # the finished steps are checkpointed: a resume continues right after the last recorded step
    assert f"checkpoint saved to {out / 'checkpoints' / f'step-{len(steps):06d}'}" in last, last
    assert json.loads((out / "checkpoints" / f"step-{len(steps):06d}" / "trainer.json").read_text())["step"] == len(steps)
