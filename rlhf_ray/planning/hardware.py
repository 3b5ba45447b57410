"""What a device can do: memory, dense peak, memory and link bandwidths.

The GPU catalogue holds vendor figures (dense, no sparsity); the planner applies its own efficiencies
(rlhf_ray.planning.timing) on top. Any other GPU is described field by field (``parse_gpu_spec``: the CLI's
--gpu-spec). Host memory per node is an input (``with_host_memory``: --host-memory-gib; at startup this node's
/proc/meminfo); the catalogue's figure is a typical node's, and the plan says it assumed it. ``cpu`` is this
machine: its memory from /proc/meminfo, its peak and memory bandwidth measured with short matmuls and a copy
(≈0.3 s), unless given.

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
    host_memory_source: str = ""   # where host_memory_bytes comes from: given, this machine, or an assumption

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

    @property
    def has_nvlink(self) -> bool:
        return self.intra_node_bandwidth > self.host_link_bandwidth

    def describe(self) -> str:
        if not self.is_gpu:
            return (f"{self.name}: {self.memory_bytes / GiB:.1f} GiB, {self.peak_flops_fp32 / 1e9:.0f} GFLOP/s fp32 "
                    f"({self.peak_flops_16bit / 1e9:.0f} bf16), {self.memory_bandwidth / 1e9:.0f} GB/s memory "
                    f"[{self.source}]")
        return (f"{self.name}: {self.memory_bytes / GiB:.1f} GiB, {self.peak_flops_16bit / 1e12:.0f} TFLOP/s bf16 dense, "
                f"HBM {self.memory_bandwidth / 1e12:.2f} TB/s, "
                + (f"NVLink {self.intra_node_bandwidth / 1e9:.0f} GB/s" if self.has_nvlink
                   else f"no NVLink (PCIe {self.host_link_bandwidth / 1e9:.0f} GB/s)")
                + f", inter-node {self.nics_per_node} × {self.inter_node_bandwidth * 8 / 1e9:.0f} Gb/s, "
                f"{self.devices_per_node} per node, host {self.host_memory_bytes / GiB:.0f} GiB")


def _gpu(name, memory_gib, bf16_tflops, fp32_tflops, hbm_tbps, nvlink_gbps, nic_gbit, pcie_gbps, host_gib, source,
         nics=8, devices_per_node=8):
    return Hardware(name=name, memory_bytes=memory_gib * GiB, peak_flops_16bit=bf16_tflops * 1e12,
                    peak_flops_fp32=fp32_tflops * 1e12, memory_bandwidth=hbm_tbps * 1e12,
                    intra_node_bandwidth=(nvlink_gbps or pcie_gbps) * 1e9, inter_node_bandwidth=nic_gbit * 1e9 / 8,
                    host_link_bandwidth=pcie_gbps * 1e9, host_memory_bytes=host_gib * GiB,
                    devices_per_node=devices_per_node, nics_per_node=nics, source=source,
                    host_memory_source=f"assumed: {host_gib:g} GiB, a typical node of this GPU; --host-memory-gib "
                                       "sets yours")


# Vendor datasheet figures, dense (no sparsity). NVLink / Infinity Fabric: the per-direction half of the vendor's
# bidirectional figure (H100/H200/H20 900 GB/s, B200 1.8 TB/s, A100 600, A800 400; MI300X: 7 links × 64 GB/s to
# its 7 peers); a card without one (L40S) talks to the others of its node over PCIe. PCIe per direction as
# achieved (Gen4 x16 ~25 GB/s, Gen5 x16 ~55 GB/s). NICs: one per GPU, 8 per node, as in DGX/HGX nodes (400 Gb/s NDR
# for Hopper/Blackwell/MI300X nodes; 200 Gb/s HDR for A100/A800). Memory: what the device reports (an "80 GB" card
# shows ~79.2 GiB). Host memory: a typical node's (DGX H100/H200: 2 TiB, DGX A100: 1 TiB, DGX B200: 2 TiB),
# an assumption the plan states; --host-memory-gib gives the real figure.
GPUS = {
    "h100-80gb": _gpu("h100-80gb", 79.2, 989, 67, 3.35, 450, 400, 55, 2048,
                      "NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense, 3.35 TB/s; DGX H100"),
    "h200-141gb": _gpu("h200-141gb", 139.8, 989, 67, 4.8, 450, 400, 55, 2048,
                       "NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, 4.8 TB/s, 141 GB; HGX H200"),
    "h20-96gb": _gpu("h20-96gb", 95.6, 148, 44, 4.0, 450, 400, 55, 2048,
                     "NVIDIA HGX H20 (China export part) specification: 148 TFLOPS fp16/bf16 dense, 44 TFLOPS fp32, "
                     "96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s"),
    "b200-180gb": _gpu("b200-180gb", 179.1, 2250, 75, 8.0, 900, 400, 55, 2048,
                       "NVIDIA HGX/DGX B200 datasheet (8 GPUs: 36 PFLOPS fp16/bf16 with sparsity, 600 TFLOPS fp32, "
                       "1,440 GB HBM3e at 64 TB/s, NVLink 5 1.8 TB/s per GPU): per GPU 2.25 PFLOPS bf16 dense"),
    "a100-80gb": _gpu("a100-80gb", 79.2, 312, 19.5, 2.04, 300, 200, 25, 1024,
                      "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS bf16 dense, 2.04 TB/s; DGX A100"),
    "a800-80gb": _gpu("a800-80gb", 79.2, 312, 19.5, 2.04, 200, 200, 25, 1024,
                      "A800 SXM4 80GB: the A100 with NVLink capped at 400 GB/s bidirectional"),
    "a100-40gb": _gpu("a100-40gb", 39.4, 312, 19.5, 1.555, 300, 200, 25, 1024,
                      "NVIDIA A100 SXM4 40GB datasheet: 312 TFLOPS bf16 dense, 1.555 TB/s"),
    "l40s-48gb": _gpu("l40s-48gb", 44.5, 362, 91.6, 0.864, 0, 200, 25, 1024,
                      "NVIDIA L40S datasheet: 362 TFLOPS bf16 dense (733 with sparsity), 91.6 TFLOPS fp32, 48 GB "
                      "GDDR6 at 864 GB/s, PCIe Gen4 x16, no NVLink; 8 per node with 4 × 200 Gb/s NICs assumed",
                      nics=4),
    "mi300x-192gb": _gpu("mi300x-192gb", 191.5, 1307.4, 163.4, 5.3, 448, 400, 55, 2048,
                         "AMD Instinct MI300X datasheet: 1307.4 TFLOPS bf16 dense, 163.4 TFLOPS fp32, 192 GB HBM3 at "
                         "5.3 TB/s, Infinity Fabric 7 × 128 GB/s (bidirectional) peer links, PCIe Gen5 x16"),
}
GPU_NAMES = (*GPUS, "cpu")

# A GPU described on the command line (python -m rlhf_ray.plan --gpu-spec): every figure the planner uses, in the
# units of the catalogue above. nvlink_gbps 0 (or 'none'): no NVLink, the node's GPUs talk over PCIe.
GPU_SPEC_FIELDS = {
    "memory_gib": "memory per GPU as the runtime reports it (GiB)",
    "bf16_tflops": "dense bf16 tensor peak (TFLOP/s, no sparsity)",
    "fp32_tflops": "dense fp32 peak without TF32 (TFLOP/s)",
    "hbm_tbps": "memory bandwidth (TB/s)",
    "nvlink_gbps": "GPU-to-GPU link inside a node, per direction (GB/s; 0 or none: over PCIe)",
    "pcie_gbps": "GPU-to-host link, per direction (GB/s)",
    "nics": "network cards per node",
    "nic_gbit": "speed of one network card (Gb/s)",
    "devices_per_node": "GPUs per node",
    "host_memory_gib": "host memory per node (GiB)",
}
WHOLE_SPEC_FIELDS = ("nics", "devices_per_node")


class GpuSpecError(ValueError):
    """A --gpu-spec the planner cannot use; the message names the field."""


def parse_gpu_spec(text: str) -> Hardware:
    """A GPU from 'key=value,…' or a YAML/JSON file of the same keys (GPU_SPEC_FIELDS, plus an optional name)."""
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        import yaml

        try:
            fields = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise GpuSpecError(f"cannot read {text}: {err}") from None
        if not isinstance(fields, dict):
            raise GpuSpecError(f"{text} must hold a mapping of {', '.join(GPU_SPEC_FIELDS)}")
    else:
        pairs = [item.partition("=") for item in text.split(",") if item.strip()]
        bad = next((key for key, eq, _ in pairs if not eq), None)
        if bad is not None:
            raise GpuSpecError(f"'{bad.strip()}' is not key=value")
        fields = {key.strip(): value.strip() for key, _, value in pairs}
    return gpu_from_fields(fields)


def gpu_from_fields(fields: dict) -> Hardware:
    """Hardware from GPU_SPEC_FIELDS (every one required, numbers > 0 except nvlink_gbps) and an optional name."""
    fields = dict(fields)
    name = str(fields.pop("name", "custom-gpu"))
    unknown = sorted(set(fields) - set(GPU_SPEC_FIELDS))
    if unknown:
        raise GpuSpecError(f"unknown field '{unknown[0]}'; the fields: name (optional), {', '.join(GPU_SPEC_FIELDS)}")
    missing = [key for key in GPU_SPEC_FIELDS if key not in fields]
    if missing:
        raise GpuSpecError(f"missing field(s) {', '.join(missing)}: " + "; ".join(
            f"{key}: {GPU_SPEC_FIELDS[key]}" for key in missing))
    values = {key: _spec_number(key, value) for key, value in fields.items()}
    gpu = _gpu(name, values["memory_gib"], values["bf16_tflops"], values["fp32_tflops"], values["hbm_tbps"],
               values["nvlink_gbps"], values["nic_gbit"], values["pcie_gbps"], values["host_memory_gib"],
               "described on the command line (--gpu-spec)", nics=int(values["nics"]),
               devices_per_node=int(values["devices_per_node"]))
    return replace(gpu, host_memory_source="given (--gpu-spec)")


def _spec_number(key: str, value) -> float:
    if key == "nvlink_gbps" and str(value).strip().lower() in ("none", "no", "false", "0"):
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GpuSpecError(f"field '{key}' must be a number ({GPU_SPEC_FIELDS[key]}), got {value!r}") from None
    if not number > 0 or (key in WHOLE_SPEC_FIELDS and number != int(number)):
        kind = "a whole number" if key in WHOLE_SPEC_FIELDS else "a number"
        raise GpuSpecError(f"field '{key}' must be {kind} > 0 ({GPU_SPEC_FIELDS[key]}), got {value!r}")
    return number


def with_host_memory(hardware: Hardware, gib: float, source: str) -> Hardware:
    """``hardware`` with host memory per node given (GiB); on a CPU plan the machine's memory is the host's."""
    if not gib > 0:
        raise ValueError(f"host memory must be > 0 GiB, got {gib}")
    host = gib * GiB
    return replace(hardware, host_memory_bytes=host, host_memory_source=source,
                   **({} if hardware.is_gpu else {"memory_bytes": host}))


def get_hardware(name: str) -> Hardware:
    """A catalogue GPU by name, or 'cpu' for this machine (measured)."""
    if name == "cpu":
        return this_machine()
    if name not in GPUS:
        raise ValueError(f"unknown device '{name}': use one of {', '.join(GPU_NAMES)}")
    return GPUS[name]


# Substrings of torch.cuda.get_device_name() -> catalogue entry, most specific first.
DEVICE_NAMES = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("H20", "h20-96gb"), ("B200", "b200-180gb"),
                ("A800", "a800-80gb"), ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"),
                ("A100", "a100-80gb"), ("L40S", "l40s-48gb"), ("MI300X", "mi300x-192gb"))


def catalogue_name(device_name: str) -> str | None:
    """The catalogue entry for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'h100-80gb'), or None."""
    return next((entry for key, entry in DEVICE_NAMES if key in device_name.upper()), None)


def detect_gpu() -> Hardware | None:
    """The catalogue entry of this process's first CUDA device with this node's host memory (/proc/meminfo), or None
    (no GPU here, or not in the catalogue)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = catalogue_name(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 — a broken CUDA setup means: plan without it
        return None
    if not name:
        return None
    return replace(GPUS[name], host_memory_bytes=host_memory_bytes(), host_memory_source="this node's /proc/meminfo")


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
                    source=f"this machine: {cores} cores, /proc/meminfo; peaks {measured}",
                    host_memory_source="this machine's /proc/meminfo")


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
