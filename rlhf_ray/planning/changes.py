"""Config changes as ``key=value`` overrides, the form the planner proposes them in (and a user types them)."""
from __future__ import annotations

from rlhf_ray.config import build_config, merge_tree, parse_overrides


def with_overrides(cfg, overrides: list[str]):
    """A validated copy of ``cfg`` with ``key=value`` overrides applied (ConfigError, a ValueError, if invalid)."""
    return build_config(merge_tree(cfg.model_dump(mode="json"), parse_overrides(overrides)), type(cfg))
