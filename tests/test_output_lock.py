"""The output-dir lock without a cluster: one holder at a time, the holder named in one line, stale locks (a dead
process on this host, an old heartbeat from another host, an unreadable one) taken over, a contender's fresh lock never
stolen, the heartbeat, release. Fake hosts, PIDs and clocks where the real ones cannot be arranged."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from rlhf_ray.run.output_lock import (LOCK_NAME, Here, Holder, OutputDirBusy, OutputDirLock, OutputDirLost, pid_space,
                                      process_start, why_gone)
from tests.conftest import ROOT

NOW = 1_800_000_000.0
HERE = Here("boot-a/pid:[1]", lambda pid: {100: 5.0}.get(pid))  # only pid 100 runs here, started at t=5


def holder(**changes) -> Holder:
    base = Holder(host="node-1", pid=100, pid_space="boot-a/pid:[1]", process_start=5.0, since=NOW - 600,
                  command="python -m rlhf_ray.train --config c.yaml", run_id="abc123def456")
    return replace(base, **changes)


def write_lock(out, who: Holder, heartbeat: float) -> None:
    path = out / LOCK_NAME
    path.write_text(who.to_json())
    os.utime(path, (heartbeat, heartbeat))


def no_flock(monkeypatch) -> None:
    """As on a file system shared by several nodes where flock does not reach the other nodes: the file decides."""
    monkeypatch.setattr(OutputDirLock, "_flock_dir", lambda self: None)


@pytest.mark.parametrize("who, heartbeat, gone", [
    (holder(), NOW - 5, None),                                               # running here
    (holder(pid=101), NOW - 5, "its process 101 is not running on this machine"),
    (holder(process_start=2.0), NOW - 5, "pid 100 is now another process"),  # the PID was reused
    (holder(pid_space="boot-b/pid:[1]", pid=101), NOW - 5, None),            # another host: its PIDs say nothing
    (holder(pid_space="boot-b/pid:[1]", pid=101), NOW - 121, "its heartbeat is 121 s old (more than 120 s)"),
    (holder(), NOW - 3600, "its heartbeat is 3600 s old"),                   # here, alive, but silent: hung
    (None, NOW - 5, None),                                                   # unreadable, fresh: maybe being written
    (None, NOW - 200, "its heartbeat is 200 s old"),
])
def test_when_a_holder_counts_as_gone(who, heartbeat, gone):
    why = why_gone(who, heartbeat, NOW, HERE, stale_s=120)
    assert (why is None) if gone is None else (why is not None and why.startswith(gone)), why


def test_one_holder_at_a_time_and_the_second_is_told_who_in_one_line(tmp_path):
    with OutputDirLock(tmp_path, "python -m rlhf_ray.train --config c.yaml") as first:
        assert Holder.from_json((tmp_path / LOCK_NAME).read_text()) == first.me
        second = OutputDirLock(tmp_path, "python -m rlhf_ray.train resume=auto")
        with pytest.raises(OutputDirBusy) as busy:
            second.acquire()
        message = str(busy.value)
        assert "\n" not in message and message.startswith(f"output_dir={str(tmp_path)!r} is in use by another run: ")
        for part in (f"host {first.me.host}", f"pid {os.getpid()}", "since 20", "heartbeat 0 s ago",
                     "python -m rlhf_ray.train --config c.yaml", f"(run {first.me.run_id})"):
            assert part in message, (part, message)
    assert not (tmp_path / LOCK_NAME).exists()
    assert not [p.name for p in tmp_path.iterdir()]  # nothing left behind: no private or stale files either
    with OutputDirLock(tmp_path, "again"):  # released: the next run takes it
        pass


def test_without_flock_the_lock_file_alone_refuses_a_second_run(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    with OutputDirLock(tmp_path, "first") as first:
        with pytest.raises(OutputDirBusy, match=f"pid {os.getpid()}, since .* first \\(run {first.me.run_id}\\)"):
            OutputDirLock(tmp_path, "second").acquire()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    pid = dead_pid()
    write_lock(tmp_path, holder(pid=pid, pid_space=pid_space(), host="this-host"), heartbeat=time.time())
    with OutputDirLock(tmp_path, "rerun") as lock:
        assert Holder.from_json((tmp_path / LOCK_NAME).read_text()).run_id == lock.me.run_id
        assert lock.took_over.startswith(f"output_dir {tmp_path}: took over the lock of a run that is gone (host "
                                         f"this-host, pid {pid}")
        assert lock.took_over.endswith(f"its process {pid} is not running on this machine")


def test_a_lock_from_another_host_is_taken_over_only_once_its_heartbeat_is_old(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    other = holder(host="node-7", pid_space="another-kernel/pid:[9]", pid=1)
    write_lock(tmp_path, other, heartbeat=time.time() - 30)
    with pytest.raises(OutputDirBusy, match=r"host node-7, pid 1, since .*heartbeat 30 s ago"):
        OutputDirLock(tmp_path, "rerun").acquire()
    assert Holder.from_json((tmp_path / LOCK_NAME).read_text()) == other  # untouched
    write_lock(tmp_path, other, heartbeat=time.time() - 3600)
    with OutputDirLock(tmp_path, "rerun") as lock:
        assert "host node-7, pid 1" in lock.took_over and "its heartbeat is 3600 s old" in lock.took_over


def test_an_unreadable_lock_is_respected_while_fresh_and_taken_over_when_old(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    path = tmp_path / LOCK_NAME
    path.write_text("{half a lo")
    with pytest.raises(OutputDirBusy, match=f"in use by another run: the lock {path}, unreadable"):
        OutputDirLock(tmp_path, "rerun").acquire()
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    with OutputDirLock(tmp_path, "rerun") as lock:
        assert "an unreadable lock" in lock.took_over


def test_a_contenders_fresh_lock_is_given_back_not_stolen(tmp_path, monkeypatch):
    """Two runs judge the same stale lock; the first takes it over before the second renames "it" aside: the second
    finds the renamed lock is not the one it judged, puts it back, and is refused."""
    no_flock(monkeypatch)
    write_lock(tmp_path, holder(pid_space="elsewhere", pid=1), heartbeat=time.time() - 3600)
    contender = holder(pid_space="elsewhere", pid=2, host="node-2", run_id="contender000")

    def pid_1_is_gone_and_meanwhile_the_contender_takes_over(pid):
        if pid == 1:
            write_lock(tmp_path, contender, heartbeat=time.time())  # between our judgement and our rename
            return None
        return contender.process_start  # pid 2, the contender, runs

    lock = OutputDirLock(tmp_path, "rerun", here=Here("elsewhere", pid_1_is_gone_and_meanwhile_the_contender_takes_over))
    with pytest.raises(OutputDirBusy, match="host node-2, pid 2"):
        lock.acquire()
    assert Holder.from_json((tmp_path / LOCK_NAME).read_text()) == contender
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_the_heartbeat_refreshes_the_lock_and_notices_when_it_is_taken(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    clock = [NOW]
    lock = OutputDirLock(tmp_path, "run", heartbeat_s=3600, clock=lambda: clock[0])
    lock.acquire()
    try:
        clock[0] = NOW + 10
        lock.touch()
        assert (tmp_path / LOCK_NAME).stat().st_mtime == NOW + 10
        lock.check()  # still ours
        (tmp_path / LOCK_NAME).unlink()  # removed by hand: put back
        lock.touch()
        assert Holder.from_json((tmp_path / LOCK_NAME).read_text()).run_id == lock.me.run_id
        write_lock(tmp_path, holder(host="node-9"), heartbeat=NOW)  # another run took it (we were paused, say)
        lock.touch()
        with pytest.raises(OutputDirLost, match=r"lock on output_dir .* was taken: .* now names host node-9"):
            lock.check()
    finally:
        lock.release()
    assert Holder.from_json((tmp_path / LOCK_NAME).read_text()).host == "node-9"  # not ours: left in place


def test_the_heartbeat_thread_keeps_a_lock_fresh(tmp_path):
    with OutputDirLock(tmp_path, "run", heartbeat_s=0.05) as lock:
        old = time.time() - 100
        os.utime(tmp_path / LOCK_NAME, (old, old))
        deadline = time.time() + 5
        while (tmp_path / LOCK_NAME).stat().st_mtime < old + 50 and time.time() < deadline:
            time.sleep(0.02)
        assert (tmp_path / LOCK_NAME).stat().st_mtime > old + 50 and lock.lost is None


def test_process_start_tells_a_running_process_from_a_gone_one():
    assert abs(process_start(os.getpid()) - process_start(os.getpid())) < 1e-6
    assert process_start(dead_pid()) is None


CONTENDER = """
import sys, time
from rlhf_ray.run.output_lock import OutputDirBusy, OutputDirLock
lock = OutputDirLock(sys.argv[1], "contender")
try:
    lock.acquire()
except OutputDirBusy as err:
    print("BUSY", err, flush=True)
    sys.exit(2)
print("HOLDS", flush=True)
time.sleep(3)
lock.release()
"""


@pytest.mark.e2e
def test_processes_started_together_exactly_one_holds(tmp_path):
    runs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for _ in range(4)]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert sorted(run.returncode for run in runs) == [0, 2, 2, 2], outputs
    assert sum(out.startswith("HOLDS") for out in outputs) == 1
    winner = next(run.pid for run, out in zip(runs, outputs) if out.startswith("HOLDS"))
    assert all(f"pid {winner}," in out for out in outputs if out.startswith("BUSY")), outputs
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_flock_left_with_a_process_that_is_no_run_does_not_block(tmp_path):
    """A process forked from a run that died can keep the run's flock; without a live holder's lock file it proves
    nothing, and the next run goes ahead (after waiting briefly for a lock file that might be on its way)."""
    import fcntl

    leftover = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(leftover, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with OutputDirLock(tmp_path, "rerun") as lock:
            assert lock.took_over is None and (tmp_path / LOCK_NAME).exists()
    finally:
        os.close(leftover)
