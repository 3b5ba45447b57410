"""Small pieces shared by the role classes."""
from __future__ import annotations

import functools
import os
import sys
import time


class Role:
    """What every role actor does besides its job: keep its chatter in a log file and report memory.

    ``log_file``: when set, this process's stdout and stderr (Python and native: vLLM, DeepSpeed, oneDNN)
    go to that file instead of the driver's console (``logging.console: quiet``).
    """

    def __init__(self, log_file: str | None = None):
        if log_file:
            redirect_output(log_file)

    def memory(self) -> dict[str, float]:
        """Resident memory of this actor's process now and at its peak since the last call (GB)."""
        release_free_memory()
        return process_memory(reset_peak=True)


def redirect_output(log_file: str) -> None:
    os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # readable while the run goes on


def release_free_memory() -> None:
    """Give memory that tensors freed back to the OS (glibc keeps freed heap memory in its arenas).

    Without this a role's resident size after a phase stays at that phase's peak although the
    tensors are gone: the learner held ~2.4 GB of freed activations and gradients on SmolLM2-135M.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def process_memory(reset_peak: bool = False) -> dict[str, float]:
    """``{"rss_gb", "peak_gb", "shared_gb"}`` of this process from /proc, in GB.

    peak: VmHWM, the resident high-water mark (reset by writing '5' to clear_refs). shared: RssShmem,
    the part of the resident size now that is shared memory — for a Ray worker mostly object-store pages
    it wrote or read (published weights, rollouts), which are counted in each process that touched them.
    Where /proc is not available the peak is the lifetime maximum from getrusage.
    """
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM", "RssShmem")))
        rss, peak, shared = (int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM", "RssShmem"))  # kB -> GB
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"rss_gb": peak, "peak_gb": peak, "shared_gb": 0.0}
    if reset_peak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    return {"rss_gb": rss, "peak_gb": peak, "shared_gb": shared}


def timed(method):
    """Make a role method return ``(result, seconds of its own compute)``."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        return result, time.perf_counter() - start
    return wrapper


def set_threads(num_cpus: float) -> None:
    """Intra-op threads = reserved CPUs (≥ 1), so roles sharing a machine do not oversubscribe it."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def device_for(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
