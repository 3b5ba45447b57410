"""Learner role: one data-parallel rank of a DeepSpeed engine running an objective (rlhf_ray.objectives):
PPO on the policy and value model, Bradley–Terry on a reward model, …

All ranks are called together with equally sized shards (ZeRO-3 forward passes and parameter
gathers are collectives: every rank must make the same calls in the same order).
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import torch

from rlhf_ray.actors.role import Role, computes, timed
from rlhf_ray.algorithms.lr_schedule import lr_scheduler
from rlhf_ray.data.batch import RolloutBatch, token_budget_groups
from rlhf_ray.objectives import LearnerSpec, make_objective
from rlhf_ray.runtime.builds import import_deepspeed
from rlhf_ray.runtime.devices import DTYPES, device_for, require_cpu_bf16, set_threads
from rlhf_ray.runtime.memory import release_free_memory

ALIGN = 1024
# DeepSpeed's own plain records inside its ZeRO optimizer states; allowed by weights_only loading
DEEPSPEED_CHECKPOINT_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.utils.tensor_fragment.fragment_address",
                                "deepspeed.runtime.zero.config.ZeroStageEnum")


def weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (it unpickles anything)."""
    import importlib

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = [getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2])
               for path in DEEPSPEED_CHECKPOINT_CLASSES]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def communication_buckets(num_params: int, hidden_size: int) -> dict:
    """ZeRO bucket sizes (elements) from the model instead of DeepSpeed's fixed 5e8 (2 GB each in fp32).

    A bucket holds a tenth of the parameters — few collectives per step, at most 10 % of the weights'
    memory per buffer — never more than DeepSpeed's default and never less than one hidden×hidden
    matrix (the floor HF's "auto" values use); rounded down to a multiple of 1024 elements.
    """
    bucket = int(min(5e8, max(hidden_size ** 2, num_params // 10)))
    bucket = max(ALIGN, bucket // ALIGN * ALIGN)  # DeepSpeed wants multiples of its alignment factor (2–8)
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": int(0.9 * bucket), "stage3_max_live_parameters": bucket,
            "stage3_max_reuse_distance": bucket, "stage3_param_persistence_threshold": 10 * hidden_size}


def without_tied_frozen(module_state_dict, module: torch.nn.Module):
    """DeepSpeed's ``module_state_dict`` whose ``exclude_frozen_parameters`` also drops a frozen weight's second name:
    DeepSpeed walks ``named_parameters()``, which lists a tied weight once, so a LoRA checkpoint would still hold the
    output head tied to the embeddings (SmolLM2: 28 M parameters)."""
    def state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = module_state_dict(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state
    return state_dict


def reduction_moves_gradients(engine) -> bool:
    """Whether DeepSpeed's gradient reduction also hands the gradients to its optimizer, so that it must run even
    with nothing to average: true for ZeRO's own optimizers (their reduction fills the partitions they step), false
    for a plain optimizer (ZeRO-0) and for the BF16_Optimizer, which accumulates each backward's gradients into its
    fp32 buffers before any reduction."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return engine.zero_optimization_stage() > 0 and not isinstance(engine.optimizer, BF16_Optimizer)


def deepspeed_config(spec: LearnerSpec, model: torch.nn.Module) -> dict:
    ds, world = spec.deepspeed, spec.world_size
    per_rank_mini = spec.mini_batch_size // world
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        hidden = next(m.config.hidden_size for m in model.modules() if hasattr(m, "config"))
        zero.update(communication_buckets(sum(p.numel() for p in model.parameters()), hidden))
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": spec.mini_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": per_rank_mini // spec.micro_batch_size,
        "gradient_clipping": spec.optimizer.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        # bf16 under ZeRO-1: DeepSpeed's BF16_Optimizer, gradients accumulated over micro-batches in fp32
        **({"data_types": {"grad_accum_dtype": "fp32"}} if ds.precision == "bf16" and ds.zero_stage == 1 else {}),
        "zero_allow_untested_optimizer": True,   # we pass torch AdamW: no JIT-built fused optimizer
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31,
    }


class LearnerActor(Role):
    def __init__(self, spec: LearnerSpec, rank: int, log_file: str | None = None):
        super().__init__(log_file)
        self.spec, self.objective = spec, make_objective(spec)
        self.rank, self.world_size = rank, spec.world_size
        self.device = device_for(spec.num_gpus)
        self.updates = 0
        set_threads(spec.num_cpus)

    @timed
    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the DeepSpeed engine (the objective's module, AdamW, schedule)."""
        deepspeed = import_deepspeed()

        spec, opt = self.spec, self.spec.optimizer
        if self.device == "cpu" and spec.deepspeed.precision == "bf16":
            require_cpu_bf16("the learner", "deepspeed.precision")
        self.join_process_group(master_addr, master_port, self.rank, self.world_size, self.spec.timeout_s, self.device)
        torch.manual_seed(spec.seed)  # new weights (an RM's score head) are the same on every rank and every run
        model = self.objective.build()
        if spec.deepspeed.gradient_checkpointing:
            for module in model.modules():
                if getattr(module, "supports_gradient_checkpointing", False):
                    module.gradient_checkpointing_enable()
        # fused: one kernel per parameter, without the per-parameter temporaries of the for-loop version
        # (two embedding-sized buffers at a time on SmolLM2); CPU and CUDA have it
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters (and a critic) alone
        optimizer = torch.optim.AdamW(trainable, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                      weight_decay=opt.weight_decay, fused=self.device in ("cpu", "cuda"))
        total = spec.optimizer_steps
        scheduler = lr_scheduler(optimizer, opt.schedule, math.ceil(opt.warmup_ratio * total), total)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(spec, model))
        if self.world_size == 1 and not reduction_moves_gradients(self.engine):
            # Nothing to average over, but DeepSpeed would still flatten every gradient into one bucket per optimizer
            # step to all-reduce it with itself and copy it back (SmolLM2 in bf16: 2 x 1 GB copies per step).
            self.engine.enable_backward_allreduce = False
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        self.engine.module_state_dict = without_tied_frozen(self.engine.module_state_dict, self.engine.module)

    @computes("score")
    @torch.no_grad()
    def evaluate(self, batch, **options):
        """The objective's forward passes over this rank's shard, without gradients (PPO: old logprobs and
        values before the update; reward modelling: scores). ``options`` go to the objective's evaluate."""
        self.engine.eval()
        out = self.objective.evaluate(self.engine, batch.to(self.device), side_by_side=self.side_by_side(), **options)
        if self.spec.deepspeed.zero_stage == 3:
            # ZeRO-3 may have prefetched parameters for a next forward that does not come: a gather (saving,
            # publishing) would then fail with "Cannot partition a param in flight"; wait for and release them
            self.engine.empty_partition_cache()
        release_free_memory()  # the micro-batches' activations: an update may come next
        return out

    def side_by_side(self) -> bool:
        """Whether the scoring passes of independent networks (PPO's policy and critic) run at once, one torch thread
        each: when the compute plan gave this learner one thread to score beside other roles but more to learn with.
        Its peers in the score phase (reward, reference) run one pass each and it runs two, so one after the other
        they would leave a core idle at the end. On CPU only, and not under ZeRO-3, whose parameter gathers are
        collectives taken in one order."""
        threads = getattr(self, "_phase_threads", {})
        return (self.device == "cpu" and self.spec.deepspeed.zero_stage < 3 and threads.get("score") == 1
                and threads.get("learn", 1) > 1)

    @computes("learn")
    def train(self, batch) -> dict[str, float]:
        """``epochs`` passes over mini-batches of this rank's shard, micro-batch gradient accumulation.

        Losses are sums divided by the mini-batch's GLOBAL unit count (tokens or pairs, all micro-batches,
        all ranks), so the accumulated gradient is that of the global mean. DeepSpeed averages gradients
        over ranks, hence the factor world_size; it must not also divide by the number of accumulation
        steps, hence scale_wrt_gas=False. Stats are this rank's shares of global means (the driver sums
        them over ranks), averaged over mini-batches; ``optim/*`` are the same on every rank.
        """
        import torch.distributed as dist

        spec = self.spec
        self.engine.train()
        batch = batch.to(self.device)
        per_rank_mini = spec.mini_batch_size // self.world_size
        generator = torch.Generator().manual_seed(spec.seed * 7919 + self.updates * 31 + self.rank)
        sums, minibatches, grad_norm = defaultdict(float), 0, None
        positions = torch.zeros(2)  # token positions the forwards computed: all, padding
        # DeepSpeed records the (unscaled) global gradient norm under ZeRO >= 1 or mixed precision only
        deepspeed_has_norm = spec.deepspeed.zero_stage > 0 or spec.deepspeed.precision != "fp32"
        for epoch in range(spec.epochs):
            order = torch.randperm(len(batch), generator=generator)
            for start in range(0, len(batch), per_rank_mini):
                fresh = epoch == 0 and start == 0  # no optimizer step yet in this update
                mini = batch.select(order[start:start + per_rank_mini])
                units = self.objective.units(mini).to(self.device, torch.float32)
                if self.world_size > 1:
                    dist.all_reduce(units)  # a sync point: every rank's share of the mini-batch
                micros = self.micro_batches(mini)
                for index, micro in enumerate(micros):
                    if spec.deepspeed.micro_batch_tokens:  # as many micro-batches as the tokens need
                        self.engine.set_gradient_accumulation_boundary(index == len(micros) - 1)
                    positions += self._computed_positions(micro)
                    loss, stats = self.objective.loss(self.engine, micro, float(units), fresh=fresh)
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    if not deepspeed_has_norm and self.engine.is_gradient_accumulation_boundary():
                        grad_norm = self._grad_norm()
                    self.engine.step()
                    for key, value in stats.items():
                        sums[key] += value
                minibatches += 1
        self.updates += 1
        stats = {k: v / minibatches for k, v in sums.items()}
        stats.update(self._padding_stats(positions, minibatches))
        if deepspeed_has_norm:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        stats.update({"optim/lr": self.engine.get_lr()[0], "optim/grad_norm": grad_norm})
        release_free_memory()  # gradients and activations are gone until the next update
        return stats

    def micro_batches(self, mini) -> list:
        """A mini-batch's micro-batches: ``micro_batch_size`` rows each, or with ``deepspeed.micro_batch_tokens`` rows
        grouped to that many real tokens (rlhf_ray.data.batch.token_budget_groups), as many groups on every rank."""
        import torch.distributed as dist

        budget = self.spec.deepspeed.micro_batch_tokens
        if not budget:
            return mini.chunks(len(mini) // self.spec.micro_batch_size)
        tokens = mini.row_tokens().tolist()
        count = torch.tensor([len(token_budget_groups(tokens, budget))], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)  # ZeRO's forwards and gradient reductions are collectives
        return [mini.select(rows) for rows in token_budget_groups(tokens, budget, int(count))]

    def _computed_positions(self, micro) -> torch.Tensor:
        """(token positions this micro-batch's forward computes, how many of them are padding)."""
        from rlhf_ray.models.forward import packed_positions

        real = float(micro.row_tokens().sum())
        padding_free = getattr(self.engine.module, "padding_free", False)
        computed = float(packed_positions(micro.attention_mask, self._exported()) if padding_free
                         else micro.padded_positions())
        return torch.tensor([computed, computed - real])

    def _padding_stats(self, positions: torch.Tensor, minibatches: int) -> dict[str, float]:
        """learn/tokens: real tokens per mini-batch (summed over ranks by the driver); learn/padding_share: the
        share of computed positions that were padding, as this rank's part of the global share."""
        import torch.distributed as dist

        total = positions.clone()
        if self.world_size > 1:
            dist.all_reduce(total)
        return {"learn/tokens": float(positions[0] - positions[1]) / minibatches,
                "learn/padding_share": float(positions[1] / total[0].clamp(min=1.0))}

    def _grad_norm(self) -> float:
        """The global gradient norm before clipping, of the optimizer step about to be taken: in plain fp32
        without ZeRO the averaged gradients are in ``.grad`` now."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def num_parameters(self, trainable: bool = True) -> int:
        """Trainable parameters (PPO: policy + critic; with LoRA its adapters + critic), or with ``trainable=False``
        the frozen ones (a LoRA policy's base); full counts also under ZeRO-3 partitioning."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()
                   if p.requires_grad == trainable)

    def activation_bytes(self, micro) -> int:
        """Bytes autograd keeps for the backward of the objective's loss on one micro-batch (its activations), each
        storage once and the parameters left out; nothing is updated (benchmarks: the learner's memory budget)."""
        params = {p.untyped_storage().data_ptr() for p in self.engine.module.parameters()}
        saved: dict[int, int] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params and storage.device.type != "meta":
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.engine.train()
        micro = micro.to(self.device)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss, _ = self.objective.loss(self.engine, micro, float(self.objective.units(micro)))
        del loss
        return sum(saved.values())

    def _exported(self):
        return self.objective.exported(self.engine.module)

    def _exported_params(self, device: str = "cpu", adapter: bool = False):
        """(name, full tensor on ``device``) per parameter of the exported model (PPO: the policy), in its export
        dtype; under ZeRO-3 gathered one parameter at a time (every rank must iterate; rank 0 gets the tensors).
        A LoRA policy exports its adapters merged (rlhf_ray.models.lora), or with ``adapter`` the adapters alone."""
        deepspeed = import_deepspeed()

        from rlhf_ray.models import lora

        dtype, model = DTYPES[self.spec.export_dtype], self._exported()
        if lora.is_adapted(model):  # (never ZeRO-3: the config refuses it) tensors computed here are new: no copy
            for name, tensor in lora.adapter_tensors(model) if adapter else lora.merged_tensors(model):
                yield name, tensor.detach().to(device, dtype) if self.rank == 0 else None
            return
        gathered = self.spec.deepspeed.zero_stage == 3  # the full tensor lives only inside the context: copy it
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):  # no-op below ZeRO-3
                # below ZeRO-3 a tensor already on ``device`` in the right dtype is passed as is: it is copied on
                full = param.detach().to(device, dtype, copy=gathered) if self.rank == 0 else None
            yield name, full

    def weight_layout(self, bucket_mb: float, adapter: bool = False) -> list:
        """The buckets one weight update is sent in (rlhf_ray.weights.buckets): names, shapes, the export dtype
        (``adapter``: a LoRA policy's adapters alone)."""
        from rlhf_ray.models import lora
        from rlhf_ray.weights.buckets import plan_buckets

        model = self._exported()
        if lora.is_adapted(model):
            shapes = lora.adapter_shapes(model) if adapter else lora.merged_shapes(model)
        else:
            shapes = [(name, tuple(getattr(param, "ds_shape", param.shape))) for name, param in model.named_parameters()]
        return plan_buckets(((name, self.spec.export_dtype, shape) for name, shape in shapes), int(bucket_mb * 2**20))

    @computes("learn")
    def publish_weights(self, transport: str = "object_store", bucket_mb: float = 256):
        """Send the policy weights by ``transport`` (rlhf_ray.weights). Every rank takes part (ZeRO-3 gathers);
        rank 0 sends and returns what the engines' ``load_weights`` gets (object refs; None for a broadcast)."""
        from rlhf_ray.models import lora
        from rlhf_ray.weights import make_transport

        sender = make_transport(transport)
        buckets = self.weight_layout(bucket_mb, adapter=sender.adapter)
        device = self.device if sender.from_device else "cpu"
        tensors = (tensor for _, tensor in self._exported_params(device, adapter=sender.adapter))
        if self.rank != 0:
            for _ in tensors:  # the gathers are collectives: every rank walks the parameters
                pass
            return None
        try:
            return sender.publish(buckets, tensors, group=getattr(self, "_weight_group", None),
                                  config=lora.adapter_config(self._exported()) if sender.adapter else None)
        except BaseException:
            for _ in tensors:  # the other ranks are in the gathers of the parameters still to come: finish them
                pass
            if sender.broadcast:
                self.leave_weight_group()  # its peers' pending transfers fail at once; the driver forms a new group
            raise

    def open_weight_group(self) -> tuple[str, int]:
        """Rank 0: the address of the weight-broadcast group's rendezvous, listening from now on."""
        import ray

        from rlhf_ray.weights.collective import open_rendezvous

        self.leave_weight_group()
        self._weight_rendezvous = open_rendezvous(ray.util.get_node_ip_address())
        self._weight_address = self._weight_rendezvous.getsockname()[:2]
        return self._weight_address

    def join_weight_group(self, world_size: int, timeout_s: float) -> int:
        """Rank 0 joins the group it opened as rank 0 (it returns once every engine worker has joined)."""
        from rlhf_ray.weights.collective import join

        self.leave_weight_group()
        host, port = self._weight_address
        self._weight_group = join(host, port, 0, world_size, timeout_s, self.device,
                                  listen_socket=self._weight_rendezvous)
        return 0

    def leave_weight_group(self) -> None:
        group = getattr(self, "_weight_group", None)
        if group is not None:
            group.close()
            self._weight_group = None

    @timed
    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The learner policy's logprobs of one response at temperature 1 — like vLLM's prompt logprobs,
        which are taken from the raw logits whatever the sampling temperature (weight-sync checks)."""
        with torch.no_grad():
            batch = RolloutBatch.from_samples([prompt_ids], [response_ids], [[0.0] * len(response_ids)], ["stop"],
                                              [[]], [""], [""], pad_token_id=0).to(self.device)
            self.engine.eval()
            logprobs, _, _ = self.engine(batch)  # a policy learner (PolicyAndValue): (logprobs, entropies, values)
            return logprobs[0].tolist()

    def save(self, path: str) -> str | None:
        """Save the exported model (PPO: the policy; RM: the sequence-classification model) in HF format
        (safetensors) with its tokenizer; rank 0 writes. A LoRA policy is saved merged, its adapter (PEFT's format)
        in ``<path>/adapter``."""
        from transformers import AutoTokenizer

        from rlhf_ray.models import lora

        state = {name: tensor for name, tensor in self._exported_params()}
        if self.rank != 0:
            return None
        model = self._exported()
        lora.causal_lm(model).save_pretrained(path, state_dict=state, safe_serialization=True)
        if lora.is_adapted(model):
            model.save_pretrained(os.path.join(path, "adapter"), safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(self.spec.model)
        if tokenizer.pad_token is None and self.spec.pad_token_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.spec.pad_token_id)  # what the RM pools by
        tokenizer.save_pretrained(path)
        return path

    @property
    def _frozen_base(self) -> bool:
        """A LoRA policy: its frozen base is rebuilt from the model path, the checkpoint holds what trains."""
        from rlhf_ray.models import lora

        return lora.is_adapted(self._exported())

    def save_state(self, directory: str) -> None:
        """Everything this rank needs to continue exactly: the HF model (rank 0), the DeepSpeed checkpoint
        (weights — with LoRA the trainable ones alone —, optimizer, LR schedule; each rank its ZeRO partition),
        this rank's RNG and update count."""
        from safetensors.torch import save_file

        self.save(os.path.join(directory, self.objective.export_name))
        self.engine.save_checkpoint(os.path.join(directory, "learner"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=self._frozen_base)
        save_file({"torch_rng": torch.get_rng_state()}, os.path.join(directory, "learner", f"rank-{self.rank}.safetensors"),
                  metadata={"updates": str(self.updates)})
        release_free_memory()

    def load_state(self, directory: str) -> None:
        """Restore what ``save_state`` wrote (weights_only / safetensors loading only)."""
        from safetensors import safe_open

        learner_dir = os.path.join(directory, "learner")
        # LoRA: the checkpoint has no frozen weights; those in the engine are the model path's, as when it was saved
        loaded, _ = self.engine.load_checkpoint(learner_dir, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True, load_module_strict=not self._frozen_base)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no learner state in {learner_dir}")
        with safe_open(os.path.join(learner_dir, f"rank-{self.rank}.safetensors"), "pt") as f:
            torch.set_rng_state(f.get_tensor("torch_rng"))
            self.updates = int(f.metadata()["updates"])
        release_free_memory()

    def shutdown(self) -> None:
        self.leave_weight_group()
        self.leave_process_group()
