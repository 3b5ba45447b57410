"""A vLLM engine's process, prepared once for every role that hosts one (the generation role's policy engine, the
reward role's LLM judge): on CPU the environment vLLM reads when it starts, and the CPUs of tensor-parallel workers."""
from __future__ import annotations

import os

from rlhf_ray.runtime.devices import require_cpu_bf16

# vLLM on CPU (verified, shared DESIGN notes): 1 GiB KV cache instead of ~9; the in-process engine
# starts in ~4 s instead of ~20 and accepts tensors (the weight iterator) in collective_rpc directly.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# the share of a GPU's memory an engine takes (weights, activations, KV cache): vLLM's own default is 0.9; a little
# less leaves room for the actor's own CUDA context and tensors
GPU_MEMORY_UTILIZATION = 0.85


def prepare_vllm_process(num_gpus: float, dtype: str, tensor_parallel_size: int = 1, what: str = "the generation "
                         "engine", dtype_key: str = "models.dtype") -> None:
    """Before ``vllm`` is imported in this process: on CPU (no GPU reserved or none visible) refuse an emulated bf16
    (naming ``dtype_key``), set ``CPU_ENV`` (unless the user set those variables) and give each tensor-parallel worker
    CPUs of its own."""
    import torch

    if num_gpus and torch.cuda.is_available():
        return
    if dtype == "bfloat16":
        require_cpu_bf16(what, dtype_key)
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    if tensor_parallel_size > 1:  # vLLM binds each CPU worker to NUMA nodes, which one machine may lack
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              cpu_bind(sorted(os.sched_getaffinity(0)), tensor_parallel_size))


CPU_STEP_TOKENS = 4096  # vLLM's default max_num_batched_tokens on CPU


def engine_options(num_gpus: float, max_model_len: int) -> dict:
    """vLLM engine arguments every engine of this project takes. On CPU: no chunked prefill. vLLM 0.32 rewinds the
    torch.Generator of a seeded request whose prompt is prefilled in parts ("CPU Generator does not use offset": the
    engine dies), which happens once a call's prompts exceed max_num_batched_tokens (4096); whole prompts only keep
    every request seeded as it is. A step then takes at least one whole sequence (vLLM requires max_num_batched_tokens
    ≥ max_model_len without chunking)."""
    import torch

    if num_gpus and torch.cuda.is_available():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(CPU_STEP_TOKENS, max_model_len)}


def cpu_bind(cpus: list[int], workers: int) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for ``workers`` tensor-parallel CPU workers: the CPUs split into as many
    disjoint groups ("0|1", "0-3|4-7"); a worker without a CPU of its own is an error naming the numbers."""
    if len(cpus) < workers:
        raise ValueError(f"tensor_parallel_size={workers} on CPU needs a CPU per worker; this actor may use "
                         f"{len(cpus)} ({cpus})")
    size = len(cpus) // workers
    groups = [cpus[i * size:(i + 1) * size] for i in range(workers)]
    return "|".join(",".join(str(c) for c in group) for group in groups)
