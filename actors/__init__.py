"""Ray role classes: generation (vLLM), reward, reference, learner (DeepSpeed).

Each is a plain class with a few coarse, batch-level methods; ``rlhf_ray.cluster.roles`` turns them into Ray
actors with the resources from the config. Coarse methods return ``(result, seconds)`` where seconds
is the actor's own compute time, so the driver can tell compute from orchestration overhead.
"""
