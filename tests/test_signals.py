"""SIGTERM (a scheduler pre-empting) and SIGINT (Ctrl-C) stop a run cleanly: one line, every process it
started gone, the metrics of finished steps intact and checkpointed. The run's own Ray listens on loopback only.
SIGINT here; SIGTERM on tests/test_durability.py's stopped run (the same checks, on a run that is then resumed)."""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time

import pytest

from tests.conftest import listening_addresses, metric_rows, ray_processes, start_run, wait_for_steps

pytestmark = pytest.mark.e2e


# SIGTERM: the stopped run of tests/test_durability.py makes the same checks (its stop is a SIGTERM mid-run)
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130)])
def test_a_signal_mid_run_stops_everything_with_one_line(tiny_cache, tmp_path, sig, code):
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    run = start_run(out, ray_tmp, tiny_cache, "ppo.total_episodes=3200")
    try:
        wait_for_steps(run, out, 1)
        assert listening_addresses(run.pid) <= {"127.0.0.1"}, listening_addresses(run.pid)
        run.send_signal(sig)
        output = run.communicate(timeout=120)[0]
        time.sleep(2)  # the raylet and the GCS exit right after the driver
        assert run.returncode == code, output[-3000:]
        assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert f"stopped by {signal.Signals(sig).name} after" in last and "of 200 steps" in last, last
        assert ray_processes(ray_tmp) == [], ray_processes(ray_tmp)
        assert not (out / "run.lock").exists()  # the output dir is free for the next run
        steps = [row["step"] for row in metric_rows(out)]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < 200
        # the finished steps are checkpointed: a resume continues right after the last recorded step
        assert f"checkpoint saved to {out / 'checkpoints' / f'step-{len(steps):06d}'}" in last, last
        assert json.loads((out / "checkpoints" / f"step-{len(steps):06d}" / "trainer.json").read_text())["step"] == len(steps)
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_driver_killed_with_sigkill_leaves_no_process_behind(tiny_cache, tmp_path):
    """SIGKILL cannot be handled: rlhf_ray.cluster.reaper, started beside the driver, stops what the driver started
    (Ray leaves its DashboardAgent and RuntimeEnvAgent running otherwise)."""
    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    run = start_run(tmp_path / "run", ray_tmp, tiny_cache, "ppo.total_episodes=3200")
    try:
        wait_for_steps(run, tmp_path / "run", 1)
        started = psutil.Process(run.pid).children(recursive=True)
        names = {p.name() for p in started}
        assert {"raylet", "gcs_server"} <= names and any("DashboardAgent" in " ".join(p.cmdline()) for p in started)
        run.kill()
        run.wait()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], [(p.pid, " ".join(p.cmdline())[:80]) for p in alive]
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
