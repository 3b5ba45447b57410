"""python -m rlhf_ray.cluster.reaper PID — after process PID ends, however it ends (SIGKILL included), stop every
process it had started that is still running.

A run that starts its own local Ray starts this beside itself, in a session of its own (a signal sent to
the run's process group does not reach it). Why: when the driver is killed with SIGKILL, Ray's GCS and
raylet go with it, but the raylet's DashboardAgent and RuntimeEnvAgent wait forever for a GCS that is
gone, and would be left behind. The reaper keeps the list of the driver's descendants (PID and start
time, so a reused PID is never touched), and when the driver is gone sends SIGTERM, then SIGKILL after
5 s, to the ones still alive.
"""
from __future__ import annotations

import os
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def reap_after(pid: int) -> int:
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    started: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():
                    started.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass
        time.sleep(POLL_S)
    left = []
    for child_pid, created in started.items():
        try:
            child = psutil.Process(child_pid)
            if child.create_time() == created:
                child.terminate()
                left.append(child)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return len(left)


def start_beside(pid: int) -> None:
    """Start a reaper for ``pid`` in a session of its own; its output is discarded."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "rlhf_ray.cluster.reaper", str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    sys.exit(0 if reap_after(int(sys.argv[1])) >= 0 else 1)
