"""Prompt and preference data through `datasets`, rendered in the Tulu chat format.

Every row that cannot be used is skipped *and counted* by reason; the counts are logged and kept on
the dataset object (``skipped``), never silent. ``PromptSampler`` gives a deterministic, seeded order
that is a pure function of the step, so a resumed run reads exactly the prompts it had not seen.
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rlhf_ray.config import DataConfig

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------- rendering

def render_tulu(messages: list[dict], add_generation_prompt: bool = True, eos: str = "</s>") -> str:
    """Tulu 2 chat format: ``<|user|>\\n{u}\\n<|assistant|>\\n{a}</s>\\n`` per turn, then ``<|assistant|>\\n``."""
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"<|assistant|>\n{m['content']}{eos}\n")
        else:
            parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def render_messages(messages: list[dict], template: str, tokenizer=None, add_generation_prompt: bool = True) -> str:
    """Render with 'tulu' or with the tokenizer's own chat template ('tokenizer')."""
    if template == "tulu":
        return render_tulu(messages, add_generation_prompt, eos=getattr(tokenizer, "eos_token", None) or "</s>")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='tokenizer' needs a tokenizer with a chat_template; use template='tulu'")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def validate_messages(messages) -> str | None:
    """None if ``messages`` is a usable conversation, else the skip reason."""
    if not isinstance(messages, list) or not messages:
        return "empty_or_not_a_list"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "malformed_message"
        if not m["content"].strip():
            return "empty_content"
    return None


# ------------------------------------------------------------------------------------------ loading

@dataclass
class Rows:
    """Raw rows of a data source, its column names, and the lines that could not even be parsed."""
    rows: Sequence[dict]
    columns: set[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def load_rows(source: str, split: str = "train") -> Rows:
    """Rows of a local .jsonl/.json/.parquet file or a hub dataset (through `datasets`).

    JSON Lines are parsed line by line so that one broken line is skipped and counted
    ("malformed_json") instead of failing the whole file, as `datasets`' JSON reader does.
    """
    import datasets

    path = Path(source).expanduser()
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        table = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    elif path.exists():
        raise ValueError(f"{path}: unsupported data file type; use one of {sorted(LOCAL_FORMATS)} or a hub dataset name")
    else:
        table = datasets.load_dataset(source, split=split)  # hub name: the real path for users
    return Rows(rows=table, columns=set(table.column_names))


def _read_jsonl(path: Path) -> Rows:
    out = Rows(rows=[], columns=set())
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                out.skipped["malformed_json"] += 1
                continue
            if not isinstance(row, dict):
                out.skipped["not_an_object"] += 1
                continue
            out.rows.append(row)
            out.columns.update(row)
    bad = sum(out.skipped.values())
    if not out.rows:
        raise ValueError(f"data file {path} has no rows" + (f" that parse as JSON objects ({bad} lines did not)"
                                                             if bad else " (it is empty)"))
    if bad:
        log.warning("%s: %d line(s) skipped: %s", path, bad, dict(out.skipped))
    return out


@dataclass
class Prompt:
    text: str
    token_ids: list[int]
    messages: list[dict]
    label: Optional[str] = None  # the reference answer of a verifiable task (data.label_field)
    fields: dict = field(default_factory=dict)  # {column: value as text}: the columns a composite reward routes by


@dataclass
class PromptDataset:
    prompts: list[Prompt]
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    total_rows: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{len(self.prompts)} prompts from {self.total_rows} rows; "
                f"skipped: {skipped}; truncated: {self.truncated}")


def load_prompts(cfg: DataConfig, tokenizer, fields: Sequence[str] = ()) -> PromptDataset:
    """Read, validate, render and tokenize the prompt data described by ``cfg``; each prompt keeps its values of the
    columns ``fields`` (a composite reward's routes: models.reward.components[*].route.field), as text."""
    if cfg.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.template='tokenizer' but the policy's tokenizer ({tokenizer.name_or_path}) has no chat "
                         "template: use data.template=tulu, or a tokenizer that has one")
    source = load_rows(cfg.prompts, cfg.split)
    column = cfg.prompt_field or cfg.messages_field
    for key, name in ((f"data.{'prompt_field' if cfg.prompt_field else 'messages_field'}", column),
                      ("data.label_field", cfg.label_field)):
        if name is not None and name not in source.columns:
            raise ValueError(f"{key}='{name}' is not a column of {cfg.prompts}; columns: {sorted(source.columns)}")
    for name in fields:
        if name not in source.columns:
            raise ValueError(f"models.reward.components[*].route.field='{name}' is not a column of {cfg.prompts}; "
                             f"columns: {sorted(source.columns)}")
    out = PromptDataset(prompts=[], total_rows=len(source) + sum(source.skipped.values()),
                        skipped=Counter(source.skipped))
    for row in source.rows:
        value = row.get(column)
        if cfg.prompt_field:
            value = [{"role": "user", "content": value}] if isinstance(value, str) else value
        reason = validate_messages(value)
        messages = value if reason else _prompt_turns(value)
        if not reason and messages[-1]["role"] != "user":
            reason = "does_not_end_with_user_turn"
        label = row.get(cfg.label_field) if cfg.label_field else None
        if not reason and cfg.label_field and (label is None or isinstance(label, (dict, list)) or str(label) == ""):
            reason = "no_label"
        if reason:
            out.skipped[reason] += 1
            continue
        text = render_messages(messages, cfg.template, tokenizer)
        # Tulu text has no BOS: let the tokenizer add its own (Llama <s>); chat templates write theirs.
        ids = tokenizer(text, add_special_tokens=cfg.template == "tulu")["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            if cfg.overlong == "drop":
                out.skipped["too_long"] += 1
                continue
            ids = ids[-cfg.max_prompt_tokens:]  # keep the end: the generation prompt must survive
            text = tokenizer.decode(ids)
            out.truncated += 1
        out.prompts.append(Prompt(text=text, token_ids=ids, messages=messages,
                                  label=None if label is None else str(label),
                                  fields={name: _text(row.get(name)) for name in fields}))
        if cfg.limit and len(out.prompts) >= cfg.limit:
            break
    log.info("prompts %s: %s", cfg.prompts, out.summary())
    if not out.prompts:
        raise ValueError(f"no usable prompt in {cfg.prompts} ({out.summary()})")
    return out


def _text(value) -> Optional[str]:
    return None if value is None else str(value)


def _prompt_turns(messages: list[dict]) -> list[dict]:
    """Drop a trailing assistant turn (SFT rows) so that the prompt ends at the user turn."""
    return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages


# --------------------------------------------------------------------------------------- preferences

@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str | None = None
    margin: float = 0.0

    def conversations(self) -> tuple[list[dict], list[dict]]:
        """(chosen, rejected) whole conversations: the prompt turns plus each response."""
        return ([*self.prompt, {"role": "assistant", "content": self.chosen}],
                [*self.prompt, {"role": "assistant", "content": self.rejected}])


@dataclass
class PreferenceDataset:
    pairs: list[PreferencePair]
    skipped: Counter = field(default_factory=Counter)
    total_rows: int = 0

    def __len__(self) -> int:
        return len(self.pairs)


def load_preferences(source: str, split: str = "train", margin_field: str | None = None) -> PreferenceDataset:
    """Tulu 2.5 preference rows: ``chosen``/``rejected`` message lists sharing the prompt turns, an optional
    ``source``, and (``margin_field``) a finite number by which the chosen response should win."""
    raw = load_rows(source, split)
    out = PreferenceDataset(pairs=[], total_rows=len(raw) + sum(raw.skipped.values()), skipped=Counter(raw.skipped))
    for row in raw.rows:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        reason = validate_messages(chosen) or validate_messages(rejected)
        if not reason and (chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant"):
            reason = "no_final_assistant_turn"
        if not reason and chosen[:-1] != rejected[:-1]:
            reason = "prompts_differ"
        if not reason and chosen[-1]["content"] == rejected[-1]["content"]:
            reason = "identical_responses"
        margin = row.get(margin_field, None) if margin_field else 0.0
        if not reason and not _is_finite_number(margin):
            reason = f"bad_{margin_field}"
        if reason:
            out.skipped[reason] += 1
            continue
        origin = row.get("source")
        out.pairs.append(PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"],
                                        str(origin) if origin is not None else None, float(margin)))
    log.info("preferences %s: %d pairs of %d rows; skipped %s", source, len(out), out.total_rows, dict(out.skipped))
    return out


def preference_sets(data, seed: int, margin_field: str | None = None) -> tuple[list[PreferencePair], dict]:
    """The training pairs and the evaluation sets of a preference run (``data``: its data section, with train, split,
    holdout_fraction, limit and eval): 'heldout' (never trained on) and one set per ``eval`` source. Unusable data
    is one ValueError naming the source and what was skipped."""
    loaded = load_preferences(data.train, data.split, margin_field)
    if not loaded.pairs:
        raise ValueError(f"no usable preference pair in data.train={data.train!r} ({loaded.total_rows} rows, "
                         f"skipped: {dict(loaded.skipped)})")
    train, held = hold_out(loaded.pairs, data.holdout_fraction, seed)
    if data.limit and data.limit < len(train):
        train = random.Random(seed).sample(train, data.limit)
    sets = {"heldout": held} if held else {}
    for name, source in zip(dataset_names(data.eval, taken=("heldout", "train")), data.eval):
        loaded = load_preferences(source, data.split)  # evaluation does not use margins
        if not loaded.pairs:
            raise ValueError(f"no usable preference pair in data.eval entry {source!r} ({loaded.total_rows} rows, "
                             f"skipped: {dict(loaded.skipped)})")
        sets[name] = loaded.pairs
    return train, sets


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dataset_name(source: str) -> str:
    """A short name for a data source in reports: a file's name without its extensions, or a hub name with '/'
    written as '__' (report keys use '/' as a separator)."""
    path = Path(source)
    return path.name.split(".")[0] if path.suffix else source.replace("/", "__")


def dataset_names(sources: list[str], taken: tuple[str, ...] = ()) -> list[str]:
    """``dataset_name`` of each source; ValueError when two sources (or a source and a reserved name) collide."""
    names = [dataset_name(s) for s in sources]
    for name in set(names):
        clashing = [s for s, n in zip(sources, names) if n == name]
        if len(clashing) > 1:
            raise ValueError(f"data sources {', '.join(clashing)} would all be reported as {name!r}: rename one")
        if name in taken:
            raise ValueError(f"data source {clashing[0]} would be reported as {name!r}, a name the reports already "
                             "use: rename it")
    return names


def hold_out(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): ``fraction`` of each source's pairs (rounded), picked with ``seed``, held out."""
    by_source: dict = {}
    for i, pair in enumerate(pairs):
        by_source.setdefault(pair.source, []).append(i)
    held = set()
    for source, indices in sorted(by_source.items(), key=lambda kv: str(kv[0])):
        random.Random(f"{seed}:{source}").shuffle(indices)
        held.update(indices[:round(fraction * len(indices))])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ------------------------------------------------------------------------------------------ sampling

class PromptSampler:
    """Seeded epoch-wise order over ``n`` items, a pure function of the step: the batch of step ``s``
    (counted from 0) is the same in every run with the same seed and data, however the run was
    interrupted and resumed. A batch never straddles epochs (the tail of an epoch is dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, what: str = "prompts",
                 key: str = "ppo.rollout_batch_size"):
        if n < batch_size:
            raise ValueError(f"{n} {what} cannot fill a batch of {batch_size} ({key})")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.batches_per_epoch = n // batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int) -> list[int]:
        """Indices of the prompts of step ``step`` (0-based)."""
        epoch, position = self.position(step)
        return self.epoch_order(epoch)[position:position + self.batch_size]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index in the epoch's order) where step ``step`` starts."""
        epoch, in_epoch = divmod(step, self.batches_per_epoch)
        return epoch, in_epoch * self.batch_size

    def state_dict(self, step: int) -> dict:
        """Where the sampler stands after ``step`` steps (what the next step will read), for checkpoints."""
        epoch, position = self.position(step)
        return {"epoch": epoch, "position": position, "seed": self.seed, "n": self.n, "batch_size": self.batch_size,
                "shuffle": self.shuffle}

    def check_state(self, state: dict, step: int) -> None:
        """Refuse a checkpointed position that this sampler would not reproduce (other data, seed or batch)."""
        mine = self.state_dict(step)
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            raise ValueError("the prompt order differs from the checkpoint's (the data, seed or batch size changed): "
                             + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differ.items()))
