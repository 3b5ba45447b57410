"""A job for tests/test_ray_job_submit.py: where this job's driver and its Ray workers import the role classes from,
and whether anything named ``actors`` is importable there. Prints one JSON line."""
import importlib.util
import json

import ray


def report() -> dict:
    import rlhf_ray.actors.role as role

    return {"role": role.__file__, "bare_actors": importlib.util.find_spec("actors") is not None}


@ray.remote(num_cpus=0.1)
def in_a_worker() -> dict:
    return report()


ray.init()
from rlhf_ray.actors.role import Role  # noqa: E402  (after ray.init: the driver joins the job's cluster)

actor = ray.remote(num_cpus=0.1)(Role).remote()  # the class travels by name: the worker imports rlhf_ray.actors.role
memory = ray.get(actor.memory.remote())
print("IMPORTS" + json.dumps({"driver": report(), "worker": ray.get(in_a_worker.remote()),
                              "actor_memory_gb": memory["rss_gb"]}))
