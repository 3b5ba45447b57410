"""What a device can do: memory, dense peak, memory and link bandwidths.

The GPU catalogue holds vendor figures (dense, no sparsity); the planner applies its own efficiencies
(rlhf_ray.planning.timing) on top. ``cpu`` is this machine: its memory from /proc/meminfo, its peak and
memory bandwidth measured with short matmuls and a copy (≈0.3 s), unless given.

Units: bytes, FLOP/s, bytes/s. Link bandwidths are per device and per direction.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One kind of device, and the nodes that hold it."""
    name: str
    memory_bytes: float            # per device, as the runtime reports it (torch.cuda.mem_get_info total)
    peak_flops_16bit: float        # dense bf16/fp16 tensor-core peak per device
    peak_flops_fp32: float         # dense fp32 without TF32 (torch's default for matmuls)
    memory_bandwidth: float        # HBM (GPU) or DRAM (CPU), bytes/s
    intra_node_bandwidth: float    # device ↔ device inside a node (NVLink), per direction
    inter_node_bandwidth: float    # one NIC, per direction (a node has nics_per_node of them)
    host_link_bandwidth: float     # device ↔ host memory (PCIe), per direction: offload traffic
    host_memory_bytes: float       # per node: offloaded optimizer states / parameters live here
    devices_per_node: int
    nics_per_node: int = 8
    is_gpu: bool = True
    source: str = ""

    def peak_flops(self, dtype: str) -> float:
        """Dense peak for a compute dtype: 'fp32'/'float32' or 16-bit."""
        return self.peak_flops_fp32 if dtype in ("fp32", "float32") else self.peak_flops_16bit

    def link_bandwidth(self, crosses_nodes: bool) -> float:
        """Bus bandwidth of a ring collective over these devices. Across nodes NCCL runs one ring (channel) per
        NIC and each ring crosses a node boundary once, so the node's NICs together bound it, and NVLink still
        does inside the node: min(NVLink, NICs × NIC). nccl-tests on DGX A100 clusters (8 × 200 Gb/s HDR)
        report ~180–190 GB/s all-reduce bus bandwidth across nodes, close to 8 × 25 GB/s."""
        if not crosses_nodes:
            return self.intra_node_bandwidth
        return min(self.intra_node_bandwidth, self.inter_node_bandwidth * self.nics_per_node)

    def describe(self) -> str:
        if not self.is_gpu:
            return (f"{self.name}: {self.memory_bytes / GiB:.1f} GiB, {self.peak_flops_fp32 / 1e9:.0f} GFLOP/s fp32 "
                    f"({self.peak_flops_16bit / 1e9:.0f} bf16), {self.memory_bandwidth / 1e9:.0f} GB/s memory "
                    f"[{self.source}]")
        return (f"{self.name}: {self.memory_bytes / GiB:.1f} GiB, {self.peak_flops_16bit / 1e12:.0f} TFLOP/s bf16 dense, "
                f"HBM {self.memory_bandwidth / 1e12:.2f} TB/s, NVLink {self.intra_node_bandwidth / 1e9:.0f} GB/s, "
                f"inter-node {self.nics_per_node} × {self.inter_node_bandwidth * 8 / 1e9:.0f} Gb/s, "
                f"{self.devices_per_node} per node")


def _gpu(name, memory_gib, bf16_tflops, fp32_tflops, hbm_tbps, nvlink_gbps, nic_gbit, pcie_gbps, host_tib, source):
    return Hardware(name=name, memory_bytes=memory_gib * GiB, peak_flops_16bit=bf16_tflops * 1e12,
                    peak_flops_fp32=fp32_tflops * 1e12, memory_bandwidth=hbm_tbps * 1e12,
                    intra_node_bandwidth=nvlink_gbps * 1e9, inter_node_bandwidth=nic_gbit * 1e9 / 8,
                    host_link_bandwidth=pcie_gbps * 1e9, host_memory_bytes=host_tib * 2**40, devices_per_node=8,
                    source=source)


# NVLink: the per-direction half of NVIDIA's bidirectional figure (H100/H200 900 GB/s, A100 600, A800 400).
# NICs: one per GPU, 8 per node, as in DGX/HGX nodes (H100/H200: 400 Gb/s NDR; A100/A800: 200 Gb/s HDR).
# Memory: what the device reports (an "80 GB" card shows ~79.2 GiB). Host memory: the DGX node's.
GPUS = {
    "h100-80gb": _gpu("h100-80gb", 79.2, 989, 67, 3.35, 450, 400, 55, 2,
                      "NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense, 3.35 TB/s; DGX H100"),
    "h200-141gb": _gpu("h200-141gb", 139.8, 989, 67, 4.8, 450, 400, 55, 2,
                       "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s, 141 GB; HGX H200"),
    "a100-80gb": _gpu("a100-80gb", 79.2, 312, 19.5, 2.04, 300, 200, 25, 1,
                      "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS bf16 dense, 2.04 TB/s; DGX A100"),
    "a800-80gb": _gpu("a800-80gb", 79.2, 312, 19.5, 2.04, 200, 200, 25, 1,
                      "A800 SXM4 80GB: the A100 with NVLink capped at 400 GB/s bidirectional"),
    "a100-40gb": _gpu("a100-40gb", 39.4, 312, 19.5, 1.555, 300, 200, 25, 1,
                      "NVIDIA A100 SXM4 40GB datasheet: 312 TFLOPS bf16 dense, 1.555 TB/s"),
}
GPU_NAMES = (*GPUS, "cpu")


def get_hardware(name: str) -> Hardware:
    """A catalogue GPU by name, or 'cpu' for this machine (measured)."""
    if name == "cpu":
        return this_machine()
    if name not in GPUS:
        raise ValueError(f"unknown device '{name}': use one of {', '.join(GPU_NAMES)}")
    return GPUS[name]


# Substrings of torch.cuda.get_device_name() -> catalogue entry, most specific first.
DEVICE_NAMES = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A800", "a800-80gb"), ("A100-SXM4-40GB", "a100-40gb"),
                ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"))


def catalogue_name(device_name: str) -> str | None:
    """The catalogue entry for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'h100-80gb'), or None."""
    return next((entry for key, entry in DEVICE_NAMES if key in device_name.upper()), None)


def detect_gpu() -> Hardware | None:
    """The catalogue entry of this process's first CUDA device, or None (no GPU here, or not in the catalogue)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = catalogue_name(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 — a broken CUDA setup means: plan without it
        return None
    return GPUS[name] if name else None


def with_nodes(hardware: Hardware, devices_per_node: int) -> Hardware:
    return replace(hardware, devices_per_node=devices_per_node)


# --------------------------------------------------------------------------------------- this machine

def this_machine(peak_flops_fp32: float | None = None, peak_flops_16bit: float | None = None,
                 memory_bandwidth: float | None = None, cores: int | None = None) -> Hardware:
    """This host as one device: all roles share its RAM and cores (the CPU configs run that way).

    Figures not given are measured: fp32 and bf16 peaks from matmuls of up to 1024×1024 on all usable cores,
    memory bandwidth from copying a 64 MiB tensor (read + write counted). Transfers between roles go
    through shared memory, so every link runs at the memory bandwidth."""
    cores = cores or usable_cores()
    fp32 = peak_flops_fp32 or measure_matmul_flops("float32", cores)
    bf16 = peak_flops_16bit or measure_matmul_flops("bfloat16", cores)
    bandwidth = memory_bandwidth or measure_copy_bandwidth(cores)
    memory = host_memory_bytes()
    measured = "given" if peak_flops_fp32 and memory_bandwidth else "measured matmul and copy"
    return Hardware(name="cpu", memory_bytes=memory, peak_flops_16bit=bf16, peak_flops_fp32=fp32,
                    memory_bandwidth=bandwidth, intra_node_bandwidth=bandwidth, inter_node_bandwidth=bandwidth,
                    host_link_bandwidth=bandwidth, host_memory_bytes=memory, devices_per_node=1, is_gpu=False,
                    source=f"this machine: {cores} cores, /proc/meminfo; peaks {measured}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_memory_bytes() -> float:
    """MemTotal of /proc/meminfo (bytes); 16 GiB where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 16.0 * GiB


def measure_matmul_flops(dtype: str, threads: int, max_size: int = 1024, repeats: int = 4,
                         long_enough_s: float = 0.02) -> float:
    """Best of ``repeats`` timed n×n matmuls, 2·n³ FLOP each. n starts at 256 and doubles, up to ``max_size``,
    while one product takes under ``long_enough_s``. A dtype the CPU runs natively is timed on 1024×1024;
    one it only emulates is timed on small matrices, e.g. bf16 without AVX512-BF16 or AMX, at ~1 GFLOP/s. At
    1024 that dtype alone took ~11 s of every run's startup."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        size = 256
        while True:
            a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
            a @ b  # untimed: the thread pool's start and this size's kernel selection are not the product
            start = time.perf_counter()
            a @ b
            if size >= max_size or time.perf_counter() - start >= long_enough_s:
                break
            size *= 2
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def measure_copy_bandwidth(threads: int, mib: int = 64, repeats: int = 4) -> float:
    """Best of ``repeats`` copies of a ``mib`` MiB tensor; bytes read plus bytes written per second."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * mib * 2**20 / best
