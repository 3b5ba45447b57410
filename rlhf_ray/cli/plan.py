"""Capacity and step-time plan of a PPO config, before anything starts (rlhf_ray.planning).

    python -m rlhf_ray.plan configs/tulu25_ppo_13b.yaml --gpus 16 --gpu h100-80gb --nodes 2 [--json plan.json]
    python -m rlhf_ray.plan configs/smollm2_cpu.yaml                   # this machine (no GPUs in the config)
    python -m rlhf_ray.plan CONFIG --gpus 64 --gpu-spec memory_gib=140,bf16_tflops=990,... --host-memory-gib 2048
    python -m rlhf_ray.plan CONFIG planning.response_tokens_mean=2000 generation.max_new_tokens=16384
    python -m rlhf_ray.plan --calibrate configs/tiny_cpu.yaml [--from-run DIR] [--grid KEY=V1,V2] [--out DIR]
    python -m rlhf_ray.plan CONFIG --calibration runs/balance/calibration.json

--calibrate: the closed-loop balancer (rlhf_ray.cli.balance): short probe runs, the planner's factors fitted to them
and saved, the layouts the cluster allows predicted, the chosen one written as a complete config.
--calibration: a plan with the factors a calibration measured; one measured on other hardware, models or precision
is refused.

Exit status: 0 when everything fits, 1 when something does not (the plan says what, and what to change),
2 for a config, model or device the planner cannot read.
"""
from __future__ import annotations

import argparse
import sys

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.planning import GPU_NAMES, PlannerError, format_plan, get_hardware, plan_experiment, write_plan
from rlhf_ray.planning.calibration import CalibrationError
from rlhf_ray.planning.hardware import GPU_SPEC_FIELDS, GpuSpecError, parse_gpu_spec, with_host_memory
from rlhf_ray.planning.planner import requested_gpus_of


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
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="plan with the factors of a calibration file (python -m rlhf_ray.plan --calibrate writes "
                             "one); refused if measured on other hardware, models or precision")
    balance = parser.add_argument_group("the balancer (--calibrate)")
    balance.add_argument("--calibrate", action="store_true",
                         help="probe the config on its cluster, fit the planner to what it measured (<out>/"
                              "calibration.json), rank the layouts the cluster allows and write the fastest as a "
                              "complete config (<out>/balanced.yaml)")
    balance.add_argument("--from-run", action="append", default=[], metavar="DIR",
                         help="fit finished runs' output dirs instead of probing (repeatable)")
    balance.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                         help="a layout option and its values (repeatable; replaces the default grid of engines, "
                              "learner ranks, ppo.async_steps, resources.rollout_cores and threads per role)")
    balance.add_argument("--out", default="runs/balance", help="probes, calibration.json, candidates.json, "
                                                               "balanced.yaml")
    balance.add_argument("--write-config", default=None, metavar="YAML", help="the chosen layout's config "
                                                                              "(default <out>/balanced.yaml)")
    balance.add_argument("--probe-steps", type=int, default=3, help="measured steps per probe")
    balance.add_argument("--probe-warmup", type=int, default=1, help="steps dropped per probe (and per --from-run)")
    balance.add_argument("--timeout-s", type=float, default=900, help="per probe")
    balance.add_argument("--verify", action="store_true", help="also measure the chosen layout; refit and choose "
                                                               "again if it is off its prediction by over 15 %%")
    balance.add_argument("--rounds", type=int, default=2, help="--verify: at most this many refits")
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


def calibrated(hardware, path: str, cfg):
    """``hardware`` (a name, a Hardware or None: the planner's default) with the factors of the calibration at
    ``path``; CalibrationError (one line) if it cannot be read or was measured on other hardware, models or
    precision."""
    from rlhf_ray.planning.calibration import with_calibration
    from rlhf_ray.planning.planner import resolve_models

    default = "h100-80gb" if requested_gpus_of(cfg) > 0 else "cpu"
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    hw, why = with_calibration(path, cfg, hw, resolve_models(cfg), default)
    if why:
        raise CalibrationError(f"--calibration: {why}")
    return hw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.calibrate or args.from_run:
        from rlhf_ray.cli.balance import main as balance

        try:
            hardware = hardware_of(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return balance(args, hardware)
    try:
        hardware = hardware_of(args)
        cfg = load_config(args.config, args.overrides)
        if args.calibration:
            hardware = calibrated(hardware, args.calibration, cfg)
        plan = plan_experiment(cfg, hardware, gpus=args.gpus, nodes=args.nodes, config_path=args.config)
    except (ConfigError, PlannerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_plan(plan)))
    if args.json:
        print(f"plan written to {write_plan(plan, args.json)}")
    return 0 if plan.fits else 1
