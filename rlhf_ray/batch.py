"""The one batch container that crosses every actor boundary.

Layout of B sequences: prompts LEFT-padded to P positions, responses RIGHT-padded to R positions,
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

PER_ROW_FIELDS = ("prompt_messages", "prompt_texts", "response_texts", "finish_reasons")


@dataclass
class RolloutBatch:
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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

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

    def select(self, index) -> "RolloutBatch":
        """Rows ``index`` (a list or 1-D tensor of row numbers)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[index]
            elif f.name in PER_ROW_FIELDS:
                out[f.name] = [value[i] for i in index.tolist()]
            else:
                out[f.name] = value
        return RolloutBatch(**out)

    def chunks(self, n: int) -> list["RolloutBatch"]:
        """``n`` contiguous, equally sized shards (B must be divisible by n)."""
        if len(self) % n:
            raise ValueError(f"cannot split {len(self)} sequences into {n} equal shards")
        size = len(self) // n
        return [self.select(range(i * size, (i + 1) * size)) for i in range(n)]

    def to(self, device) -> "RolloutBatch":
        if str(device) == "cpu" and self.input_ids.device.type == "cpu":
            return self
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def with_(self, **changes) -> "RolloutBatch":
        return replace(self, **changes)

    @staticmethod
    def from_samples(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                     finish_reasons: list[str], prompt_messages: list[list[dict]], prompt_texts: list[str],
                     response_texts: list[str], pad_token_id: int) -> "RolloutBatch":
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
                            response_texts=response_texts, gen_logprobs=gen_logprobs)

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
