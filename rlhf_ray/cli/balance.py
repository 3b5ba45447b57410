"""The closed-loop balancer (python -m rlhf_ray.plan --calibrate CONFIG): probe, fit, search, write the layout.

    python -m rlhf_ray.plan --calibrate configs/tiny_cpu.yaml [key=value ...] [--out runs/balance]
    python -m rlhf_ray.plan --calibrate CONFIG --from-run runs/tiny_cpu        # fit finished runs instead of probing
    python -m rlhf_ray.plan --calibrate CONFIG --grid ppo.async_steps=0,1 --grid resources.generation.num_actors=1,2
    python -m rlhf_ray.plan CONFIG --calibration runs/balance/calibration.json  # any plan, with the measured factors

1. Probes: short runs of the config on the cluster it names (ray.address; this machine's local Ray by default), each
   run as python -m rlhf_ray.sweep runs a point (rlhf_ray.cli.sweep.run_point): with ppo.async_steps as configured,
   and flipped (0 <-> 1), which runs every side at other thread counts and so identifies the serial shares. Or
   finished runs (--from-run: their config.yaml, plan.json and metrics.jsonl).
2. The fit (rlhf_ray.planning.calibration), written to <out>/calibration.json.
3. The layouts the cluster allows (rlhf_ray.planning.balance), each with its predicted step, phase split and idle
   share per role, fastest first (also <out>/candidates.json).
4. The chosen layout as a complete config, <out>/balanced.yaml, which python -m rlhf_ray.train --config and ray job
   submit ... -- python -m rlhf_ray.train --config take as is. It names the calibration (planning.calibration, so the
   run's plan at startup uses it) and the measured mean lengths where the config gave none
   (planning.prompt_tokens_mean: the config's prompts tokenized as the run does; planning.response_tokens_mean: the
   probes' response/length_mean). The same layout is printed as key=value overrides of the config.
With --verify the chosen layout is measured as well; where its step is further than VERIFY_TOLERANCE from its
prediction, it joins the probes, the fit is redone and the layouts ranked again (at most --rounds times).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


from rlhf_ray.cli.sweep import label_of, parse_grid, run_point
from rlhf_ray.config import ConfigError, dump_config, load_config, load_saved_config, read_yaml
from rlhf_ray.planning import plan_experiment, with_overrides
from rlhf_ray.planning.balance import Candidate, choose, cpu_candidates, default_grid, ranked, reservations
from rlhf_ray.planning.calibration import (Calibration, CalibrationError, Probe, apply, calibrate, hardware_from_figures,
                                           measured_seconds)
from rlhf_ray.planning.hardware import WORK_KINDS, get_hardware, this_machine, usable_cores
from rlhf_ray.planning.search import MIN_GAIN_FOR_MORE_GPUS, setting

# The target for a prediction: the chosen layout's measured step within 15 % of it.
VERIFY_TOLERANCE = 0.15
SHOWN_CANDIDATES = 16


# ------------------------------------------------------------------------------------------- probes

def probe_from_run(run_dir: str | Path, warmup: int = 1, label: str = "", overrides: list[str] | None = None,
                   hardware=None) -> Probe:
    """A finished run as a probe: its config (config.yaml) planned on ``hardware`` (default: what its plan at startup
    described, plan.json; else this machine, measured now), with its measured mean lengths where its config gave none
    (``measured_lengths``), and its steps after ``warmup`` (metrics.jsonl). Probes fitted together are planned on one
    hardware description (the first's): a CPU's peaks measured at each run's start move with the machine's load."""
    from rlhf_ray.run.report import load_metrics

    run_dir = Path(run_dir)
    try:
        cfg = load_saved_config(run_dir / "config.yaml")
        rows = load_metrics(run_dir)[warmup:]
    except (ConfigError, FileNotFoundError) as err:
        raise CalibrationError(f"{run_dir} is not a finished run's output_dir: {err}") from None
    if not rows:
        raise CalibrationError(f"{run_dir}: no step after the {warmup} warm-up step(s) in metrics.jsonl")
    lengths = measured_lengths(cfg, rows)
    cfg = with_overrides(cfg, [f"{key}={value}" for key, value in lengths.items()]) if lengths else cfg
    plan_file = run_dir / "plan.json"
    hw = hardware or (hardware_from_figures(json.loads(plan_file.read_text())["hardware"]) if plan_file.is_file()
                      else this_machine())
    plan = plan_experiment(cfg, hw, search=False)
    return Probe(label or run_dir.name, plan, measured_seconds(rows), str(run_dir), list(overrides or []), lengths, cfg)


def measured_lengths(cfg, rows: list[dict]) -> dict[str, int]:
    """The planner's mean lengths (planning.*) a run measured, where its config gave none: its responses' median
    response/length_mean, and its prompts' mean tokens (the config's prompts as the run reads and tokenizes them;
    left out where they cannot be read here)."""
    lengths, planning = {}, cfg.planning
    if planning.response_tokens_mean is None and "response/length_mean" in rows[-1]:
        mean = statistics.median(r["response/length_mean"] for r in rows)
        lengths["planning.response_tokens_mean"] = min(max(1, round(mean)), cfg.generation.max_new_tokens)
    if planning.prompt_tokens_mean is None:
        mean = prompt_tokens_mean(cfg)
        if mean:
            lengths["planning.prompt_tokens_mean"] = min(max(1, round(mean)), cfg.data.max_prompt_tokens)
    return lengths


def prompt_tokens_mean(cfg) -> float | None:
    """The mean tokens of the config's prompts, rendered and tokenized as the run does (rlhf_ray.data.sources); None
    where the data or the tokenizer cannot be read here."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.sources import load_prompts
    from rlhf_ray.models.specs import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.models.policy, cfg.models.cache_dir, cfg.seed))
        prompts = load_prompts(cfg.data, tokenizer).prompts
    except Exception:  # noqa: BLE001 — a hub dataset offline, a path relative to another directory: keep the caps
        return None
    return statistics.fmean(len(p.token_ids) for p in prompts) if prompts else None


def probe_points(cfg) -> list[dict]:
    """The probes' settings: ppo.async_steps as configured, and flipped (without overlap, no rollout cores)."""
    flipped = {"ppo.async_steps": 0 if cfg.ppo.async_steps else 1}
    if cfg.ppo.async_steps and cfg.resources.rollout_cores is not None:
        flipped["resources.rollout_cores"] = None
    return [{"ppo.async_steps": cfg.ppo.async_steps}, flipped]


def run_probe(config: str, overrides: list[str], point: dict, args, out: Path, hardware=None) -> Probe:
    """One probe run (rlhf_ray.cli.sweep.run_point) read back as a Probe (planned on ``hardware``: probe_from_run);
    CalibrationError if it did not finish."""
    record = run_point(config, overrides, point, args.probe_steps, args.probe_warmup, out / "probes", args.timeout_s)
    print(f"  probe {record['label']}: " + (f"step {record['step_s']:.3g} s ({record['dir']})" if record["status"] == "ok"
                                            else f"{record['status']}: {record.get('error', '')}"), flush=True)
    if record["status"] != "ok":
        raise CalibrationError(f"probe {record['label']} {record['status']}: {record.get('error', '')} "
                               f"({record.get('console', record['dir'])})")
    return probe_from_run(record["dir"], args.probe_warmup, record["label"],
                          [*overrides, *(f"{k}={v}" for k, v in point.items())], hardware)


def run_probes(config: str, overrides: list[str], cfg, args, out: Path) -> list[Probe]:
    """The probes of ``probe_points``, with Ray's CPU reservations scaled to fit this machine where they would not,
    all planned on the first one's hardware description."""
    fitted = reservations(cfg, usable_cores())
    probes: list[Probe] = []
    for point in probe_points(cfg):
        probes.append(run_probe(config, [*overrides, *fitted], point, args, out,
                                probes[0].plan.hardware if probes else None))
    return probes


# ------------------------------------------------------------------------------------------- the search

def search(cfg, calibration: Calibration, hw, grid: dict | None, gpus: int | None, nodes: int | None
           ) -> tuple[list[Candidate], Candidate | None]:
    """(candidates, the chosen one) on the calibrated hardware: a CPU machine's grid, or the GPU layout search."""
    cfg = with_overrides(cfg, calibration.length_overrides(cfg))
    hw = apply(calibration, hw)
    if hw.is_gpu:
        return gpu_candidates(cfg, hw, gpus, nodes)
    found = cpu_candidates(cfg, hw, grid or default_grid(cfg, hw.cores),
                           lambda changed: plan_experiment(changed, hw, search=False))
    return found, choose(found, calibration.step_error())


def gpu_candidates(cfg, hw, gpus: int | None, nodes: int | None) -> tuple[list[Candidate], Candidate | None]:
    """The layout as configured and the planner's layout search's answer, both planned in full."""
    from rlhf_ray.planning.search import role_shares

    plan = plan_experiment(cfg, hw, gpus=gpus, nodes=nodes)
    found = [Candidate({}, [], plan, roles=role_shares(plan.roles, plan.phases, plan.step_seconds))]
    rec = plan.recommendation
    if rec is not None and rec.overrides and rec.note != "as configured":
        changed = plan_experiment(with_overrides(cfg, rec.overrides), hw, gpus=plan.gpus, nodes=plan.nodes, search=False)
        settings = {o.partition("=")[0]: read_yaml(o.partition("=")[2]) for o in rec.overrides}
        found.append(Candidate(settings, rec.overrides, changed, roles=rec.roles))
    return found, choose(found)   # (the layout search has chosen among its own: this keeps its answer unless a tie)


# ------------------------------------------------------------------------------------------- output

def label(candidate: Candidate) -> str:
    return label_of({k: v for k, v in candidate.settings.items() if v is not None}) or "as configured"


def probe_lines(calibration: Calibration) -> list[str]:
    kinds = [k for k in (*WORK_KINDS, "step") if any(k in p["measured"] for p in calibration.probes)]
    lines = [f"  {'probe':<28} " + " ".join(f"{k[:11]:>22}" for k in kinds),
             f"  {'':<28} " + " ".join(f"{'measured/planned/fit':>22}" for _ in kinds)]
    for probe in calibration.probes:
        cells = [f"{probe['measured'].get(k, 0):.3g}/{probe['predicted'].get(k, 0):.3g}/{probe['calibrated'].get(k, 0):.3g}"
                 for k in kinds]
        lines.append(f"  {probe['label']:<28} " + " ".join(f"{c:>22}" for c in cells))
    factors = calibration.factors
    lines.append("  factors (measured / planned seconds; serial share): " + ", ".join(
        f"{k} ×{factors.time[k]:.3g}" + (f" ({factors.serial[k]:.2f})" if k in factors.serial else "")
        for k in factors.time))
    lines.append("  driver per step: " + (", ".join(f"{mode} {s:.3g} s" for mode, s in factors.overhead_s.items())
                                          or "not measured"))
    return lines


def candidate_lines(candidates: list[Candidate], chosen: Candidate | None) -> list[str]:
    shown = ranked(candidates)
    planned = [c for c in shown if c.plan is not None]
    lines = [f"  {'':2}{'layout':<58} {'step s':>7}  {'generate':>8} {'score':>6} {'learn':>6} {'sync':>6}  "
             f"{'bound by':<26} idle share per role"]
    for c in planned[:SHOWN_CANDIDATES]:
        phases, mark = c.plan.phases, "* " if c is chosen else "  "
        idle = ", ".join(f"{r.role} {r.idle_share:.0%}" for r in c.roles)
        lines.append(f"  {mark}{label(c):<58} {c.step:7.3g}  {phases['generate'].seconds:8.3g} "
                     f"{phases['score'].seconds:6.3g} {phases['learn'].seconds:6.3g} "
                     f"{phases['weight_sync'].seconds:6.3g}  {c.bound_by():<26} {idle}")
    if len(planned) > SHOWN_CANDIDATES:
        lines.append(f"  … and {len(planned) - SHOWN_CANDIDATES} slower (all in candidates.json)")
    refused = [c for c in shown if c.plan is None]
    if refused:
        lines.append(f"  {len(refused)} combination(s) the config refuses, e.g. {label(refused[0])}: {refused[0].error}")
    return lines


def candidates_json(candidates: list[Candidate], chosen: Candidate | None) -> list[dict]:
    return [{"label": label(c), "settings": c.settings, "overrides": c.overrides, "chosen": c is chosen,
             "step_s": c.step if c.plan else None, "error": c.error,
             "phases_s": {name: p.seconds for name, p in c.plan.phases.items()} if c.plan else {},
             "idle_share": {r.role: r.idle_share for r in c.roles}, "bound_by": c.bound_by() if c.plan else ""}
            for c in ranked(candidates)]


def write_layout(config: str, overrides: list[str], chosen: Candidate, calibration: Calibration,
                 path: Path) -> tuple[Path, list[str]]:
    """The chosen layout as a complete config at ``path`` (validated by reading it back) and as overrides of the
    config."""
    extra = [f"planning.calibration={_shown(calibration.path)}"]
    base = load_config(config, overrides)
    extra += calibration.length_overrides(base)
    layout = [*chosen.overrides, *extra]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# python -m rlhf_ray.plan --calibrate {config} {' '.join(overrides)}: the chosen layout\n"
                    + dump_config(with_overrides(base, layout)))
    load_config(path)
    return path, [*overrides, *layout]


def _shown(path: str | Path) -> str:
    """A path relative to the working directory where it is inside it (ray job submit --working-dir . carries it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(Path(path).resolve())


# ------------------------------------------------------------------------------------------- the command

def main(args, hardware) -> int:
    """The balancer for the parsed plan arguments (rlhf_ray.cli.plan: --calibrate and its options)."""
    out = Path(args.out)
    try:
        cfg = load_config(args.config, args.overrides)
        grid = parse_grid(args.grid) if args.grid else None
        if args.from_run:
            print(f"calibration: fitting {len(args.from_run)} finished run(s)", flush=True)
            probes = [probe_from_run(args.from_run[0], args.probe_warmup)]
            probes += [probe_from_run(d, args.probe_warmup, hardware=probes[0].plan.hardware) for d in args.from_run[1:]]
        else:
            print(f"calibration: probing {args.config} ({args.probe_warmup} + {args.probe_steps} steps per probe) → "
                  f"{out}/probes/", flush=True)
            probes = run_probes(args.config, list(args.overrides), cfg, args, out)
        calibration = calibrate(probes, args.config)
        calibration.save(out / "calibration.json")
        hw = probes[0].plan.hardware if hardware is None else get_hardware(hardware) if isinstance(hardware, str) \
            else hardware
        for round_ in range(1 + (args.rounds if args.verify else 0)):
            print(f"calibration: {calibration.describe()}")
            print("\n".join(probe_lines(calibration)))
            candidates, chosen = search(cfg, calibration, hw, grid, args.gpus, args.nodes)
            print(f"layouts ({len([c for c in candidates if c.plan])} planned; * the chosen one, the simplest within "
                  f"{max(calibration.step_error(), MIN_GAIN_FOR_MORE_GPUS):.1%} of the fastest: the fit's own error):")
            print("\n".join(candidate_lines(candidates, chosen)))
            if chosen is None or not args.verify or round_ == args.rounds or _probed(chosen, probes):
                break
            probe = run_probe(args.config, list(args.overrides), {o.partition("=")[0]: read_yaml(o.partition("=")[2])
                                                                  for o in chosen.overrides}, args, out,
                              probes[0].plan.hardware)
            error = chosen.step / probe.measured["step"] - 1
            print(f"verify: {label(chosen)} measured {probe.measured['step']:.3g} s, predicted {chosen.step:.3g} s "
                  f"({error:+.0%})")
            if abs(error) <= VERIFY_TOLERANCE:
                break
            probes.append(probe)
            calibration = calibrate(probes, args.config)
            calibration.save(out / "calibration.json")
        (out / "candidates.json").write_text(json.dumps(candidates_json(candidates, chosen), indent=2) + "\n")
        if chosen is None:
            print("no layout planned: see the refused combinations above", file=sys.stderr)
            return 1
        path, layout = write_layout(args.config, list(args.overrides), chosen, calibration,
                                    Path(args.write_config or out / "balanced.yaml"))
    except (ConfigError, CalibrationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"chosen: {label(chosen)}, predicted step {chosen.step:.3g} s, bound by {chosen.bound_by()}")
    print(f"wrote {path} (complete config) and {out / 'calibration.json'}; run it with\n"
          f"  python -m rlhf_ray.train --config {_shown(path)}\n"
          f"  ray job submit --working-dir . -- python -m rlhf_ray.train --config {_shown(path)}\n"
          f"or as overrides of {args.config}:\n  {' '.join(layout)}")
    return 0


def _probed(chosen: Candidate, probes: list[Probe]) -> bool:
    """The chosen layout is one a probe measured (every setting of it as the probe's config had it)."""
    return any(p.config is not None and all(setting(p.config, k) == v for k, v in chosen.settings.items())
               for p in probes)
