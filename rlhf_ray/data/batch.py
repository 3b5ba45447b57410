"""The batches that cross actor boundaries: RolloutBatch (PPO rollouts), PairBatch (preference pairs for an RM),
ResponsePairBatch (preference pairs for a policy: DPO) and SequenceBatch (SFT).

RolloutBatch, B sequences: prompts LEFT-padded to P positions, responses RIGHT-padded to R positions,
so every response token sits at the same column for all rows:

    input_ids      [B, P+R]   <pad> <pad> p0 p1 p2 | r0 r1 r2 <pad>
    attention_mask [B, P+R]     0     0   1  1  1  |  1  1  1   0
    response_mask  [B, R]                          |  1  1  1   0

The logits that predict response token j are at column P-1+j of the model output. Per-token tensors
(logprobs, values, rewards, advantages) are [B, R] and aligned with ``response_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


class Rows:
    """Row selection, equal shards and device moves for a dataclass batch: tensor fields are indexed on
    their first dimension, the list fields named in ``PER_ROW`` row by row, anything else is kept."""
    PER_ROW: tuple[str, ...] = ()

    def __len__(self) -> int:
        return next(v for v in (getattr(self, f.name) for f in fields(self)) if isinstance(v, torch.Tensor)).shape[0]

    def select(self, index):
        """Rows ``index`` (a list or 1-D tensor of row numbers)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[index]
            elif f.name in self.PER_ROW and value is not None:
                out[f.name] = [value[i] for i in index.tolist()]
            else:
                out[f.name] = value
        return type(self)(**out)

    def chunks(self, n: int) -> list:
        """``n`` contiguous, equally sized shards (the row count must be divisible by n)."""
        if len(self) % n:
            raise ValueError(f"cannot split {len(self)} rows into {n} equal shards")
        size = len(self) // n
        return [self.select(range(i * size, (i + 1) * size)) for i in range(n)]

    def to(self, device):
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        if str(device) == "cpu" and all(t.device.type == "cpu" for t in tensors.values()):
            return self
        return replace(self, **{name: t.to(device) for name, t in tensors.items()})

    def with_(self, **changes):
        return replace(self, **changes)

    def row_tokens(self) -> torch.Tensor:
        """[B] real (non-padding) tokens of each row, all its sequences together."""
        mask = self.attention_mask
        return mask.flatten(1).sum(-1)

    def padded_positions(self) -> int:
        """Token positions of the padded layout: what a forward over the padded rows computes."""
        return self.input_ids.numel()


@dataclass
class RolloutBatch(Rows):
    PER_ROW = ("prompt_messages", "prompt_texts", "response_texts", "finish_reasons", "labels", "prompt_fields")

    input_ids: torch.Tensor               # [B, P+R] long
    attention_mask: torch.Tensor          # [B, P+R] long
    response_mask: torch.Tensor           # [B, R] float
    prompt_length: int                    # P
    pad_token_id: int
    prompt_messages: list[list[dict]]
    prompt_texts: list[str]
    response_texts: list[str]
    finish_reasons: list[str]             # vLLM's: 'stop' (EOS or a stop string) or 'length'
    gen_logprobs: Optional[torch.Tensor] = None   # [B, R] from the sampler (vLLM)
    ref_logprobs: Optional[torch.Tensor] = None   # [B, R] reference policy
    old_logprobs: Optional[torch.Tensor] = None   # [B, R] learner policy before the update
    values: Optional[torch.Tensor] = None         # [B, R] critic before the update
    scores: Optional[torch.Tensor] = None         # [B] reward-model / function score
    rewards: Optional[torch.Tensor] = None        # [B, R] shaped per-token rewards
    advantages: Optional[torch.Tensor] = None     # [B, R]
    returns: Optional[torch.Tensor] = None        # [B, R]
    group_ids: Optional[torch.Tensor] = None      # [B] long: the samples of one prompt share an id
    is_weights: Optional[torch.Tensor] = None     # [B, R] off-policy correction of the policy loss (ppo.is_correction)
    labels: Optional[list[str]] = None            # each prompt's reference answer (data.label_field), for the reward
    prompt_fields: Optional[list[dict]] = None    # each prompt's data columns a composite reward routes by

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions that ignore left padding: 0 at each row's first real token."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def ended_with_eos(self) -> torch.Tensor:
        """[B] bool: the response stopped by itself (EOS or a stop string) rather than at the length cap."""
        return torch.tensor([r == "stop" for r in self.finish_reasons], dtype=torch.bool)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    @staticmethod
    def from_samples(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                     finish_reasons: list[str], prompt_messages: list[list[dict]], prompt_texts: list[str],
                     response_texts: list[str], pad_token_id: int,
                     labels: Optional[list[Optional[str]]] = None,
                     prompt_fields: Optional[list[dict]] = None) -> "RolloutBatch":
        """Pad raw samples into the layout above."""
        P = max(len(p) for p in prompts)
        R = max(1, max(len(r) for r in responses))
        B = len(prompts)
        input_ids = torch.full((B, P + R), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + R), dtype=torch.long)
        response_mask = torch.zeros((B, R), dtype=torch.float32)
        gen_logprobs = torch.zeros((B, R), dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
            input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, P - len(p):P + len(r)] = 1
            if r:
                input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
                response_mask[i, :len(r)] = 1
                gen_logprobs[i, :len(r)] = torch.tensor(lp, dtype=torch.float32)
        return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                            prompt_length=P, pad_token_id=pad_token_id, finish_reasons=list(finish_reasons),
                            prompt_messages=prompt_messages, prompt_texts=prompt_texts,
                            response_texts=response_texts, gen_logprobs=gen_logprobs,
                            labels=list(labels) if labels is not None and any(x is not None for x in labels) else None,
                            prompt_fields=list(prompt_fields) if prompt_fields and any(prompt_fields) else None)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Join batches (e.g. from several generation actors), re-padding to the widest P and R."""
        P = max(b.prompt_length for b in batches)
        R = max(b.response_length for b in batches)
        padded = [b._pad_to(P, R) for b in batches]
        out = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in padded]
            if f.name == "prompt_length":
                out[f.name] = P
            elif isinstance(values[0], torch.Tensor):
                out[f.name] = torch.cat(values)
            elif isinstance(values[0], list):
                out[f.name] = [item for v in values for item in v]
            else:  # None or a per-batch scalar
                out[f.name] = values[0]
        return RolloutBatch(**out)

    def _pad_to(self, P: int, R: int) -> "RolloutBatch":
        dp, dr = P - self.prompt_length, R - self.response_length
        if dp == 0 and dr == 0:
            return self
        changes = {
            "input_ids": torch.nn.functional.pad(self.input_ids, (dp, dr), value=self.pad_token_id),
            "attention_mask": torch.nn.functional.pad(self.attention_mask, (dp, dr), value=0),
            "prompt_length": P,
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and f.name not in changes:
                changes[f.name] = torch.nn.functional.pad(value, (0, dr), value=0)
        return replace(self, **changes)


@dataclass
class PairBatch(Rows):
    """Preference pairs for reward modelling: row i holds its chosen (0) and rejected (1) conversation,
    right-padded to a common length T, so one forward pass over [2B, T] scores both sides.

        input_ids      [B, 2, T] long      attention_mask [B, 2, T] long
        margin         [B] float           how much the chosen side should win by (0: just win)
    """
    PER_ROW = ("sources",)

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor
    sources: list[str]

    @staticmethod
    def from_encoded(chosen: list[list[int]], rejected: list[list[int]], margins: list[float], sources: list[str],
                     pad_token_id: int) -> "PairBatch":
        """Token ids of each side (already truncated) -> the padded layout above."""
        T = max(len(ids) for ids in chosen + rejected)
        input_ids = torch.full((len(chosen), 2, T), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chosen), 2, T), dtype=torch.long)
        for i, pair in enumerate(zip(chosen, rejected)):
            for side, ids in enumerate(pair):
                input_ids[i, side, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, side, :len(ids)] = 1
        return PairBatch(input_ids, attention_mask, torch.tensor(margins, dtype=torch.float32), list(sources))


@dataclass
class ResponsePairBatch(Rows):
    """Preference pairs as the POLICY reads them (DPO): row i holds the prompt with its chosen (0) and its rejected (1)
    response, in the RolloutBatch layout (prompts left-padded to P, responses right-padded to R), so both sides'
    response tokens are at the same columns and the pair stays together when rows are shuffled or sharded:

        input_ids [B, 2, P+R]   attention_mask [B, 2, P+R]   response_mask [B, 2, R]
        ref_logps [B, 2]        the reference's summed response logprobs (None for reference-free losses)
    """
    PER_ROW = ("sources",)

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    pad_token_id: int
    sources: list[str]
    ref_logps: Optional[torch.Tensor] = None

    @staticmethod
    def from_encoded(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], sources: list[str],
                     pad_token_id: int) -> "ResponsePairBatch":
        flat = RolloutBatch.from_samples([p for p in prompts for _ in range(2)],
                                         [r for pair in zip(chosen, rejected) for r in pair],
                                         [[0.0] * len(r) for pair in zip(chosen, rejected) for r in pair],
                                         ["stop"] * 2 * len(prompts), [[]] * 2 * len(prompts), [""] * 2 * len(prompts),
                                         [""] * 2 * len(prompts), pad_token_id)
        B = len(prompts)
        return ResponsePairBatch(flat.input_ids.view(B, 2, -1), flat.attention_mask.view(B, 2, -1),
                                 flat.response_mask.view(B, 2, -1), flat.prompt_length, pad_token_id, list(sources))

    def sides(self) -> RolloutBatch:
        """Both sides as 2B sequences (chosen, rejected, chosen, …): what the policy and the reference forward."""
        n = 2 * len(self)
        return RolloutBatch(input_ids=self.input_ids.reshape(n, -1), attention_mask=self.attention_mask.reshape(n, -1),
                            response_mask=self.response_mask.reshape(n, -1), prompt_length=self.prompt_length,
                            pad_token_id=self.pad_token_id, prompt_messages=[[]] * n, prompt_texts=[""] * n,
                            response_texts=[""] * n, finish_reasons=["stop"] * n)

    @property
    def response_tokens(self) -> torch.Tensor:
        """[B, 2] response lengths (the length-normalised losses divide by them)."""
        return self.response_mask.sum(-1)


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[..., T] segment ids -> [..., T, T] bool, True where query q may attend to key k: k ≤ q and both in the same
    segment (one packed conversation). Padding is one more segment, so no query row is all False (NaN in softmax)."""
    T = segment_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return causal & (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2))


@dataclass
class SequenceBatch(Rows):
    """Token sequences with a per-token loss mask (SFT), right-padded to T; with packing a row holds several
    conversations, each attending only to itself:

        input_ids [B, T]   loss_mask [B, T] (1: a token the model learns to predict)   position_ids [B, T]
        segment_ids [B, T]  which conversation of its row a token belongs to (1, 2, …; 0: padding)
    """
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: causal within each conversation, nothing across conversations — the 4-D mask Hugging Face
        models take as is. Without packing it is the plain causal mask with the padding cut out."""
        return segment_causal_mask(self.segment_ids).unsqueeze(1)

    def row_tokens(self) -> torch.Tensor:
        return (self.segment_ids > 0).sum(-1)

    @property
    def packed(self) -> bool:
        return bool((self.segment_ids.max(-1).values > 1).any())

    @staticmethod
    def from_rows(rows: list[tuple[list[int], list[int], list[int]]], pad_token_id: int) -> "SequenceBatch":
        """(input_ids, loss_mask, sequence_lengths) per row -> the padded layout above."""
        T = max(len(ids) for ids, _, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros((B, T), dtype=torch.float32)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        segment_ids = torch.zeros((B, T), dtype=torch.long)
        for i, (ids, mask, lengths) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            loss_mask[i, :len(mask)] = torch.tensor(mask, dtype=torch.float32)
            start = 0
            for k, length in enumerate(lengths, 1):
                position_ids[i, start:start + length] = torch.arange(length)
                segment_ids[i, start:start + length] = k
                start += length
        return SequenceBatch(input_ids, loss_mask, position_ids, segment_ids)


def token_budget_groups(tokens: list[int], budget: int, count: int | None = None) -> list[list[int]]:
    """Rows (their token counts) grouped into micro-batches of at most ``budget`` tokens each — fewest groups first,
    then as even as longest-first greedy assignment makes them; a row longer than the budget is a group alone.
    ``count`` forces the number of groups (every data-parallel rank must run as many; at most len(tokens)).
    Each group lists its row numbers in increasing order. -> list of groups"""
    n = len(tokens)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-tokens[i], i))

    def assign(k: int) -> list[list[int]]:
        groups, loads = [[] for _ in range(k)], [0] * k
        for i in order:
            g = min(range(k), key=lambda j: (loads[j], j))
            groups[g].append(i)
            loads[g] += tokens[i]
        return [sorted(g) for g in groups]

    if count is not None:
        return assign(min(count, n))
    k = max(1, -(-sum(min(t, budget) for t in tokens) // budget))  # a lower bound: no group holds more
    while True:
        groups = assign(min(k, n))
        if k >= n or all(len(g) == 1 or sum(tokens[i] for i in g) <= budget for g in groups):
            return groups
        k += 1
