"""Reward models as shared Ray Serve applications: deployed once, scored by any number of experiments.

The command: ``python -m rlhf_ray.rm --help``. What it does lives in rlhf_ray.cli.rm.
"""
from rlhf_ray.cli.rm import main

if __name__ == "__main__":
    raise SystemExit(main())
