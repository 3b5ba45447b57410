"""Exact weight sync into a real vLLM engine on every architecture family we claim: tied heads, fused
HF projections, q/k norms, attention biases, scaled embeddings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
SCRIPT = ROOT / "tests" / "weight_sync_architectures.py"
NAMES = "llama,llama-tied,qwen2-tied,qwen3-tied,mistral,phi3,gemma-tied"


def run(*args: str) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line[len("RESULT"):]) for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    return {row["name"]: row for row in rows}


def test_every_architecture_matches_hf_after_an_update():
    results = run(NAMES)
    assert sorted(results) == sorted(NAMES.split(","))
    for name, row in results.items():
        assert row["before"] < 1e-4 and row["after"] < 1e-4, row  # fp32: vLLM's CPU kernels agree to ~1e-6
        assert ("lm_head" in row["reprocessed"]) == row["tied"], row


def test_vllm_stock_reload_leaves_a_tied_head_stale():
    """The failure the test above guards against, shown on vLLM's own reload: if this starts to pass
    with a small gap, vLLM fixed tied heads upstream and the re-processing can be revisited."""
    row = run("llama-tied", "--stock")["llama-tied"]
    assert row["after"] > 1e-2, row
