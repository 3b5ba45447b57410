"""Capacity and step-time plan of a PPO config, before anything starts (rlhf_ray.planning).

    python -m rlhf_ray.plan configs/tulu25_ppo_13b.yaml --gpus 16 --gpu h100-80gb --nodes 2 [--json plan.json]
    python -m rlhf_ray.plan configs/smollm2_cpu.yaml                   # this machine (no GPUs in the config)

Exit status: 0 when everything fits, 1 when something does not (the plan says what, and what to change),
2 for a config or model the planner cannot read.
"""
from __future__ import annotations

import argparse
import sys

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.planning import GPU_NAMES, PlannerError, format_plan, plan_experiment, write_plan


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs available (default: what the config reserves)")
    parser.add_argument("--gpu", choices=GPU_NAMES, default=None,
                        help="device kind (default: cpu for a config without GPUs, else h100-80gb)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes the GPUs are spread over (default: 8 per node)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON to OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_experiment(cfg, args.gpu, gpus=args.gpus, nodes=args.nodes, config_path=args.config)
    except (ConfigError, PlannerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_plan(plan)))
    if args.json:
        print(f"plan written to {write_plan(plan, args.json)}")
    return 0 if plan.fits else 1
