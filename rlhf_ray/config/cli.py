"""``python -m rlhf_ray.config``: print a config's resolved tree, list the keys (--help) or write the reference."""
from __future__ import annotations

import sys

from rlhf_ray.config.errors import ConfigError
from rlhf_ray.config.loading import dump_config, load_config
from rlhf_ray.config.reference import RUN_KINDS, describe, reference_markdown

USAGE = """usage: python -m rlhf_ray.config [--rm | --sft | --dpo] [CONFIG.yaml] [key=value ...]
       python -m rlhf_ray.config --reference > docs/config-reference.md

--rm, --sft, --dpo: a reward-model training, SFT or DPO config (python -m rlhf_ray.train_rm, train_sft, train_dpo); \
none: PPO (python -m rlhf_ray.train)

key=value: the value is YAML. A dotted key changes one entry and keeps the rest of its section; a mapping value \
replaces the whole mapping (models.reward.function_kwargs={} drops the file's arguments, \
models.reward.function_kwargs.max_words=40 changes one).

--reference: every key of every run kind with its type, default and description, as Markdown \
(docs/config-reference.md)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--reference"]:
        print(reference_markdown(), end="")
        return 0
    kinds = {flag: schema for flag, _, _, schema in RUN_KINDS if flag}
    schema = RUN_KINDS[0][3]
    if argv and argv[0] in kinds:
        schema, argv = kinds[argv[0]], argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nkeys:")
        print("\n".join(describe(schema)))
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides, schema)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dump_config(cfg), end="")
    return 0
