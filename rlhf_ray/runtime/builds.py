"""What importing and starting DeepSpeed brings along: torch extension builds (stale locks of killed builds, an op
training never uses) and an import of MLflow (``import_deepspeed``)."""
from __future__ import annotations

import glob
import os
import sys
import time

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


def import_deepspeed():
    """``import deepspeed`` without MLflow: DeepSpeed's autotuner imports ``mlflow`` when it is installed (the trackers
    extra installs it), which adds 1.5 s and more to every learner's start for a feature we do not use. The import is
    refused for the length of DeepSpeed's own (its autotuner then runs without MLflow), and allowed again after."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    refused = "mlflow" not in sys.modules
    if refused:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is here
    try:
        import deepspeed
    finally:
        if refused and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op at ``init_distributed``: a ~60 s C++ build
    on every fresh machine (behind the lock above), for an op that serves only ``inference_all_reduce`` (tensor-parallel
    inference). Training's collectives (ZeRO's all-reduce, reduce-scatter, all-gather) go through gloo either way."""
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed probes which ops this machine can build once and keeps the dict it reads from then on
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
