"""``weights.transport: collective`` — a bucketed, pipelined broadcast from the learner's rank 0 to every engine.

The group is the run's own: learner rank 0 is rank 0, engine worker ``w`` of engine ``e`` is rank
``1 + e · workers_per_engine + w``. It is built directly on a TCPStore (``ProcessGroupGloo`` on CPU,
``ProcessGroupNCCL`` on GPU) and never becomes ``torch.distributed``'s default group, which DeepSpeed owns in the
learner and vLLM in the engines — the reason Ray's Direct Transport (it takes the default group) is not used here.

One update: the learner packs bucket k into a flat buffer and broadcasts it asynchronously while it packs (and,
under ZeRO-3, gathers) bucket k+1; each engine posts the receive of bucket k+1 before it loads bucket k into
vLLM, so the wire and the engine's copy overlap. A receive gets a fresh buffer: vLLM's layer-wise reload keeps
the tensors of a layer until the whole layer has arrived, so a buffer is never written while it may be read.
Every wait is bounded by ``timeouts.weight_sync_s``; an engine that dies mid-broadcast fails the others'
transfers, and the driver replaces it and forms a new group (rlhf_ray.weights.sync.BroadcastSync).
"""
from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Iterable, Iterator

import torch

from rlhf_ray.weights.buckets import Bucket, pack_into, unpack
from rlhf_ray.weights.transport import Transport

STORE_PREFIX = "rlhf_ray/weights"
ABORT_KEY = "aborted"  # set in the group's store by a member that failed: the others stop waiting at once
MAX_POLL_S = 0.01


class WeightGroupAborted(RuntimeError):
    """Another member of the weight group failed during this update."""


class WeightGroup:
    """One member's handle on the weight-broadcast group."""

    def __init__(self, backend, store, rank: int, world_size: int, timeout_s: float, device: str):
        self.backend, self.store, self.rank, self.world_size = backend, store, rank, world_size
        self.timeout_s, self.device = timeout_s, device

    def broadcast(self, tensor: torch.Tensor):
        """Start the broadcast of ``tensor`` from rank 0 (sent by rank 0, filled in on the others); returns the Work."""
        return self.backend.broadcast(tensor, 0, timedelta(seconds=self.timeout_s))

    def wait(self, work) -> None:
        """Wait for ``work`` at most ``timeout_s``, and not at all once another member has failed.

        A peer that dies is seen by the members it talks to (rank 0) at once, but a member waiting for data that
        rank 0 will not send any more would wait for the whole timeout: hence the group's abort flag."""
        deadline, delay = time.monotonic() + self.timeout_s, 1e-4
        while not work.is_completed():
            if self._aborted():
                raise WeightGroupAborted("another member of the weight group failed during this update")
            if time.monotonic() > deadline:
                self.abort()
                raise TimeoutError(f"a weight bucket did not arrive within {self.timeout_s:.0f} s "
                                   "(timeouts.weight_sync_s)")
            time.sleep(delay)
            delay = min(2 * delay, MAX_POLL_S)
        work.wait()  # raises the transfer's own error, if it failed

    def _aborted(self) -> bool:
        try:
            return self.store.check([ABORT_KEY])
        except Exception:  # the store lives in rank 0: gone means rank 0 is gone
            return True

    def abort(self) -> None:
        """Tell every member to stop waiting for this update (the driver forms a new group)."""
        try:
            self.store.set(ABORT_KEY, "1")
        except Exception:  # the store is gone with rank 0: the others see that too
            pass

    def close(self) -> None:
        """Leave the group (a replaced engine or learner forms a new one with the others)."""
        for method in ("abort", "shutdown"):
            try:
                getattr(self.backend, method)()
                return
            except Exception:  # not supported by this backend / already broken: dropping it is enough
                continue


def open_rendezvous(host: str) -> socket.socket:
    """Rank 0's listening socket for the group's TCPStore, bound now: the port cannot be taken before it is used."""
    return socket.create_server((host, 0))


def join(host: str, port: int, rank: int, world_size: int, timeout_s: float, device: str = "cpu",
         listen_socket: socket.socket | None = None) -> WeightGroup:
    """Join the group at ``host:port`` as ``rank`` (rank 0 passes its ``open_rendezvous`` socket). Blocks until every
    member has joined, at most ``timeout_s``."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    # the store takes the listening socket's descriptor over: detached, the socket object can no longer close it
    # (a garbage-collected socket would close a number the next socket may already have)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=listen_socket.detach() if listen_socket is not None else None)
    store = dist.PrefixStore(f"{STORE_PREFIX}/{world_size}", store)
    if device == "cuda":
        backend = dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
    else:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # the group's connections go over the interface that reaches ``host`` (loopback on one machine)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=_local_address_towards(host))]
        backend = dist.ProcessGroupGloo(store, rank, world_size, options)
    return WeightGroup(backend, store, rank, world_size, timeout_s, device)


def _local_address_towards(host: str) -> str:
    """This node's address on the route to ``host`` (127.0.0.1 when ``host`` is loopback)."""
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP: no packet is sent, the kernel just picks the route
        return probe.getsockname()[0]


def send(group: WeightGroup, buckets: list[Bucket], tensors: Iterable[torch.Tensor]) -> int:
    """Rank 0: broadcast ``tensors`` (in the buckets' order and dtypes) bucket by bucket, packing bucket k+1 while
    bucket k is on the wire (two buffers). Returns the bytes sent per receiver. On any failure the group is aborted."""
    try:
        return _send(group, buckets, iter(tensors))
    except BaseException:
        group.abort()
        raise


def _send(group: WeightGroup, buckets: list[Bucket], stream: Iterator[torch.Tensor]) -> int:
    buffers: list[torch.Tensor | None] = [None, None]
    in_flight: list = [None, None]
    sent = 0
    for k, bucket in enumerate(buckets):
        slot = k % 2
        if in_flight[slot] is not None:
            group.wait(in_flight[slot])  # its buffer is about to be refilled
        if buffers[slot] is None or buffers[slot].numel() < bucket.nbytes:
            buffers[slot] = torch.empty(bucket.nbytes, dtype=torch.uint8, device=group.device)
        chunk = [next(stream) for _ in bucket.slots]
        buffer = pack_into(buffers[slot][:bucket.nbytes], bucket, chunk)
        in_flight[slot] = group.broadcast(buffer)
        sent += bucket.nbytes
    for work in in_flight:
        if work is not None:
            group.wait(work)
    if next(stream, None) is not None:
        raise RuntimeError("the learner has more weights than the bucket layout it announced")
    return sent


def receive(group: WeightGroup, buckets: list[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """Any rank but 0: ``(name, tensor)`` of every bucket, each bucket's receive posted before the previous one is
    handed out."""
    def post(bucket: Bucket):
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=group.device)
        return buffer, group.broadcast(buffer)

    pending = post(buckets[0]) if buckets else None
    for k, bucket in enumerate(buckets):
        buffer, work = pending
        group.wait(work)
        pending = post(buckets[k + 1]) if k + 1 < len(buckets) else None
        yield from unpack(buffer, bucket)


# ------------------------------------------------------------------------------------------ in the vLLM workers
# Run through ``llm.collective_rpc`` so that every worker of an engine takes part, in whatever process it lives.

def worker_join(worker, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> int:
    """Join the weight group as rank ``first_rank + this worker's rank`` (replacing the group it had)."""
    worker_leave(worker)
    rank = first_rank + int(getattr(worker, "rank", 0) or 0)
    device = "cuda" if str(getattr(worker, "device", "cpu")).startswith("cuda") else "cpu"
    worker._rlhf_ray_weight_group = join(host, port, rank, world_size, timeout_s, device)
    return rank


def worker_leave(worker) -> None:
    group = getattr(worker, "_rlhf_ray_weight_group", None)
    if group is not None:
        group.close()
        worker._rlhf_ray_weight_group = None


def worker_receive(worker, buckets: list[Bucket]) -> dict:
    """Receive one update over the worker's group and load it (rlhf_ray.weights.engine.load_into_engine)."""
    from rlhf_ray.weights.engine import load_into_engine

    group = getattr(worker, "_rlhf_ray_weight_group", None)
    if group is None:
        raise RuntimeError("this engine has not joined the weight group (weights.transport=collective)")
    try:
        return load_into_engine(worker, weights=receive(group, buckets))
    except BaseException:
        group.abort()  # rank 0 would otherwise wait for this worker until the timeout
        worker_leave(worker)  # and its pending transfers end now (NCCL's watchdog would kill the process later)
        raise


class CollectiveTransport(Transport):
    name = "collective"
    broadcast = True
    from_device = True  # a broadcast goes from where the weights are
    replayable = False  # a replacement engine joins the next broadcast instead

    def publish(self, buckets, tensors, group=None, config=None):
        if group is None:
            raise RuntimeError("weights.transport=collective: learner rank 0 has not joined the weight group")
        send(group, buckets, tensors)
        return None

    def load(self, llm, payload, timeout_s):
        return llm.collective_rpc(worker_receive, kwargs={"buckets": payload})[0]

    @classmethod
    def driver(cls, roles, name):
        from rlhf_ray.weights.sync import BroadcastSync

        return BroadcastSync(roles, cls, name)

    @classmethod
    def refuses(cls, cfg):
        if not cfg.same_devices_for_weights:
            return ("'collective' needs the learner and the engines on the same kind of device (both with GPUs: NCCL, "
                    "or both without: gloo); use 'files' or 'auto'")
        return None

    @classmethod
    def learner_memory(cls, full, cfg):
        return [("weight-sync buckets (2 in flight, rank 0)", min(full, 2 * cfg.weights.bucket_mb * 2**20), "device",
                 "2 · weights.bucket_mb")]

    @classmethod
    def transfer_seconds(cls, full, hw, placement, rates):
        """One pipelined broadcast from the learner's device: over NVLink inside a node, over the NICs to engines on
        other nodes (gloo over loopback on one CPU machine); nothing crosses host memory."""
        return {"broadcast": rates.collective_seconds(full, hw, placement.engines_off_learner_node)}
