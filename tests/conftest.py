"""Shared fixtures: tiny models built once per run into a temporary cache."""
from __future__ import annotations

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
