"""Config changes as ``key=value`` overrides, the form the planner proposes them in (and a user types them)."""
from __future__ import annotations

from rlhf_ray.config import build_config, parse_overrides


def with_overrides(cfg, overrides: list[str]):
    """A validated copy of ``cfg`` with ``key=value`` overrides applied (ConfigError, a ValueError, if invalid)."""
    tree = cfg.model_dump(mode="json")
    _merge(tree, parse_overrides(overrides))
    return build_config(tree, type(cfg))


def _merge(tree: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value
