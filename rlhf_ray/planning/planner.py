"""The plan of one experiment config on some hardware: memory per role and device, a predicted step split, what
does not fit and the smallest change that makes it fit, and (on GPUs) the fastest layout found for the GPUs.

    plan = plan_experiment(cfg, "h100-80gb", gpus=16, nodes=2)
    print("\\n".join(format_plan(plan)))
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_ray.planning.calibration import precision_of, with_calibration
from rlhf_ray.planning.changes import with_overrides
from rlhf_ray.planning.checks import context_overrun, host_load_per_node, host_shortfalls, lengths_note
from rlhf_ray.planning.cores import Group, cpu_phases, gpu_work
from rlhf_ray.planning.fixes import fix_candidates, host_bound
from rlhf_ray.planning.hardware import Hardware, get_hardware, with_nodes
from rlhf_ray.planning.memory import (GPU_RESERVED_BYTES, GiB, RoleMemory, frozen_role_memory, generation_memory,
                                      learner_memory)
from rlhf_ray.planning.models import Architecture, resolve_architecture
from rlhf_ray.planning.placement import Layout, place
from rlhf_ray.planning.search import RoleShare, Search, idle_reasons, role_options, role_shares
from rlhf_ray.planning.timing import (PhaseTime, Placement, driver_overhead, generate_time, learn_time, score_time,
                                      step_seconds, transport_prices, weight_sync_time)
from rlhf_ray.weights import AUTO, choose_transport

FROZEN_ROLES = ("reward", "reference")


@dataclass
class Fix:
    """A change to the config (key=value overrides) and what the plan predicts with it."""
    overrides: list[str]
    step_seconds: float
    gpus_reserved: int          # GPUs the changed config reserves
    note: str = ""


@dataclass
class Recommendation(Fix):
    """The layout search's answer (recommend_layout): a Fix with each role's GPUs and idle share of the step, the GPUs
    it leaves idle and why, the weight transport it plans, and what the search cost."""
    roles: list[RoleShare] = field(default_factory=list)
    idle_gpus: int = 0
    idle_reasons: list[str] = field(default_factory=list)
    transport: str = ""
    layouts_examined: int = 0
    search_seconds: float = 0.0


@dataclass
class Problem:
    role: str        # learner / generation / reward / reference / layout / host
    message: str
    fix: Fix | None = None


@dataclass
class Plan:
    """Everything the planner predicts for one config on some hardware (format_plan prints it, to_dict is the JSON).

    roles: each role's memory per device of one actor; layout: the devices those actors land on; kv: the generation
    engine's KV-cache room; phases: seconds per phase of one PPO step; problems: what does not fit, each with the
    smallest fix found; recommendation: the fastest layout found for the GPUs (GPU plans)."""
    config: str | None
    hardware: Hardware
    gpus: int
    nodes: int
    models: dict[str, Architecture]
    roles: list[RoleMemory]
    layout: Layout
    kv: dict
    phases: dict[str, PhaseTime]
    step_seconds: float
    steps: int
    problems: list[Problem] = field(default_factory=list)
    recommendation: Recommendation | None = None
    assumptions: list[str] = field(default_factory=list)
    host_load_bytes_per_node: dict[int, float] = field(default_factory=dict)  # host memory while the models load
    no_layout_reason: str = ""   # why the layout search found none, where host memory is why
    work: dict[str, Group] = field(default_factory=dict)   # each kind of work's actors (rlhf_ray.planning.cores)
    async_steps: int = 0         # ppo.async_steps: how the phases make a step (timing.step_seconds)
    precision: dict = field(default_factory=dict)   # models.dtype, deepspeed.precision (what a calibration matches)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layout"]["nodes_of"] = {k: sorted(v) for k, v in self.layout.nodes_of.items()}
        data["fits"] = self.fits
        data["run_hours"] = self.step_seconds * self.steps / 3600
        data["requested_gpus"] = requested_gpus(self.roles)
        for name, arch in self.models.items():
            head = "lm" if name in ("policy", "reference") else "score"
            data["models"][name]["parameters"] = arch.parameters(head)
            data["models"][name]["active_parameters"] = arch.active_parameters(head)
        return data


# ------------------------------------------------------------------------------------------- entry point

def plan_experiment(cfg, hardware: Hardware | str | None = None, gpus: int | None = None, nodes: int | None = None,
                    config_path: str | None = None, search: bool = True, archs: dict | None = None) -> Plan:
    """Plan ``cfg`` (a validated ExperimentConfig). hardware: a Hardware, a catalogue name or None (this machine
    for a config without GPUs, else h100-80gb). gpus: default the config's own request. nodes: default as few
    as hold the GPUs. search: also look for fixes and the fastest layout (GPU plans)."""
    hw = _hardware(cfg, hardware)
    gpus = (gpus or max(1, requested_gpus_of(cfg))) if hw.is_gpu else 0
    if hw.is_gpu:
        nodes = nodes or math.ceil(gpus / hw.devices_per_node)
        hw = with_nodes(hw, math.ceil(gpus / nodes))
    archs = archs or resolve_models(cfg)
    plan = _evaluate(cfg, hw, gpus, nodes or 1, archs, config_path)
    if search:
        _attach_fixes(plan, cfg)
        if hw.is_gpu:
            plan.recommendation = recommend_layout(cfg, hw, gpus, archs)
            if plan.recommendation is None:
                plan.no_layout_reason = host_bound(cfg, hw, gpus, archs) or ""
    return plan


def _hardware(cfg, hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if hardware is None:
        hardware = "h100-80gb" if requested_gpus_of(cfg) > 0 else "cpu"
    return get_hardware(hardware)


def requested_gpus_of(cfg) -> int:
    res = cfg.resources
    roles = [res.learner, res.generation] + ([res.reference] if cfg.reference_actors else []) \
        + ([res.reward] if cfg.models.reward.loads_model else [])
    return math.ceil(sum(r.num_actors * r.num_gpus for r in roles) - 1e-9)


def requested_gpus(roles: list[RoleMemory]) -> int:
    return math.ceil(sum(r.actors * r.gpus_per_actor for r in roles) - 1e-9)


def resolve_models(cfg) -> dict[str, Architecture]:
    """Architectures by role: policy, critic (value model; None under a critic-free ppo.advantage), reference (when
    reference actors compute it: ExperimentConfig.reference_source) and reward (when it is a model)."""
    models, seen = cfg.models, {}
    resolve = lambda spec: seen.setdefault(spec, resolve_architecture(spec, models.cache_dir, cfg.seed))  # noqa: E731
    archs = {"policy": resolve(models.policy)}
    if cfg.reference_actors:  # not under LoRA (the learner's base, adapters off), nor with none (ppo.kl_coef=0)
        archs["reference"] = resolve(models.reference_path)
    critic = models.value_model_path if models.value_init == "reward" else models.policy
    if cfg.ppo.needs_critic:
        archs["critic"] = resolve(critic)
    if models.reward.kind == "model":
        archs["reward"] = resolve(models.reward.model)
    return archs


# ------------------------------------------------------------------------------------------- evaluation

def _evaluate(cfg, hw: Hardware, gpus: int, nodes: int, archs: dict, config_path: str | None) -> Plan:
    problems, assumptions = [], _assumptions(cfg, hw)
    if hw.is_gpu:
        cfg = _gpu_for_cpu_roles(cfg, problems)
    roles, kv = _role_memories(cfg, archs, hw)
    layout = place(roles, hw, gpus)
    placement = _placement(layout, cfg)
    priced = _priced_transport(cfg, archs["policy"], hw, placement)
    if priced is not cfg:  # 'auto' costs least another way here than in its default order: memory follows it
        assumptions.append(f"weights.transport=auto: planned with {priced.weights.transport}, the cheapest on "
                           f"{hw.name}; the trainer takes the first that serves the run (rlhf_ray.weights)")
        cfg = priced
        roles, kv = _role_memories(cfg, archs, hw)
        layout = place(roles, hw, gpus)
    if hw.is_gpu:
        phases = {"generate": generate_time(cfg, archs["policy"], hw, kv["concurrent"]),
                  "score": score_time(cfg, archs, hw, placement),
                  "learn": learn_time(cfg, archs["policy"], archs.get("critic"), hw, placement),
                  "weight_sync": weight_sync_time(cfg, archs["policy"], hw, placement)}
        work = gpu_work(phases)
    else:   # the roles share one machine's cores
        phases, work = cpu_phases(cfg, archs, hw, placement, kv["concurrent"])
    plan = Plan(config_path, hw, gpus, nodes, archs, roles, layout, kv, phases,
                step_seconds(phases, cfg.ppo.async_steps, driver_overhead(hw, cfg.ppo.async_steps)), cfg.num_steps,
                problems, assumptions=assumptions,
                host_load_bytes_per_node=host_load_per_node(layout, roles) if hw.is_gpu else {}, work=work,
                async_steps=cfg.ppo.async_steps,
                precision=precision_of(cfg))
    plan.problems += _problems(plan)
    overrun = context_overrun(cfg, archs)
    if overrun:  # its fix (the caps lowered) is planned with the others' (_attach_fixes)
        plan.problems.append(Problem("context", overrun[0]))
    return plan


def _role_memories(cfg, archs: dict, hw: Hardware) -> tuple[list[RoleMemory], dict]:
    """Each role's memory per device of one actor, and the generation engine's KV-cache room."""
    roles = [learner_memory(archs["policy"], archs.get("critic"), cfg)]
    generation, kv = generation_memory(archs["policy"], cfg, hw.is_gpu, hw.memory_bytes)
    roles.append(generation)
    roles += [frozen_role_memory(role, archs[role], cfg) for role in FROZEN_ROLES if role in archs]
    return roles, kv


def _gpu_for_cpu_roles(cfg, problems: list[Problem]):
    """On GPU hardware a role reserving no GPU would run on CPUs: say so, and plan it with one GPU per actor."""
    changes = []
    for role in ("learner", "generation") + (("reference",) if cfg.reference_actors else ()) \
            + (("reward",) if cfg.models.reward.loads_model else ()):
        res = getattr(cfg.resources, role)
        if res.num_gpus == 0:
            problems.append(Problem("layout", f"resources.{role}.num_gpus is 0: it would run on CPUs; planned with "
                                              f"{res.tensor_parallel_size} GPU(s) per actor"))
            changes.append(f"resources.{role}.num_gpus={res.tensor_parallel_size}")
    return with_overrides(cfg, changes) if changes else cfg


def _placement(layout: Layout, cfg) -> Placement:
    nodes = layout.nodes_of
    learner_nodes = nodes.get("learner", {0}) or {0}
    first = min(learner_nodes)
    elsewhere = len(nodes.get("generation", set()) - {first})
    return Placement(learner_crosses_nodes=len(learner_nodes) > 1, engines_off_learner_node=bool(elsewhere),
                     engine_nodes_elsewhere=max(elsewhere, 1),
                     reward_crosses_nodes=len(nodes.get("reward", ())) > 1,
                     reference_crosses_nodes=len(nodes.get("reference", ())) > 1,
                     learner_ranks_per_node=math.ceil(cfg.resources.learner.num_actors / len(learner_nodes)))


def _priced_transport(cfg, policy: Architecture, hw: Hardware, placement: Placement):
    """``cfg``, or a copy with weights.transport=auto replaced by the transport priced cheapest here where that is not
    the one the trainer's 'auto' takes without prices (rlhf_ray.weights.choose_transport)."""
    if cfg.weights.transport != AUTO:
        return cfg
    prices = {name: phase.seconds for name, phase in transport_prices(cfg, policy, hw, placement).items()}
    name = choose_transport(cfg, prices)[0]
    if name == choose_transport(cfg)[0]:
        return cfg
    return cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"transport": name})})


def _problems(plan: Plan) -> list[Problem]:
    problems = []
    asked, roles = requested_gpus(plan.roles), {r.role: r for r in plan.roles}
    if plan.hardware.is_gpu and asked > plan.gpus:
        problems.append(Problem("layout", f"the config reserves {asked} GPUs; {plan.gpus} available"))
    elif plan.layout.unplaced:
        problems.append(Problem("layout", "cannot place " + "; ".join(plan.layout.unplaced)))
    if plan.kv["sequences_that_fit"] < 1:
        gen = roles["generation"]
        problems.append(Problem("generation", f"generation: weights {gen.items[0].bytes / GiB:.1f} GiB per GPU leave no "
                                              f"room for one sequence's KV cache "
                                              f"({plan.kv['kv_bytes_per_sequence'] / GiB:.2f} GiB)"))
    reported = {p.role for p in problems}
    problems += [p for p in _devices_over_capacity(plan) if p.role not in reported]
    if plan.hardware.is_gpu:
        problems += [Problem("host", message) for message in
                     host_shortfalls(plan.layout, plan.host_load_bytes_per_node, plan.hardware)]
    return problems


def _devices_over_capacity(plan: Plan) -> list[Problem]:
    """One problem per role whose devices are over capacity (named by the first actor on the device)."""
    over: dict[str, list] = {}
    for dev in plan.layout.devices:
        if not dev.fits:
            over.setdefault(dev.actors[0].split("[")[0], []).append(dev)
    problems = []
    for role, devices in over.items():
        dev = devices[0]
        where = f"gpu {dev.index} (node {dev.node})" if plan.hardware.is_gpu else "this machine's memory"
        more = f" (and {len(devices) - 1} more GPU(s) like it)" if len(devices) > 1 else ""
        problems.append(Problem(role, f"{where}: {', '.join(dev.actors)} need {dev.used_bytes / GiB:.1f} GiB of "
                                      f"{dev.capacity_bytes / GiB:.1f}{more}"))
    return problems


def _assumptions(cfg, hw: Hardware) -> list[str]:
    notes = [lengths_note(cfg),
             f"efficiencies and overheads: measured on this hardware ({hw.factors.source})" if hw.factors else
             "efficiencies and overheads: the constants of rlhf_ray.planning.timing (not fitted to any run)"]
    reference, why = cfg.reference_source()
    if reference == "none":
        notes.append(f"{why}: none planned")
    if cfg.models.reward.kind == "judge":
        notes.append(f"models.reward.kind=judge: the judge's generation ({cfg.models.reward.model}, up to "
                     f"{cfg.models.reward.judge.max_tokens} verdict tokens per judging prompt) is NOT priced"
                     + (f", nor its baseline's ({cfg.models.reward.judge.baseline}, up to "
                        f"{cfg.models.reward.judge.baseline_max_tokens} tokens per new prompt)"
                        if cfg.models.reward.judge.baseline else "")
                     + " — its score phase is planned as one call's overhead and its engines' memory is not counted; "
                     "measure it "
                     "(benchmarks/judge_throughput.py) before trusting this plan's step time")
    if cfg.models.reward.kind == "composite":
        models = [c.name for c in cfg.models.reward.components if c.loads_model]
        notes.append("models.reward.kind=composite: planned as light work, like a function; its components are not "
                     "sized" + (f" — the RMs or judges of {', '.join(models)} load in the reward actor, on "
                                "resources.reward's CPUs/GPUs, and their memory and time (a judge's generation "
                                "included) are not in this plan" if models else ""))
    if hw.is_gpu:
        notes.append(f"{GPU_RESERVED_BYTES / GiB:.1f} GiB per GPU reserved for CUDA context, NCCL and fragmentation; "
                     "vLLM takes 85 % of its GPUs")
        notes.append(f"host memory per node {hw.host_memory_bytes / GiB:.0f} GiB: {hw.host_memory_source}")
    else:
        notes.append("one machine: every role shares its RAM and cores, with the run's threads per phase "
                     "(rlhf_ray.planning.cores)")
        if "measured" in hw.source and not hw.factors:
            notes.append("this machine's peak and bandwidth were measured just now: other processes' load lowers them")
    return notes


# ------------------------------------------------------------------------------------------- config changes

def _try(cfg, overrides: list[str], hw: Hardware, gpus: int, archs: dict) -> tuple[Plan, int] | None:
    """The plan with ``overrides`` applied (on more GPUs if the change reserves more), or None if invalid."""
    try:
        changed = with_overrides(cfg, overrides)
    except ValueError:
        return None
    needed = max(gpus, requested_gpus_of(changed)) if hw.is_gpu else gpus
    nodes = math.ceil(needed / hw.devices_per_node) if hw.is_gpu else 1
    return _evaluate(changed, hw, needed, nodes, archs, None), needed


def _attach_fixes(plan: Plan, cfg) -> None:
    """For each problem its fix: for a role that does not fit, the cheapest change that fits it (smallest_fix); host
    memory over capacity is the learner's (offloaded states, or its ranks loading their models: the fix search sizes
    both); a sequence over the model's context, the caps lowered (context_fix). A layout that does not fit the GPUs is
    answered by the recommended layout."""
    for problem in plan.problems:
        if problem.role == "context":
            problem.fix = context_fix(cfg, plan)
        elif problem.role != "layout":
            role = "learner" if problem.role == "host" else problem.role
            problem.fix = smallest_fix(cfg, role, plan)
            if role == "learner" and (problem.fix is None or problem.fix.gpus_reserved > plan.gpus):
                why = host_bound(cfg, plan.hardware, plan.gpus, plan.models)   # host memory may be why
                if why and problem.fix:
                    problem.fix.note += f"; {why}"
                elif why:
                    problem.message += f"; no fix within the GPUs: {why}"


# Fix candidates planned in full, cheapest first by their own sizing (rlhf_ray.planning.fixes): a plan costs ~10 ms.
FIXES_PLANNED = 8


def context_fix(cfg, plan: Plan) -> Fix | None:
    """The caps lowered to fit the model's context (rlhf_ray.planning.checks.context_fix_overrides), planned."""
    overrun = context_overrun(cfg, plan.models)
    tried = _try(cfg, overrun[1], plan.hardware, plan.gpus, plan.models) if overrun else None
    if tried is None:
        return None
    return Fix(overrun[1], tried[0].step_seconds, requested_gpus(tried[0].roles),
               "the longest sequence within the model's context")


def smallest_fix(cfg, role: str, plan: Plan) -> Fix | None:
    """The change that fits ``role``: any combination of its knobs (rlhf_ray.planning.fixes: offload, micro-batch down
    to 1, ZeRO stage, checkpointing, more ranks, bf16; TP and engines; sharding), the cheapest first: the fewest GPUs
    beyond those the config reserves, then the fastest predicted step, then the fewest changes."""
    found, reserved_now = [], requested_gpus(plan.roles)
    for overrides in fix_candidates(cfg, role, plan.hardware, plan.models)[:FIXES_PLANNED]:
        tried = _try(cfg, overrides, plan.hardware, plan.gpus, plan.models)
        if tried and _role_fits(tried[0], role):
            reserved = requested_gpus(tried[0].roles)
            found.append(Fix(overrides, tried[0].step_seconds, reserved,
                             f"reserves {reserved} GPUs, {plan.gpus} available" if reserved > plan.gpus else ""))
    return min(found, key=lambda f: (max(0, f.gpus_reserved - reserved_now), f.step_seconds, len(f.overrides)),
               default=None)


def _role_fits(plan: Plan, role: str) -> bool:
    return not any(p.role == role or p.role == "host" for p in plan.problems)


def layout_fits(plan: Plan) -> bool:
    """Everything fits but, perhaps, the context: the caps are the config's to lower (context_fix), whatever the
    layout; the layout search plans past them."""
    return all(p.role == "context" for p in plan.problems)


# ------------------------------------------------------------------------------------------- layout search

def recommend_layout(cfg, hw: Hardware, gpus: int, archs: dict, keep: int = 24) -> Recommendation | None:
    """The fastest layout found on ``gpus`` GPUs (rlhf_ray.planning.search): each role's options sized on their own
    (learner ranks with DeepSpeed settings and micro-batch, engines × TP, replicated or sharded frozen models, any
    count the batches divide), their combinations ranked by the step ppo.async_steps gives them, and the best few
    planned in full; with each role's GPUs and idle share, and why any GPU is left over."""
    started = time.perf_counter()
    search = Search(cfg, hw, gpus, archs, role_options(cfg, hw, gpus, archs))
    for candidate in search.ranked(keep):
        tried = _try(cfg, candidate.overrides, hw, gpus, archs)
        if tried and layout_fits(tried[0]) and tried[1] <= gpus:
            plan, changed = tried[0], with_overrides(cfg, candidate.overrides)
            same = changed.resources == cfg.resources and changed.deepspeed == cfg.deepspeed and changed.ppo == cfg.ppo
            used = requested_gpus(plan.roles)
            return Recommendation(candidate.overrides, plan.step_seconds, used,
                                  "as configured" if same else "fastest layout found",
                                  roles=role_shares(plan.roles, plan.phases, plan.step_seconds), idle_gpus=gpus - used,
                                  idle_reasons=idle_reasons(search, candidate),
                                  transport=plan.phases["weight_sync"].bound, layouts_examined=search.examined,
                                  search_seconds=time.perf_counter() - started)
    return None


# ------------------------------------------------------------------------------------------- output

def plan_at_startup(cfg) -> Plan | None:
    """What ``train`` says before the cluster starts (logging.plan): the plan on this machine's devices (its GPU model
    from the catalogue, else this CPU; with planning.calibration's factors where they were measured on it with these
    models), written to <output_dir>/plan.json, a line with the predicted step and,
    when something will not fit, a warning for each with its fix. A model the planner cannot size is a note, never
    a failure: the run goes on."""
    import logging

    from rlhf_ray.planning.hardware import detect_gpu

    log = logging.getLogger("rlhf_ray.plan")
    try:
        hw = detect_gpu()
        if cfg.planning.calibration:   # measured factors, where they were measured on this hardware with these models
            hw, why = with_calibration(cfg.planning.calibration, cfg, hw, resolve_models(cfg),
                                       "cpu" if hw is None else hw.name)
            if why:
                log.warning("plan: %s; planned with the planner's own constants", why)
        plan = plan_experiment(cfg, hw, search=False)
        if plan.problems:
            _attach_fixes(plan, cfg)  # only then: trying changes costs a few re-plans
    except Exception as err:  # noqa: BLE001 — a plan is advice; an unknown architecture must not stop the run
        log.info("no plan for this config (%s); python -m rlhf_ray.plan explains", str(err).splitlines()[0])
        return None
    path = write_plan(plan, Path(cfg.output_dir) / "plan.json")
    split = ", ".join(f"{name} {phase.seconds / plan.step_seconds:.0%}" for name, phase in plan.phases.items())
    log.info("plan: predicted step %.3g s (%s) on %s%s; %s (%s)", plan.step_seconds, split, plan.hardware.name,
             ", calibrated" if plan.hardware.factors else "",
             "fits" if plan.fits else f"{len(plan.problems)} problem(s)", path)
    for problem in plan.problems:
        log.warning("plan: %s: %s%s", problem.role, problem.message,
                    f"; fix: {' '.join(problem.fix.overrides)}" if problem.fix else "")
    return plan


def write_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_dict(), indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
