"""Capacity and step-time plan of a PPO config, before anything starts (rlhf_ray.planning).

The command: ``python -m rlhf_ray.plan --help``. What it does lives in rlhf_ray.cli.plan.
"""
from rlhf_ray.cli.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
