"""Shared fixtures: tiny models built once per run into a temporary cache."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    from rlhf_ray.tiny import build_tiny_models

    cache = tmp_path_factory.mktemp("tiny_cache")
    build_tiny_models(cache, seed=0)
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cache):
    from transformers import AutoTokenizer

    from rlhf_ray.model_specs import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny:policy", tiny_cache))


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is not present (../shared/data is optional)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray session shared by every end-to-end test of the run."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_config(tmp_path, tiny_cache, *overrides):
    """The embedded tiny CPU config with the test's model cache and output dir, plus overrides."""
    from rlhf_ray.config import load_config

    return load_config(ROOT / "configs" / "tiny_cpu.yaml",
                       [f"models.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "logging.progress_bar=false",
                        *overrides])


def vllm_greedy(model_dir: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids from a vLLM engine, in a subprocess (its CPU engine binds threads)."""
    script = f"""
import json, os
os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={model_dir!r}, enforce_eager=True, dtype="float32", max_model_len=512)
out = llm.generate([TokensPrompt(prompt_token_ids={prompt_ids!r})],
                   SamplingParams(max_tokens={max_tokens}, temperature=0, ignore_eos=True), use_tqdm=False)
print("RESULT" + json.dumps(list(out[0].outputs[0].token_ids)))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[0][len("RESULT"):])
