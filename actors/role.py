"""What every role actor is besides its job: a log file of its own, a process group, phases with planned threads,
memory reports."""
from __future__ import annotations

import functools
import os
import sys
import time

import torch

from rlhf_ray.runtime.builds import clear_stale_build_locks, skip_cpu_shm_comm_op
from rlhf_ray.runtime.devices import set_num_threads_as_before_vllm
from rlhf_ray.runtime.memory import process_memory, release_free_memory
from rlhf_ray.runtime.spans import RECORDER, span
from rlhf_ray.runtime.stacks import install_stack_dump


class Role:
    """What every role actor does besides its job: keep its chatter in a log file and report memory.

    ``log_file``: when set, this process's stdout and stderr (Python and native: vLLM, DeepSpeed, oneDNN)
    go to that file instead of the driver's console (``logging.console: quiet``).
    """

    def __init__(self, log_file: str | None = None):
        if log_file:
            redirect_output(log_file)
        self.stacks_file = install_stack_dump(log_file)  # the hang doctor's fallback where py-spy may not read us

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

        import torch.distributed as dist

        from rlhf_ray.runtime.builds import import_deepspeed

        deepspeed = import_deepspeed()

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
        return {"node": ray.get_runtime_context().get_node_id(), "cpus": cpus[:max(1, quota)], "pid": os.getpid(),
                "stacks_file": self.stacks_file}

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

    def memory(self) -> dict:
        """Resident memory of this actor's process now and at its peak since the last call (GB), and — read in the
        same call every step — the spans it recorded since (``spans``: rlhf_ray.runtime.spans.SpanRecorder.take)."""
        release_free_memory()
        return {**process_memory(reset_peak=True), "spans": RECORDER.take()}


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


def timed(method):
    """Make a role method return ``(result, seconds of its own compute)``, and record its span (the timeline:
    rlhf_ray.runtime.spans; the method may ``annotate`` it with counts)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with span(method.__name__):
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
                set_num_threads_as_before_vllm(threads)
            return method_timed(self, *args, **kwargs)
        return wrapper
    return decorate
