"""The policy as LoRA adapters on frozen weights (PEFT), and the three forms it leaves the learner in:

    adapter_tensors   the adapters alone, named as PEFT saves them (what the engines load as a vLLM LoRA adapter)
    merged_tensors    W + (alpha / r) · B A for every adapted layer, named as the plain model's parameters
                      (saved models; the engines' weights under a full-weight transport)
    adapter_config    PEFT's adapter_config.json contents, for whoever writes the adapter next to its tensors

The base weights are never changed in place: PEFT's merge/unmerge would round them (W + d − d ≠ W in floats), and
the base with its adapters off is the run's reference policy.
"""
from __future__ import annotations

import json
from typing import Iterator

import torch
from torch import nn

ADAPTER = "default"  # PEFT's name for a model's one adapter


def add_adapters(model: nn.Module, lora, key: str = "models.lora") -> nn.Module:
    """``model`` (a causal LM) with LoRA adapters from ``lora`` (rlhf_ray.config.LoRAConfig, at ``key`` in the run's
    config); only they train. B starts at zero, so the adapted model starts equal to ``model``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # PEFT names no layer for target_modules that match nothing
        raise ValueError(f"{key}.target_modules={lora.target_modules!r} on {type(model).__name__}: {err}") from None


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model to run forwards on: a PEFT model's adapted base (its adapters in place), else itself."""
    return model.get_base_model() if is_adapted(model) else model


def adapter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every adapter weight, named as in PEFT's adapter_model.safetensors."""
    from peft import get_peft_model_state_dict

    yield from get_peft_model_state_dict(model, adapter_name=ADAPTER).items()


def adapter_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(tensor.shape)) for name, tensor in adapter_tensors(model)]


def adapter_config(model: nn.Module) -> dict:
    """The adapter's config as PEFT writes adapter_config.json (sets as sorted lists)."""
    config = model.peft_config[ADAPTER].to_dict()
    return json.loads(json.dumps(config, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def _plain_name(name: str) -> str:
    """A parameter's name in the model without adapters (``….q_proj.base_layer.weight`` -> ``….q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


def merged_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(_plain_name(name), tuple(p.shape)) for name, p in causal_lm(model).named_parameters() if "lora_" not in name]


@torch.no_grad()
def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the plain model's parameters with every adapter merged in: W + scale · B A (PEFT's own
    delta), computed one layer at a time into new tensors."""
    from peft.tuners.lora import LoraLayer

    base = causal_lm(model)
    owners = {f"{module_name}.base_layer.weight": module for module_name, module in base.named_modules()
              if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        owner = owners.get(name)
        if owner is None:
            yield _plain_name(name), param.detach()
        else:
            yield _plain_name(name), param.detach() + owner.get_delta_weight(ADAPTER).to(param.dtype)
