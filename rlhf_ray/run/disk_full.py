"""A full disk, told in one line: which path filled up and what is still valid.

A full disk reaches the driver in many forms: OSError ENOSPC/EDQUOT from its own writes (metrics, checkpoint
files), the same text inside a role's error (a RoleError carries the actor's message: safetensors says "No space left
on device (os error 28)"), and some that name no cause at all (torch.save: "unexpected pos 576 vs 534"). The last kind
is recognised by the free space left where the run writes, looked at before anything is cleaned up
(``CheckpointedDriver.save_checkpoint``, which then raises ``DiskFull``).
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from rlhf_ray.run import checkpoint

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")
LOW_SPACE_BYTES = 1 << 20  # less than this left: a write error there is the full disk's
_PATH_IN_TEXT = re.compile(r"(?:No space left on device|Disk quota exceeded): '([^']+)'")


class DiskFull(OSError):
    """A write under ``filename`` failed because its disk is full (whatever form the error first took)."""

    def __init__(self, path: str | Path, cause: BaseException):
        super().__init__(errno.ENOSPC, f"no space left on the device ({type(cause).__name__}: {cause})", str(path))


def causes(err: BaseException):
    """``err`` and its causes / contexts, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException, where: str | Path | None = None) -> bool:
    """Whether ``err`` comes from a full disk: by its errno or text, or — for errors that say nothing of it — by the
    free space left at ``where`` now."""
    for cause in causes(err):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(cause) for text in DISK_FULL_TEXTS):
            return True
    return where is not None and free_bytes(where) < LOW_SPACE_BYTES


def free_bytes(where: str | Path) -> int:
    """Bytes this process may still write on the device holding ``where`` (its nearest existing parent)."""
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return LOW_SPACE_BYTES  # cannot tell: not evidence of a full disk
    blocks = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail  # root may use the reserved blocks
    return blocks * stat.f_frsize


def written_path(err: BaseException) -> str | None:
    """The file or directory being written when the disk filled, when the error names one."""
    for cause in causes(err):
        if isinstance(cause, OSError) and cause.filename:
            return str(cause.filename)
        found = _PATH_IN_TEXT.search(str(cause))
        if found:
            return found.group(1)
    return None


def mount_point(where: str | Path) -> Path:
    path = Path(where).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_message(err: BaseException, output_dir: str | Path) -> str:
    """One line: the path that filled up (its device and the space left) and the checkpoints still valid."""
    where = written_path(err) or str(output_dir)
    device = f"file system at {mount_point(where)}, {_size(free_bytes(where))} free now"
    latest = checkpoint.latest_complete(output_dir)
    if latest is None:
        kept = "no checkpoint was saved yet (a rerun starts from the beginning)"
    else:
        kept = f"checkpoints up to step {int(latest.name.split('-')[-1])} in {latest.parent} remain valid"
    return f"no space left on the device of {where} ({device}); {kept}; free space and rerun with resume=auto"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
