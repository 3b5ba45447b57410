"""The end-of-run report: a four-panel picture and a one-line verdict, from ``metrics.jsonl``.

The command: ``python -m rlhf_ray.report --help``. What it does lives in rlhf_ray.run.report.
"""
from rlhf_ray.run.report import main

if __name__ == "__main__":
    raise SystemExit(main())
