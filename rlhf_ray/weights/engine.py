"""Loading new policy weights into a vLLM engine, exactly, whatever the architecture.

The learner publishes its parameters under their HF names (``model.layers.0.self_attn.q_proj.weight``
…); the engine's own ``load_weights`` maps them onto its fused / renamed layout (``qkv_proj``,
``gate_up_proj``). ``load_into_engine`` runs inside every vLLM worker (through ``collective_rpc``) and
adds what vLLM's in-place reload leaves to chance:

- a parameter the engine expects and did not receive is an error naming it (vLLM only logs a warning
  and keeps the old values);
- layers that share a parameter with another layer (tied input/output embeddings: SmolLM2, Llama-3.2
  1B/3B, small Qwen2.5, Gemma) are re-processed after the reload. vLLM's layer-wise reload processes a
  shared tensor only through its first owner, and on CPU ``process_weights_after_loading`` packs each
  GEMM weight into a kernel-private copy, so without this the output head keeps sampling from the
  initial weights while the embedding moves on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

# vLLM warns "<Layer>: Failed to load weights" for every layer that got no tensor in a reload: the tied
# output head (re-processed below) and buffer-only layers such as rotary tables. The checks here
# replace that warning, so it is silenced while they run.
_VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class WeightSyncError(RuntimeError):
    """The engine did not receive (or could not take) every weight of the policy."""


def load_into_engine(worker, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
                     directory: str | None = None) -> dict:
    """Reload the engine's weights in place from ``weights`` (HF names) or the safetensors files in
    ``directory``; runs in a vLLM worker (``llm.collective_rpc(load_into_engine, kwargs=…)``).

    Returns ``{"received": n tensors, "bytes": their bytes, "loaded": n engine parameters, "reprocessed": [layer
    names]}``.
    """
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.get_model()
    expected = {name for name, _ in model.named_parameters()}  # shared tensors appear once
    counted = _Counted(weights if weights is not None else _read_files(directory))
    vllm_log = logging.getLogger(_VLLM_RELOAD_LOGGER)
    level = vllm_log.level
    vllm_log.setLevel(logging.ERROR)
    try:
        initialize_layerwise_reload(model)
        loaded = set(model.load_weights(counted))
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
    finally:
        vllm_log.setLevel(level)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightSyncError(f"the engine expected {len(missing)} weight(s) that the update did not contain: "
                              f"{shown} (received {counted.n} tensors); the engine would sample from stale weights")
    return {"received": counted.n, "bytes": counted.bytes, "loaded": len(loaded),
            "reprocessed": reprocess_shared_layers(model)}


def reprocess_shared_layers(model: torch.nn.Module) -> list[str]:
    """Re-run ``process_weights_after_loading`` on every layer whose parameter another layer shares.

    The shared tensor itself already holds the new values (its first owner loaded it); what is stale is
    anything a layer derived from it after loading, such as a CPU GEMM's packed copy.
    """
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for layer_name, layer in model.named_modules():
        for param in layer.parameters(recurse=False):
            if param.numel() > 0:  # processed linear layers keep an empty placeholder on CPU
                owners.setdefault(param.data_ptr(), []).append((layer_name, layer))
    done: dict[str, torch.nn.Module] = {}
    for sharing in owners.values():
        if len(sharing) > 1:
            done.update((name, layer) for name, layer in sharing if getattr(layer, "quant_method", None) is not None)
    for layer in done.values():
        layer.quant_method.process_weights_after_loading(layer)
    return sorted(done)


class _Counted:
    """Iterates ``(name, tensor)`` pairs and counts them and their bytes."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]):
        self.pairs, self.n, self.bytes = pairs, 0, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for pair in self.pairs:
            self.n += 1
            self.bytes += pair[1].numel() * pair[1].element_size()
            yield pair


def _read_files(directory: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors")) if directory else []
    if not files:
        raise WeightSyncError(f"no safetensors weight files in {directory!r}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
