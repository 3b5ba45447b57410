"""Model loading and the forward passes shared by the reference and learner roles."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.models.forward import ForwardOptions, response_hidden, response_token_stats, scatter_response
from rlhf_ray.models.lora import causal_lm, is_adapted
from rlhf_ray.runtime.devices import DTYPES  # noqa: F401  (the names models are loaded in)


@torch.no_grad()
def batched_response_logprobs(model: nn.Module, batch: RolloutBatch, micro_batch_size: int,
                              temperature: float = 1.0, options: ForwardOptions = ForwardOptions()) -> torch.Tensor:
    """Per-token logprobs of the response tokens under ``model``, micro-batch by micro-batch, 0 on padding. [B, R]"""
    parts = []
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.select(range(start, min(start + micro_batch_size, len(batch))))
        parts.append(response_token_stats(model, mb, temperature, options=options)[0])
    return torch.cat(parts)


class ValueModel(nn.Module):
    """Critic: a transformer backbone plus a scalar head applied at every position."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, padding_free: bool = False):
        super().__init__()
        self.backbone, self.head, self.padding_free = backbone, head, padding_free

    def forward(self, batch: RolloutBatch) -> torch.Tensor:
        """V(s_t) for each response token t: the hidden state *before* the token; 0 on padding. [B, R]"""
        hidden = response_hidden(self.backbone, batch, self.padding_free)
        return scatter_response(self.head(hidden).squeeze(-1), batch)


class PolicyAndValue(nn.Module):
    """The learner's trainable module: one optimizer and one DeepSpeed engine for both networks (under a critic-free
    estimator the policy alone: ``value`` None). The policy may be a PEFT model (LoRA, rlhf_ray.models.lora): its
    forwards run with the adapters, and with the adapters off it is the reference policy."""

    def __init__(self, policy: nn.Module, value: ValueModel | None, options: ForwardOptions = ForwardOptions()):
        super().__init__()
        self.policy, self.value, self.options = policy, value, options

    @property
    def padding_free(self) -> bool:
        return self.options.padding_free

    def forward(self, batch: RolloutBatch, temperature: float = 1.0, entropy: bool = False,
                entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the policy's response log-probs at ``temperature``, their entropies when asked (differentiable under
        ``entropy_grad``), the critic's values when there is one), each [B, R] and 0 on padding."""
        logprobs, entropies = response_token_stats(causal_lm(self.policy), batch, temperature, entropy, self.options,
                                                   entropy_grad)
        return logprobs, entropies, (self.value(batch) if self.value is not None else None)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
        """The policy's response log-probs alone, without the critic's pass. [B, R]"""
        return response_token_stats(causal_lm(self.policy), batch, temperature, options=self.options)[0]

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
        """A LoRA policy's base, its adapters off: the reference policy's response log-probs. [B, R]"""
        if not is_adapted(self.policy):
            raise RuntimeError("only a LoRA policy holds its reference (the base with the adapters off)")
        with self.policy.disable_adapter():
            return self.logprobs(batch, temperature)


def _placement(num_gpus: float) -> dict:
    """Frozen models on several GPUs of one actor are sharded layer-wise (accelerate's device_map)."""
    return {"device_map": "auto"} if num_gpus > 1 and torch.cuda.is_available() else {}


def load_causal_lm(path: str, dtype: str = "float32", num_gpus: float = 0.0):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **_placement(num_gpus))


def load_reward_model(path: str, dtype: str = "float32", num_gpus: float = 0.0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    if config.num_labels != 1 and any("SequenceClassification" in a for a in config.architectures or []):
        raise ValueError(f"reward model {path} has {config.num_labels} output labels; a scalar reward model needs 1")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype],
                                                              **_placement(num_gpus))


def load_reward_tokenizer(path: str):
    """A reward model's own tokenizer, set up to keep the end of an over-long input (the response) and to pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_conversations(tokenizer, conversations: list[list[dict]], template: str, max_length: int):
    """Whole conversations (ending with the assistant's response) as a reward model reads them: rendered in
    ``template`` ('tulu' or the tokenizer's chat template), right-padded, keeping the last ``max_length``
    tokens. The one encoding used to train, evaluate and serve reward models. -> BatchEncoding [N, T]"""
    from rlhf_ray.data.sources import render_messages

    texts = [render_messages(c, template, tokenizer, add_generation_prompt=False) for c in conversations]
    # Tulu text has no BOS: the tokenizer adds its own (Llama <s>); chat templates write theirs into the text
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=template == "tulu")


def load_value_model(init: str, policy_path: str, value_path: str | None, dtype: str,
                     options: ForwardOptions = ForwardOptions(padding_free=False)) -> ValueModel:
    """Critic initialised from a reward model (backbone + its score head) or from the policy (new zero head)."""
    if init == "reward":
        rm = load_reward_model(value_path, dtype)
        head = getattr(rm, "score", None) or getattr(rm, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"cannot find the linear score head of reward model {value_path} "
                             f"(looked for .score / .classifier); use models.value_init=policy")
        return ValueModel(rm.base_model, head, options.checked(rm.base_model, f"critic {value_path}").padding_free)
    lm = load_causal_lm(policy_path, dtype)
    head = nn.Linear(lm.config.hidden_size, 1, bias=False, dtype=DTYPES[dtype])
    nn.init.zeros_(head.weight)
    return ValueModel(lm.base_model, head, options.checked(lm.base_model, f"critic {policy_path}").padding_free)


def check_same_tokenizer(policy_path: str, other_path: str, role: str) -> None:
    """The critic and the reference read the policy's token ids, so they need the policy's vocabulary
    (the reward model does not: it re-tokenizes text)."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(policy_path), AutoTokenizer.from_pretrained(other_path)
    if a.get_vocab() != b.get_vocab():
        raise ValueError(f"{role} {other_path} uses a different tokenizer than the policy {policy_path}; "
                         f"it reads the policy's token ids, so it needs the same vocabulary")
