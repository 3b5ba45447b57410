"""Supervised fine-tuning (SFT) data: whole conversations, the loss on the assistant's turns only, and packing.

Which tokens the assistant wrote is found by *rendering*, never by searching the text for role markers: the
assistant turn ``i`` spans the characters from the end of ``render(turns[:i], generation prompt)`` (what the
model is shown before it answers) to the end of ``render(turns[:i + 1])``. That works for any chat template
(Tulu, ChatML, Llama-3, ...) and puts the turn's end marker (``</s>``, ``<|im_end|>``, ``<|eot_id|>``) inside the
loss, so the model learns to stop. It needs each shorter render to be a prefix of the whole render; a template
that rewrites earlier turns once later ones follow is refused with an error, never guessed around.

Rows that cannot be used are skipped *and counted* by reason, as in ``rlhf_ray.data.sources``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from rlhf_ray.data.batch import segment_causal_mask
from rlhf_ray.data.sources import load_rows, render_messages, validate_messages

log = logging.getLogger(__name__)

TEMPLATES = ("tulu", "tokenizer")


@dataclass
class EncodedConversation:
    """Token ids of a whole conversation; ``loss_mask[t] = 1`` when token ``t`` is a target of the loss
    (the objective predicts it from tokens ``< t``, so it shifts the mask with the labels)."""
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False


# ------------------------------------------------------------------------------------------ encoding

def sft_problem(messages) -> str | None:
    """None if ``messages`` can be trained on, else the skip reason. The conversation must end with the assistant
    (a final user turn has no answer to learn) and a user turn must come before the first assistant turn (its
    prompt; it also spares templates an empty conversation, which some cannot render)."""
    reason = validate_messages(messages)
    if reason:
        return reason
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no_assistant_turn"
    if roles[-1] != "assistant":
        return "does_not_end_with_assistant_turn"
    if "user" not in roles[:roles.index("assistant")]:
        return "assistant_turn_before_any_user_turn"
    return None


def assistant_spans(messages: list[dict], template: str, tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each assistant turn in ``text``, the whole conversation as rendered:
    start = len(render(messages[:i], generation prompt)), end = len(render(messages[:i + 1])). The span holds the
    turn's content and its end marker, never the header the generation prompt already wrote."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = _prefix_length(messages[:i], True, template, tokenizer, text)
            end = _prefix_length(messages[:i + 1], False, template, tokenizer, text)
            spans.append((start, end))
    return spans


def _prefix_length(turns: list[dict], generation_prompt: bool, template: str, tokenizer, text: str) -> int:
    prefix = render_messages(turns, template, tokenizer, add_generation_prompt=generation_prompt)
    if not text.startswith(prefix):
        name = "template 'tulu'" if template == "tulu" else \
            f"the chat template of {getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}"
        raise ValueError(f"{name} renders the first {len(turns)} turn(s) differently once later turns follow (it "
                         "rewrites earlier turns, e.g. drops the reasoning of earlier answers), so the assistant turns "
                         "cannot be located by rendering: use template='tulu' or a template that renders each turn "
                         "the same way whatever follows")
    return len(prefix)


def encode_for_sft(tokenizer, messages: list[dict], template: str, max_length: int) -> EncodedConversation:
    """``messages`` rendered once in ``template`` ('tulu' or 'tokenizer': the tokenizer's own chat template),
    tokenized once, each token in the loss iff its characters overlap an assistant turn's span. Keeps the first
    ``max_length`` tokens (SFT keeps the start: the prompt comes before the answer it conditions); a truncation
    can leave nothing to learn (all-zero mask), which the caller must not train on (the loader skips it)."""
    problem = sft_problem(messages)
    if problem:
        raise ValueError(f"not a conversation to fine-tune on: {problem}")
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: use one of {TEMPLATES}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: SFT masking needs the character offsets "
                         "of each token (return_offsets_mapping), which only fast tokenizers give; load it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    text = render_messages(messages, template, tokenizer, add_generation_prompt=False)
    spans = assistant_spans(messages, template, tokenizer, text)
    # Tulu text has no BOS: the tokenizer adds its own (Llama <s>); chat templates write theirs into the text
    encoded = tokenizer(text, add_special_tokens=template == "tulu", return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [int(_in_spans(start, end, spans)) for start, end in encoded["offset_mapping"]]
    return EncodedConversation(ids[:max_length], mask[:max_length], truncated=len(ids) > max_length)


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Does the token's ``[start, end)`` overlap a span? A token with an empty span (a BOS the tokenizer adds at
    (0, 0), whitespace some tokenizers trim from offsets) counts as sitting on the character at ``start``. A
    token straddling a span's edge holds assistant text, so it is in."""
    end = max(end, start + 1)
    return any(start < b and end > a for a, b in spans)


# ------------------------------------------------------------------------------------------- loading

@dataclass
class SFTDataset:
    rows: list[EncodedConversation]
    skipped: Counter = field(default_factory=Counter)
    total_rows: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{len(self.rows)} conversations from {self.total_rows} rows; "
                f"skipped: {skipped}; truncated: {self.truncated}")


def load_sft_conversations(source: str, split: str, template: str, tokenizer, max_length: int,
                           messages_field: str = "messages") -> SFTDataset:
    """Read ``source`` (a .jsonl/.json/.parquet file or a hub dataset), validate and encode each row's
    ``messages_field`` conversation; every unusable row is skipped and counted by reason."""
    raw = load_rows(source, split)
    if messages_field not in raw.columns:
        raise ValueError(f"messages_field='{messages_field}' is not a column of {source}; "
                         f"columns: {sorted(raw.columns)}")
    out = SFTDataset(rows=[], skipped=Counter(raw.skipped), total_rows=len(raw) + sum(raw.skipped.values()))
    for row in raw.rows:
        messages = row.get(messages_field)
        reason = f"missing_{messages_field}" if messages is None else sft_problem(messages)
        if not reason:
            encoded = encode_for_sft(tokenizer, messages, template, max_length)
            reason = None if any(encoded.loss_mask) else "nothing_to_learn_after_truncation"
        if reason:
            out.skipped[reason] += 1
            continue
        out.truncated += encoded.truncated
        out.rows.append(encoded)
    if not out.rows:
        raise ValueError(f"no usable SFT conversation in {source} (max_length={max_length}): {out.summary()}")
    if out.skipped or out.truncated:
        log.warning("SFT data %s: %s", source, out.summary())
    else:
        log.info("SFT data %s: %s", source, out.summary())
    return out


# ------------------------------------------------------------------------------------------- packing

@dataclass
class PackedRow:
    """Several conversations in one row. ``position_ids`` restart at 0 with each conversation and
    ``sequence_lengths`` give each one's length (in order), so attention stays within each conversation."""
    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    sequence_lengths: list[int]


def pack(rows: list[EncodedConversation], max_length: int) -> list[PackedRow]:
    """Conversations packed into rows of at most ``max_length`` tokens, greedy first-fit in the given order
    (each goes into the first row with room; deterministic). Rows are not padded."""
    lengths = [len(r.input_ids) for r in rows]
    bad = [n for n in lengths if not 1 <= n <= max_length]
    if bad:
        raise ValueError(f"{len(bad)} conversation(s) have a length outside [1, {max_length}] (e.g. {bad[0]}): "
                         "encode them with a max_length no larger than the packing length")
    packs: list[PackedRow] = []
    for row, index in zip(rows, first_fit(lengths, max_length)):
        if index == len(packs):
            packs.append(PackedRow([], [], [], []))
        out = packs[index]
        out.input_ids += row.input_ids
        out.loss_mask += row.loss_mask
        out.position_ids += range(len(row.input_ids))
        out.sequence_lengths.append(len(row.input_ids))
    return packs


def first_fit(lengths: list[int], capacity: int) -> list[int]:
    """Pack index of each item under greedy first-fit, in O(n log n): a max-tree over the room left in each of
    ``n`` possible packs (never more than one per item) finds the leftmost pack with room. Packs not opened yet
    have full room, so the first of them is where an item goes when no open pack has room."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()
    room = [capacity] * (2 * size)  # room[1] is the root; room[size + p] is pack p's room; parents hold the max
    out = []
    for n in lengths:
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= n (the root has: n <= capacity)
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        out.append(node - size)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return out


def packed_attention_mask(sequence_lengths: list[int], total_length: int) -> torch.Tensor:
    """Block-diagonal causal mask of a packed row -> BoolTensor [T, T], True where query ``q`` may attend to key
    ``k``: ``k <= q`` and both in the same conversation. Positions past ``sum(sequence_lengths)`` (padding) attend
    causally among themselves only, so no row is all False (that gives NaN in softmax).

    With Hugging Face models (checked with transformers 5 in tests/test_conversations.py), give the packed row's
    ``position_ids`` (the rotary positions must restart too) and either
    * this mask as a 4D one, ``mask[None, None]`` [B=1, 1, T, T]: a 4D mask is used as given. sdpa reads a bool
      mask; eager *adds* the mask to the scores (a bool one is silently wrong), so give it
      ``torch.where(mask, 0.0, torch.finfo(dtype).min)``; or
    * ``attention_mask=None`` and ``use_cache=False``: the model then finds the restarts in ``position_ids`` and
      builds this mask itself. With a cache (``use_cache`` defaults to True, in training too) it does not, and
      the conversations silently attend to each other.
    """
    used = sum(sequence_lengths)
    if used > total_length:
        raise ValueError(f"sequence lengths sum to {used} > total_length {total_length}")
    segment = torch.full((total_length,), -1)  # [T] conversation index of each token, -1 for padding
    segment[:used] = torch.repeat_interleave(torch.arange(len(sequence_lengths)), torch.tensor(sequence_lengths,
                                                                                                dtype=torch.long))
    return segment_causal_mask(segment)
