"""PPO: the policy and its critic in one module, trained on rollout batches."""
from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.batch import RolloutBatch
from rlhf_ray.models.modeling import PolicyAndValue, load_causal_lm, load_value_model, token_logprobs
from rlhf_ray.objectives import Objective, register
from rlhf_ray.ppo_math import entropy_from_logits, policy_loss, token_aggregate, value_loss


@register("ppo")
class PPOObjective(Objective):
    """Clipped policy loss + clipped value loss − entropy bonus over response tokens (rlhf_ray.ppo_math)."""
    export_name = "policy"

    def build(self) -> nn.Module:
        spec = self.spec
        return PolicyAndValue(load_causal_lm(spec.model),
                              load_value_model(spec.value_init, spec.model, spec.value_model, "float32"))

    def units(self, batch: RolloutBatch) -> torch.Tensor:
        return batch.response_mask.sum()

    def loss(self, module, micro: RolloutBatch, num_units: float, fresh: bool = False):
        """``fresh`` (the first mini-batch of an update): these logprobs are the policy's before the update, so
        their gap to the sampler's is the weight-sync check — also when the sampler's serve as old logprobs."""
        ppo, mask, temperature = self.spec.ppo, micro.response_mask, self.spec.temperature
        logits, values = module(micro)
        logprobs = token_logprobs(logits, micro.response_ids, temperature)
        pg_loss, pg_stats = policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, ppo.clip_range,
                                        num_units)
        vf_loss, vf_stats = value_loss(values, micro.values, micro.returns, mask, ppo.value_clip_range, num_units)
        with torch.set_grad_enabled(ppo.entropy_coef > 0):  # a metric only: keep [B, R, V] out of the graph
            entropy = token_aggregate(entropy_from_logits(logits / temperature), mask, num_units)
        loss = pg_loss + ppo.vf_coef * vf_loss - ppo.entropy_coef * entropy
        share = float(mask.sum()) / max(num_units, 1.0)  # this micro-batch's share of the global token mean
        stats = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(), "entropy": entropy.item(),
                 **{f"ppo/{key}": float(value) * share for key, value in {**pg_stats, **vf_stats}.items()}}
        if fresh and micro.gen_logprobs is not None:
            gap = (logprobs.detach() - micro.gen_logprobs).abs() * mask
            stats.update({"check/sampler_gap_sum": float(gap.sum()), "check/sampler_gap_tokens": float(mask.sum())})
        return loss, stats

    @torch.no_grad()
    def evaluate(self, module, batch: RolloutBatch, logprobs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Old logprobs (None without ``logprobs``: the sampler's serve) and values before the update. ([B, R], [B, R])"""
        net = getattr(module, "module", module)  # the DeepSpeed engine's module: the critic alone, when that is all
        old, values = [], []
        for micro in batch.chunks(max(1, len(batch) // self.spec.micro_batch_size)):
            if logprobs:
                logits, v = module(micro)
                old.append(token_logprobs(logits, micro.response_ids, self.spec.temperature))
                del logits
            else:
                v = net.value(micro)
            values.append(v)
        mask = batch.response_mask
        return ((torch.cat(old) * mask).cpu() if logprobs else None), (torch.cat(values) * mask).cpu()

    def exported(self, module: nn.Module) -> nn.Module:
        return module.policy
