"""SIGTERM (a scheduler pre-empting) and SIGINT (Ctrl-C) stop a run cleanly: one line, every process it
started gone, the metrics of finished steps intact."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def ray_processes(ray_tmp: str) -> list[str]:
    """Processes of the Ray instance whose temp dir is ``ray_tmp`` (their command lines name it)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if ray_tmp in line]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_stops_everything_with_one_line(tiny_cache, tmp_path, sig, code):
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", "ppo.total_episodes=3200",
                            f"models.cache_dir={tiny_cache}", f"output_dir={out}", "logging.progress_bar=false"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           # a shell running this suite in the background ignores SIGINT, and children
                           # inherit that; a user's terminal does not
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
                break
            time.sleep(0.5)
        assert run.poll() is None, run.communicate()[0][-3000:]
        run.send_signal(sig)
        output = run.communicate(timeout=120)[0]
        time.sleep(2)  # the raylet and the GCS exit right after the driver
        assert run.returncode == code, output[-3000:]
        assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert f"stopped by {signal.Signals(sig).name} after" in last and "of 200 steps" in last, last
        assert ray_processes(ray_tmp) == [], ray_processes(ray_tmp)
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < 200
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
