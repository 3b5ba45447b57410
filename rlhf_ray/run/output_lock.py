"""One run per output dir, for the run's whole life — also on a file system shared by several nodes.

``<output_dir>/run.lock`` names its holder (JSON: host, pid, since when, the command, a run id). It is created
atomically: written whole to a private file, then hard-linked into place (``link`` fails if the name exists, on NFS
too, and nobody ever reads a half-written lock; where a file system has no hard links, ``O_CREAT|O_EXCL``). Its
modification time is the holder's heartbeat, touched every HEARTBEAT_S by a thread — no data is written, so it goes
on when the disk is full. The run removes it however it ends (normal end, error, SIGTERM, SIGINT).

A lock is taken over (said on the console) only when its holder is provably gone: it ran on this machine (same
kernel and PID namespace) and its process is not running any more, or its heartbeat is older than STALE_S (a run
SIGKILLed on another node, a node that died). Taking over renames the old lock aside and checks that the one renamed
is the one judged stale — a contender that took over meanwhile gets its lock back. Where ``flock`` works, the output
dir is also flocked for the run's life: on one machine that alone settles every race.

A run whose lock was taken from it (paused for longer than STALE_S, say) finds out at its next heartbeat and stops
after its current step, without writing anything more (``check``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0   # how often the holder touches its lock
STALE_S = 120.0      # a lock not touched for this long is taken over (well above HEARTBEAT_S and clock skew)
SCHEDULER_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")  # named in the holder's identity when set
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


class OutputDirBusy(RuntimeError):
    """Another run holds the output dir; the message (one line) names it."""


class OutputDirLost(RuntimeError):
    """This run's lock was taken by another run (or removed): it must stop writing into the output dir."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to name it to a user and to tell whether it is still running."""
    host: str
    pid: int
    pid_space: str          # kernel boot id + PID namespace: where ``pid`` means this very process
    process_start: float | None
    since: float            # wall clock, seconds since the epoch
    command: str
    run_id: str

    @classmethod
    def this_process(cls, command: str) -> "Holder":
        jobs = [f"{var}={os.environ[var]}" for var in SCHEDULER_JOB_VARS if os.environ.get(var)]
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_space=pid_space(),
                   process_start=process_start(os.getpid()), since=time.time(),
                   command=_shorten(" ".join([command, *jobs]), 160), run_id=uuid.uuid4().hex[:12])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Holder":
        """ValueError for anything that is not a whole lock (e.g. one being written with O_EXCL)."""
        try:
            data = json.loads(text)
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (TypeError, KeyError) as err:
            raise ValueError(f"not a lock: {err}") from None

    def describe(self, heartbeat_age_s: float | None = None) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        beat = f", heartbeat {heartbeat_age_s:.0f} s ago" if heartbeat_age_s is not None else ""
        return f"host {self.host}, pid {self.pid}, since {since}{beat}, {self.command} (run {self.run_id})"


# ---------------------------------------------------------------------------------- is the holder gone?

def pid_space() -> str:
    """This kernel boot and PID namespace: two processes with the same value see the same PIDs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the host name is the best there is
        return socket.gethostname()


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if no such process is running."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Here:
    """This process's view: which PIDs it can judge and how (tests give fake ones)."""
    pid_space: str
    process_start: Callable[[int], float | None]


def why_gone(holder: Holder | None, heartbeat: float, now: float, here: Here, stale_s: float = STALE_S) -> str | None:
    """Why the lock's holder is provably gone, or None while it may be running. ``heartbeat``: the lock's mtime."""
    age = now - heartbeat
    if holder is not None and holder.pid_space == here.pid_space:
        started = here.process_start(holder.pid)
        if started is None:
            return f"its process {holder.pid} is not running on this machine"
        if holder.process_start is not None and abs(started - holder.process_start) > 1.0:
            return f"pid {holder.pid} is now another process (the run's own has ended)"
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (more than {stale_s:.0f} s)"
    return None


# ---------------------------------------------------------------------------------- the lock

class OutputDirLock:
    """``acquire()`` or OutputDirBusy; ``check()`` between steps; ``release()`` at the end (idempotent)."""

    def __init__(self, output_dir: str | Path, command: str, heartbeat_s: float | None = None,
                 stale_s: float | None = None, clock: Callable[[], float] = time.time, here: Here | None = None):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.me = Holder.this_process(command)
        self.heartbeat_s, self.stale_s = heartbeat_s or HEARTBEAT_S, stale_s or STALE_S
        self.clock = clock
        self.here = here or Here(pid_space(), process_start)
        self.took_over: str | None = None  # what was taken over, for the console once logging is set up
        self.lost: str | None = None       # set by the heartbeat thread
        self._flock_fd: int | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self.held = False

    # -------------------------------------------------------------------------------- acquire
    def acquire(self, attempts: int = 5) -> None:
        self._flock_dir()
        try:
            for _ in range(attempts):
                if self._create():
                    self.held = True
                    self._start_heartbeat()
                    return
                self._take_over_if_gone()  # OutputDirBusy while the holder may be running
            raise OutputDirBusy(f"output_dir={str(self.dir)!r}: could not take {self.path} after {attempts} tries "
                                f"(other runs are contending for it); try again")
        except BaseException:
            self._unflock()
            raise

    def _flock_dir(self) -> None:
        """An exclusive flock on the output dir, where the file system supports it (local ones; not all NFS)."""
        import fcntl

        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            found = self._read(wait_s=2.0)
            if found is not None and why_gone(*found, self.clock(), self.here, self.stale_s) is None:
                raise OutputDirBusy(self._busy_message(found)) from None
            # no lock file, or its holder is gone: the flock is held by a process it left behind (one forked from
            # it, say), which proves nothing about a run: the lock file decides
            return
        except OSError:  # not supported here: the lock file alone decides
            os.close(fd)
            return
        self._flock_fd = fd

    def _create(self) -> bool:
        """Put our lock in place atomically; False if a lock is there already."""
        private = self.dir / f".{LOCK_NAME}.{self.me.run_id}"
        private.write_text(self.me.to_json())
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in NO_HARD_LINKS:
                raise
            return self._create_exclusive()
        finally:
            private.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.me.to_json())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self, path: Path | None = None, wait_s: float = 0.5) -> tuple[Holder | None, float] | None:
        """(holder, heartbeat) of the lock at ``path``; holder None if it cannot be parsed after ``wait_s`` (one
        being written with O_EXCL, or damaged); None if there is no lock."""
        path = path or self.path
        deadline = time.monotonic() + wait_s
        while True:
            try:
                heartbeat, text = path.stat().st_mtime, path.read_text()
            except FileNotFoundError:
                return None
            try:
                return Holder.from_json(text), heartbeat
            except ValueError:
                if time.monotonic() >= deadline:
                    return None, heartbeat
                time.sleep(0.1)

    def _take_over_if_gone(self) -> None:
        found = self._read()
        if found is None:  # released meanwhile: try again
            return
        holder, heartbeat = found
        why = why_gone(holder, heartbeat, self.clock(), self.here, self.stale_s)
        if why is None:
            raise OutputDirBusy(self._busy_message(found))
        aside = self.dir / f".{LOCK_NAME}.stale-{self.me.run_id}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another contender moved it first
            return
        if self._read(aside, wait_s=0) != found:  # not the lock judged stale: a contender's fresh one, give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = holder.describe() if holder else "an unreadable lock"
        self.took_over = f"output_dir {self.dir}: took over the lock of a run that is gone ({who}): {why}"

    def _busy_message(self, found: tuple[Holder | None, float] | None) -> str:
        if found is None or found[0] is None:
            holder = "a process whose lock cannot be read yet" if found is None else f"the lock {self.path}, unreadable"
        else:
            holder = found[0].describe(heartbeat_age_s=max(0.0, self.clock() - found[1]))
        return (f"output_dir={str(self.dir)!r} is in use by another run: {holder}. Wait for it to end or choose "
                f"another output_dir (the lock of a run that is gone is taken over once its process is gone from "
                f"this machine or its heartbeat is {self.stale_s:.0f} s old)")

    # -------------------------------------------------------------------------------- while held
    def _start_heartbeat(self) -> None:
        self._beating = threading.Thread(target=self._beat, name="output-dir-lock", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.touch()
            except OSError as err:  # a file-system hiccup: the next beat tries again (STALE_S leaves room)
                log.debug("output-dir lock heartbeat failed: %s", err)
            if self.lost:  # the driver's loop stops the run (check)
                return

    def touch(self) -> None:
        """One heartbeat: refresh our lock's mtime, or notice that it is not ours any more (``lost``)."""
        found = self._read(wait_s=0.5)
        if found is None:  # removed by hand: put it back if nobody else has
            if not self._create():
                self.lost = f"{self.path} was removed and another run created it"
            return
        holder = found[0]
        if holder is None or holder.run_id != self.me.run_id:
            self.lost = f"{self.path} now names {holder.describe() if holder else 'an unreadable holder'}"
            return
        now = self.clock()
        os.utime(self.path, (now, now))

    def check(self) -> None:
        """OutputDirLost once the heartbeat found the lock taken (the run must stop writing here)."""
        if self.lost:
            raise OutputDirLost(f"this run's lock on output_dir {self.dir} was taken: {self.lost} (was the run "
                                f"paused for more than {self.stale_s:.0f} s?); it stopped without writing more")

    # -------------------------------------------------------------------------------- release
    def release(self) -> None:
        self._stop.set()
        if self._beating is not None and self._beating is not threading.current_thread():
            self._beating.join(timeout=5)
        if self.held:
            self.held = False
            found = self._read(wait_s=0)
            if found is not None and found[0] is not None and found[0].run_id == self.me.run_id:
                try:
                    self.path.unlink()
                except OSError as err:
                    log.warning("could not remove %s: %s (the next run takes it over: this process is gone)",
                                self.path, err)
        self._unflock()

    def _unflock(self) -> None:
        if self._flock_fd is not None:
            os.close(self._flock_fd)  # closing drops the flock
            self._flock_fd = None

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def default_command() -> str:
    """How this process was started, short (for the lock's holder identity)."""
    argv0 = Path(sys.argv[0])
    module = f"python -m rlhf_ray.{argv0.stem}" if argv0.parent.name == "rlhf_ray" else argv0.name
    return " ".join([module, *sys.argv[1:]])
