"""Reward backends (a model in the reward actors, a shared Ray Serve RM, an HTTP endpoint, a Python function) and
the reward functions shipped with the project: config values name them as ``rlhf_ray.rewards:NAME``.

    base       the sample a backend scores, the backend interface, stored RM statistics (imports no other module here)
    backends   the backends behind models.reward.kind
    judge      an LLM judge in the reward actors (vLLM): judging prompts, verdict rules, templates/*.jinja
    http       the rlhf-ray/reward/v1 schema: client, reference server (python -m rlhf_ray.rewards.http)
    serve      an RM as a shared Ray Serve application (managed with python -m rlhf_ray.rm); a run's version of it
    versions   NAME@vN from the Serve application names: latest, the next version, the model fingerprint
    normalize  raw scores -> what PPO sees (models.reward.normalize / clip)
    functions  verifiable reward functions
"""
from rlhf_ray.rewards.functions import char_frequency, concise_answer

__all__ = ["char_frequency", "concise_answer"]
