"""Policy evaluation, AlpacaEval style, judged by a reward model: every policy answers the same held-out prompts

The command: ``python -m rlhf_ray.evaluate --help``. What it does lives in rlhf_ray.cli.evaluate.
"""
from rlhf_ray.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
