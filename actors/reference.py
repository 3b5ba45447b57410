"""Reference role: the frozen initial policy; per-token logprobs of the response tokens for the KL."""
from __future__ import annotations

import torch

from actors.common import Role, computes, device_for
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.models.modeling import batched_response_logprobs, load_causal_lm


class ReferenceActor(Role):
    def __init__(self, model_path: str, dtype: str, micro_batch_size: int, temperature: float,
                 num_gpus: float = 0.0, log_file: str | None = None):
        super().__init__(log_file)
        self.device = device_for(num_gpus)
        self.model = load_causal_lm(model_path, dtype, num_gpus).eval()
        if num_gpus <= 1:
            self.model.to(self.device)
        self.micro_batch_size, self.temperature = micro_batch_size, temperature

    @computes("score")
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """log π_ref(token) for every response token, 0 on padding. [B, R] float32"""
        return batched_response_logprobs(self.model, batch.to(self.device), self.micro_batch_size,
                                         self.temperature).cpu()
