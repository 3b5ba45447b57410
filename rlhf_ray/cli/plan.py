"""Capacity and step-time plan of a PPO config, before anything starts (rlhf_ray.planning).

    python -m rlhf_ray.plan configs/tulu25_ppo_13b.yaml --gpus 16 --gpu h100-80gb --nodes 2 [--json plan.json]
    python -m rlhf_ray.plan configs/smollm2_cpu.yaml                   # this machine (no GPUs in the config)
    python -m rlhf_ray.plan CONFIG --gpus 64 --gpu-spec memory_gib=140,bf16_tflops=990,... --host-memory-gib 2048
    python -m rlhf_ray.plan CONFIG planning.response_tokens_mean=2000 generation.max_new_tokens=16384

Exit status: 0 when everything fits, 1 when something does not (the plan says what, and what to change),
2 for a config, model or device the planner cannot read.
"""
from __future__ import annotations

import argparse
import sys

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.planning import GPU_NAMES, PlannerError, format_plan, get_hardware, plan_experiment, write_plan
from rlhf_ray.planning.hardware import GPU_SPEC_FIELDS, GpuSpecError, parse_gpu_spec, with_host_memory


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for training (the planning.* keys say "
                                                     "how long prompts and responses really are)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs available (default: what the config reserves)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", choices=GPU_NAMES, default=None,
                        help="device kind from the catalogue (default: cpu for a config without GPUs, else h100-80gb)")
    device.add_argument("--gpu-spec", default=None, metavar="SPEC",
                        help="any other GPU, every field given: 'key=value,…' or a YAML/JSON file of them. Fields: "
                             + "; ".join(f"{key}: {what}" for key, what in GPU_SPEC_FIELDS.items())
                             + "; name (optional)")
    parser.add_argument("--host-memory-gib", type=float, default=None, metavar="GIB",
                        help="host memory per node in GiB (offloaded states, models while they load); default: the "
                             "catalogue's typical node, stated in the plan")
    parser.add_argument("--nodes", type=int, default=None, help="nodes the GPUs are spread over (default: as few as "
                                                                "hold them)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON to OUT")
    return parser.parse_intermixed_args(argv)   # key=value overrides before or after the options


def hardware_of(args: argparse.Namespace):
    """The device the options describe: --gpu-spec, else --gpu (None: the planner's default), with --host-memory-gib."""
    if args.gpu_spec:
        try:
            hardware = parse_gpu_spec(args.gpu_spec)
        except GpuSpecError as err:
            raise GpuSpecError(f"--gpu-spec: {err}") from None
    else:
        hardware = args.gpu
    if args.host_memory_gib is not None:
        if hardware is None:
            raise GpuSpecError("--host-memory-gib needs --gpu or --gpu-spec (a CPU plan reads this machine's memory)")
        hardware = with_host_memory(get_hardware(hardware) if isinstance(hardware, str) else hardware,
                                    args.host_memory_gib, "given (--host-memory-gib)")
    return hardware


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        hardware = hardware_of(args)
        cfg = load_config(args.config, args.overrides)
        plan = plan_experiment(cfg, hardware, gpus=args.gpus, nodes=args.nodes, config_path=args.config)
    except (ConfigError, PlannerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_plan(plan)))
    if args.json:
        print(f"plan written to {write_plan(plan, args.json)}")
    return 0 if plan.fits else 1
