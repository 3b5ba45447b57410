"""``weights.transport: files`` — published like ``object_store``; each engine writes the buckets as safetensors files
(in RAM-backed /dev/shm where there is one) and its workers reload them by path: for engines whose workers are other
processes. Also the directories the ``adapter`` transport writes its adapters to."""
from __future__ import annotations

import os
import shutil
import tempfile

import psutil

from rlhf_ray.weights.object_store import ObjectStoreTransport

FILES_PREFIX = "rlhf_ray_weights_"


class FilesTransport(ObjectStoreTransport):
    name = "files"

    def load(self, llm, payload, timeout_s):
        from safetensors.torch import save_file

        from rlhf_ray.weights.engine import load_into_engine
        from rlhf_ray.weights.object_store import read_buckets

        tensors = dict(read_buckets(payload, timeout_s))
        if not hasattr(self, "directory"):
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            self.directory = weight_dir(size)
        for old in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, old))
        save_file(tensors, os.path.join(self.directory, "weights.safetensors"))
        return llm.collective_rpc(load_into_engine, kwargs={"directory": self.directory})[0]

    def close(self):
        if hasattr(self, "directory"):
            shutil.rmtree(self.directory, ignore_errors=True)

    @classmethod
    def refuses(cls, cfg):
        return None

    @classmethod
    def _extra_seconds(cls, full, rates):
        return {"files_write_read": 2 * full / rates.file_bytes_per_s}


def weight_dir(size: int) -> str:
    """A directory of this process's own for weight files of ``size`` bytes: in RAM-backed /dev/shm where it has room
    for them (a container's is often 64 MiB), else in the temp dir."""
    root = tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size:
        root = "/dev/shm"
    remove_orphaned_weight_dirs(root)
    return tempfile.mkdtemp(prefix=f"{FILES_PREFIX}{os.getpid()}_", dir=root)


def remove_orphaned_weight_dirs(root: str) -> list[str]:
    """Weight files of engines that died without closing (killed, or lost with their node) stay in RAM-backed
    /dev/shm: remove those whose process is gone (the directory name carries its pid)."""
    removed = []
    for name in os.listdir(root):
        pid = name[len(FILES_PREFIX):].partition("_")[0]
        if name.startswith(FILES_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed
