"""LoRA's pieces without Ray: merged weights equal PEFT's merge, adapters named as PEFT saves them, only adapters get
gradients, the reference is the base with the adapters off, and the config's choices (rlhf_ray.models.lora)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from rlhf_ray.config import LoRAConfig, load_config
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.models import lora
from rlhf_ray.models.modeling import PolicyAndValue
from rlhf_ray.weights import transport_class
from tests.conftest import ROOT, tiny_config


@pytest.fixture(params=["policy", "policy-tied"])
def adapted(request, tiny_cache):
    """A tiny policy with rank-4 adapters whose B is no longer zero (as after some training)."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.tiny import resolve_tiny

    path = resolve_tiny(request.param, tiny_cache)
    return path, trained_adapters(AutoModelForCausalLM.from_pretrained(path), seed=0)


def trained_adapters(model, seed: int):
    """``model`` with rank-4 adapters whose B is random (seeded), as after some training: no longer the base."""
    return as_if_trained(lora.add_adapters(model, LoRAConfig(rank=4)), seed)


def as_if_trained(model, seed: int):
    """``model``'s adapters with a random (seeded) B, as after some training, instead of PEFT's zeros."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def rows(count: int = 3) -> RolloutBatch:
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, 200, (4 + i,), generator=generator).tolist() for i in range(count)]
    responses = [torch.randint(6, 200, (3 + 2 * i,), generator=generator).tolist() for i in range(count)]
    return RolloutBatch.from_samples(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * count,
                                     [[]] * count, [""] * count, [""] * count, pad_token_id=0)


def test_merged_weights_are_pefts_merge_under_the_plain_models_names(adapted):
    _, model = adapted
    merged = dict(lora.merged_tensors(model))
    reference = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert list(merged) == list(reference) and [(n, tuple(t.shape)) for n, t in merged.items()] == lora.merged_shapes(model)
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    assert any("lora_" in name for name, _ in model.named_parameters())  # the model itself is left as it was


def test_adapters_are_named_and_configured_as_peft_saves_them(adapted, tmp_path):
    from safetensors.torch import load_file

    _, model = adapted
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    tensors = dict(lora.adapter_tensors(model))
    assert set(saved) == set(tensors) and all(torch.equal(saved[k], tensors[k]) for k in saved)
    assert [(n, tuple(t.shape)) for n, t in tensors.items()] == lora.adapter_shapes(model)
    config = lora.adapter_config(model)
    assert config["r"] == 4 and config["lora_alpha"] == 32.0 and isinstance(config["target_modules"], list)


def test_only_adapters_get_gradients_and_the_reference_is_the_base(adapted):
    from transformers import AutoModelForCausalLM

    path, model = adapted
    module, batch = PolicyAndValue(model, None), rows()
    logprobs, _, _ = module(batch)
    (-logprobs.sum()).backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert all(not p.requires_grad for name, p in module.named_parameters() if "lora_" not in name)
    base = PolicyAndValue(AutoModelForCausalLM.from_pretrained(path), None)
    with torch.no_grad():
        expected = base(batch)[0]
        assert torch.equal(module.reference_logprobs(batch), expected)  # adapters off: the base, bit for bit
        assert (module(batch)[0] - expected).abs().max() > 1e-3         # adapters on: another policy
    with pytest.raises(RuntimeError, match="only a LoRA policy"):
        base.reference_logprobs(batch)


def test_target_modules_matching_nothing_is_an_error_naming_the_key(tiny_cache):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.tiny import resolve_tiny

    model = AutoModelForCausalLM.from_pretrained(resolve_tiny("policy", tiny_cache))
    with pytest.raises(ValueError, match="models.lora.target_modules"):
        lora.add_adapters(model, LoRAConfig(target_modules=["no_such_proj"]))


def test_lora_sends_merged_weights_unless_asked_for_the_adapter_and_vllm_rank(tmp_path, tiny_cache):
    # merged weights by default: vLLM's CPU LoRA kernels cost more generation time than a full-weight sync
    assert tiny_config(tmp_path, tiny_cache, "models.lora.rank=12").weight_transport()[0] == "object_store"
    assert tiny_config(tmp_path, tiny_cache, "models.lora.rank=12", "weights.transport=adapter"
                       ).weight_transport()[0] == "adapter"
    assert load_config(ROOT / "configs" / "tiny_cpu.yaml", []).weight_transport()[0] == "object_store"

    def lora_options(rank, transport):  # the engine's vLLM options a transport asks for
        return transport_class(transport).engine_options(rank)

    assert lora_options(12, "adapter") == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 16}
    assert lora_options(8, "adapter")["max_lora_rank"] == 8 and lora_options(8, "object_store") == {}
    with pytest.raises(ValueError, match="at most 512"):
        lora_options(1024, "adapter")


@pytest.mark.parametrize("name", ["llama-tied", "qwen3-tied", "phi3", "gemma-tied", "gpt2", "gemma2"])
def test_every_architecture_merges_exactly_and_its_packed_adapted_forward_is_the_merged_model(name, tiny_tokenizer):
    """Fused projections (Phi-3), q/k norms (Qwen3), GPT-2's transposed Conv1D layers, a soft-capped head (Gemma 2)."""
    from tests.test_forward import FAST, model_named, rollout

    base = model_named(name, tiny_tokenizer)
    model = trained_adapters(copy.deepcopy(base), seed=1)
    merged = copy.deepcopy(base)
    merged.load_state_dict(dict(lora.merged_tensors(model)), strict=False)
    pefts = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert all(torch.equal(tensor, pefts[n]) for n, tensor in lora.merged_tensors(model))
    batch = rollout([(6, 4), (3, 5), (2, 2)], vocab=len(tiny_tokenizer))
    with torch.no_grad():
        adapted = PolicyAndValue(model, None, FAST)
        torch.testing.assert_close(adapted(batch)[0], PolicyAndValue(merged, None)(batch)[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(adapted.reference_logprobs(batch), PolicyAndValue(base, None)(batch)[0],
                                   atol=2e-5, rtol=0)


def test_the_critics_scoring_pass_beside_the_policys_gives_what_one_after_the_other_gives(tmp_path, tiny_cache):
    """PPO's scoring before an update (old log-probs, the reference as the base with the adapters off, values) with
    the critic's pass in a second thread (``side_by_side``, on CPU when the learner scores on one thread beside
    other roles): the same tensors as the passes one after the other, and as the module's own forward."""
    from rlhf_ray.cluster.roles import ModelPaths
    from rlhf_ray.drivers.ppo import ppo_learner
    from rlhf_ray.models.tiny import resolve_tiny
    from rlhf_ray.objectives import make_objective

    policy, reward = resolve_tiny("policy", tiny_cache), resolve_tiny("reward", tiny_cache)
    spec = ppo_learner(tiny_config(tmp_path, tiny_cache, "models.lora.rank=4", "ppo.micro_batch_size=2"),
                       ModelPaths(policy=policy, reference=policy, reward=reward, value=reward))
    objective = make_objective(spec)
    module = objective.build()
    as_if_trained(module.policy, seed=0)
    batch = rows(6)
    together = objective.evaluate(module, batch, reference=True, side_by_side=True)
    apart = objective.evaluate(module, batch, reference=True, side_by_side=False)
    assert set(together) == set(apart) == {"old_logprobs", "ref_logprobs", "values"}
    assert all(torch.equal(together[key], apart[key]) for key in apart)
    assert not any(t.requires_grad for t in together.values())  # no graph from the critic's thread either
    with torch.no_grad():  # the module's forward on the same micro-batches (micro_batch_size 2)
        outputs = [module(micro) for micro in batch.chunks(3)]
    logprobs, values = (torch.cat([out[i] for out in outputs]) for i in (0, 2))
    mask = batch.response_mask
    assert torch.equal(together["old_logprobs"], logprobs * mask) and torch.equal(together["values"], values * mask)
    assert (together["old_logprobs"] - together["ref_logprobs"]).abs().max() > 1e-3  # the adapters were on, then off
