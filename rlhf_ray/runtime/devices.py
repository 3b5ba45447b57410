"""The process's devices and threads: CPU bf16 support, cuda or cpu, torch's thread count."""
from __future__ import annotations

import os

import torch

# vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process; the generation role still
# sets its threads per phase, through the function as it was before any engine started
set_num_threads_as_before_vllm = torch.set_num_threads

# dtype names as configs and checkpoints spell them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def set_threads(num_cpus: float) -> None:
    """Threads until the compute plan arrives: the reserved CPUs (≥ 1)."""
    set_num_threads_as_before_vllm(max(1, int(num_cpus)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def device_for(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
