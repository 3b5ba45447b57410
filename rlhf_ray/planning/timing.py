"""Predicted seconds per PPO step, phase by phase, from FLOPs, bandwidths and stated efficiencies.

    generate     prefill: 2·N·prompt tokens of FLOPs plus causal attention; decode: per token step, the weights
                 (/TP; a MoE's experts in use) and the KV cache are read once for all sequences in flight —
                 bandwidth-bound until the batch is large enough to be compute-bound; max(bytes / bandwidth,
                 FLOPs / peak), plus per-step overheads. A batch decodes until its longest response ends, while
                 sequences that finished no longer cost (rlhf_ray.planning.lengths: means, caps and the tail).
    score        reward ‖ reference ‖ the learner's values (and old logprobs): 2·N FLOP per token forward each,
                 concurrently on their own devices (on one CPU machine they share its cores); a sharded frozen
                 model also gathers its weights over the links once per forward batch (ZeRO-3 inference).
    learn        6·N FLOP per token (8·N with gradient checkpointing) for policy and critic, each PPO epoch, on
                 the tokens the learner computes (real tokens when it packs: deepspeed.padding_free),
                 plus ZeRO's collectives over NVLink / the inter-node fabric (part of them hidden behind
                 compute) and the optimizer step (on the host with offload).
    weight_sync  the policy in the engines' dtype, gathered on the learner (ZeRO-3), then moved by
                 weights.transport: a broadcast over the fabric, the object store or files.

N is the parameters a token is multiplied by (a MoE's active ones); attention adds 4·layers·heads·head_dim FLOPs per
(query, key) pair, which a causal mask halves over a whole sequence (Architecture.forward_flops).

Every efficiency below is a stated constant with where it comes from. None was fitted to the validation cases:
benchmarks/planner_validation.py reports the errors, what one global factor would change, and the modelling
corrections made after its first run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.lengths import Lengths, ResponseLengths, lengths_of
from rlhf_ray.planning.memory import DTYPE_BYTES
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
# Ray's object manager pulling an object to another node (one TCP stream over one NIC, chunked): ~1–2 GB/s per
# node pair is typical. Assumed, not measured; one NIC's rate bounds it where that is lower.
RAY_OBJECT_TRANSFER_BYTES_PER_S = 1.5e9
# Weight sync through safetensors files in /dev/shm: one writer, engines reading in parallel; single-threaded
# serialisation runs at a few GB/s. Assumed, not measured.
FILE_BYTES_PER_S = 2.0e9
# gloo broadcast between processes of one machine (the CPU 'collective' transport): TCP over loopback. Measured into
# a vLLM engine like OBJECT_STORE_BYTES_PER_S (benchmarks/results/weight_sync.md, SmolLM2, one engine: 538 MB in
# 1.528 s = 0.35 GB/s, against 0.898 s through the object store and 1.094 s through files).
GLOO_LOOPBACK_BYTES_PER_S = 0.35e9

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
    engine_nodes_elsewhere: int = 1     # nodes with engines besides the learner's (when engines_off_learner_node)


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

    def pull_seconds(self, num_bytes: float, hw: Hardware, nodes: int) -> float:
        """Ray's object manager bringing an object to ``nodes`` other nodes: each pull is one TCP stream over one NIC
        (at most ray_object_transfer_bytes_per_s), and a node that holds a copy serves the next ones (Ray's object
        directory lists every copy), so the copies double each round: ⌈log2(nodes + 1)⌉ rounds."""
        rate = min(self.ray_object_transfer_bytes_per_s, hw.inter_node_bandwidth)
        return math.ceil(math.log2(max(nodes, 1) + 1)) * num_bytes / rate


def forward_shape(lengths: Lengths, padding_free: bool, padded_together: int) -> tuple[float, float]:
    """(tokens, attended (query, key) pairs) one sequence costs in a causal forward. Padding-free (packed): its real
    tokens, E[s] and E[s·(s+1)/2]; padded: every row as long as the longest of the ``padded_together`` sequences
    padded as one batch (prompts to their cap), s_pad and s_pad·(s_pad+1)/2."""
    if padding_free:
        return lengths.mean_tokens, (lengths.mean_square_tokens() + lengths.mean_tokens) / 2
    padded = lengths.padded_tokens(padded_together)
    return padded, padded * (padded + 1) / 2


def capped_shape(shape: tuple[float, float], max_tokens: int) -> tuple[float, float]:
    """A forward shape with sequences cut to ``max_tokens`` (the reward model's models.reward.max_length)."""
    tokens, pairs = shape
    if tokens <= max_tokens:
        return shape
    return float(max_tokens), max_tokens * (max_tokens + 1) / 2


def learner_shape(cfg, lengths: Lengths) -> tuple[float, float]:
    """What one sequence costs in the learner's forwards: packed with deepspeed.padding_free, else the rollout batch
    is padded as one (its prompts to the longest, its responses to the longest of all rollout_sequences)."""
    return forward_shape(lengths, cfg.deepspeed.padding_free, cfg.rollout_sequences)


# ------------------------------------------------------------------------------------------- generate

def decode_steps(response: ResponseLengths, sequences: int, in_flight: int) -> float:
    """Decode steps an engine runs for ``sequences`` responses with at most ``in_flight`` at once (vLLM's continuous
    batching: a finished sequence's slot goes to the next). All in flight at once: the longest of them. Otherwise
    the queue empties after about (sequences·mean − in_flight·mean) / in_flight steps, and the in_flight sequences
    still running then end after the longest of in_flight (lengths are memoryless for the exponential; exact for
    fixed lengths: sequences / in_flight waves of the mean)."""
    if sequences <= in_flight:
        return response.longest(sequences)
    return sequences * response.mean / in_flight + response.longest(in_flight) - response.mean


def generate_time(cfg, arch: Architecture, hw: Hardware, concurrent: int) -> PhaseTime:
    """One engine's share of the rollout (engines run in parallel; on one CPU machine they split its cores).

    Prefill: 2·N FLOP per prompt token plus causal attention, once per prompt for all its samples. Decode: n·mean
    sequence-steps over ``decode_steps`` steps. Every step reads the weights (a MoE: the experts its tokens use) and
    every sequence-step its KV cache, prompt + E[L²]/(2·E[L]) tokens on average; the phase is the larger of those
    bytes over the bandwidth and its FLOPs over the peak, plus per-step and per-sequence-step overheads."""
    res = cfg.resources.generation
    lengths = lengths_of(cfg)
    tp, engines, width = res.tensor_parallel_size, res.num_actors, DTYPE_BYTES[cfg.models.dtype]
    share = 1.0 if hw.is_gpu else 1.0 / engines       # CPU engines share the machine's cores and memory
    seqs = cfg.rollout_sequences // engines
    in_flight = max(1, min(concurrent, seqs))
    peak = _peak(hw, cfg.models.dtype, "forward") * tp * share
    efficiency = DECODE_BANDWIDTH_EFFICIENCY if hw.is_gpu else CPU_DECODE_BANDWIDTH_EFFICIENCY
    bandwidth = hw.memory_bandwidth * efficiency * tp * share

    # vLLM prefills a prompt once for all of its n_samples_per_prompt samples
    prompts, prompt = cfg.ppo.rollout_batch_size / engines, lengths.prompt_mean
    prefill = prompts * arch.forward_flops("lm", prompt, prompt * (prompt + 1) / 2) / peak
    response = lengths.response
    sequence_steps = seqs * response.mean
    steps = decode_steps(response, seqs, in_flight)
    context = prompt + response.decode_context()
    weights = arch.decode_read_params("lm", sequence_steps / max(steps, 1.0)) * width
    kv_per_token = arch.kv_bytes_per_token(width) * tp / min(tp, arch.kv_heads)
    memory = (steps * weights + sequence_steps * context * kv_per_token) / bandwidth
    compute = sequence_steps * arch.forward_flops_per_token("lm", context) / peak
    step_overhead = DECODE_STEP_OVERHEAD_S
    if hw.is_gpu:
        step_overhead += arch.layers * (EAGER_LAUNCH_S_PER_LAYER + (2 * TP_ALLREDUCE_LATENCY_S if tp > 1 else 0))
    decode = max(memory, compute) + steps * step_overhead + sequence_steps * DECODE_SEQUENCE_OVERHEAD_S
    bound = "memory-bandwidth" if memory >= compute else "compute"
    longest = response.longest(min(seqs, in_flight))
    return PhaseTime("generate", prefill + decode + ROLE_CALL_OVERHEAD_S,
                     {"prefill": prefill, "decode": decode, "decode_step_s": decode / max(steps, 1.0),
                      "decode_steps": steps, "sequences_in_flight": in_flight},
                     f"decode {bound}-bound, {in_flight} sequences in flight per engine, {steps:.0f} steps "
                     f"(responses: mean {response.mean:.0f}, longest of {min(seqs, in_flight)} ~{longest:.0f}, "
                     f"cap {response.cap} tokens)")


# ---------------------------------------------------------------------------------------------- score

def frozen_forward_time(role: str, cfg, arch: Architecture, hw: Hardware, crosses_nodes: bool) -> float:
    """Reward or reference: one actor's share of the rollout, plus ZeRO-3 inference gathers when sharded. The
    reference runs as the learner does (deepspeed.padding_free); the reward model packs its batch of
    models.reward.batch_size (its load-time check permitting) and cuts sequences at models.reward.max_length."""
    res = getattr(cfg.resources, role)
    lengths = lengths_of(cfg)
    if role == "reward":
        if cfg.models.reward.kind != "model":
            return ROLE_CALL_OVERHEAD_S  # a function or remote endpoint: its own cost is not modelled
        rm = cfg.models.reward
        shape, batch, head = capped_shape(forward_shape(lengths, True, rm.batch_size), rm.max_length), \
            rm.batch_size, "score"
    else:
        shape, batch, head = learner_shape(cfg, lengths), cfg.ppo.micro_batch_size, "lm"
    seqs = cfg.rollout_sequences / res.num_actors
    flops = seqs * arch.forward_flops(head, *shape)
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
    shape = learner_shape(cfg, lengths_of(cfg))
    with_logprobs = cfg.old_logprobs_source()[0] == "learner"
    seqs = cfg.rollout_sequences / world
    policy_passes = int(with_logprobs) + int(cfg.reference_source()[0] == "learner")
    if critic is None and not policy_passes:  # critic-free, the sampler's logprobs: no such pass
        return 0.0
    flops = critic.forward_flops("score", *shape) if critic else 0.0
    params = critic.parameters("score") if critic else 0
    if policy_passes:
        flops += policy_passes * policy.forward_flops("lm", *shape)
        params += policy.parameters("lm")
    seconds = seqs * flops / _peak(hw, cfg.deepspeed.precision, "forward")
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
    """PPO epochs over the rollout: forward + backward (+ the recomputed forward) FLOPs of the sequences' tokens as
    the learner computes them (``learner_shape``: packed, or padded), ZeRO's collectives per micro-batch
    (``learner_micro_steps``) and the optimizer steps."""
    ds, world = cfg.deepspeed, cfg.resources.learner.num_actors
    lengths = lengths_of(cfg)
    shape = learner_shape(cfg, lengths)
    epochs = cfg.ppo.epochs
    seqs_per_rank = cfg.rollout_sequences / world
    passes = 4 if ds.gradient_checkpointing else 3      # forward + backward (2×) (+ recomputed forward)
    lora = cfg.models.lora
    policy_passes = passes - 1 if lora else passes      # LoRA: no weight gradients for the frozen base
    per_sequence = (policy_passes * policy.forward_flops("lm", *shape)
                    + (passes * critic.forward_flops("score", *shape) if critic else 0.0))
    seqs_per_device = seqs_per_rank if hw.is_gpu else cfg.rollout_sequences   # CPU ranks share one machine
    compute = epochs * seqs_per_device * per_sequence / _peak(hw, ds.precision, "train")

    trained = policy.lora_params(lora.rank) if lora else policy.parameters("lm")
    params = trained + (critic.parameters("score") if critic else 0)
    width = DTYPE_BYTES[ds.precision]
    micro_steps = learner_micro_steps(cfg, lengths)
    optimizer_steps = epochs * (cfg.rollout_sequences // cfg.ppo.mini_batch_size)
    comm = collective_seconds(zero_traffic_bytes(ds, params * width, world, micro_steps, optimizer_steps), hw,
                              placement.learner_crosses_nodes) * (1 - COMM_OVERLAP)
    optimizer = optimizer_seconds(ds, params, world, optimizer_steps, micro_steps, hw, placement)
    return PhaseTime("learn", compute + comm + optimizer + ROLE_CALL_OVERHEAD_S,
                     {"compute": compute, "zero_collectives": comm, "optimizer": optimizer},
                     f"{passes * 2}·N FLOP/token on {shape[0]:.0f} tokens per sequence "
                     f"({'packed' if ds.padding_free else 'padded'}) at {_rate(_peak(hw, ds.precision, 'train'))} "
                     "per device")


def learner_micro_steps(cfg, lengths: Lengths) -> int:
    """Forward/backward passes one rank runs per step: each mini-batch's share of a rank in micro_batch_size rows,
    or with deepspeed.micro_batch_tokens in groups of that many real tokens (at least one row each)."""
    world, ppo = cfg.resources.learner.num_actors, cfg.ppo
    rows = ppo.mini_batch_size / world
    budget = cfg.deepspeed.micro_batch_tokens
    per_mini = (min(rows, max(1, math.ceil(rows * lengths.mean_tokens / budget))) if budget
                else math.ceil(rows / ppo.micro_batch_size))
    return math.ceil(ppo.epochs * (cfg.rollout_sequences // ppo.mini_batch_size) * per_mini)


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

def transport_prices(cfg, policy: Architecture, hw: Hardware, placement: Placement) -> dict[str, PhaseTime]:
    """The weight sync through every transport that could carry this policy (the registered ones, an adapter one only
    for a LoRA policy, and the configured one), each priced on this hardware: rank 0 gathers the policy (ZeRO-3), then
    the transport's own parts (``Transport.transfer_seconds``: a broadcast over NVLink / the NICs, or a trip through
    host memory over PCIe, the object store and Ray's pulls across nodes), plus a call to publish and one to load.
    ``bound`` says why a transport cannot serve this config, where it cannot."""
    from rlhf_ray.weights import AUTO, TRANSPORTS, transport_class

    names = list(TRANSPORTS) + ([cfg.weights.transport] if cfg.weights.transport not in (AUTO, *TRANSPORTS) else [])
    world, ds = cfg.resources.learner.num_actors, cfg.deepspeed
    gather = 0.0
    if ds.zero_stage == 3 and world > 1:
        gather = collective_seconds(policy.parameters("lm") * DTYPE_BYTES[ds.precision] * (world - 1) / world,
                                    hw, placement.learner_crosses_nodes)
    prices = {}
    for name in names:
        transport = transport_class(name)
        if transport.adapter and cfg.models.lora is None:
            continue  # nothing to send but full weights
        full = transport.payload_parameters(policy, cfg) * DTYPE_BYTES[cfg.models.dtype]
        parts = {"gather": gather, **transport.transfer_seconds(full, hw, placement, rates=TransferRates())}
        refused = transport.refuses(cfg)
        prices[name] = PhaseTime("weight_sync", sum(parts.values()) + 2 * ROLE_CALL_OVERHEAD_S, parts,
                                 f"{full / 2**30:.2f} GiB via {name}" + (f"; cannot serve this run: {refused}"
                                                                          if refused else ""))
    return prices


def weight_sync_time(cfg, policy: Architecture, hw: Hardware, placement: Placement) -> PhaseTime:
    """The sync through the transport the run uses: ``weights.transport``, or for 'auto' the cheapest of those that
    serve it on this hardware (rlhf_ray.weights.choose_transport, given ``transport_prices``). ``alternatives``: every
    other transport's seconds (also those that cannot serve this run, as their ``bound`` in transport_prices says)."""
    from rlhf_ray.weights import choose_transport, transport_class

    prices = transport_prices(cfg, policy, hw, placement)
    name, why = choose_transport(cfg, {n: p.seconds for n, p in prices.items()})
    chosen = prices[name]
    others = {n: p.seconds for n, p in prices.items() if n != name}
    bound = chosen.bound + (f" ({why})" if why != "weights.transport" else "")
    for label, serves in (("faster", True), ("faster, but unable to serve this run", False)):
        faster = sorted((s, n) for n, s in others.items()
                        if s < chosen.seconds and (transport_class(n).refuses(cfg) is None) == serves)
        bound += f"; {label}: " + ", ".join(f"{n} {s:.3g} s" for s, n in faster) if faster else ""
    return PhaseTime("weight_sync", chosen.seconds, chosen.parts, bound, others)


def step_seconds(phases: dict[str, PhaseTime], async_steps: int) -> float:
    """One step in the steady state. ppo.async_steps=0: the phases one after another, generate + score + learn +
    weight_sync. k ≥ 1: generation of later batches runs while the learner scores and learns, so the slower side
    bounds the step, max(generate, score + learn) + weight_sync (the sync still stops both). k changes nothing here:
    in the steady state the slower side sets the pace whatever k is; a larger k only absorbs one slow batch (jitter,
    which is not modelled) at the cost of samples up to k updates old and k rollout batches held."""
    g, s, l, w = (phases[k].seconds for k in ("generate", "score", "learn", "weight_sync"))
    return (max(g, s + l) if async_steps else g + s + l) + w
