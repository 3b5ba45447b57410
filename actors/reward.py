"""Reward role: a frozen sequence-classification RM with its own tokenizer, or a Python function."""
from __future__ import annotations

import functools
import importlib
import math
import numbers

import torch

from actors.common import Role, device_for, timed
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import RewardConfig
from rlhf_ray.data import render_messages


def load_function(spec: str):
    """'package.module:function' -> the callable, with a message that says what is wrong."""
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"models.reward.function='{spec}' cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"models.reward.function='{spec}' is not callable")
    return fn


class RewardActor(Role):
    def __init__(self, reward: dict, model_path: str | None, dtype: str = "float32", num_gpus: float = 0.0,
                 log_file: str | None = None):
        super().__init__(log_file)
        self.cfg = RewardConfig(**reward)
        if self.cfg.kind == "function":
            self.function = functools.partial(load_function(self.cfg.function), **self.cfg.function_kwargs)
            return
        from transformers import AutoTokenizer

        from rlhf_ray.modeling import load_reward_model

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.truncation_side = "left"  # keep the response when the input is too long
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_reward_model(model_path, dtype, num_gpus).eval()
        if num_gpus <= 1:
            self.model.to(device_for(num_gpus))
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # HF pools at the last non-pad token

    @timed
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """One scalar per (prompt, response). [B] float32"""
        if self.cfg.kind == "function":
            return self._score_function(batch)
        texts = [render_messages(msgs + [{"role": "assistant", "content": response}], self.cfg.template,
                                 self.tokenizer, add_generation_prompt=False)
                 for msgs, response in zip(batch.prompt_messages, batch.response_texts)]
        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.cfg.batch_size):
                enc = self.tokenizer(texts[start:start + self.cfg.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.cfg.max_length,
                                     # Tulu text has no BOS: the tokenizer adds its own (Llama <s>); chat
                                     # templates write theirs into the text.
                                     add_special_tokens=self.cfg.template == "tulu")
                enc = enc.to(self.model.device)
                scores.append(self.model(**enc).logits[:, 0].float().cpu())
        scores = torch.cat(scores)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the reward model ({self.cfg.model}) scored {len(bad)} of {len(scores)} samples "
                             f"{scores[bad[0]].item()} (first: sample {bad[0]}, response "
                             f"{batch.response_texts[bad[0]][:80]!r}); scores must be finite — check its weights "
                             "and models.dtype (float16 overflows)")
        return scores

    def _score_function(self, batch: RolloutBatch) -> torch.Tensor:
        scores = []
        name = f"models.reward.function='{self.cfg.function}'"
        for i, (prompt, response) in enumerate(zip(batch.prompt_texts, batch.response_texts)):
            try:
                result = self.function(prompt, response)
            except Exception as err:
                raise ValueError(f"{name} raised {type(err).__name__}: {err} for sample {i} "
                                 f"(response {response[:80]!r})") from err
            if isinstance(result, bool) or not isinstance(result, numbers.Real) and not (
                    isinstance(result, torch.Tensor) and result.numel() == 1):
                raise ValueError(f"{name} returned {result!r} ({type(result).__name__}) for sample {i}; it must "
                                 "return one number")
            value = float(result)
            if not math.isfinite(value):
                raise ValueError(f"{name} returned {value} for sample {i} "
                                 f"(response {response[:80]!r}); rewards must be finite")
            scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)
