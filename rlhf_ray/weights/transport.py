"""What every weight transport is: one class, chosen once by name (``weights.transport``), that owns

- the learner's half, ``publish`` (learner rank 0, given the buckets and the tensors in order);
- the engine's half, ``load`` (the generation actor, given what ``publish`` returned or, for a broadcast, the layout),
  the vLLM options it needs (``engine_options``) and the LoRA adapter the engine samples with (``lora_request``);
- the driver's half, ``driver`` (rlhf_ray.weights.sync: which calls go out together, bringing a replacement engine up
  to date, its own recovery);
- what the planner charges for it (``payload_parameters``, ``learner_memory``, ``transfer_seconds``) and which
  configurations it refuses (``refuses``).

Callers ask the class its capabilities (``broadcast``, ``adapter``, ``from_device``, ``replayable``); none compares
names. A new transport is a module with a subclass and an entry in ``rlhf_ray.weights.TRANSPORTS`` — or, without the
entry, its ``module:Class`` as ``weights.transport``.
"""
from __future__ import annotations

from typing import Iterable

import torch

from rlhf_ray.weights.buckets import Bucket


class Transport:
    name = ""
    broadcast = False    # learner and engines take part in one collective: called together, in a group formed first
    adapter = False      # it carries a LoRA policy's adapters (and their config), not the weights
    from_device = False  # publish takes the tensors where the learner holds them (its device), not copies on the CPU
    # a replacement engine can be given the update the others got by loading its payload again (an overlapped run
    # needs this: the learner may be changing the weights meanwhile)
    replayable = True

    # ------------------------------------------------------------------------------------ learner and engine
    def publish(self, buckets: list[Bucket], tensors: Iterable[torch.Tensor], group=None, config: dict | None = None):
        """Learner rank 0: send one update; returns what every engine's ``load`` gets (None: the layout). ``group``:
        the weight group (broadcast transports); ``config``: the LoRA adapter's config (adapter transports)."""
        raise NotImplementedError

    def load(self, llm, payload, timeout_s: float) -> dict:
        """Generation actor: take one update into the vLLM engine ``llm``; returns load_into_engine's report."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds in this process."""

    @property
    def lora_request(self):
        """The vLLM LoRARequest the engine samples with (None: its own weights)."""
        return None

    @classmethod
    def engine_options(cls, lora_rank: int | None) -> dict:
        """Options for the engine's ``vllm.LLM`` that this transport needs."""
        return {}

    # ------------------------------------------------------------------------------------ driver
    @classmethod
    def driver(cls, roles, name: str):
        """The driver's side of this transport for ``roles`` (rlhf_ray.cluster.roles.Roles); ``name``: as configured."""
        from rlhf_ray.weights.sync import WeightSync

        return WeightSync(roles, cls, name)

    # ------------------------------------------------------------------------------------ config and planner
    @classmethod
    def refuses(cls, cfg) -> str | None:
        """Why this transport cannot serve the experiment ``cfg`` (None: it can); the config reports it under
        weights.transport."""
        return None

    @classmethod
    def payload_parameters(cls, policy, cfg) -> float:
        """How many parameters one update sends (rlhf_ray.planning.models.Architecture ``policy``)."""
        return policy.parameters("lm")

    @classmethod
    def learner_memory(cls, full: float, cfg) -> list[tuple[str, float, str, str]]:
        """What learner rank 0 holds while it publishes an update of ``full`` bytes, as the planner's memory lines
        (what, bytes, 'host' or 'device', formula): by default a full host copy in the engines' dtype."""
        return [(f"published weights ({cls.name}, rank 0)", full, "host", "N · engine dtype bytes")]

    @classmethod
    def transfer_seconds(cls, full: float, hw, placement, rates) -> dict[str, float]:
        """The planner's seconds for moving an update of ``full`` bytes to the engines, by part (after the learner's
        gather), each priced by the hardware that carries it. By default through host memory: on GPUs learner rank 0
        copies it device → host (PCIe); the object store's put; engines on other nodes pull it over the NICs
        (``rates.pull_seconds``); what the transport adds (``_extra_seconds``); on GPUs every engine copies it host →
        device (PCIe, the engines at once). ``hw``: rlhf_ray.planning.hardware.Hardware; ``placement``:
        rlhf_ray.planning.timing.Placement; ``rates``: the planner's rates (rlhf_ray.planning.timing.TransferRates)."""
        parts = {"device_to_host": full / hw.host_link_bandwidth} if hw.is_gpu else {}
        parts["object_store"] = full / rates.object_store_bytes_per_s
        if placement.engines_off_learner_node:
            parts["cross_node_pull"] = rates.pull_seconds(full, hw, placement.engine_nodes_elsewhere)
        parts.update(cls._extra_seconds(full, rates))
        if hw.is_gpu:
            parts["host_to_device"] = full / hw.host_link_bandwidth
        return parts

    @classmethod
    def _extra_seconds(cls, full: float, rates) -> dict[str, float]:
        """What a transport adds to the default's transfer (before the host/device copies)."""
        return {}
