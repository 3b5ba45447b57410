"""Every key of every run kind, from the schemas themselves: the ``--help`` listing and docs/config-reference.md
(``python -m rlhf_ray.config --reference``; tests/test_config.py fails when the committed file is stale)."""
from __future__ import annotations

import json
import types
import typing
from typing import Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlhf_ray.config.dpo import DPOConfig
from rlhf_ray.config.ppo import ExperimentConfig
from rlhf_ray.config.rm import RewardTrainingConfig
from rlhf_ray.config.sft import SFTConfig

# (command-line flag of `python -m rlhf_ray.config`, title, the command that runs it, schema)
RUN_KINDS = [("", "PPO", "python -m rlhf_ray.train", ExperimentConfig),
             ("--rm", "Reward-model training", "python -m rlhf_ray.train_rm", RewardTrainingConfig),
             ("--sft", "SFT", "python -m rlhf_ray.train_sft", SFTConfig),
             ("--dpo", "DPO", "python -m rlhf_ray.train_dpo", DPOConfig)]

REFERENCE_COMMAND = "python -m rlhf_ray.config --reference > docs/config-reference.md"


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """``  key: description`` for every key of ``model`` (sections expanded): the ``--help`` listing."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe(ann, f"{prefix}{name}.")
        else:
            lines.append(f"  {prefix}{name}: {field.description or ''}")
    return lines


def _section_of(annotation) -> type[BaseModel] | None:
    """The section class of a field that holds one (optionally null), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _section_of(args[0])
    return None


def type_name(annotation) -> str:
    """A field's type as a reader of YAML sees it: `"a" \\| "b"` (a table cell's pipe escaped), `int or null`,
    `list[str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    """Plain text as Markdown that shows it as written: one line; a pipe, an asterisk ('tiny:*') or a '<' starting
    what looks like a tag ('<output_dir>') escaped."""
    return " ".join(text.split()).replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def reference_rows(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """Table rows for every key of ``model``. ``defaults``: the section as its run kind creates it when the YAML
    leaves it out (a learner run's deepspeed starts at ZeRO 0, SFT's optimizer at lr 2e-5), whose values are the
    defaults shown; without it (a required section) each field's own default."""
    rows = []
    for name, field in model.model_fields.items():
        key, section = f"{prefix}{name}", _section_of(field.annotation)
        if defaults is not None:
            value = getattr(defaults, name)
        elif field.is_required():
            value = PydanticUndefined
        else:
            value = field.get_default(call_default_factory=True)
        if section is None or section is not field.annotation:  # a leaf, or a section that may be null (lora)
            description = field.description or (section.__doc__ if section else "") or ""
            shown = None if isinstance(value, BaseModel) else value  # an optional section: absent unless given
            rows.append(f"| `{key}` | {type_name(field.annotation)} | {_default(shown)} | {_cell(description)} |")
        if section is not None:
            rows += reference_rows(section, f"{key}.", value if isinstance(value, BaseModel) else None)
    return rows


def reference_markdown() -> str:
    """docs/config-reference.md: for each run kind, every key with its type, default and description."""
    parts = ["# Config reference\n",
             f"Generated from the schemas in `rlhf_ray/config/` by `{REFERENCE_COMMAND}`; do not edit by hand. "
             "Keys are dotted paths: set them in a YAML file or as `key=value` overrides. The same listing, "
             "descriptions only: `python -m rlhf_ray.config [--rm | --sft | --dpo] --help`.\n"]
    parts += [f"- [{title}](#{title.lower().replace(' ', '-')}) (`{command}`)" for _, title, command, _ in RUN_KINDS]
    for flag, title, command, schema in RUN_KINDS:
        parts.append(f"\n## {title}\n\n`{command}`; `python -m rlhf_ray.config {flag + ' ' if flag else ''}CONFIG.yaml "
                     f"[key=value ...]` prints a config's resolved tree. {_cell(schema.__doc__ or '')}\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        parts += reference_rows(schema)
    return "\n".join(parts) + "\n"
