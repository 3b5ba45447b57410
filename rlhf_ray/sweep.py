"""The rollout:learn sweep: short PPO runs over a grid of resource and batch settings, side by side.

The command: ``python -m rlhf_ray.sweep --help``. What it does lives in rlhf_ray.cli.sweep.
"""
from rlhf_ray.cli.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
