"""A transport that lives outside rlhf_ray (tests/test_toy_transport.py names it as ``tests.toy_transport:ToyTransport``):
the whole policy pickled into one object-store object, no buckets. Its reports say which processes published and
loaded it, so a test can tell that its own methods ran in the learner and in the engines."""
from __future__ import annotations

import os

from rlhf_ray.weights.transport import Transport


class ToyTransport(Transport):
    name = "toy"

    def __init__(self):
        self.loads = 0

    def publish(self, buckets, tensors, group=None, config=None):
        import ray

        names = [slot.name for bucket in buckets for slot in bucket.slots]
        weights = {name: tensor.clone() for name, tensor in zip(names, tensors, strict=True)}
        return {"weights": ray.put(weights), "publisher": os.getpid(), "tensors": len(weights)}

    def load(self, llm, payload, timeout_s):
        import ray

        from rlhf_ray.weights.engine import load_into_engine

        weights = ray.get(payload["weights"], timeout=timeout_s)
        report = llm.collective_rpc(load_into_engine, kwargs={"weights": iter(weights.items())})[0]
        self.loads += 1
        return {**report, "toy": {"publisher": payload["publisher"], "published": payload["tensors"],
                                  "loader": os.getpid(), "loads": self.loads}}
