"""Direct preference optimisation and its variants (rlhf_ray.algorithms.preference_math.DPO_LOSSES) on the policy alone; the
reference's log-probs come with the batch, computed once per pair by the reference role (rlhf_ray.drivers.dpo)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.algorithms.preference_math import dpo_loss, dpo_needs_reference
from rlhf_ray.config import DPOTrainingConfig
from rlhf_ray.data.batch import ResponsePairBatch
from rlhf_ray.models.lora import add_adapters
from rlhf_ray.models.modeling import PolicyAndValue, load_causal_lm
from rlhf_ray.objectives.base import Objective, register

# implicit rewards this close count as a tie (half right): while the policy is the reference, its margins are
# rounding noise (fp32 sums over a response: ~1e-6), not preferences
TIE = 1e-4


def pair_logps(module: nn.Module, batch: ResponsePairBatch) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each response: [B, 2] (chosen, rejected), one forward pass over both sides
    (``module``: a PolicyAndValue without critic, or the DeepSpeed engine around one)."""
    logprobs, _, _ = module(batch.sides())
    return logprobs.sum(-1).view(len(batch), 2)


def loss_options(dpo) -> dict:
    """The config's options that the chosen variant takes (its keyword parameters name them)."""
    import inspect

    from rlhf_ray.algorithms.preference_math import get_dpo_loss

    accepted = inspect.signature(get_dpo_loss(dpo.loss)).parameters
    offered = {"label_smoothing": dpo.label_smoothing, "gamma": dpo.simpo_gamma}
    return {key: value for key, value in offered.items() if key in accepted}


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dpo: DPOTrainingConfig  # the loss and its options


@register("dpo")
class DPOObjective(Objective):
    """The loss ``options.dpo.loss`` over pairs, a mean over the global mini-batch's pairs."""
    Options = DPOOptions
    export_name = "policy"

    def build(self) -> nn.Module:
        policy = load_causal_lm(self.spec.model)
        options = self.spec.forward_options().checked(policy, f"policy {self.spec.model}")
        return PolicyAndValue(add_adapters(policy, self.spec.lora, key="lora") if self.spec.lora else policy, None,
                              options)

    def units(self, batch: ResponsePairBatch) -> torch.Tensor:
        return torch.tensor(float(len(batch)))

    def loss(self, module, micro: ResponsePairBatch, num_units: float, fresh: bool = False):
        dpo = self.options.dpo
        logps, ref, lengths = pair_logps(module, micro), micro.ref_logps, micro.response_tokens
        if ref is None and dpo_needs_reference(dpo.loss):
            raise ValueError(f"dpo.loss={dpo.loss!r} needs the reference's log-probs, and the batch has none")
        loss, stats = dpo_loss(dpo.loss, logps[:, 0], logps[:, 1], *((ref[:, 0], ref[:, 1]) if ref is not None
                                                                     else (None, None)),
                               lengths[:, 0], lengths[:, 1], beta=dpo.beta, num_units=num_units, tie=TIE,
                               **loss_options(dpo))
        return loss, {"loss/dpo": loss.item(), **{f"dpo/{key}": value for key, value in stats.items()}}

    @torch.no_grad()
    def evaluate(self, module, batch, side_by_side: bool = False, reference: bool = False, logprobs: bool = True,
                 values: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """[B, 2] summed response log-probs of (chosen, rejected) under the current policy (``batch``: pairs).

        ``reference`` (a LoRA policy, whose base with the adapters off is the reference; rlhf_ray.cluster.roles
        asks for it in place of reference actors, with ``logprobs`` and ``values`` off): {"ref_logprobs": [2B, R]}
        of ``batch``, both sides of pairs (ResponsePairBatch.sides()), 0 on padding, as a reference actor gives them."""
        if reference and (logprobs or values):
            raise ValueError("the DPO objective computes the reference's log-probs alone (no old log-probs, no critic)")
        net = getattr(module, "module", module)  # the DeepSpeed engine's module
        if reference:
            size = 2 * self.spec.micro_batch_size
            logprobs = torch.cat([net.reference_logprobs(batch.select(range(i, min(i + size, len(batch)))))
                                  for i in range(0, len(batch), size)])
            return {"ref_logprobs": (logprobs * batch.response_mask).cpu()}
        size = self.spec.micro_batch_size
        return torch.cat([pair_logps(module, batch.select(range(i, min(i + size, len(batch))))).cpu()
                          for i in range(0, len(batch), size)])

    def exported(self, module: nn.Module) -> nn.Module:
        return module.policy
