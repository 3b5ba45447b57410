"""Small pieces shared by the role classes."""
from __future__ import annotations

import functools
import os
import time


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
