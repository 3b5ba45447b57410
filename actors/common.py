"""Small pieces shared by the role classes."""
from __future__ import annotations

import functools
import glob
import os
import sys
import time

import torch

# vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process; the generation role still
# sets its threads per phase, through the function as it was before any engine started
_set_num_threads = torch.set_num_threads


# A JIT build of a torch extension takes about a minute; its lock file, older than this, is a dead build's
STALE_BUILD_LOCK_S = 600


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove the lock files that killed JIT builds left in torch's extension build directories, and name them.

    torch guards each build directory (``~/.cache/torch_extensions/py311_cpu/<op>/`` or ``$TORCH_EXTENSIONS_DIR/<op>/``)
    with a bare ``lock`` file that it deletes when the build ends. A build killed half-way leaves it, and from then
    on every process that builds *or loads* that op (DeepSpeed's CPUAdam under offload, for one) waits on it forever,
    silently. A lock older than ``max_age_s`` cannot belong to a build still running."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    patterns = [os.path.join(root, "*", "lock"), os.path.join(root, "*", "*", "lock")]
    removed = []
    for lock in sorted({path for pattern in patterns for path in glob.glob(pattern)}):
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
        except FileNotFoundError:  # its build just ended
            continue
    for lock in removed:
        print(f"warning: removed {lock}, left by a JIT build killed half-way (every build or load of that op "
              f"would have waited on it forever)", file=sys.stderr, flush=True)
    return removed


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op at ``init_distributed``: a ~60 s C++ build
    on every fresh machine (behind the lock above), for an op that serves only ``inference_all_reduce`` (tensor-parallel
    inference). Training's collectives (ZeRO's all-reduce, reduce-scatter, all-gather) go through gloo either way."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed probes which ops this machine can build once and keeps the dict it reads from then on
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 matrices natively, what it has): AMX or AVX512-BF16 on x86, BF16 on Arm.
    Without them torch still runs bf16, emulated in fp32 arithmetic, slower than fp32 itself."""
    import platform

    if torch.cpu._is_amx_tile_supported():
        return True, "AMX (and AVX512-BF16)" if torch.cpu._is_avx512_bf16_supported() else "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "AVX512-BF16"
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            flags = open("/proc/cpuinfo").read().split()
        except OSError:
            flags = []
        if "bf16" in flags:
            return True, "Arm BF16"
    return False, f"no AVX512-BF16, AMX or Arm BF16 ({platform.machine()} {platform.processor() or ''})".strip()


def require_cpu_bf16(what: str, key: str) -> None:
    """Refuse bf16 on a CPU that only emulates it, naming the setting to change."""
    native, has = cpu_bf16()
    if not native:
        raise RuntimeError(f"{what} is set to bf16 ({key}) and runs on this CPU, which has {has}: torch would emulate "
                           f"bf16 there, slower than fp32 and less exact. Set {key} to fp32 / float32 on this machine.")


class Role:
    """What every role actor does besides its job: keep its chatter in a log file and report memory.

    ``log_file``: when set, this process's stdout and stderr (Python and native: vLLM, DeepSpeed, oneDNN)
    go to that file instead of the driver's console (``logging.console: quiet``).
    """

    def __init__(self, log_file: str | None = None):
        if log_file:
            redirect_output(log_file)

    def master_address(self) -> tuple[str, int]:
        """As rank 0 of a process group (a learner group, a sharded frozen model): open the rendezvous, a socket bound
        and listening now on this node's address (127.0.0.1 for a run's own local Ray), later handed to the TCPStore
        as it is — the port is never free between being chosen and being used, so no other process can take it."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        self._rendezvous = socket.create_server((host, 0))
        return host, self._rendezvous.getsockname()[1]

    def join_process_group(self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float,
                           device: str) -> None:
        """Make this process rank ``rank`` of torch.distributed's default group (gloo on CPU, NCCL on GPU) and hand it
        to DeepSpeed. Rank 0 serves the TCPStore on the socket ``master_address`` opened."""
        import ipaddress
        from datetime import timedelta

        import deepspeed
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        if ipaddress.ip_address(master_addr).is_loopback:  # one machine: collectives over loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))  # Ray gives each actor its own GPU
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timeout,
                              master_listen_fd=self._rendezvous.fileno() if rank == 0 else None,
                              wait_for_workers=False)
        backend = "nccl" if device == "cuda" else "gloo"
        clear_stale_build_locks()
        if device != "cuda":
            skip_cpu_shm_comm_op()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # wraps the group above

    def leave_process_group(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def where(self) -> dict:
        """This actor's node and the CPUs it may run on (rlhf_ray.cluster.compute plans threads from them): its affinity,
        cut to the container's CPU quota where a cgroup sets one (the affinity shows all of the host's CPUs)."""
        import ray

        cpus = sorted(os.sched_getaffinity(0))
        try:
            from ray._private.utils import get_num_cpus

            quota = int(get_num_cpus(override_docker_cpu_warning=True))
        except Exception:  # a private helper of Ray's: without it, the affinity alone
            quota = len(cpus)
        return {"node": ray.get_runtime_context().get_node_id(), "cpus": cpus[:max(1, quota)]}

    def configure_compute(self, threads: dict[str, int], cpus: list[int] | None = None,
                          nice: int | None = None) -> dict:
        """Threads per phase (applied when a ``computes(phase)`` method runs), and now for every thread of this
        process: the CPU set and the priority. Returns what took effect."""
        self._phase_threads = dict(threads)
        tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        applied = {}
        if cpus:
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:  # the thread ended meanwhile
                    pass
            applied["cpus"] = sorted(os.sched_getaffinity(0))
        if nice is not None:
            try:
                for tid in tids:  # Linux priorities are per thread; threads started later inherit
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except PermissionError as err:
                applied["nice_error"] = str(err)
            except ProcessLookupError:
                pass
        applied["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        return applied

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


# resources.keep_freed_memory: glibc serves every tensor from its heap, never from a fresh mmap (which costs a page
# fault per 4 KiB on first touch, every step), and never trims the heap: the memory a phase freed is there, already
# mapped, for the next phase. A threshold cannot do it: glibc caps M_MMAP_THRESHOLD at 32 MiB, below an embedding's
# gradient (20M Llama: 50 MB, SmolLM2: 113 MB), so mmap is off (M_MMAP_MAX=0); glibc still mmaps what its heap
# cannot hold (another thread's arena: 64 MiB at most). What it saves: README, "No work twice".
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


def timed(method):
    """Make a role method return ``(result, seconds of its own compute)``."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        return result, time.perf_counter() - start
    return wrapper


def computes(phase: str):
    """A role method that computes in ``phase`` (rlhf_ray.cluster.compute.PHASES): it runs with the threads planned
    for that phase and returns ``(result, seconds of its own compute)``."""
    def decorate(method):
        method_timed = timed(method)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            threads = getattr(self, "_phase_threads", {}).get(phase)
            if threads and threads != torch.get_num_threads():
                _set_num_threads(threads)
            return method_timed(self, *args, **kwargs)
        return wrapper
    return decorate


def set_threads(num_cpus: float) -> None:
    """Threads until the compute plan arrives: the reserved CPUs (≥ 1)."""
    _set_num_threads(max(1, int(num_cpus)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
