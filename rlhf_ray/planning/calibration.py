"""Calibration: the planner's factors fitted to measured steps, saved as JSON, and applied to plans of the same models
on the same hardware (python -m rlhf_ray.plan --calibrate / --from-run / --calibration; planning.calibration for the
plan at startup).

What is fitted (hardware.WorkFactors), per kind of work of a step (hardware.WORK_KINDS: generate, reward, reference,
values, learn, weight_sync):
- a time factor k, measured / predicted seconds of that work. It multiplies the work's own formula
  (rlhf_ray.planning.timing), not a phase's total at the probed layout, so what the formula says about other layouts
  (sequences per engine, rows per rank, ZeRO traffic, tensor parallelism) carries over. It stands for every efficiency
  constant of that work at once: one measurement per kind cannot tell them apart.
- a serial share σ (CPU machines): the part of that work which more threads do not speed up
  (rlhf_ray.planning.cores). It is fitted only where the probes ran the work at two thread counts or more (the
  balancer's second probe flips ppo.async_steps, which halves each side's cores); elsewhere the prior stands
  (cores.SERIAL_SHARE_PRIOR).
- the driver's own seconds per step, sequential and overlapped: each probe's measured step minus the step its measured
  phases make (timing.step_seconds), the median per mode, at least 0.

``fit`` is a pure function of the probes: each one's plan, made without a calibration (its ``work``: which actors do
each kind of work, with how many threads, on which cores), and its measured seconds. Per kind, k and σ minimise
Σ_probes log²(measured / predicted) + PRIOR_WEIGHT · (σ − prior)²: σ on a grid of SERIAL_GRID_STEP, k for each σ by
fixed-point iteration. Kinds that share cores (the score phase) are fitted in turn until none moves (at most
COORDINATE_ROUNDS rounds).

The file (JSON, ``FORMAT``): created (UTC), hardware (the figures the predictions were made with: a CPU plan reuses
them rather than measuring the machine again, since the factors are relative to them), machine (what a plan checks
before using it: the device, and on CPUs the processor and its cores), models (role -> name and parameters),
precision (models.dtype, deepspeed.precision), config, factors {time, serial, overhead_s}, lengths (the planning.*
means the probes measured where the config gave none, averaged: the plans they were fitted with used them), probes
[{label, dir, overrides, lengths, measured, predicted, calibrated}].
"""
from __future__ import annotations

import datetime
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from rlhf_ray.planning.cores import SERIAL_SHARE_PRIOR, Group, work_seconds
from rlhf_ray.planning.hardware import WORK_KINDS, Hardware, WorkFactors, usable_cores
from rlhf_ray.planning.timing import PhaseTime, step_seconds

FORMAT = "rlhf_ray.calibration/1"
# Ties between equally good fits go to the prior: a weight far below any real misfit (0.01² in log units is a 1 % error).
PRIOR_WEIGHT = 1e-4
SERIAL_GRID_STEP = 0.02
FIXED_POINT_ITERATIONS = 12
COORDINATE_ROUNDS = 30      # at most; until no factor moves by CONVERGED
CONVERGED = 1e-4
FACTOR_RANGE = (1e-3, 1e3)   # a factor outside it means the model misses the work entirely: clipped, and visible
# metrics.jsonl keys measured for each kind of work (the first present; overlapped runs log the values pass's wall)
MEASURED_KEYS = {"generate": ("time/generate",), "reward": ("time/reward",), "reference": ("time/reference",),
                 "values": ("time/values_wall", "time/values"), "learn": ("time/learn",),
                 "weight_sync": ("time/weight_sync",), "step": ("time/step",)}


class CalibrationError(ValueError):
    """A calibration file that cannot be read, or measured on other hardware or models; one line."""


@dataclass
class Probe:
    """One measured run: its plan without a calibration (``plan.work`` is what the fit reads), its measured seconds
    per kind of work and per step (medians over its steps), where it ran and how it differed from the base config."""
    label: str
    plan: object                    # rlhf_ray.planning.planner.Plan
    measured: dict[str, float]
    source: str = ""
    overrides: list[str] = field(default_factory=list)
    lengths: dict[str, int] = field(default_factory=dict)   # planning.* means measured, its plan's, where the config gave none
    config: object = None                       # the config it ran (an ExperimentConfig), where known


def measured_seconds(rows: list[dict]) -> dict[str, float]:
    """Each kind's and the step's median seconds over metrics.jsonl rows (MEASURED_KEYS); a kind not logged is left
    out."""
    measured = {}
    for kind, keys in MEASURED_KEYS.items():
        key = next((k for k in keys if rows and k in rows[-1]), None)
        if key is not None:
            measured[kind] = statistics.median(r[key] for r in rows if key in r)
    return measured


# ------------------------------------------------------------------------------------------- the fit

def fit(probes: list[Probe]) -> WorkFactors:
    """The factors that make the probes' plans predict what they measured (the module docstring's criterion)."""
    if not probes:
        raise CalibrationError("no probe to fit")
    kinds = [k for k in WORK_KINDS if any(_usable(p, k) for p in probes)]
    factors, serials = {k: 1.0 for k in kinds}, dict(SERIAL_SHARE_PRIOR)
    for _ in range(COORDINATE_ROUNDS):
        before = dict(factors)
        for kind in kinds:
            factors[kind], serials[kind] = _fit_kind(kind, probes, factors, serials)
        if all(abs(factors[k] / before[k] - 1) < CONVERGED for k in kinds):
            break
    overhead = {}
    for mode, async_on in (("sequential", False), ("overlapped", True)):
        measured = [p.measured["step"] - _step(p.measured, p.plan.async_steps) for p in probes
                    if bool(p.plan.async_steps) == async_on and "step" in p.measured]
        if measured:
            overhead[mode] = max(0.0, statistics.median(measured))
    return WorkFactors(time=factors, serial={k: serials[k] for k in kinds}, overhead_s=overhead)


def _usable(probe: Probe, kind: str) -> bool:
    return (kind in probe.plan.work and probe.measured.get(kind, 0.0) > 0
            and probe.plan.work[kind].seconds(kind) > 0)


def _fit_kind(kind: str, probes: list[Probe], factors: dict, serials: dict) -> tuple[float, float]:
    """(k, σ) of one kind, the others held at ``factors`` and ``serials``."""
    used = [p for p in probes if _usable(p, kind)]
    prior = SERIAL_SHARE_PRIOR[kind]
    threads = {w.threads for p in used if p.plan.work[kind].pool for w in p.plan.work[kind].works if w.kind == kind}
    # σ is what changes with the threads: measured only where the probes ran this work at two thread counts or more
    grid = [i * SERIAL_GRID_STEP for i in range(round(1 / SERIAL_GRID_STEP) + 1)] if len(threads) > 1 else [prior]
    best = (math.inf, factors[kind], prior)
    for serial in grid:
        trial_serials, k = {**serials, kind: serial}, factors[kind]
        for _ in range(FIXED_POINT_ITERATIONS):
            k = _clip(k * math.exp(statistics.fmean(_log_errors(kind, used, {**factors, kind: k}, trial_serials))))
        error = sum(e * e for e in _log_errors(kind, used, {**factors, kind: k}, trial_serials)) \
            + PRIOR_WEIGHT * (serial - prior) ** 2
        if error < best[0] - 1e-15:
            best = (error, k, serial)
    return best[1], best[2]


def _log_errors(kind: str, probes: list[Probe], factors: dict, serials: dict) -> list[float]:
    """log(measured / predicted) of ``kind`` in each probe."""
    return [math.log(p.measured[kind] / p.plan.work[kind].seconds(kind, factors, serials)) for p in probes]


def _clip(k: float) -> float:
    return min(max(k, FACTOR_RANGE[0]), FACTOR_RANGE[1])


def _step(seconds: dict[str, float], async_steps: int, overhead_s: float = 0.0) -> float:
    """timing.step_seconds of per-kind seconds (a kind absent: 0 s)."""
    get = lambda kind: seconds.get(kind, 0.0)  # noqa: E731
    parts = {role: get(role) for role in ("reward", "reference", "values")}
    phases = {"generate": PhaseTime("generate", get("generate")),
              "score": PhaseTime("score", max(parts.values()), parts),
              "learn": PhaseTime("learn", get("learn")), "weight_sync": PhaseTime("weight_sync", get("weight_sync"))}
    return step_seconds(phases, async_steps, overhead_s)


def predicted_seconds(work: dict[str, Group], async_steps: int, factors: WorkFactors | None = None) -> dict[str, float]:
    """Each kind's and the step's seconds a plan's work takes with ``factors`` (none: the planner's constants)."""
    seconds = work_seconds(work, factors.time if factors else None, factors.serial if factors else None)
    overhead = 0.0
    if factors and factors.overhead_s:
        mode, other = ("overlapped", "sequential") if async_steps else ("sequential", "overlapped")
        overhead = factors.overhead_s.get(mode, factors.overhead_s.get(other, 0.0))
    return {**seconds, "step": _step(seconds, async_steps, overhead)}


# ------------------------------------------------------------------------------------------- the file

@dataclass
class Calibration:
    """A fitted calibration and what it was measured on (the module docstring's file format)."""
    factors: WorkFactors
    hardware: dict
    machine: dict
    models: dict
    precision: dict
    config: str = ""
    created: str = ""
    lengths: dict[str, int] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)
    path: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("path")
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self.path = str(path)
        return path

    def length_overrides(self, cfg) -> list[str]:
        """The measured mean lengths as overrides of ``cfg``, for those of its planning.* keys it leaves unset."""
        return [f"{key}={value}" for key, value in self.lengths.items()
                if getattr(cfg.planning, key.removeprefix("planning.")) is None]

    def step_error(self) -> float:
        """The largest |calibrated / measured − 1| of a probe's step: how close the fit came to what it was fitted to."""
        return max((abs(p["calibrated"]["step"] / p["measured"]["step"] - 1) for p in self.probes
                    if p["measured"].get("step")), default=0.0)

    def describe(self) -> str:
        """Where and on what it was measured, in a few words."""
        policy = self.models.get("policy", {}).get("name", "?")
        return f"{self.path or 'calibration'}: {_identity_text(self.machine)}, policy {policy}, {self.created}"


def calibrate(probes: list[Probe], config: str = "") -> Calibration:
    """Fit ``probes`` and record what they ran on (the first probe's hardware, models and precision; every probe must
    share them), each probe's measured, uncalibrated and calibrated seconds."""
    first = probes[0].plan
    for probe in probes[1:]:
        differs = mismatch_of(_identity(probe.plan.hardware), _models(probe.plan), _precision(probe.plan),
                              _identity(first.hardware), _models(first), _precision(first))
        if differs:
            raise CalibrationError(f"probe {probe.label} ran on other hardware or models than {probes[0].label}: "
                                   f"{differs}")
    factors = fit(probes)
    measured_keys = sorted({key for p in probes for key in p.lengths})
    calibration = Calibration(
        factors, hardware=_hardware_figures(first.hardware), machine=_identity(first.hardware), models=_models(first),
        precision=_precision(first), config=config,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        lengths={key: round(statistics.fmean(p.lengths[key] for p in probes if key in p.lengths))
                 for key in measured_keys})
    for probe in probes:
        calibration.probes.append({
            "label": probe.label, "dir": probe.source, "overrides": probe.overrides, "lengths": probe.lengths,
            "measured": probe.measured,
            "predicted": predicted_seconds(probe.plan.work, probe.plan.async_steps),
            "calibrated": predicted_seconds(probe.plan.work, probe.plan.async_steps, factors)})
    return calibration


def load(path: str | Path) -> Calibration:
    """A calibration file (CalibrationError, one line, if it is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CalibrationError(f"cannot read calibration {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a calibration file (no \"format\": \"{FORMAT}\"); python -m "
                               "rlhf_ray.plan --calibrate CONFIG writes one")
    try:
        factors = WorkFactors(**{**data["factors"], "source": str(path)})
        unknown = set(factors.time) - set(WORK_KINDS)
        if unknown:
            raise CalibrationError(f"{path}: unknown kind(s) of work {sorted(unknown)}; known: {', '.join(WORK_KINDS)}")
        kept = {f.name for f in fields(Calibration)} - {"factors", "path"}
        return Calibration(factors, **{k: v for k, v in data.items() if k in kept}, path=str(path))
    except (KeyError, TypeError) as err:
        raise CalibrationError(f"{path}: malformed calibration ({err})") from None


# ------------------------------------------------------------------------------------------- using it

def apply(calibration: Calibration, hw: Hardware) -> Hardware:
    """``hw`` with the calibration's factors. A CPU plan takes the calibration's own figures for this machine (the
    factors are relative to them; measuring again would move them with the machine's load)."""
    factors = replace(calibration.factors, source=calibration.describe())
    if hw.is_gpu:
        return replace(hw, factors=factors)
    return replace(hardware_from_figures(calibration.hardware), factors=factors)


def check(calibration: Calibration, hw: Hardware, archs: dict, cfg) -> str | None:
    """Why ``calibration`` does not apply to ``cfg`` (its models ``archs``) on ``hw``: other hardware, models or
    precision, in one line; None if it does."""
    differs = mismatch_of(calibration.machine, calibration.models, calibration.precision,
                          _identity(hw), _models_of(archs), precision_of(cfg))
    return f"calibration {calibration.path} does not apply: {differs}" if differs else None


def with_calibration(path: str, cfg, hw: Hardware | None, archs: dict, default: str = "cpu") -> tuple[Hardware, str | None]:
    """(the hardware to plan ``cfg`` on with the calibration at ``path``, None) or, where it cannot be used, (the
    hardware without it, why not: one line). ``hw`` None: the planner's default, ``default`` ('cpu': this machine,
    as the calibration measured it where it was measured on a CPU)."""
    from rlhf_ray.planning.hardware import get_hardware

    try:
        found = load(path)
    except CalibrationError as err:
        return hw or get_hardware(default), str(err)
    if hw is None:
        hw = hardware_from_figures(found.hardware) if default == "cpu" and found.machine.get("device") == "cpu" \
            else get_hardware(default)
    why = check(found, hw, archs, cfg)
    return (hw, why) if why else (apply(found, hw), None)


def mismatch_of(machine: dict, models: dict, precision: dict, other_machine: dict, other_models: dict,
                other_precision: dict) -> str | None:
    """What differs between two (machine, models, precision) records, or None. Models are compared role by role where
    both have the role."""
    if machine != other_machine:
        return f"measured on {_identity_text(machine)}, this is {_identity_text(other_machine)}"
    for role in sorted(set(models) & set(other_models), key=lambda r: (r != "policy", r)):
        if models[role] != other_models[role]:
            return (f"its {role} was {models[role]['name']} ({models[role]['parameters'] / 1e6:.1f} M parameters), "
                    f"here {other_models[role]['name']} ({other_models[role]['parameters'] / 1e6:.1f} M)")
    if precision != other_precision:
        return f"measured with {_precision_text(precision)}, here {_precision_text(other_precision)}"
    return None


def _identity(hw: Hardware) -> dict:
    """What a calibration must have been measured on: the device and, for a CPU machine, its processor and cores."""
    if hw.is_gpu:
        return {"device": hw.name, "memory_gib": round(hw.memory_bytes / 2**30, 1),
                "bf16_tflops": round(hw.peak_flops_16bit / 1e12, 1)}
    from rlhf_ray.cluster.machine import cpu_model

    return {"device": "cpu", "cpu_model": cpu_model(), "cores": hw.cores or usable_cores()}


def _identity_text(machine: dict) -> str:
    if machine.get("device") == "cpu":
        return f"{machine.get('cpu_model')} × {machine.get('cores')} cores"
    return str(machine.get("device"))


def _models(plan) -> dict:
    return _models_of(plan.models)


def _models_of(archs: dict) -> dict:
    return {role: {"name": arch.name, "parameters": arch.parameters("lm" if role in ("policy", "reference") else
                                                                    "score")}
            for role, arch in archs.items()}


def _precision(plan) -> dict:
    return dict(plan.precision)


def precision_of(cfg) -> dict:
    """What a calibration's factors depend on besides the hardware and the models: the engines' and roles' dtype and
    the learner's precision."""
    return {"models.dtype": cfg.models.dtype, "deepspeed.precision": cfg.deepspeed.precision}


def _precision_text(precision: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in precision.items()) or "unknown precision"


def _hardware_figures(hw: Hardware) -> dict:
    figures = asdict(replace(hw, factors=None))
    figures.pop("factors")
    return figures


def hardware_from_figures(figures: dict) -> Hardware:
    """A Hardware from its figures (a calibration's, or a plan.json's ``hardware``), without factors; a CPU machine of
    unknown cores: this one's."""
    known = {f.name for f in fields(Hardware)} - {"factors"}
    hw = Hardware(**{k: v for k, v in figures.items() if k in known})
    return hw if hw.is_gpu or hw.cores else replace(hw, cores=usable_cores())
