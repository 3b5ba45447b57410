"""The planner's inputs (issue 27): lengths as means and caps, causal attention, packed learner tokens, MoE models,
GPUs described on the command line, host memory (given, and at load), and the model's context.

Fast: pure functions and plans of hub names from the built-in table; no weights, no Ray, no vLLM.
"""
from __future__ import annotations

import json
import math
import random
import typing
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.planning import PlannerError, format_plan, get_hardware, plan_experiment, resolve_architecture
from rlhf_ray.planning.hardware import GPU_SPEC_FIELDS, GpuSpecError, parse_gpu_spec
from rlhf_ray.planning.lengths import DISTRIBUTIONS, ResponseLengths, lengths_of
from rlhf_ray.planning.models import from_hf_config, known_architecture

ROOT = Path(__file__).resolve().parent.parent
TULU = ROOT / "configs" / "tulu25_ppo_13b.yaml"
GRPO = ROOT / "configs" / "grpo_smollm2_cpu.yaml"
H100 = get_hardware("h100-80gb")
SPEC = ("name=my-gpu,memory_gib=139.8,bf16_tflops=989,fp32_tflops=67,hbm_tbps=4.8,nvlink_gbps=450,pcie_gbps=55,"
        "nics=8,nic_gbit=400,devices_per_node=8,host_memory_gib=1536")


def tulu(*overrides: str):
    return load_config(TULU, list(overrides))


def long_reasoning(*overrides: str):
    """GRPO on Qwen2.5-7B, 64 prompts × 8 samples, prompts ≤ 1k and responses ≤ 16k tokens, on 9 H100s."""
    return load_config(GRPO, [
        "models.policy=Qwen/Qwen2.5-7B-Instruct", "models.dtype=bfloat16", "data.max_prompt_tokens=1024",
        "generation.max_new_tokens=16384", "generation.n_samples_per_prompt=8", "ppo.rollout_batch_size=64",
        "ppo.total_episodes=640", "ppo.mini_batch_size=128", "ppo.micro_batch_size=1", "deepspeed.precision=bf16",
        "deepspeed.zero_stage=3", "deepspeed.gradient_checkpointing=true", "resources.learner.num_actors=4",
        "resources.learner.num_gpus=1", "resources.generation.num_actors=4", "resources.generation.num_gpus=1",
        "resources.reference.num_actors=1", "resources.reference.num_gpus=1", *overrides])


def learner_of(plan):
    return next(r for r in plan.roles if r.role == "learner")


# ------------------------------------------------------------------------------------------------ lengths

def test_the_length_distributions_are_the_configs():
    from rlhf_ray.config.planning import LengthDistribution

    assert set(typing.get_args(LengthDistribution)) == set(DISTRIBUTIONS)


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_a_mean_at_the_cap_is_every_response_at_the_cap(distribution):
    lengths = ResponseLengths(512, 512, distribution)
    assert lengths.longest(64) == 512 and lengths.mean_square() == 512**2 and lengths.capped_share() == 1.0


def test_the_truncated_exponential_matches_sampling():
    """E[min(X, cap)] = mean, E[max of k], E[L²] and the capped share against 40,000 draws."""
    lengths, k = ResponseLengths(2000, 8192), 64
    rate = 1 / 2000
    rng = random.Random(0)
    for _ in range(60):  # λ whose truncated mean is 2000: a few fixed-point steps of (1 − e^(−λ·cap)) / λ = mean
        rate = (1 - math.exp(-rate * 8192)) / 2000
    draws = [min(rng.expovariate(rate), 8192) for _ in range(40_000)]
    assert sum(draws) / len(draws) == pytest.approx(2000, rel=0.02)
    assert sum(d * d for d in draws) / len(draws) == pytest.approx(lengths.mean_square(), rel=0.04)
    assert sum(d >= 8192 for d in draws) / len(draws) == pytest.approx(lengths.capped_share(), abs=0.005)
    longest = [max(draws[i:i + k]) for i in range(0, len(draws), k)]
    assert sum(longest) / len(longest) == pytest.approx(lengths.longest(k), rel=0.03)
    assert 2000 < lengths.longest(k) < 8192


def test_planning_lengths_are_config_keys_with_caps_as_defaults():
    cfg = tulu()
    lengths = lengths_of(cfg)
    assert (lengths.prompt_mean, lengths.response.mean) == (cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens)
    with pytest.raises(ConfigError, match="planning.response_tokens_mean: 2000 is above generation.max_new_tokens"):
        tulu("planning.response_tokens_mean=2000")
    with pytest.raises(ConfigError, match="planning.response_length_distribution"):
        tulu("planning.response_length_distribution=zipf")


def test_compute_follows_the_mean_memory_and_kv_room_the_caps():
    caps = plan_experiment(tulu(), H100, gpus=16, nodes=2, search=False)
    means = plan_experiment(tulu("planning.prompt_tokens_mean=256", "planning.response_tokens_mean=256"), H100,
                            gpus=16, nodes=2, search=False)
    # memory: the largest micro-batch and a sequence's KV cache are sized at the caps, whatever the means
    assert learner_of(means).device_bytes == learner_of(caps).device_bytes
    assert means.kv["sequences_that_fit"] == caps.kv["sequences_that_fit"]
    # compute: a quarter of the tokens (packed), and a smaller share of attention
    ratio = means.phases["learn"].parts["compute"] / caps.phases["learn"].parts["compute"]
    assert 0.2 < ratio < 0.25
    assert means.phases["score"].parts["reference"] < 0.3 * caps.phases["score"].parts["reference"]
    assert "256 tokens on average" in "\n".join(format_plan(means))


def test_long_reasoning_is_no_longer_planned_at_its_cap():
    """Mean 2,000 of a 16,384-token cap: the caps-only plan decodes and trains ~8× the tokens; the mean-aware plan
    decodes until the longest response of each batch (far past the mean, short of the cap) and trains on the mean."""
    caps = plan_experiment(long_reasoning(), H100, gpus=9, search=False)
    means = plan_experiment(long_reasoning("planning.response_tokens_mean=2000", "planning.prompt_tokens_mean=300"),
                            H100, gpus=9, search=False)
    assert caps.fits and means.fits
    assert caps.step_seconds > 5 * means.step_seconds
    generate = means.phases["generate"]
    steps, in_flight = generate.parts["decode_steps"], generate.parts["sequences_in_flight"]
    assert in_flight == 128                      # 512 sequences over 4 engines, all in flight at their mean footprint
    assert 4 * 2000 < steps < 16384              # the longest of 128: ~2000·H(128) ≈ 10.8k steps
    assert means.phases["learn"].parts["compute"] < caps.phases["learn"].parts["compute"] / 6
    # the tail costs: the same mean with no spread decodes in 2,000 steps
    fixed = plan_experiment(long_reasoning("planning.response_tokens_mean=2000", "planning.prompt_tokens_mean=300",
                                           "planning.response_length_distribution=fixed"), H100, gpus=9, search=False)
    assert fixed.phases["generate"].parts["decode_steps"] == 2000
    assert fixed.phases["generate"].seconds < 0.5 * generate.seconds


def test_continuous_batching_runs_the_queue_then_the_tail():
    from rlhf_ray.planning.timing import decode_steps

    fixed = ResponseLengths(100, 400, "fixed")
    assert decode_steps(fixed, 256, 64) == 400   # four waves of 100
    exponential = ResponseLengths(100, 4000)
    assert decode_steps(exponential, 64, 64) == pytest.approx(exponential.longest(64))
    assert decode_steps(exponential, 640, 64) == pytest.approx(1000 + exponential.longest(64) - 100)


# ------------------------------------------------------------------------------------------------ FLOPs

def test_attention_over_a_whole_sequence_is_causal():
    arch = resolve_architecture("meta-llama/Llama-2-7b-hf")
    s = 4096
    attention = arch.forward_flops("lm", s, s * (s + 1) / 2) - 2 * arch.matmul_params("lm") * s
    megatron = 4 * arch.layers * s * s * arch.heads * arch.head_dim   # every query against every key
    assert attention == pytest.approx(megatron / 2, rel=1e-3)
    # a decode step attends over its whole context
    assert arch.forward_flops_per_token("lm", s) - 2 * arch.matmul_params("lm") == 4 * arch.layers * s * 4096


def test_the_learner_packs_real_tokens_and_pads_otherwise():
    from rlhf_ray.planning.timing import learner_micro_steps, learner_shape

    means = ("planning.prompt_tokens_mean=512", "planning.response_tokens_mean=256")
    packed, padded = tulu(*means), tulu(*means, "deepspeed.padding_free=false")
    assert learner_shape(packed, lengths_of(packed))[0] == 768
    # padded: the rollout's prompts to their cap, its responses to the longest of its 64 (exponential, cap 1024)
    tokens = learner_shape(padded, lengths_of(padded))[0]
    assert tokens == pytest.approx(1024 + lengths_of(padded).response.longest(64)) and tokens > 1024 + 800
    at_caps = tulu()
    assert learner_shape(at_caps, lengths_of(at_caps))[0] == 2048
    learn = lambda cfg: plan_experiment(cfg, H100, gpus=16, nodes=2, search=False).phases["learn"]  # noqa: E731
    assert learn(padded).parts["compute"] > 2 * learn(packed).parts["compute"]
    # micro-batches by tokens: fewer forward/backward passes, so fewer ZeRO-3 gathers
    budget = tulu(*means, "deepspeed.micro_batch_tokens=4096")
    assert learner_micro_steps(budget, lengths_of(budget)) < learner_micro_steps(packed, lengths_of(packed))


def test_logits_are_held_a_chunk_at_a_time():
    from rlhf_ray.models.forward import AUTO_CHUNK_LOGITS
    from rlhf_ray.planning.memory import AUTO_CHUNK_LOGITS as PLANNED

    assert PLANNED == AUTO_CHUNK_LOGITS
    logits = lambda cfg: next(i.bytes for i in learner_of(plan_experiment(cfg, H100, gpus=16, nodes=2,  # noqa: E731
                                                                          search=False)).items if "logits" in i.what)
    assert logits(tulu()) == pytest.approx(2 * 4 * AUTO_CHUNK_LOGITS, rel=0.01)     # 64 MiB of fp32 logits, twice
    assert logits(tulu("deepspeed.logits_chunk_tokens=0")) == 2 * 2048 * 32000 * 4  # a whole micro-batch


# ------------------------------------------------------------------------------------------------ MoE

def qwen3_30b_a3b_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=40960,
                          tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


def test_a_qwen3_moe_config_json_plans_as_30_5b_total_3_3b_active(tmp_path):
    qwen3_30b_a3b_config().save_pretrained(tmp_path)
    arch = resolve_architecture(str(tmp_path))
    assert arch.is_moe and (arch.experts, arch.experts_per_token, arch.moe_layers) == (128, 8, 48)
    assert arch.parameters("lm") == pytest.approx(30.5e9, rel=0.01)          # Qwen's model card: 30.5B in total
    assert arch.active_parameters("lm") == pytest.approx(3.3e9, rel=0.03)    # and 3.3B activated
    assert arch.max_positions == 40960
    table = known_architecture("Qwen/Qwen3-30B-A3B")
    assert table.parameters("lm") == arch.parameters("lm") and table.active_parameters("lm") == arch.active_parameters("lm")


def test_moe_memory_holds_every_expert_and_compute_runs_the_active_ones():
    moe = resolve_architecture("Qwen/Qwen3-30B-A3B")
    cfg = long_reasoning("models.policy=Qwen/Qwen3-30B-A3B", "generation.max_new_tokens=1024",
                         "resources.learner.num_actors=8")
    plan = plan_experiment(cfg, H100, gpus=13, nodes=2, search=False)
    states = sum(i.bytes for i in learner_of(plan).items if i.what.startswith("policy ") and "activations" not in i.what
                 and "frozen" not in i.what)
    world = cfg.resources.learner.num_actors
    assert states == pytest.approx(16 * moe.parameters("lm") / world)        # ZeRO-3: 16 B per parameter, all experts
    tokens = plan.phases["learn"].parts["compute"] * 0.30 * H100.peak_flops_16bit   # FLOPs the phase runs
    dense_equivalent = 8 * moe.matmul_params("lm") * cfg.rollout_sequences / world * (1024 + 1024)
    assert tokens == pytest.approx(dense_equivalent, rel=0.25)               # 8·N_active per token, plus attention
    assert moe.matmul_params("lm") < 0.12 * moe.parameters("lm")
    # decoding one sequence reads 8 of 128 experts a layer; a batch of 64 touches nearly all of them
    expert = 3 * moe.hidden * moe.expert_intermediate
    assert moe.parameters("lm") - moe.decode_read_params("lm", 1) == pytest.approx(48 * 120 * expert)
    assert moe.decode_read_params("lm", 64) > 0.95 * moe.parameters("lm")


def test_mixtral_and_qwen2_moe_configs():
    from transformers import MixtralConfig, Qwen2MoeConfig

    mixtral = from_hf_config(MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                           num_local_experts=8, num_experts_per_tok=2), "mixtral", "test")
    assert mixtral.parameters("lm") == pytest.approx(46.7e9, rel=0.01)     # Mistral's Mixtral 8x7B: 46.7B total
    assert mixtral.active_parameters("lm") == pytest.approx(12.9e9, rel=0.01)   # 12.9B per token
    # Qwen1.5-MoE-A2.7B (transformers' defaults): 60 experts, 4 per token, a gated shared expert; 14.3B / 2.7B
    qwen = from_hf_config(Qwen2MoeConfig(), "qwen2-moe", "test")
    assert qwen.shared_intermediate == 5632 and qwen.shared_expert_gate
    assert qwen.parameters("lm") == pytest.approx(14.3e9, rel=0.01)
    assert qwen.active_parameters("lm") == pytest.approx(2.7e9, rel=0.01)
    sparse = from_hf_config(Qwen2MoeConfig(decoder_sparse_step=2, mlp_only_layers=[1]), "every-other", "test")
    assert sparse.moe_layers == 11   # layers 1, 3, …, 23 (transformers: (i + 1) % step == 0), less layer 1


def test_deepseek_style_layers_and_unknown_moe_fields():
    from transformers import Glm4MoeConfig, LlamaConfig

    glm = from_hf_config(Glm4MoeConfig(num_hidden_layers=8, first_k_dense_replace=2, n_shared_experts=1,
                                       moe_intermediate_size=1408, n_routed_experts=16, num_experts_per_tok=4),
                         "glm", "test")
    assert (glm.moe_layers, glm.shared_intermediate, glm.experts) == (6, 1408, 16)
    refused = LlamaConfig(num_hidden_layers=2)
    refused.moe_num_experts = 8   # Ernie's spelling: not read, so refused by name rather than planned as dense
    with pytest.raises(PlannerError, match="config field moe_num_experts looks like a mixture of experts"):
        from_hf_config(refused, "ernie-like", "test")
    mla = LlamaConfig(num_hidden_layers=2)
    mla.kv_lora_rank = 512
    with pytest.raises(PlannerError, match="kv_lora_rank"):
        from_hf_config(mla, "deepseek-like", "test")


@pytest.mark.parametrize("hub_id,total,non_embedding", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.49e9, 0.36e9), ("Qwen/Qwen2.5-1.5B", 1.54e9, 1.31e9),
    ("Qwen/Qwen2.5-3B", 3.09e9, 2.77e9), ("Qwen/Qwen2.5-7B-Instruct", 7.61e9, 6.53e9),
    ("Qwen/Qwen2.5-14B", 14.7e9, 13.1e9), ("Qwen/Qwen2.5-32B", 32.5e9, 31.0e9), ("Qwen/Qwen2.5-72B", 72.7e9, 70.0e9),
    ("Qwen/Qwen3-0.6B", 0.6e9, 0.44e9), ("Qwen/Qwen3-1.7B", 1.7e9, 1.4e9), ("Qwen/Qwen3-4B", 4.0e9, 3.6e9),
    ("Qwen/Qwen3-8B", 8.2e9, 6.95e9), ("Qwen/Qwen3-14B", 14.8e9, 13.2e9), ("Qwen/Qwen3-32B", 32.8e9, 31.2e9),
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9, 6.98e9), ("meta-llama/Llama-3.1-70B", 70.6e9, 68.5e9),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7e9, 46.4e9)])
def test_the_table_matches_published_parameter_counts(hub_id, total, non_embedding):
    """Totals and non-embedding counts from the models' cards (Qwen2.5 / Qwen3: "Number of Parameters" and "(Non-
    Embedding)"; Llama 3.1: 8.03B / 70.6B; Mixtral: 46.7B)."""
    arch = known_architecture(hub_id)
    assert arch.parameters("lm") == pytest.approx(total, rel=0.02)
    assert arch.body_params == pytest.approx(non_embedding, rel=0.02)


# ------------------------------------------------------------------------------------------------ GPUs, hosts

def test_a_gpu_described_on_the_command_line(tmp_path, capsys):
    from rlhf_ray.cli.plan import main

    gpu = parse_gpu_spec(SPEC)
    assert (gpu.name, gpu.memory_bytes, gpu.peak_flops_16bit) == ("my-gpu", 139.8 * 2**30, 989e12)
    assert (gpu.nics_per_node, gpu.inter_node_bandwidth, gpu.host_memory_bytes) == (8, 50e9, 1536 * 2**30)
    spec_file = tmp_path / "gpu.yaml"
    spec_file.write_text("\n".join(f"{k}: {v}" for k, v in (item.split("=") for item in SPEC.split(","))))
    assert parse_gpu_spec(str(spec_file)) == gpu
    assert main([str(TULU), "--gpus", "16", "--nodes", "2", "--gpu-spec", SPEC]) == 0
    printed = capsys.readouterr().out
    assert "16 × my-gpu" in printed and "host memory per node 1536 GiB: given (--gpu-spec)" in printed


@pytest.mark.parametrize("spec,message", [
    ("memory_gib=80", "missing field(s) bf16_tflops"),
    (SPEC + ",tensor_cores=528", "unknown field 'tensor_cores'"),
    (SPEC.replace("hbm_tbps=4.8", "hbm_tbps=fast"), "field 'hbm_tbps' must be a number"),
    (SPEC.replace("nics=8", "nics=2.5"), "field 'nics' must be a whole number"),
])
def test_a_bad_gpu_spec_is_one_line_naming_the_field(spec, message, capsys):
    from rlhf_ray.cli.plan import main

    with pytest.raises(GpuSpecError, match=re_escape(message)):
        parse_gpu_spec(spec)
    assert main([str(TULU), "--gpu-spec", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu-spec: ") and message in err[0]


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_gpu_without_nvlink_talks_over_pcie():
    gpu = parse_gpu_spec(SPEC.replace("nvlink_gbps=450", "nvlink_gbps=none"))
    assert gpu.intra_node_bandwidth == gpu.host_link_bandwidth == 55e9 and not gpu.has_nvlink
    l40s = get_hardware("l40s-48gb")
    assert not l40s.has_nvlink and "no NVLink" in l40s.describe()
    assert set(GPU_SPEC_FIELDS) >= {"bf16_tflops", "fp32_tflops", "memory_gib", "hbm_tbps", "nvlink_gbps",
                                    "pcie_gbps", "nics", "nic_gbit", "devices_per_node", "host_memory_gib"}


@pytest.mark.parametrize("name,bf16_tflops,memory_gib", [("h20-96gb", 148, 95.6), ("l40s-48gb", 362, 44.5),
                                                          ("b200-180gb", 2250, 179.1), ("mi300x-192gb", 1307.4, 191.5)])
def test_the_catalogue_has_more_gpus(name, bf16_tflops, memory_gib):
    gpu = get_hardware(name)
    assert gpu.peak_flops_16bit == bf16_tflops * 1e12 and gpu.memory_bytes == memory_gib * 2**30 and gpu.source
    plan = plan_experiment(tulu(), gpu, gpus=16, nodes=2, search=False)
    assert plan.step_seconds > 0


def test_host_memory_is_an_input_and_loading_is_priced(capsys):
    """OpenRLHF's 70B layout: 8 learner ranks a node each read a 70B policy and a 70B critic in fp32 (560 GB) before
    ZeRO-3 partitions them — 4.5 TB on a node."""
    from rlhf_ray.cli.plan import main

    cfg = tulu("models.policy=meta-llama/Llama-2-70b-hf", "models.reward.model=meta-llama/Llama-2-70b-hf",
               "models.value_model=null", "resources.learner.num_actors=16", "ppo.micro_batch_size=1",
               "resources.reward.num_actors=4", "resources.reference.num_actors=4", "resources.reference.sharded=true")
    plan = plan_experiment(cfg, "a800-80gb", gpus=32, nodes=4, search=False)
    loading = [p for p in plan.problems if p.role == "host" and "loading" in p.message]
    assert loading and "assumed: 1024 GiB" in loading[0].message
    arch = resolve_architecture("meta-llama/Llama-2-70b-hf")
    assert plan.host_load_bytes_per_node[0] == pytest.approx(8 * 4 * (arch.parameters("lm") + arch.parameters("score"))
                                                             + 8 * 0.3 * 2**30)
    code = main([str(TULU), "--gpus", "16", "--gpu", "h100-80gb", "--nodes", "2", "--host-memory-gib", "512"])
    printed = capsys.readouterr().out
    # tulu25: 8 ranks × (13B policy + 13B critic) × 4 B = 0.8 TiB at load: fits the DGX's 2 TiB, not 512 GiB
    assert code == 1 and "loading" in printed and "given (--host-memory-gib)" in printed
    assert main([str(TULU), "--gpus", "16", "--gpu", "h100-80gb", "--nodes", "2", "--host-memory-gib", "1024"]) == 0


# ------------------------------------------------------------------------------------------------ context

def test_the_context_is_checked_against_the_models_maximum():
    over = tulu("models.policy=meta-llama/Llama-2-13b-hf", "models.reference=null", "generation.max_new_tokens=4096")
    plan = plan_experiment(over, H100, gpus=16, nodes=2)   # its fix comes with the others' (search=True)
    problem = next(p for p in plan.problems if p.role == "context")
    assert "1024 + generation.max_new_tokens=4096 = 5120 tokens, over the policy's context of 4096" in problem.message
    assert problem.fix.overrides == ["generation.max_new_tokens=3072"]
    assert plan.recommendation is not None   # the layout search plans past the caps, which are the config's to lower
    fixed = plan_experiment(tulu("models.policy=meta-llama/Llama-2-13b-hf", "models.reference=null",
                                 *problem.fix.overrides), H100, gpus=16, nodes=2, search=False)
    assert not any(p.role == "context" for p in fixed.problems)
    assert not any(p.role == "context" for p in plan_experiment(tulu(), H100, gpus=16, nodes=2,
                                                               search=False).problems)  # Tulu 2: not in the table


def test_the_trainers_preflight_checks_the_context(tmp_path):
    from transformers import LlamaConfig

    from rlhf_ray.run.preflight import PreflightError, check_context

    LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=100,
                max_position_embeddings=1024, rope_scaling={"rope_type": "linear", "factor": 2.0}).save_pretrained(tmp_path)
    check_context(tulu("generation.max_new_tokens=1024"), str(tmp_path))   # 2048 within 1024 × 2 (linear RoPE)
    with pytest.raises(PreflightError, match="over the policy's context of 2048 .*max_new_tokens to 1024 or less"):
        check_context(tulu("generation.max_new_tokens=1500"), str(tmp_path))


def test_the_plan_json_carries_the_new_inputs(tmp_path):
    from rlhf_ray.planning import write_plan

    plan = plan_experiment(tulu("planning.response_tokens_mean=300"), parse_gpu_spec(SPEC), gpus=16, nodes=2)
    data = json.loads(write_plan(plan, tmp_path / "plan.json").read_text())
    assert data["hardware"]["host_memory_source"] == "given (--gpu-spec)"
    assert data["host_load_bytes_per_node"] and data["phases"]["generate"]["parts"]["decode_steps"] > 300
