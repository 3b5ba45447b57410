"""Held-out prompts for policy evaluation (rlhf_ray.evaluate): read from any prompt or preference file, split by source,
encoded with each policy's chat template."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_COLUMNS = ("messages", "prompt", "chosen")


@dataclass
class EvalPrompt:
    messages: list[dict]
    file: str            # the prompt file's report name (rlhf_ray.data.sources.dataset_name)
    row: int             # the row's position in its file
    source: str | None   # the row's own ``source`` column, if any
    label: str | None = None  # the row's reference answer (--label-field), for a verifying judge
    fields: dict = field(default_factory=dict)  # the row's columns a composite judge routes by, as text

    @property
    def group(self) -> str:
        return f"{self.file}/{self.source}" if self.source is not None else self.file


@dataclass
class PromptFile:
    path: str
    rows: int
    used: int = 0
    skipped: Counter = field(default_factory=Counter)


def prompt_turns(row: dict) -> list[dict] | str:
    """The prompt of a row (``messages``, a ``prompt`` string, or a preference row's ``chosen`` without its answer),
    ending with a user turn; else the reason to skip it."""
    from rlhf_ray.data.sources import validate_messages

    value = row.get("messages", row.get("prompt", row.get("chosen")))
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    reason = validate_messages(messages)
    if reason:
        return reason
    if messages[-1]["role"] == "assistant":  # a preference or SFT row: its answer is not part of the prompt
        messages = messages[:-1]
    return messages if messages and messages[-1]["role"] == "user" else "does_not_end_with_user_turn"


def load_eval_prompts(paths: list[str], limit: int | None, label_field: str | None = None,
                      fields: list[str] = ()) -> tuple[list[EvalPrompt], dict[str, PromptFile]]:
    """Every usable prompt of every file (the first ``limit`` of each), skips counted by reason; with ``label_field``
    each keeps that column as its reference answer (a row without one is skipped: 'no_label'); ``fields``: the
    columns a composite judge routes by, kept (as text; a file without the column gives None)."""
    from rlhf_ray.data.sources import dataset_names, load_rows

    prompts, files = [], {}
    for name, path in zip(dataset_names(paths), paths):
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        rows = load_rows(path)
        if not set(PROMPT_COLUMNS) & rows.columns:
            raise ValueError(f"{path} has none of the columns {', '.join(PROMPT_COLUMNS)}; "
                             f"its columns: {sorted(rows.columns)}")
        if label_field and label_field not in rows.columns:
            raise ValueError(f"--label-field {label_field} is not a column of {path}; its columns: "
                             f"{sorted(rows.columns)}")
        info = files[name] = PromptFile(path, len(rows) + sum(rows.skipped.values()), skipped=Counter(rows.skipped))
        for index, row in enumerate(rows.rows):
            if limit and info.used >= limit:
                break
            turns = prompt_turns(row)
            label = row.get(label_field) if label_field else None
            if not isinstance(turns, str) and label_field and (label is None or str(label) == ""):
                turns = "no_label"
            if isinstance(turns, str):
                info.skipped[turns] += 1
                continue
            source = row.get("source")
            prompts.append(EvalPrompt(turns, name, index, None if source is None else str(source),
                                      None if label is None else str(label),
                                      {f: None if row.get(f) is None else str(row.get(f)) for f in fields}))
            info.used += 1
        if not info.used:
            raise ValueError(f"no usable prompt in {path} ({info.rows} rows; skipped: {dict(info.skipped)})")
    return prompts, files


def encode_prompts(prompts: list[EvalPrompt], model_path: str, template: str, max_prompt_tokens: int):
    """The engine's prompts in one policy's tokenizer (over-long ones keep their end) and how many were cut."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.sources import Prompt, render_messages

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out, truncated = [], 0
    for p in prompts:
        text = render_messages(p.messages, template, tokenizer)
        ids = tokenizer(text, add_special_tokens=template == "tulu")["input_ids"]  # as rlhf_ray.data.sources.load_prompts
        if len(ids) > max_prompt_tokens:
            ids, truncated = ids[-max_prompt_tokens:], truncated + 1
            text = tokenizer.decode(ids)
        out.append(Prompt(text=text, token_ids=ids, messages=p.messages, label=p.label, fields=p.fields))
    return out, truncated
