"""Which reward makes the better policy: K runs of one config, their checkpoints scored by a gold judge against KL.

The command: ``python -m rlhf_ray.compare_rewards --help``. What it does lives in rlhf_ray.cli.compare_rewards.
"""
from rlhf_ray.cli.compare_rewards import main

if __name__ == "__main__":
    raise SystemExit(main())
