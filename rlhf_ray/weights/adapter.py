"""``weights.transport: adapter`` — a LoRA policy's adapters through the object store; each engine writes them as a
PEFT adapter directory (in /dev/shm where it has room) and vLLM loads it as a new LoRA adapter, which the engine
samples with from then on (``lora_request``). The old adapter is dropped: each update gets a new adapter id, so no
cached KV block of the old one is reused."""
from __future__ import annotations

import os
import shutil

from rlhf_ray.weights.files import weight_dir
from rlhf_ray.weights.object_store import put_buckets
from rlhf_ray.weights.transport import Transport

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


class AdapterTransport(Transport):
    name = "adapter"
    adapter = True

    def __init__(self):
        self.request = None  # the vLLM LoRARequest of the adapter loaded last (None: the base model)

    def publish(self, buckets, tensors, group=None, config=None):
        if config is None:
            raise ValueError("weights.transport=adapter sends a LoRA adapter: its config is missing")
        return {"buckets": put_buckets(buckets, tensors), "config": config}

    def load(self, llm, payload, timeout_s):
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from rlhf_ray.weights.object_store import read_buckets

        tensors = {name: tensor.contiguous() for name, tensor in read_buckets(payload["buckets"], timeout_s)}
        if not hasattr(self, "directory"):
            self.directory = weight_dir(sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, os.path.join(self.directory, "adapter_model.safetensors"))
        with open(os.path.join(self.directory, "adapter_config.json"), "w") as f:
            json.dump(payload["config"], f)
        engine, version = llm.llm_engine, (self.request.lora_int_id + 1 if self.request is not None else 1)
        request = LoRARequest(lora_name=f"policy-{version}", lora_int_id=version, lora_path=self.directory)
        if not engine.add_lora(request):  # vLLM reads the files now: they may be overwritten by the next update
            raise RuntimeError(f"vLLM did not load the policy's LoRA adapter from {self.directory}")
        if self.request is not None:
            engine.remove_lora(self.request.lora_int_id)
        self.request = request
        return {"received": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "loaded": len(tensors), "reprocessed": [], "adapter": request.lora_name}

    def close(self):
        if hasattr(self, "directory"):
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def lora_request(self):
        return self.request

    @classmethod
    def engine_options(cls, lora_rank):
        """vLLM's LoRA settings: one adapter at a time, of up to ``lora_rank`` rounded up to a rank vLLM allows."""
        if lora_rank is None or lora_rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"weights.transport=adapter needs a LoRA rank of at most {VLLM_LORA_RANKS[-1]} (vLLM's "
                             f"largest); got {lora_rank}")
        return {"enable_lora": True, "max_loras": 1, "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= lora_rank)}

    @classmethod
    def refuses(cls, cfg):
        return None if cfg.models.lora is not None else "'adapter' sends LoRA adapters: it needs models.lora"

    @classmethod
    def payload_parameters(cls, policy, cfg):
        return policy.lora_params(cfg.models.lora.rank)
