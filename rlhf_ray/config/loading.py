"""Reading a config: YAML, ``key=value`` overrides (dotted paths, values parsed as YAML), validation as a run kind.

A dotted path changes one key and keeps the rest of its section; a mapping value replaces the whole mapping
(``models.reward.function_kwargs={}`` drops the YAML's arguments; ``models.reward.function_kwargs.max_words=40``
changes one). Nothing is silently rewritten: what the user wrote is validated as written, or refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_ray.config.errors import ConfigError, format_validation_error
from rlhf_ray.config.ppo import ExperimentConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


class ConfigYAML(yaml.SafeLoader):
    """YAML as configs mean it: only true/false are booleans (YAML 1.2), so ``logging.alarms=off`` and
    ``models.reward.cache=off`` are the word they say — YAML 1.1's on/off/yes/no would turn them into booleans that a
    choice of words then refuses. A boolean key still takes them: pydantic reads 'off', 'no', … as false."""


ConfigYAML.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigYAML.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def read_yaml(text: str):
    """A config's YAML (a file, an override's value, a saved config.yaml) with ``ConfigYAML``'s booleans."""
    return yaml.load(text, Loader=ConfigYAML)  # noqa: S506 — a SafeLoader


class Replacing(dict):
    """A mapping given whole on the command line (``key={…}``): it replaces the YAML's mapping at that key rather
    than merging into it, so ``models.reward.function_kwargs={}`` drops the old function's arguments."""


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x', 'd={k: 1}'] -> {'a': {'b': 1}, 'c': 'x', 'd': Replacing({'k': 1})}; values are parsed as
    YAML. A dotted path merges into the YAML's tree; a mapping value replaces the one there (``Replacing``)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. ppo.kl_coef=0.1)")
        try:
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err.problem})") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = Replacing(value) if isinstance(value, dict) else value
    return tree


def merge_tree(base: dict, update: dict) -> dict:
    """``base`` with ``update`` (parse_overrides' tree) applied: dotted keys merge, ``Replacing`` mappings replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Replacing):
            merged[key] = dict(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(tree: dict, schema: type[BaseModel] = ExperimentConfig):
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[BaseModel] = ExperimentConfig):
    """Read YAML ``path`` (default: the tiny CPU PPO config), apply ``key=value`` overrides, validate as ``schema``
    (ExperimentConfig for PPO; RewardTrainingConfig, SFTConfig, DPOConfig for the learner-only runs)."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must contain a mapping of config sections, got {type(tree).__name__}")
    return build_config(merge_tree(tree, parse_overrides(overrides or [])), schema)


# Keys reshaped since a config was saved: old dotted key -> (new dotted key, the old value as the new key's). A run's
# saved config.yaml (a checkpoint's, a finished run's) is read through these; a config a user writes is not (it gets
# the error that says what replaced the key: errors.REPLACED_KEYS).
RESHAPED = {"logging.tensorboard": ("logging.trackers", lambda on: ["tensorboard"] if on else [])}


def upgrade_saved(tree: dict) -> dict:
    """A saved config tree with the keys reshaped since (``RESHAPED``) in their new form."""
    tree = {key: dict(value) if isinstance(value, dict) else value for key, value in tree.items()}
    for old, (new, convert) in RESHAPED.items():
        section, _, key = old.rpartition(".")
        holder = tree.get(section) if section else tree
        if isinstance(holder, dict) and key in holder:
            value = convert(holder.pop(key))
            new_section, _, new_key = new.rpartition(".")
            target = tree.setdefault(new_section, {}) if new_section else tree
            target.setdefault(new_key, value)
    return tree


def load_saved_config(path: str | Path, schema: type[BaseModel] = ExperimentConfig):
    """A run's saved config.yaml (``path``), keys reshaped since upgraded, validated as ``schema``."""
    try:
        tree = read_yaml(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must contain a mapping of config sections, got {type(tree).__name__}")
    return build_config(upgrade_saved(tree), schema)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

