"""PPO: the policy and its critic in one module, trained on rollout batches; with a critic-free advantage estimator
(ppo.advantage: grpo, rloo, …) the policy alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rlhf_ray.algorithms.ppo_math import aggregate_loss, kl_penalty, policy_loss, value_loss
from rlhf_ray.config import PPOConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.models.lora import add_adapters
from rlhf_ray.models.modeling import PolicyAndValue, load_causal_lm, load_value_model
from rlhf_ray.objectives.base import Objective, register


class PPOOptions(BaseModel):
    """What the PPO objective needs beyond the learner's spec (from the experiment config's ppo, models, generation)."""
    model_config = ConfigDict(extra="forbid")

    ppo: PPOConfig
    critic: bool = True                   # a value model (ppo.advantage=gae) or the policy alone
    value_init: str = "policy"            # models.value_init: where the critic starts
    value_model: Optional[str] = None     # the critic's source when value_init='reward' (a local path)
    temperature: float = 1.0              # the sampling temperature the logprobs are taken at
    max_new_tokens: Optional[int] = None  # the response length cap (loss_aggregation=seq_mean_token_sum)


@register("ppo")
class PPOObjective(Objective):
    """Clipped policy loss (× importance weights) + clipped value loss (with a critic) + β·KL (ppo.kl_in=loss)
    − entropy bonus, each aggregated over response tokens as ppo.loss_aggregation says (rlhf_ray.algorithms.ppo_math).
    With ``spec.lora`` the policy is LoRA adapters on its frozen weights, and the learner also serves the reference
    (the base, adapters off)."""
    export_name = "policy"
    Options = PPOOptions

    def build(self) -> nn.Module:
        spec = self.spec
        policy = load_causal_lm(spec.model)
        options = spec.forward_options().checked(policy, f"policy {spec.model}")
        if spec.lora is not None:
            policy = add_adapters(policy, spec.lora)
        value = load_value_model(self.options.value_init, spec.model, self.options.value_model, "float32",
                                 spec.forward_options()) if self.options.critic else None
        return PolicyAndValue(policy, value, options)

    def units(self, batch: RolloutBatch) -> torch.Tensor:
        """Response tokens (token_mean), or sequences (the sequence-mean aggregations)."""
        if self.options.ppo.loss_aggregation == "token_mean":
            return batch.response_mask.sum()
        return torch.tensor(float(len(batch)))

    def loss(self, module, micro: RolloutBatch, num_units: float, fresh: bool = False):
        """``fresh`` (the first mini-batch of an update): these logprobs are the policy's before the update, so
        their gap to the sampler's is the weight-sync check — also when the sampler's serve as old logprobs."""
        ppo, mask, temperature = self.options.ppo, micro.response_mask, self.options.temperature
        aggregate = dict(aggregation=ppo.loss_aggregation, max_tokens=self.options.max_new_tokens)
        # entropy is a metric unless ppo.entropy_coef > 0: without a bonus it is kept out of the gradient
        logprobs, entropy, values = module(micro, temperature=temperature, entropy=True,
                                           entropy_grad=ppo.entropy_coef > 0)
        pg_loss, pg_stats = policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, ppo.clip_range,
                                        num_units, clip_range_high=ppo.clip_range_high, is_weights=micro.is_weights,
                                        **aggregate)
        loss, stats = pg_loss, {"loss/policy": pg_loss.item()}
        if values is not None:
            vf_loss, vf_stats = value_loss(values, micro.values, micro.returns, mask, ppo.value_clip_range, num_units,
                                           **aggregate)
            loss = loss + ppo.vf_coef * vf_loss
            stats["loss/value"], pg_stats = vf_loss.item(), {**pg_stats, **vf_stats}
        if ppo.kl_in == "loss" and ppo.kl_coef > 0:
            kl = aggregate_loss(kl_penalty(logprobs, micro.ref_logprobs, ppo.kl_estimator), mask,
                                ppo.loss_aggregation, num_units, self.options.max_new_tokens)
            loss, stats["loss/kl"] = loss + ppo.kl_coef * kl, kl.item()
        entropy = aggregate_loss(entropy, mask, ppo.loss_aggregation, num_units, self.options.max_new_tokens)
        loss = loss - ppo.entropy_coef * entropy
        share = float(self.units(micro)) / max(num_units, 1.0)  # this micro-batch's share of the global mean
        stats.update({"entropy": entropy.item(), **{f"ppo/{key}": float(value) * share for key, value in pg_stats.items()}})
        if fresh and micro.gen_logprobs is not None:
            gap = (logprobs.detach() - micro.gen_logprobs).abs() * mask
            stats.update({"check/sampler_gap_sum": float(gap.sum()), "check/sampler_gap_tokens": float(mask.sum())})
        return loss, stats

    @torch.no_grad()
    def evaluate(self, module, batch: RolloutBatch, logprobs: bool = True, values: bool = True,
                 reference: bool = False, side_by_side: bool = False) -> dict[str, torch.Tensor]:
        """Before the update, each when asked: ``old_logprobs`` (else the sampler's serve), ``values`` (with a critic),
        ``ref_logprobs`` (a LoRA policy's base, its adapters off). Each [B, R], 0 on padding.

        The policy's passes and the critic's share no weights; with ``side_by_side`` the critic's run in a second
        thread meanwhile. The policy's stay in one thread: the reference pass switches the adapters off."""
        net = getattr(module, "module", module)  # the DeepSpeed engine's module
        temperature = self.options.temperature
        policy_passes = {key: fn for key, fn, wanted in (
            ("old_logprobs", lambda micro: net.logprobs(micro, temperature), logprobs),
            ("ref_logprobs", lambda micro: net.reference_logprobs(micro, temperature), reference)) if wanted}
        critic_passes = {"values": net.value} if values and self.options.critic else {}
        micros = batch.chunks(max(1, len(batch) // self.spec.micro_batch_size))

        @torch.no_grad()  # in the thread that runs it: grad mode is per thread
        def run(passes: dict) -> dict[str, torch.Tensor]:
            return {key: (torch.cat([fn(micro) for micro in micros]) * batch.response_mask).cpu()
                    for key, fn in passes.items()}

        if side_by_side and policy_passes and critic_passes:
            with ThreadPoolExecutor(1) as critic_thread:
                critic = critic_thread.submit(run, critic_passes)
                return {**run(policy_passes), **critic.result()}
        return {**run(policy_passes), **run(critic_passes)}

    def exported(self, module: nn.Module) -> nn.Module:
        return module.policy
