"""Every actor's Python stacks while a phase hangs (the hang doctor): read with py-spy where ptrace is allowed, else
written by the process itself — each role actor registers faulthandler on STACK_SIGNAL at start, into a file of its
own — and the innermost frame in our code picked out of them.

When a wait on a role (rlhf_ray.runtime.waiting.wait) passes ``timeouts.hang_dump_at`` of its timeout, ``HangDoctor``
dumps the stacks of every actor of the run, one Ray task per node (a process can only be read from its own node),
into ``<output_dir>/logs/hang-step-N.txt``, and says in one console line which actor of the waited-on role is in
which function of ours. The wait then goes on; at the timeout the role is replaced as before.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("rlhf_ray.cluster.roles")

STACK_SIGNAL = signal.SIGUSR1
OUR_CODE = re.compile(r"[/\\](rlhf_ray|actors)[/\\]")  # a frame in this project's files
_handler_file = None  # kept open: faulthandler writes into it from the signal handler


# ------------------------------------------------------------------------------------------------ in each actor

def install_stack_dump(log_file: str | None) -> str:
    """In a role actor at start: STACK_SIGNAL writes every thread's stack to ``<log_file>.stacks`` (a file in the temp
    dir without a log file); returns that file's path."""
    global _handler_file
    path = f"{log_file}.stacks" if log_file else os.path.join(tempfile.gettempdir(), f"rlhf_ray-{os.getpid()}.stacks")
    if _handler_file is None or _handler_file.name != path:
        _handler_file = open(path, "a")  # noqa: SIM115 — lives as long as the process
        faulthandler.register(STACK_SIGNAL, file=_handler_file, all_threads=True, chain=False)
    return path


# ------------------------------------------------------------------------------------------------ on an actor's node

def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def dump_stacks(pid: int, stacks_file: str | None, tool: str = "auto", timeout_s: float = 20.0) -> tuple[str, str]:
    """(the stacks of process ``pid``, how they were read: 'py-spy', 'faulthandler' or 'none'). py-spy reads them from
    outside (needs ptrace); 'faulthandler' signals the process, whose handler writes them to ``stacks_file``."""
    why = ""
    if tool in ("auto", "py-spy"):
        try:
            done = subprocess.run([py_spy(), "dump", "--full-filenames", "--pid", str(pid)], capture_output=True,
                                  text=True, timeout=timeout_s)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout, "py-spy"
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as err:
            why = f"{type(err).__name__}: {err}"
        if tool == "py-spy":
            return f"(py-spy could not read process {pid}: {why})\n", "none"
    if not stacks_file:
        return f"(no stacks: py-spy: {why or 'not tried'}; no faulthandler file)\n", "none"
    start = os.path.getsize(stacks_file) if os.path.exists(stacks_file) else 0
    try:
        os.kill(pid, STACK_SIGNAL)
    except OSError as err:
        return f"(no stacks: py-spy: {why or 'not tried'}; signalling {pid}: {err})\n", "none"
    size, deadline = start, time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # written from the handler: done when it stops growing
        time.sleep(0.2)
        now = os.path.getsize(stacks_file) if os.path.exists(stacks_file) else 0
        if now > start and now == size:
            break
        size = now
    with open(stacks_file) as f:
        f.seek(start)
        return f.read(), "faulthandler"


def dump_on_node(processes: list[dict], tool: str) -> list[dict]:
    """Run on one node (a Ray task there): each {"name", "pid", "stacks_file"} with its "stacks" and "how"."""
    out = []
    for p in processes:
        text, how = dump_stacks(p["pid"], p.get("stacks_file"), tool)
        out.append({**p, "stacks": text, "how": how})
    return out


# ------------------------------------------------------------------------------------------------ reading a dump

PY_SPY_FRAME = re.compile(r"^\s+(?P<fn>\S.*?) \((?P<file>.+?):(?P<line>\d+)\)\s*$")
FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.+?)", line (?P<line>\d+) in (?P<fn>.+?)\s*$')


def innermost_ours(stacks: str) -> str | None:
    """'fn (file:line)' of the innermost frame in this project's code: in the main thread (where an actor runs its
    calls; py-spy names it "MainThread", faulthandler's signal handler runs there: "Current thread"), else in the
    first thread that has one (py-spy and faulthandler both list a thread's frames innermost first)."""
    blocks = re.split(r"\n(?=(?:Thread|Current thread) )", stacks)
    main = [b for b in blocks if '"MainThread"' in b.split("\n", 1)[0] or b.startswith("Current thread")]
    for block in main + [b for b in blocks if b not in main]:
        for line in block.splitlines():
            match = PY_SPY_FRAME.match(line) or FAULTHANDLER_FRAME.match(line)
            if match and OUR_CODE.search(match["file"]):
                path = match["file"]
                short = path[OUR_CODE.search(path).start() + 1:]
                return f"{match['fn']} ({short}:{match['line']})"
    return None


# ------------------------------------------------------------------------------------------------ in the driver

class HangDoctor:
    """Called by a wait that passed ``fraction`` of its timeout (rlhf_ray.runtime.waiting): dumps every actor's stacks
    to ``<logs>/hang-step-N.txt`` (N: ``step()``, the step under way) and says which function of ours the waited-on
    role's actors are in. ``processes()``: {actor name: {"role", "node", "pid", "stacks_file"}} of the run's actors."""

    def __init__(self, processes, logs_dir: str | Path, step, fraction: float, tool: str = "auto"):
        self.processes, self.logs_dir, self.step = processes, Path(logs_dir), step
        self.fraction, self.tool = fraction, tool
        self.lock = threading.Lock()  # a rollout thread and the main thread may both be waiting

    def __call__(self, role: str, doing: str, waited_s: float, timeout_s: float, timeout_key: str) -> Path | None:
        with self.lock:
            dumps = self.dump_all()
            if not dumps:
                return None
            step = self.step()
            path = self.logs_dir / f"hang-step-{step}.txt"
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"=== step {step}: {role} {doing}, waited {waited_s:.0f} s of {timeout_s:.0f} s "
                        f"({timeout_key}), {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
                for d in dumps:
                    f.write(f"\n--- {d['name']} (pid {d['pid']}, stacks by {d['how']}) ---\n{d['stacks']}")
            waited_on = [d for d in dumps if role in (d["role"], d["name"])] or dumps
            where = "; ".join(f"{d['name']} is in {innermost_ours(d['stacks']) or 'no function of ours'}"
                              for d in waited_on)
            log.warning("hang doctor: %s has been %s for %.0f s of its %.0f s (%s); %s; every actor's stacks: %s",
                        role, doing, waited_s, timeout_s, timeout_key, where, path)
            return path

    def dump_all(self) -> list[dict]:
        """Every actor's stacks, read on its own node (a task per node, at most 60 s)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        by_node: dict[str, list[dict]] = {}
        for name, p in self.processes().items():
            by_node.setdefault(p["node"], []).append({"name": name, "role": p["role"], "pid": p["pid"],
                                                      "stacks_file": p.get("stacks_file")})
        task = ray.remote(num_cpus=0)(dump_on_node)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(procs,
                                                                                                            self.tool)
                for node, procs in by_node.items()]
        try:
            return [d for part in ray.get(refs, timeout=60) for d in part]
        except Exception as err:  # noqa: BLE001 — the doctor must never be what breaks the run
            log.warning("hang doctor: the stacks could not be read: %s: %s", type(err).__name__, err)
            return []
