"""Model loading and the forward passes shared by the reference and learner roles."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.batch import RolloutBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def response_logits(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Logits that predict each response token: columns P-1 … P+R-2 of the output. [B, R, V]

    ``logits_to_keep`` skips the LM head on prompt positions (the largest activation on long prompts).
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=batch.response_length + 1)
    return out.logits[:, :-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token], in float32. logits [B, R, V], tokens [B, R] -> [B, R]"""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def batched_response_logprobs(model: nn.Module, batch: RolloutBatch, micro_batch_size: int,
                              temperature: float = 1.0) -> torch.Tensor:
    """Per-token logprobs of the response tokens under ``model``, micro-batch by micro-batch. [B, R]"""
    parts = []
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.select(range(start, min(start + micro_batch_size, len(batch))))
        parts.append(token_logprobs(response_logits(model, mb), mb.response_ids, temperature))
    return torch.cat(parts) * batch.response_mask


class ValueModel(nn.Module):
    """Critic: a transformer backbone plus a scalar head applied at every position."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: RolloutBatch) -> torch.Tensor:
        """V(s_t) for each response token t: the hidden state *before* the token. [B, R]"""
        hidden = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, use_cache=False).last_hidden_state
        P, R = batch.prompt_length, batch.response_length
        return self.head(hidden[:, P - 1:P + R - 1]).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """The learner's trainable module: one optimizer and one DeepSpeed engine for both networks."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return response_logits(self.policy, batch), self.value(batch)


class PolicyOnly(nn.Module):
    """The learner's module under a critic-free estimator: the policy, with PolicyAndValue's interface (no values)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: RolloutBatch) -> tuple[torch.Tensor, None]:
        return response_logits(self.policy, batch), None


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
    from rlhf_ray.data import render_messages

    texts = [render_messages(c, template, tokenizer, add_generation_prompt=False) for c in conversations]
    # Tulu text has no BOS: the tokenizer adds its own (Llama <s>); chat templates write theirs into the text
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=template == "tulu")


def load_value_model(init: str, policy_path: str, value_path: str | None, dtype: str) -> ValueModel:
    """Critic initialised from a reward model (backbone + its score head) or from the policy (new zero head)."""
    if init == "reward":
        rm = load_reward_model(value_path, dtype)
        head = getattr(rm, "score", None) or getattr(rm, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"cannot find the linear score head of reward model {value_path} "
                             f"(looked for .score / .classifier); use models.value_init=policy")
        return ValueModel(rm.base_model, head)
    lm = load_causal_lm(policy_path, dtype)
    head = nn.Linear(lm.config.hidden_size, 1, bias=False, dtype=DTYPES[dtype])
    nn.init.zeros_(head.weight)
    return ValueModel(lm.base_model, head)


def check_same_tokenizer(policy_path: str, other_path: str, role: str) -> None:
    """The critic and the reference read the policy's token ids, so they need the policy's vocabulary
    (the reward model does not: it re-tokenizes text)."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(policy_path), AutoTokenizer.from_pretrained(other_path)
    if a.get_vocab() != b.get_vocab():
        raise ValueError(f"{role} {other_path} uses a different tokenizer than the policy {policy_path}; "
                         f"it reads the policy's token ids, so it needs the same vocabulary")
