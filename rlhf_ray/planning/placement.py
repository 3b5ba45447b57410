"""Which device each actor lands on, as Ray's PACK placement would put them.

Whole-GPU actors (num_gpus ≥ 1: a learner rank, a TP engine, a device_map RM) take consecutive GPUs of one
node, node by node in role order; fractional actors share GPUs first-fit. On a CPU machine every actor runs
on the one host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.memory import GPU_RESERVED_BYTES, PROCESS_BASELINE_BYTES, RoleMemory

ROLE_ORDER = ("learner", "generation", "reward", "reference")


@dataclass
class DeviceUse:
    index: int
    node: int
    actors: list[str] = field(default_factory=list)
    used_bytes: float = 0.0
    capacity_bytes: float = 0.0
    free_fraction: float = 1.0

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.capacity_bytes


@dataclass
class Layout:
    devices: list[DeviceUse]
    nodes_of: dict[str, set[int]]            # role -> nodes its actors use
    unplaced: list[str]                      # actors that found no room (GPU count or node size)
    host_bytes_per_node: dict[int, float]
    host_capacity_bytes: float


def place(roles: list[RoleMemory], hw: Hardware, total_gpus: int) -> Layout:
    if not hw.is_gpu:
        return _place_on_host(roles, hw)
    per_node = hw.devices_per_node
    devices = [DeviceUse(i, i // per_node, capacity_bytes=hw.memory_bytes) for i in range(total_gpus)]
    layout = Layout(devices, {r.role: set() for r in roles}, [], {}, hw.host_memory_bytes)
    nodes = _NodeFill(total_gpus, per_node)
    ordered = sorted(roles, key=lambda r: ROLE_ORDER.index(r.role))
    for role in ordered:          # whole GPUs first: they need free consecutive devices on one node
        if role.gpus_per_actor >= 1:
            for k in range(role.actors):
                _place_whole(role, k, devices, nodes, layout)
    for role in ordered:
        if role.gpus_per_actor < 1:
            for k in range(role.actors):
                _place_fraction(role, k, devices, layout)
    for dev in devices:
        if dev.actors:
            dev.used_bytes += GPU_RESERVED_BYTES
    return layout


class _NodeFill:
    """How many devices of each node whole-GPU actors took. PACK fills a node from its first device, so the free
    devices of a node are always its last ones, and a block of ``width`` goes to the first node with that many left
    (the nodes before it never regain room: one pointer per width keeps placing linear in the actors)."""

    def __init__(self, total_gpus: int, per_node: int):
        self.per_node = per_node
        self.size = [min(per_node, total_gpus - start) for start in range(0, total_gpus, per_node)]
        self.taken = [0] * len(self.size)
        self.first_with_room: dict[int, int] = {}

    def take(self, width: int) -> int | None:
        """The index of the first of ``width`` consecutive free devices on one node, marked taken; None if none."""
        node = self.first_with_room.get(width, 0)
        while node < len(self.size) and self.size[node] - self.taken[node] < width:
            node += 1
        self.first_with_room[width] = node
        if node == len(self.size):
            return None
        start = node * self.per_node + self.taken[node]
        self.taken[node] += width
        return start


def _charge(role: RoleMemory, k: int, dev: DeviceUse, name: str, layout: Layout) -> None:
    dev.actors.append(name)
    need = role.actor_bytes(k, "device")
    if role.reserves_fraction:  # vLLM takes its share of the device up front, whatever it needs
        need = max(need + GPU_RESERVED_BYTES, role.reserves_fraction * dev.capacity_bytes) - GPU_RESERVED_BYTES
    dev.used_bytes += need
    layout.nodes_of[role.role].add(dev.node)


def _place_whole(role: RoleMemory, k: int, devices: list[DeviceUse], nodes: _NodeFill, layout: Layout) -> None:
    width = math.ceil(role.gpus_per_actor)
    name = f"{role.role}[{k}]"
    start = nodes.take(width)
    if start is None:
        reason = f"needs {width} free GPUs on one node of {nodes.per_node}" if width > 1 else "no free GPU left"
        layout.unplaced.append(f"{name}: {reason}")
        return
    block = devices[start:start + width]
    for i, dev in enumerate(block):
        dev.free_fraction = 0.0
        _charge(role, k, dev, name + (f" ({i + 1}/{width})" if width > 1 else ""), layout)
    _charge_host(layout, block[0].node, role.actor_bytes(k, "host"))


def _place_fraction(role: RoleMemory, k: int, devices: list[DeviceUse], layout: Layout) -> None:
    name = f"{role.role}[{k}] ({role.gpus_per_actor:g} GPU)"
    for dev in devices:
        if dev.free_fraction >= role.gpus_per_actor - 1e-9 and (dev.actors or dev.free_fraction == 1.0):
            dev.free_fraction -= role.gpus_per_actor
            _charge(role, k, dev, name, layout)
            _charge_host(layout, dev.node, role.actor_bytes(k, "host"))
            return
    layout.unplaced.append(f"{name}: no GPU with {role.gpus_per_actor:g} free")


def _charge_host(layout: Layout, node: int, num_bytes: float) -> None:
    layout.host_bytes_per_node[node] = layout.host_bytes_per_node.get(node, 0.0) + num_bytes + PROCESS_BASELINE_BYTES


def _place_on_host(roles: list[RoleMemory], hw: Hardware) -> Layout:
    host = DeviceUse(0, 0, capacity_bytes=hw.memory_bytes)
    for role in roles:
        for k in range(role.actors):
            host.actors.append(f"{role.role}[{k}]")
            host.used_bytes += role.actor_bytes(k, "device") + role.actor_bytes(k, "host") + PROCESS_BASELINE_BYTES
    nodes = {r.role: {0} for r in roles}
    return Layout([host], nodes, [], {0: host.used_bytes}, hw.memory_bytes)
