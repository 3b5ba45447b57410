"""The process's memory: glibc's heap kept or given back, resident and peak sizes from /proc."""
from __future__ import annotations

import os

# resources.keep_freed_memory: glibc serves every tensor from its heap, never from a fresh mmap (which costs a page
# fault per 4 KiB on first touch, every step), and never trims the heap: the memory a phase freed is there, already
# mapped, for the next phase. A threshold cannot do it: glibc caps M_MMAP_THRESHOLD at 32 MiB, below an embedding's
# gradient (20M Llama: 50 MB, SmolLM2: 113 MB), so mmap is off (M_MMAP_MAX=0); glibc still mmaps what its heap
# cannot hold (another thread's arena: 64 MiB at most). What it saves: docs/throughput.md, "No work twice".
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def release_free_memory() -> None:
    """Give memory that tensors freed back to the OS (glibc keeps freed heap memory in its arenas) — unless
    this process keeps it for the next phase (started with KEEP_FREED_MEMORY_ENV).

    Without this a role's resident size after a phase stays at that phase's peak although the
    tensors are gone: the learner held ~2.4 GB of freed activations and gradients on SmolLM2-135M.
    """
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == KEEP_FREED_MEMORY_ENV["MALLOC_TRIM_THRESHOLD_"]:
        return
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
