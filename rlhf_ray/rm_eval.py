"""Reward-model evaluation, RewardBench style: pairwise accuracy (the chosen response scored strictly higher)

The command: ``python -m rlhf_ray.rm_eval --help``. What it does lives in rlhf_ray.cli.rm_eval.
"""
from rlhf_ray.cli.rm_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
