"""Predicted seconds per PPO step, phase by phase, from FLOPs, bandwidths and stated efficiencies.

    generate     prefill: 2·N·prompt tokens of FLOPs; decode: per token step, the weights (/TP) and the KV
                 cache are read once for all sequences in flight — bandwidth-bound until the batch is large
                 enough to be compute-bound; max(bytes / bandwidth, FLOPs / peak) per step, plus per-step
                 overheads. Responses are assumed to run to generation.max_new_tokens (an upper bound).
    score        reward ‖ reference ‖ the learner's values (and old logprobs): 2·N FLOP per token forward each,
                 concurrently on their own devices (on one CPU machine they share its cores); a sharded frozen
                 model also gathers its weights over the links once per forward batch (ZeRO-3 inference).
    learn        6·N FLOP per token (8·N with gradient checkpointing) for policy and critic, each PPO epoch,
                 plus ZeRO's collectives over NVLink / the inter-node fabric (part of them hidden behind
                 compute) and the optimizer step (on the host with offload).
    weight_sync  the policy in the engines' dtype, gathered on the learner (ZeRO-3), then moved by
                 weights.transport: a broadcast over the fabric, the object store or files.

Every efficiency below is a stated constant with where it comes from. None was fitted to the validation cases:
benchmarks/planner_validation.py reports the errors, what one global factor would change, and the modelling
corrections made after its first run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.memory import DTYPE_BYTES, published_bytes
from rlhf_ray.planning.models import Architecture

# --- share of the dense peak each kind of work reaches --------------------------------------------------------
# Training (forward + backward + optimizer) in RLHF: OpenRLHF's benchmark/README (A800, Llama-2 7B–70B, ZeRO-3)
# reports 52–116 TFLOPS of 312 for its training phase (17–37 %); DESIGN §2b: "RLHF training reaches ~15–37 %".
TRAIN_MFU = 0.30
# No-grad forwards over whole sequences (reward, reference, values, prefill): no backward and no optimizer,
# batched long sequences; inference prefill on A100/H100 commonly reaches 40–60 % MFU. The low end is taken.
FORWARD_MFU = 0.40
# Decoding reads weights + KV cache once per token step; vLLM reaches ~50–70 % of HBM bandwidth there
# (memory-bound kernels at small batch). The middle is taken.
DECODE_BANDWIDTH_EFFICIENCY = 0.6
# A CPU's memory bandwidth is itself a measured copy rate (rlhf_ray.planning.hardware), already what streaming
# code achieves: no further discount.
CPU_DECODE_BANDWIDTH_EFFICIENCY = 1.0
# On a CPU machine the peak is the measured matmul rate, so the efficiencies are shares of that: matmuls are
# 67 % of the learner's CPU time (benchmarks/results/learner_profile_llama-20m.json: aten::mm 0.78 of 1.18 s);
# the rest (element-wise, attention, copies, optimizer) adds time at no FLOPs. Forwards alone: the same share.
CPU_TRAIN_EFFICIENCY = 0.67
CPU_FORWARD_EFFICIENCY = 0.67

# --- communication -----------------------------------------------------------------------------------------
# NCCL collectives reach ~70–80 % of a link's nominal bandwidth as bus bandwidth (nccl-tests on DGX A100/H100).
COLLECTIVE_EFFICIENCY = 0.7
# DeepSpeed prefetches ZeRO-3 gathers and reduces gradient buckets while backward runs: about half of the
# collective time is assumed hidden behind compute (none of it at world size 1, where nothing is sent).
COMM_OVERLAP = 0.5
# Weight sync through Ray's object store: 540 MB in 0.86 s measured on this machine (issue 15: ~0.6 GB/s).
OBJECT_STORE_BYTES_PER_S = 0.63e9
# Ray's object manager pulling an object to another node (TCP, chunked): ~1–2 GB/s per node pair is typical.
# Assumed, not measured.
RAY_OBJECT_TRANSFER_BYTES_PER_S = 1.5e9
# Weight sync through safetensors files in /dev/shm: one writer, engines reading in parallel; single-threaded
# serialisation runs at a few GB/s. Assumed, not measured.
FILE_BYTES_PER_S = 2.0e9
# gloo broadcast between processes of one machine (the CPU 'collective' transport): TCP over loopback,
# assumed ~1 GB/s until benchmarks/weight_sync.py measures it.
GLOO_LOOPBACK_BYTES_PER_S = 1.0e9

# --- fixed costs ---------------------------------------------------------------------------------------------
# A Ray actor call with its batch through the object store: ~ms (DESIGN §2: a 10 MB tensor ~40 ms, small calls
# a few ms). Counted once per phase (the phase's roles are called concurrently) and for publish + load.
ROLE_CALL_OVERHEAD_S = 5e-3
# vLLM's per-token-step cost outside the model: scheduling, sampling, logprobs, detokenising. From
# benchmarks/results/generation.json (tiny model, FLOPs negligible): 16 sequences 1.6 ms/step, 64 sequences
# 4.1 ms/step -> 0.8 ms + 0.05 ms per sequence.
DECODE_STEP_OVERHEAD_S = 0.8e-3
DECODE_SEQUENCE_OVERHEAD_S = 0.05e-3
# The generation actor runs vLLM with enforce_eager=True (no CUDA graphs): each decode step launches every
# layer's ~15 kernels from Python, ~3 µs each -> ~50 µs per layer per step on a GPU.
EAGER_LAUNCH_S_PER_LAYER = 50e-6
# Tensor parallelism all-reduces twice per layer per step; small messages are latency-bound on NVLink.
TP_ALLREDUCE_LATENCY_S = 10e-6
# ZeRO-Offload's CPU Adam: DeepSpeed reports ~1B-parameter updates in well under a second on a 2-socket host;
# 2e9 parameters/s per node is assumed, shared by the node's learner ranks.
CPU_ADAM_PARAMS_PER_S = 2e9
# An Adam step on the device reads weights, gradients, m, v and writes weights, m, v: ~28 bytes per parameter.
ADAM_BYTES_PER_PARAM = 28


@dataclass
class PhaseTime:
    phase: str
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    bound: str = ""
    alternatives: dict[str, float] = field(default_factory=dict)   # the same phase done another way (seconds)


@dataclass
class Placement:
    """What timing needs to know about where things run."""
    learner_crosses_nodes: bool = False
    engines_off_learner_node: bool = False
    reward_crosses_nodes: bool = False
    reference_crosses_nodes: bool = False
    learner_ranks_per_node: int = 1


def _peak(hw: Hardware, dtype: str, kind: str) -> float:
    """Achievable FLOP/s of one device for 'train' or 'forward' work."""
    if hw.is_gpu:
        return hw.peak_flops(dtype) * (TRAIN_MFU if kind == "train" else FORWARD_MFU)
    return hw.peak_flops(dtype) * (CPU_TRAIN_EFFICIENCY if kind == "train" else CPU_FORWARD_EFFICIENCY)


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOP/s"


def collective_seconds(num_bytes: float, hw: Hardware, crosses_nodes: bool) -> float:
    if not hw.is_gpu:
        return num_bytes / GLOO_LOOPBACK_BYTES_PER_S
    return num_bytes / (hw.link_bandwidth(crosses_nodes) * COLLECTIVE_EFFICIENCY)


@dataclass(frozen=True)
class TransferRates:
    """What a transport prices its transfer with (rlhf_ray.weights.Transport.transfer_seconds): the rates above and the
    collective model, handed to it by the planner (the weights package stays below the planner that prices it)."""
    object_store_bytes_per_s: float = OBJECT_STORE_BYTES_PER_S
    ray_object_transfer_bytes_per_s: float = RAY_OBJECT_TRANSFER_BYTES_PER_S
    file_bytes_per_s: float = FILE_BYTES_PER_S

    @staticmethod
    def collective_seconds(num_bytes: float, hw: Hardware, crosses_nodes: bool) -> float:
        return collective_seconds(num_bytes, hw, crosses_nodes)


def lengths(cfg) -> tuple[int, int]:
    """(prompt, response) tokens: the caps, data.max_prompt_tokens and generation.max_new_tokens."""
    return cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens


# ------------------------------------------------------------------------------------------- generate

def generate_time(cfg, arch: Architecture, hw: Hardware, concurrent: int) -> PhaseTime:
    """One engine's share of the rollout (engines run in parallel; on one CPU machine they split its cores)."""
    res = cfg.resources.generation
    prompt, response = lengths(cfg)
    tp, engines, width = res.tensor_parallel_size, res.num_actors, DTYPE_BYTES[cfg.models.dtype]
    share = 1.0 if hw.is_gpu else 1.0 / engines       # CPU engines share the machine's cores and memory
    seqs = cfg.rollout_sequences // engines
    concurrent = max(1, min(concurrent, seqs))
    waves = math.ceil(seqs / concurrent)
    peak = _peak(hw, cfg.models.dtype, "forward") * tp * share
    efficiency = DECODE_BANDWIDTH_EFFICIENCY if hw.is_gpu else CPU_DECODE_BANDWIDTH_EFFICIENCY
    bandwidth = hw.memory_bandwidth * efficiency * tp * share

    # vLLM prefills a prompt once for all of its n_samples_per_prompt samples
    prompts = cfg.ppo.rollout_batch_size / engines
    prefill = prompts * prompt * arch.forward_flops_per_token("lm", prompt) / peak
    mean_context = prompt + response / 2
    weights = arch.parameters("lm") * width
    kv_read = concurrent * mean_context * arch.kv_bytes_per_token(width) * tp / min(tp, arch.kv_heads)
    memory_step = (weights + kv_read) / bandwidth
    compute_step = concurrent * arch.forward_flops_per_token("lm", mean_context) / peak
    overhead_step = DECODE_STEP_OVERHEAD_S + DECODE_SEQUENCE_OVERHEAD_S * concurrent
    if hw.is_gpu:
        overhead_step += arch.layers * (EAGER_LAUNCH_S_PER_LAYER + (2 * TP_ALLREDUCE_LATENCY_S if tp > 1 else 0))
    decode = waves * response * (max(memory_step, compute_step) + overhead_step)
    bound = "memory-bandwidth" if memory_step >= compute_step else "compute"
    return PhaseTime("generate", prefill + decode + ROLE_CALL_OVERHEAD_S,
                     {"prefill": prefill, "decode": decode, "decode_step_s": decode / max(waves * response, 1),
                      "waves": waves, "sequences_in_flight": concurrent},
                     f"decode {bound}-bound, {concurrent} sequences in flight per engine, {waves} wave(s)")


# ---------------------------------------------------------------------------------------------- score

def frozen_forward_time(role: str, cfg, arch: Architecture, hw: Hardware, crosses_nodes: bool) -> float:
    """Reward or reference: one actor's share of the rollout, plus ZeRO-3 inference gathers when sharded."""
    res = getattr(cfg.resources, role)
    prompt, response = lengths(cfg)
    seq = prompt + response
    if role == "reward":
        if cfg.models.reward.kind != "model":
            return ROLE_CALL_OVERHEAD_S  # a function or remote endpoint: its own cost is not modelled
        seq, batch, head = min(seq, cfg.models.reward.max_length), cfg.models.reward.batch_size, "score"
    else:
        batch, head = cfg.ppo.micro_batch_size, "lm"
    seqs = cfg.rollout_sequences / res.num_actors
    flops = seqs * seq * arch.forward_flops_per_token(head, seq)
    # device_map over several GPUs runs one GPU at a time: one GPU's rate whatever num_gpus is
    seconds = flops / _peak(hw, cfg.models.dtype, "forward")
    if res.sharded and res.num_actors > 1:
        weights = arch.parameters(head) * DTYPE_BYTES[cfg.models.dtype]
        forwards = math.ceil(seqs / batch)
        gather = forwards * weights * (res.num_actors - 1) / res.num_actors
        seconds += collective_seconds(gather, hw, crosses_nodes) * (1 - COMM_OVERLAP)
    return seconds + ROLE_CALL_OVERHEAD_S


def values_time(cfg, policy: Architecture, critic: Architecture | None, hw: Hardware, placement: Placement) -> float:
    """The learner's pass before the update: values (critic), old logprobs (policy) unless the sampler's serve, and
    with LoRA the reference's (the policy with its adapters off); ZeRO-3 gathers the weights for every micro-batch."""
    world = cfg.resources.learner.num_actors
    prompt, response = lengths(cfg)
    seq = prompt + response
    with_logprobs = cfg.old_logprobs_source()[0] == "learner"
    seqs = cfg.rollout_sequences / world
    policy_passes = int(with_logprobs) + int(cfg.reference_source()[0] == "learner")
    if critic is None and not policy_passes:  # critic-free, the sampler's logprobs: no such pass
        return 0.0
    per_token = critic.forward_flops_per_token("score", seq) if critic else 0.0
    params = critic.parameters("score") if critic else 0
    if policy_passes:
        per_token += policy_passes * policy.forward_flops_per_token("lm", seq)
        params += policy.parameters("lm")
    seconds = seqs * seq * per_token / _peak(hw, cfg.deepspeed.precision, "forward")
    if cfg.deepspeed.zero_stage == 3 and world > 1:
        micro_batches = math.ceil(seqs / cfg.ppo.micro_batch_size)
        gathered = micro_batches * params * DTYPE_BYTES[cfg.deepspeed.precision] * (world - 1) / world
        seconds += collective_seconds(gathered, hw, placement.learner_crosses_nodes) * (1 - COMM_OVERLAP)
    return seconds + ROLE_CALL_OVERHEAD_S


def score_time(cfg, archs: dict, hw: Hardware, placement: Placement) -> PhaseTime:
    parts = {"reward": frozen_forward_time("reward", cfg, archs["reward"], hw, placement.reward_crosses_nodes)
             if archs.get("reward") else ROLE_CALL_OVERHEAD_S,
             "reference": frozen_forward_time("reference", cfg, archs["reference"], hw,
                                              placement.reference_crosses_nodes)
             if archs.get("reference") else ROLE_CALL_OVERHEAD_S,   # LoRA: in the learner's values pass
             "values": values_time(cfg, archs["policy"], archs.get("critic"), hw, placement)}
    if cfg.reference_source()[0] == "none":  # no reference at all (ppo.kl_coef=0, ppo.reference=auto)
        del parts["reference"]
    if hw.is_gpu:
        slowest = max(parts, key=parts.get)
        return PhaseTime("score", parts[slowest], parts, f"concurrent on their own GPUs; slowest: {slowest}")
    # one machine: they share its cores, so their compute adds up (their call overheads overlap)
    total = sum(parts.values()) - (len(parts) - 1) * ROLE_CALL_OVERHEAD_S
    return PhaseTime("score", total, parts, "concurrent on the same cores: compute adds up")


# ---------------------------------------------------------------------------------------------- learn

def learn_time(cfg, policy: Architecture, critic: Architecture | None, hw: Hardware, placement: Placement) -> PhaseTime:
    ds, world = cfg.deepspeed, cfg.resources.learner.num_actors
    prompt, response = lengths(cfg)
    seq = prompt + response
    epochs = cfg.ppo.epochs
    seqs_per_rank = cfg.rollout_sequences / world
    passes = 4 if ds.gradient_checkpointing else 3      # forward + backward (2×) (+ recomputed forward)
    lora = cfg.models.lora
    policy_passes = passes - 1 if lora else passes      # LoRA: no weight gradients for the frozen base
    per_token = (policy_passes * policy.forward_flops_per_token("lm", seq)
                 + (passes * critic.forward_flops_per_token("score", seq) if critic else 0.0))
    seqs_per_device = seqs_per_rank if hw.is_gpu else cfg.rollout_sequences   # CPU ranks share one machine
    compute = epochs * seqs_per_device * seq * per_token / _peak(hw, ds.precision, "train")

    trained = policy.lora_params(lora.rank) if lora else policy.parameters("lm")
    params = trained + (critic.parameters("score") if critic else 0)
    width = DTYPE_BYTES[ds.precision]
    micro_steps = epochs * math.ceil(seqs_per_rank / cfg.ppo.micro_batch_size)
    optimizer_steps = epochs * (cfg.rollout_sequences // cfg.ppo.mini_batch_size)
    comm = collective_seconds(zero_traffic_bytes(ds, params * width, world, micro_steps, optimizer_steps), hw,
                              placement.learner_crosses_nodes) * (1 - COMM_OVERLAP)
    optimizer = optimizer_seconds(ds, params, world, optimizer_steps, micro_steps, hw, placement)
    return PhaseTime("learn", compute + comm + optimizer + ROLE_CALL_OVERHEAD_S,
                     {"compute": compute, "zero_collectives": comm, "optimizer": optimizer},
                     f"{passes * 2}·N FLOP/token at {_rate(_peak(hw, ds.precision, 'train'))} per device")


def zero_traffic_bytes(ds, weight_bytes: float, world: int, micro_steps: int, optimizer_steps: int) -> float:
    """Bytes each rank moves through ring collectives in one step (each collective moves (world-1)/world of the
    full tensor): ZeRO-0/1 all-reduce (reduce-scatter + all-gather) once per optimizer step; ZeRO-2
    reduce-scatters every micro-batch and all-gathers per optimizer step; ZeRO-3 gathers the weights for
    forward and backward (and the recomputed forward) and reduce-scatters every micro-batch."""
    if world == 1:
        return 0.0
    share = weight_bytes * (world - 1) / world
    if ds.zero_stage <= 1:
        return 2 * share * optimizer_steps
    if ds.zero_stage == 2:
        return share * (micro_steps + optimizer_steps)
    gathers = 3 if ds.gradient_checkpointing else 2
    return share * (gathers + 1) * micro_steps


def optimizer_seconds(ds, params: int, world: int, optimizer_steps: int, micro_steps: int, hw: Hardware,
                      placement: Placement) -> float:
    """Adam on the device (memory-bound), or on the host with offload: CPU Adam shared by the node's ranks, the
    gradients down and the weights back over PCIe; offloaded parameters also stream up for every micro-batch."""
    local = params / (world if ds.zero_stage >= 1 else 1)
    if not ds.offload_optimizer:
        seconds = optimizer_steps * local * ADAM_BYTES_PER_PARAM / hw.memory_bandwidth
    else:
        cpu_adam = local * placement.learner_ranks_per_node / CPU_ADAM_PARAMS_PER_S
        transfers = local * (DTYPE_BYTES[ds.precision] + 2) / hw.host_link_bandwidth
        seconds = optimizer_steps * (cpu_adam + transfers)
    if ds.offload_params:
        gathers = 3 if ds.gradient_checkpointing else 2
        seconds += micro_steps * gathers * local * DTYPE_BYTES[ds.precision] / hw.host_link_bandwidth
    return seconds


# ---------------------------------------------------------------------------------------- weight sync

def weight_sync_time(cfg, policy: Architecture, hw: Hardware, placement: Placement) -> PhaseTime:
    """Rank 0 gathers the policy (ZeRO-3), then weights.transport moves it (rlhf_ray.weights): 'collective'
    broadcasts it over the fabric (pipelined: one transfer's time whatever the number of engines);
    'object_store' puts it once and the engines read it (pulled across nodes by Ray's object manager);
    'files' is the object store plus each engine writing and reading safetensors in /dev/shm. On GPUs the
    non-collective paths also copy device → host and host → device. The transport's own part is its class's
    (``Transport.transfer_seconds``)."""
    from rlhf_ray.weights import choose_transport, transport_class

    name, _ = choose_transport(cfg)
    transport = transport_class(name)
    full = published_bytes(policy, cfg)
    world, ds = cfg.resources.learner.num_actors, cfg.deepspeed
    parts = {"gather": 0.0}
    if ds.zero_stage == 3 and world > 1:
        parts["gather"] = collective_seconds(policy.parameters("lm") * DTYPE_BYTES[ds.precision] * (world - 1) / world,
                                             hw, placement.learner_crosses_nodes)
    parts.update(transport.transfer_seconds(full, hw, placement, rates=TransferRates()))
    seconds = sum(parts.values()) + 2 * ROLE_CALL_OVERHEAD_S
    bound = f"{full / 2**30:.2f} GiB via {name}"
    alternatives = {}
    if hw.is_gpu and not transport.broadcast:
        alternatives["nccl_broadcast"] = (parts["gather"] + collective_seconds(full, hw, placement.engines_off_learner_node)
                                          + 2 * ROLE_CALL_OVERHEAD_S)
        bound += f" (an NCCL broadcast would take ~{alternatives['nccl_broadcast']:.1f} s)"
    return PhaseTime("weight_sync", seconds, parts, bound, alternatives)


def step_seconds(phases: dict[str, PhaseTime], async_steps: int) -> float:
    """Phases one after another; with ppo.async_steps=1 generation of the next batch overlaps score + learn."""
    g, s, l, w = (phases[k].seconds for k in ("generate", "score", "learn", "weight_sync"))
    return (max(g, s + l) if async_steps else g + s + l) + w
