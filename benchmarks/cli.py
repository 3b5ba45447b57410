"""What the benchmarks that drive the real CLIs share."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(module: str, args: list[str], echo: bool = True) -> float:
    """``python -m module args`` as a user runs it, its console passed through; the wall seconds."""
    if echo:
        print(f"\n$ python -m {module} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT).returncode
    if code != 0:
        sys.exit(f"{module} exited with {code}")
    return time.perf_counter() - start
