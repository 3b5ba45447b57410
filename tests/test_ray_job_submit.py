"""`ray job submit` against a real local head on loopback, started and stopped by the test."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_a_two_step_job(tiny_cache, tmp_path):
    dashboard = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           # A head started after any local ray.init() on this machine uses token auth (~/.ray/auth_token):
           # the client must then send the token.
           "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    # --block ties the head's processes to this Popen: terminating it stops this cluster only (`ray stop`
    # would also stop the test session's own Ray).
    # Every port of this head is a free one: the test session's own Ray holds the default agent ports.
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "ray-client-server-port")]
    head = subprocess.Popen([RAY, "start", "--head", "--block", *ports, "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={ray_tmp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(1)
        out = tmp_path / "job_run"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "-m", "rlhf_ray.train", "--config", "configs/tiny_cpu.yaml", "ppo.total_episodes=32",
                  f"models.cache_dir={tiny_cache}", f"output_dir={out}", "logging.progress_bar=false",
                  "deepspeed.zero_stage=2"]  # the ZeRO-2 code path (one rank; the other e2e tests: 0 and 3)
        for _ in range(15):  # the dashboard answers a few seconds before its job agent accepts jobs
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps] == [1, 2]
        assert (out / "final_model" / "model.safetensors").is_file()
        assert (out / "report.png").is_file() and (out / "logs" / "learner-0.log").is_file()

        rm_out = tmp_path / "rm_job"  # reward-model training goes the same way
        rm_job = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m",
                                 "rlhf_ray.train_rm", f"cache_dir={tiny_cache}", f"output_dir={rm_out}",
                                 "training.epochs=1", "logging.progress_bar=false"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert rm_job.returncode == 0 and "succeeded" in rm_job.stdout, rm_job.stdout[-4000:] + rm_job.stderr[-2000:]
        assert json.loads((rm_out / "eval.json").read_text())["sets"]["heldout"]["accuracy"] > 0.5
        assert (rm_out / "final_model" / "reward_stats.json").is_file()
    finally:
        head.terminate()  # the head drains for up to 30 s, then stops its processes
        head.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
