"""Memory per role actor and per device, from the architecture and the config alone.

Every function returns MemoryItems for ONE device of one actor (a learner rank, one GPU of a TP engine, one
shard of a frozen model); ``where='host'`` items live in the node's RAM instead (offload, published weights).

Formulas (N parameters, s sequence length, b micro-batch, h hidden, a heads, L layers):
- mixed-precision Adam: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master, m, v) = 16 B/param;
  fp32 Adam: 4 + 4 + 8 = 16 B/param. ZeRO-1 splits the optimizer states over the ranks, ZeRO-2 also the
  gradients, ZeRO-3 also the weights (Rajbhandari et al. 2020).
- activations per layer: s·b·h·(34 + 5·a·s/h) bytes in 16-bit without recomputation (Korthikanti et al.
  2022); the 5·a·s/h term is the a·s² attention scores, which SDPA/flash kernels never store
  (ATTENTION_STORES_SCORES). With full recomputation: 2·s·b·h per layer plus one layer recomputed at a time.
  fp32 doubles both.
- logits: the learner and the reference run the LM head deepspeed.logits_chunk_tokens tokens at a time
  (rlhf_ray.models.forward): 2·min(b·s, chunk)·vocab·4 bytes (fp32 logits and their log-softmax) at once.
- KV cache: 2·L·kv_heads·head_dim·dtype bytes per token (vLLM), per GPU divided by min(TP, kv_heads).
- host memory at load: every process that loads a model on the host before moving it to its device holds all of it
  there once (``load_host_bytes``); the node's peak at load is the sum over its actors.

Lengths: memory is sized for the caps (rlhf_ray.planning.lengths): the largest micro-batch holds micro_batch_size
sequences of prompt cap + response cap (or deepspeed.micro_batch_tokens tokens), a sequence's KV cache is that long.
A MoE keeps every expert (Architecture.parameters); activations use the dense formula.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_ray.planning.lengths import Lengths, lengths_of
from rlhf_ray.planning.models import Architecture

GiB = 2**30

# transformers runs attention through torch SDPA (flash / memory-efficient kernels on GPU, a flash kernel on
# CPU): the a·s² score matrices of Korthikanti's 5·a·s/h term are recomputed, not stored. True for 'eager'.
ATTENTION_STORES_SCORES = False
# CUDA context, NCCL buffers and allocator fragmentation: memory a GPU process cannot use for tensors
# (PyTorch's own context is ~0.5 GiB on H100; NCCL and fragmentation take ~1–2 GiB more in practice).
GPU_RESERVED_BYTES = 2.5 * GiB
# Resident memory of a role process before any model (torch, transformers, Ray worker); measured here:
# the function-reward actor peaks at 0.30 GB (benchmarks/results/real_model_smollm2_cpu.json).
PROCESS_BASELINE_BYTES = 0.3 * GiB
# vLLM: the share of a GPU the generation actor's engine takes (actors/generation.py: gpu_memory_utilization)
# and, on CPU, the KV-cache space it is given (VLLM_CPU_KVCACHE_SPACE=1, in GiB).
VLLM_GPU_MEMORY_UTILIZATION = 0.85
VLLM_CPU_KVCACHE_BYTES = 1 * GiB
# vLLM schedules at most this many sequences at once (SchedulerConfig.max_num_seqs default) and prefills
# at most this many tokens per step (max_num_batched_tokens with chunked prefill).
VLLM_MAX_NUM_SEQS = 256
VLLM_MAX_BATCHED_TOKENS = 8192

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# deepspeed.logits_chunk_tokens=null sizes an LM-head chunk to this many fp32 logits (64 MiB):
# rlhf_ray.models.forward.AUTO_CHUNK_LOGITS (kept equal by a test; importing it here would import torch)
AUTO_CHUNK_LOGITS = 2**24
# The learner loads its models in fp32 whatever deepspeed.precision says (rlhf_ray.objectives: load_causal_lm and
# load_value_model with dtype float32); DeepSpeed casts them to bf16 on the device.
LEARNER_LOAD_DTYPE = "float32"


@dataclass
class MemoryItem:
    what: str
    bytes: float
    where: str = "device"     # 'device' (GPU, or the host's RAM on a CPU machine) or 'host' (offloaded)
    formula: str = ""
    first_actor_only: bool = False   # held by one actor of the role (learner rank 0's published weights)


@dataclass
class RoleMemory:
    """One actor's memory on each of its devices (and in host RAM)."""
    role: str
    model: str
    actors: int
    gpus_per_actor: float
    items: list[MemoryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reserves_fraction: float = 0.0   # vLLM on GPU: takes this share of the device whatever it needs
    load_host_bytes: float = 0.0     # host memory one actor holds while it loads its model(s) (see load_host_bytes)

    @property
    def device_bytes(self) -> float:
        return sum(i.bytes for i in self.items if i.where == "device")

    @property
    def host_bytes(self) -> float:
        return sum(i.bytes for i in self.items if i.where == "host")

    def actor_bytes(self, index: int, where: str) -> float:
        """Bytes actor ``index`` holds on its device ('device') or in host memory ('host')."""
        return sum(i.bytes for i in self.items if i.where == where and (index == 0 or not i.first_actor_only))


# ------------------------------------------------------------------------------------------ learner

def model_states(params: int, label: str, precision: str, zero_stage: int, world: int,
                 offload_optimizer: bool, offload_params: bool) -> list[MemoryItem]:
    """Weights, gradients and Adam states of one rank (see the module docstring for the bytes)."""
    mixed = precision in ("bf16", "fp16")
    weight_b, grad_b, adam_b = (2, 2, 12) if mixed else (4, 4, 8)
    split = lambda stage: world if zero_stage >= stage else 1  # noqa: E731
    items = [
        MemoryItem(f"{label} weights", params * weight_b / split(3), "host" if offload_params else "device",
                   f"{weight_b}·N{'/world' if zero_stage >= 3 else ''}"),
        MemoryItem(f"{label} gradients", params * grad_b / split(2), "device",
                   f"{grad_b}·N{'/world' if zero_stage >= 2 else ''}"),
        MemoryItem(f"{label} Adam states", params * adam_b / split(1), "host" if offload_optimizer else "device",
                   f"{adam_b}·N{'/world' if zero_stage >= 1 else ''} ({'fp32 master + m + v' if mixed else 'm + v'})"),
    ]
    if not mixed and zero_stage in (1, 2):
        # DeepSpeed's ZeRO-1/2 optimizer keeps its own flat fp32 partition beside the module's weights
        items.append(MemoryItem(f"{label} ZeRO fp32 partition", params * 4 / world,
                                "host" if offload_optimizer else "device", "4·N/world (DeepSpeed flat copy)"))
    return items


def zero_buffers(params: int, hidden: int, precision: str, zero_stage: int) -> list[MemoryItem]:
    """ZeRO's communication buffers, sized as actors/learner.py sizes them: bucket = min(5e8, max(h², N/10))
    elements; ZeRO-3 keeps up to max_live + prefetch (1.9 buckets) of gathered parameters."""
    if zero_stage == 0:
        return []
    bucket = min(5e8, max(hidden**2, params / 10))
    width = DTYPE_BYTES[precision]
    if zero_stage == 3:
        return [MemoryItem("ZeRO-3 gathered parameters", 1.9 * bucket * width, "device",
                           "(max_live + prefetch) buckets, bucket = min(5e8, max(h², N/10))")]
    return [MemoryItem("ZeRO reduce/all-gather buckets", 2 * bucket * width, "device", "2 buckets")]


def training_activation_bytes(arch: Architecture, micro: int, seq: int, precision: str,
                              checkpointing: bool) -> float:
    """Activations kept for backward by one micro-batch through all layers (module docstring)."""
    s, b, h, a = seq, micro, arch.hidden, arch.heads
    scores = 5 * a * s / h if ATTENTION_STORES_SCORES else 0.0
    per_layer_full = s * b * h * (34 + scores)
    scale = 2 if precision in ("fp32", "float32") else 1
    if checkpointing:
        return scale * (arch.layers * 2 * s * b * h + per_layer_full)
    return scale * arch.layers * per_layer_full


def logits_bytes(micro: int, seq: int, vocab: int, chunk_tokens: int | None = None) -> float:
    """fp32 logits plus their log-softmax copy, for at most ``chunk_tokens`` tokens at a time (None: the whole
    micro-batch): 2·min(b·s, chunk)·vocab·4."""
    tokens = micro * seq if not chunk_tokens else min(micro * seq, chunk_tokens)
    return 2 * tokens * vocab * 4


def logits_chunk(cfg, vocab: int) -> int | None:
    """Tokens per LM-head chunk as rlhf_ray.models.forward.ForwardOptions.chunk_tokens sizes them (None: unchunked)."""
    chunk = cfg.deepspeed.logits_chunk_tokens
    if chunk is None:
        return max(1, AUTO_CHUNK_LOGITS // max(1, vocab))
    return chunk or None


def micro_batch_shape(cfg, lengths: Lengths) -> tuple[int, int]:
    """(rows, tokens per row) of the learner's largest micro-batch: micro_batch_size rows at the caps, or with
    deepspeed.micro_batch_tokens one row of that many tokens (a longer sequence goes alone)."""
    budget = cfg.deepspeed.micro_batch_tokens
    if budget:
        return 1, max(budget, lengths.cap)
    return cfg.ppo.micro_batch_size, lengths.cap


def learner_memory(policy: Architecture, critic: Architecture | None, cfg) -> RoleMemory:
    """One learner rank: policy and value model in one DeepSpeed engine (rlhf_ray.objectives.ppo.PPOObjective); the
    policy alone under a critic-free estimator (``critic`` None). Activations and logits of the largest micro-batch
    (``micro_batch_shape``: at the caps)."""
    ds, res = cfg.deepspeed, cfg.resources.learner
    world = res.num_actors
    micro, tokens = micro_batch_shape(cfg, lengths_of(cfg))
    n_policy, n_critic = policy.parameters("lm"), critic.parameters("score") if critic else 0
    if cfg.models.lora:  # the frozen base in the engine's precision; weights, gradients and Adam of the adapters
        n_adapters = policy.lora_params(cfg.models.lora.rank)
        items = [MemoryItem("policy frozen weights", n_policy * DTYPE_BYTES[ds.precision], "device",
                            "N · precision bytes (models.lora)")]
        items += model_states(n_adapters, "policy LoRA adapters", ds.precision, ds.zero_stage, world,
                              ds.offload_optimizer, ds.offload_params)
        n_policy = n_adapters  # what ZeRO's buckets carry
    else:
        items = model_states(n_policy, "policy", ds.precision, ds.zero_stage, world, ds.offload_optimizer,
                             ds.offload_params)
    if critic:
        items += model_states(n_critic, "critic", ds.precision, ds.zero_stage, world, ds.offload_optimizer,
                              ds.offload_params)
    items += zero_buffers(n_policy + n_critic, policy.hidden, ds.precision, ds.zero_stage)
    scores = "" if ATTENTION_STORES_SCORES else " without the a·s² scores (SDPA)"
    act_formula = ("2·s·b·h per layer + one layer (checkpointing)" if ds.gradient_checkpointing
                   else f"s·b·h·(34 + 5·a·s/h) per layer{scores}")
    for name, arch in (("policy", policy), ("critic", critic)):
        if arch:
            items.append(MemoryItem(f"{name} activations (one micro-batch)", training_activation_bytes(
                arch, micro, tokens, ds.precision, ds.gradient_checkpointing), "device", act_formula))
    chunk = logits_chunk(cfg, policy.vocab)
    items.append(MemoryItem("logits + log-softmax", logits_bytes(micro, tokens, policy.vocab, chunk), "device",
                            f"2·min(b·s, {chunk})·vocab·4 (deepspeed.logits_chunk_tokens)" if chunk
                            else "2·b·s·vocab·4"))
    items += published_weights(policy, cfg)
    role = RoleMemory("learner", cfg.models.policy, world, res.num_gpus, items,
                      load_host_bytes=learner_load_bytes(policy, critic, cfg))
    if ds.offload_params:
        role.notes.append("offload_params: weights stream in from host memory for every forward and backward")
    return role


def learner_load_bytes(policy: Architecture, critic: Architecture | None, cfg) -> float:
    """Host memory one learner rank holds while it loads: the whole policy (and critic) in LEARNER_LOAD_DTYPE, before
    DeepSpeed moves them to the device and ZeRO partitions them."""
    params = policy.parameters("lm") + (critic.parameters("score") if critic else 0)
    return params * DTYPE_BYTES[LEARNER_LOAD_DTYPE]


def node_host_bytes(role: RoleMemory, actors: int) -> float:
    """Host memory ``actors`` actors of ``role`` on one node need at their peak: running (offloaded states, the first
    actor's published weights) or, where that is more, loading (``load_host_bytes`` each), each actor with its
    process baseline. The plan sums this over a node's actors of every role (rlhf_ray.planning.checks); the layout
    and fix searches size a role's options with it on their own."""
    running = role.actor_bytes(0, "host") + role.actor_bytes(1, "host") * (actors - 1)
    return max(running, role.load_host_bytes * actors) + PROCESS_BASELINE_BYTES * actors


def published_bytes(policy: Architecture, cfg) -> float:
    """What one weight update sends: the parameters weights.transport carries (the policy, or with
    weights.transport=adapter its LoRA adapters alone) in the engines' dtype."""
    from rlhf_ray.weights import chosen_class

    return chosen_class(cfg).payload_parameters(policy, cfg) * DTYPE_BYTES[cfg.models.dtype]


def published_weights(policy: Architecture, cfg) -> list[MemoryItem]:
    """What rank 0 holds while it publishes new weights, as weights.transport says (two buckets in flight on the
    collective path, a full host copy (engine dtype) in the object store or in /dev/shm files)."""
    from rlhf_ray.weights import chosen_class

    return [MemoryItem(what, size, where, formula, first_actor_only=True)  # rank 0 publishes
            for what, size, where, formula in chosen_class(cfg).learner_memory(published_bytes(policy, cfg), cfg)]


# ----------------------------------------------------------------------------------------- generation

def generation_memory(arch: Architecture, cfg, on_gpu: bool, device_bytes: float) -> tuple[RoleMemory, dict]:
    """One GPU of one engine: weights/TP, a workspace, and the KV cache for its sequences; plus what vLLM can hold
    (``kv``): sequences wanted, sequences that fit at the cap (the memory check), and sequences in flight.

    vLLM grows a sequence's KV cache block by block and admits new sequences while blocks are free, preempting one
    when they run out. The number in flight is the room over ``running_footprint``: what a running sequence will
    hold when it ends."""
    res = cfg.resources.generation
    tp, width = res.tensor_parallel_size, DTYPE_BYTES[cfg.models.dtype]
    lengths = lengths_of(cfg)
    wanted = cfg.rollout_sequences // res.num_actors
    kv_per_token = arch.kv_bytes_per_token(width) / min(tp, arch.kv_heads)
    kv_per_seq = kv_per_token * lengths.cap
    kv_running = kv_per_token * running_footprint(lengths)
    weights = arch.parameters("lm") * width / tp
    workspace = (min(wanted, VLLM_MAX_NUM_SEQS) * arch.vocab * 4
                 + VLLM_MAX_BATCHED_TOKENS * (4 * arch.hidden + 3 * mlp_width(arch) / tp) * width)
    if on_gpu:
        room = VLLM_GPU_MEMORY_UTILIZATION * device_bytes - weights - workspace
    else:
        room = VLLM_CPU_KVCACHE_BYTES
    fits = max(0, int(room // kv_per_seq)) if kv_per_seq else wanted
    in_flight = max(0, int(room // kv_running)) if kv_running else wanted
    concurrent = min(wanted, in_flight, VLLM_MAX_NUM_SEQS) if fits else 0
    items = [MemoryItem("weights", weights, "device", "N · dtype / tensor_parallel_size (every expert of a MoE)"),
             MemoryItem("workspace (sampler logits, prefill chunk)", workspace, "device",
                        "seqs·vocab·4 + 8192 tokens of one layer"),
             MemoryItem(f"KV cache ({concurrent} of {wanted} sequences in flight)", concurrent * kv_running, "device",
                        "2·L·kv_heads·head_dim·dtype per token / min(TP, kv_heads) · a running sequence's tokens")]
    role = RoleMemory("generation", cfg.models.policy, res.num_actors, res.num_gpus, items,
                      reserves_fraction=VLLM_GPU_MEMORY_UTILIZATION if on_gpu else 0.0)
    kv = {"sequences_wanted": wanted, "sequences_that_fit": fits, "concurrent": concurrent,
          "kv_bytes_per_sequence": kv_per_seq, "kv_bytes_all_sequences": wanted * kv_per_seq,
          "kv_room_bytes": max(room, 0.0)}
    if 0 < concurrent < wanted:
        role.notes.append(f"KV cache holds {concurrent} of {wanted} sequences in flight ({fits} at the cap): the "
                          "others start as running ones finish")
    return role, kv


def running_footprint(lengths: Lengths) -> float:
    """KV tokens of a running sequence when it ends, averaged over the sequences in flight: prompt + E[L²] / E[L]
    (long responses hold a slot longer, so the running ones are length-biased: E[L²]/E[L] ≥ E[L]). With that room per
    sequence vLLM need not preempt on average. Every response at the cap: prompt + cap, the memory check's size;
    exponential lengths far below the cap: prompt + 2·mean."""
    return min(lengths.prompt_mean + 2 * lengths.response.decode_context(), float(lengths.cap))


def mlp_width(arch: Architecture) -> int:
    """The MLP width one token passes through: intermediate, or a MoE's routed experts plus its shared expert."""
    if not arch.is_moe:
        return arch.intermediate
    return arch.experts_per_token * arch.expert_intermediate + arch.shared_intermediate


# ------------------------------------------------------------------------------------- frozen roles

def inference_activation_bytes(arch: Architecture, batch: int, seq: int, width: float) -> float:
    """Live tensors of one layer in a no-grad forward: residual, normed input, q/k/v/o (~4h) and the MLP's
    gate/up/product (3·intermediate; a MoE's routed and shared experts) per token; SDPA keeps no s² scores."""
    return batch * seq * (5 * arch.hidden + 3 * mlp_width(arch)) * width


def frozen_memory(role: str, arch: Architecture, model: str, res, cfg, batch: int, seq: int) -> RoleMemory:
    """Reward or reference: weights (1/num_actors of them when sharded, 1/num_gpus with device_map), a forward's
    activations, and the reference's logits (in LM-head chunks, as the learner). Sharded (ZeRO-3 inference) also holds
    two gathered layers. At load, an actor on one GPU (or none) reads its whole model into host memory first; a
    sharded one loads its partition straight to its device, a device_map one its slices."""
    width = DTYPE_BYTES[cfg.models.dtype]
    head = "score" if role == "reward" else "lm"
    full = arch.parameters(head) * width
    if res.sharded:
        items = [MemoryItem("weights (shard)", full / res.num_actors, "device", "N · dtype / num_actors (ZeRO-3)"),
                 MemoryItem("gathered layers", 2 * arch.layer_params * width, "device", "current + prefetched layer")]
    elif res.num_gpus > 1:
        items = [MemoryItem("weights (device_map slice)", full / res.num_gpus, "device", "N · dtype / num_gpus")]
    else:
        items = [MemoryItem("weights", full, "device", "N · dtype")]
    items.append(MemoryItem(f"forward activations (batch {batch})", inference_activation_bytes(arch, batch, seq, width),
                            "device", "b·s·(5h + 3·intermediate)·dtype"))
    if head == "lm":
        chunk = logits_chunk(cfg, arch.vocab)
        items.append(MemoryItem("logits + log-softmax", logits_bytes(batch, seq, arch.vocab, chunk), "device",
                                f"2·min(b·s, {chunk})·vocab·4" if chunk else "2·b·s·vocab·4"))
    load = full if not res.sharded and res.num_gpus <= 1 else 0.0
    return RoleMemory(role, model, res.num_actors, res.num_gpus, items, load_host_bytes=load)


def frozen_role_memory(role: str, arch: Architecture, cfg) -> RoleMemory:
    """Reward or reference as ``cfg`` runs it: the reward model's models.reward.batch_size sequences cut at
    models.reward.max_length, the reference's ppo.micro_batch_size at the caps."""
    res, cap = getattr(cfg.resources, role), lengths_of(cfg).cap
    if role == "reward":
        rm = cfg.models.reward
        return frozen_memory(role, arch, rm.model, res, cfg, rm.batch_size, min(cap, rm.max_length))
    return frozen_memory(role, arch, cfg.models.reference_path, res, cfg, cfg.ppo.micro_batch_size, cap)
