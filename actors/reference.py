"""Reference role: the frozen initial policy; per-token logprobs of the response tokens for the KL.

With ``resources.reference.sharded`` the role's actors hold one model between them (rlhf_ray.models.sharding):
each is one rank of a ZeRO-3 group, built in ``setup`` once the group exists."""
from __future__ import annotations

import torch

from rlhf_ray.actors.role import Role, computes, timed
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.models.forward import ForwardOptions
from rlhf_ray.models.modeling import batched_response_logprobs, load_causal_lm
from rlhf_ray.runtime.devices import device_for, require_cpu_bf16


class ReferenceActor(Role):
    def __init__(self, model_path: str, dtype: str, micro_batch_size: int, temperature: float,
                 num_gpus: float = 0.0, shard: tuple[int, int] | None = None, timeout_s: float = 600.0,
                 forward: dict | None = None, log_file: str | None = None):
        super().__init__(log_file)
        self.device = device_for(num_gpus)
        self.model_path, self.dtype, self.num_gpus = model_path, dtype, num_gpus
        self.micro_batch_size, self.temperature = micro_batch_size, temperature
        self.shard, self.timeout_s = shard, timeout_s
        self.options = ForwardOptions(**(forward or {}))
        if self.device == "cpu" and dtype == "bfloat16":
            require_cpu_bf16("the reference", "models.dtype")
        if shard is None:
            self.model = load_causal_lm(model_path, dtype, num_gpus).eval()
            if num_gpus <= 1:
                self.model.to(self.device)
            self.options = self.options.checked(self.model, f"reference {model_path}")

    @timed
    def setup(self, master_addr: str, master_port: int) -> None:
        """Sharded: join the group and load this rank's partition of the model (every rank together)."""
        from rlhf_ray.models.sharding import load_sharded

        rank, world = self.shard
        self.join_process_group(master_addr, master_port, rank, world, self.timeout_s, self.device)
        self.model = load_sharded(lambda: load_causal_lm(self.model_path, self.dtype), self.dtype)
        self.options = self.options.checked(self.model, f"reference {self.model_path}")  # every rank: collectives

    @computes("score")
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """log π_ref(token) for every response token, 0 on padding. [B, R] float32"""
        from rlhf_ray.models.sharding import release_gathered

        out = batched_response_logprobs(self.model, batch.to(self.device), self.micro_batch_size,
                                        self.temperature, self.options).cpu()
        release_gathered(self.model)
        return out

    def resident_parameter_bytes(self) -> int:
        from rlhf_ray.models.sharding import resident_parameter_bytes

        return resident_parameter_bytes(self.model)

    def shutdown(self) -> None:
        self.leave_process_group()
