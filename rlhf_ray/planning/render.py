"""A plan as console lines."""
from __future__ import annotations

from itertools import groupby

from rlhf_ray.planning.memory import GiB
from rlhf_ray.planning.planner import Plan

COUNT_PARTS = ("sequences_in_flight", "decode_steps")  # parts of a phase that are counts, not seconds


def format_plan(plan: Plan) -> list[str]:
    return [*_header(plan), *_models(plan), *_memory(plan), *_devices(plan), *_step(plan), *_verdict(plan)]


def _header(plan: Plan) -> list[str]:
    hw = plan.hardware
    where = (f"{plan.gpus} × {hw.name} ({plan.nodes} node{'s' if plan.nodes > 1 else ''} of {hw.devices_per_node})"
             if hw.is_gpu else "this machine (CPU)")
    return [f"Plan for {plan.config or 'the config'} on {where}", f"  {hw.describe()}"]


def _models(plan: Plan) -> list[str]:
    lines = ["Models"]
    for role, arch in plan.models.items():
        head = "lm" if role in ("policy", "reference") else "score"
        moe = (f" MoE {arch.experts} experts, {arch.experts_per_token} per token: "
               f"{arch.active_parameters(head) / 1e9:.3f} B active" if arch.is_moe else "")
        context = f", context {arch.max_positions}" if arch.max_positions else ""
        lines.append(f"  {role:<10} {arch.name:<36} {arch.parameters(head) / 1e9:7.3f} B params  "
                     f"L{arch.layers} h{arch.hidden} heads {arch.heads}/{arch.kv_heads}{context}{moe} [{arch.source}]")
    return lines


def _memory(plan: Plan) -> list[str]:
    lines = ["Memory per device of each actor (GiB)"]
    for role in plan.roles:
        lines.append(f"  {role.role} × {role.actors}, {role.gpus_per_actor:g} GPU each: "
                     f"{role.device_bytes / GiB:.2f} on the device"
                     + (f", {role.host_bytes / GiB:.2f} in host memory" if role.host_bytes else ""))
        for item in role.items:
            place = "" if item.where == "device" else " [host]"
            lines.append(f"      {item.bytes / GiB:8.2f}  {item.what}{place}   ({item.formula})")
        lines += [f"      note: {note}" for note in role.notes]
    kv = plan.kv
    lines.append(f"  KV cache: {kv['kv_bytes_per_sequence'] / 2**20:.1f} MiB per sequence at the cap; all "
                 f"{kv['sequences_wanted']} of an engine: {kv['kv_bytes_all_sequences'] / GiB:.2f} GiB; room for "
                 f"{kv['sequences_that_fit']} at the cap, {kv['concurrent']} in flight")
    return lines


def _devices(plan: Plan) -> list[str]:
    lines = ["Devices"]
    key = lambda d: (d.node, tuple(a.split("[")[0] for a in d.actors), round(d.used_bytes / GiB, 1))  # noqa: E731
    for (node, roles, used), group in groupby(plan.layout.devices, key=key):
        group = list(group)
        first, last = group[0], group[-1]
        span = f"gpu {first.index}" + (f"-{last.index}" if last is not first else "")
        label = span if plan.hardware.is_gpu else "host"
        status = "ok" if first.fits else "DOES NOT FIT"
        who = ", ".join(sorted(set(roles))) or "idle"
        lines.append(f"  node {node} {label:<10} {who:<30} {used:7.1f} / {first.capacity_bytes / GiB:.1f} GiB  {status}")
    lines += [f"  not placed: {actor}" for actor in plan.layout.unplaced]
    loading = plan.host_load_bytes_per_node
    for node, used in sorted(plan.layout.host_bytes_per_node.items()):
        if plan.hardware.is_gpu:
            load = f" (at load {loading[node] / GiB:.1f})" if loading.get(node) else ""
            lines.append(f"  node {node} host memory: {used / GiB:.1f}{load} / "
                         f"{plan.layout.host_capacity_bytes / GiB:.0f} GiB")
    return lines


def _step(plan: Plan) -> list[str]:
    lines = [f"Step (predicted): {plan.step_seconds:.2f} s; {plan.steps} steps ≈ "
             f"{plan.step_seconds * plan.steps / 3600:.2f} h"]
    for name, phase in plan.phases.items():
        share = phase.seconds / plan.step_seconds if plan.step_seconds else 0
        parts = ", ".join(f"{k} {v:.3g}" + ("" if k in COUNT_PARTS else " s")
                          for k, v in phase.parts.items() if k != "decode_step_s")
        lines.append(f"  {name:<12} {phase.seconds:9.2f} s {share:6.1%}   {phase.bound}; {parts}")
    lines += [f"  assumes: {a}" for a in plan.assumptions]
    return lines


def _verdict(plan: Plan) -> list[str]:
    lines = ["Fits." if plan.fits else "Does not fit:"]
    for problem in plan.problems:
        lines.append(f"  - {problem.message}")
        if problem.fix:
            lines.append(f"    smallest change that fits: {' '.join(problem.fix.overrides)}  "
                         f"(step {problem.fix.step_seconds:.1f} s{'; ' + problem.fix.note if problem.fix.note else ''})")
        elif problem.role not in ("layout",):
            lines.append("    no change of its settings found that fits")
    return lines + _recommendation(plan)


def _recommendation(plan: Plan) -> list[str]:
    rec = plan.recommendation
    if rec is None:
        why = f": {plan.no_layout_reason}" if plan.no_layout_reason else ""
        return [f"No layout found that fits {plan.gpus} GPUs{why}."] if plan.hardware.is_gpu else []
    if rec.note == "as configured":
        lines = [f"The configured layout is the fastest found for {plan.gpus} GPUs."]
    else:
        versus = f" vs {plan.step_seconds:.1f} s as configured" if plan.fits else ""
        lines = [f"Fastest layout found for {plan.gpus} GPUs (step {rec.step_seconds:.1f} s{versus}):",
                 "  " + " ".join(rec.overrides)]
    for role in rec.roles:
        lines.append(f"  {role.role:<10} {role.actors:>5} × {role.gpus_per_actor:g} GPU = {role.gpus:>5} GPUs "
                     f"({role.gpus / plan.gpus:6.1%}), busy {role.busy_seconds:9.2f} s, idle {role.idle_share:6.1%} "
                     "of the step")
    lines.append(f"  weight sync: {rec.transport}")
    if rec.idle_gpus:
        lines.append(f"  {rec.idle_gpus} GPU(s) left idle:")
        lines += [f"    - {reason}" for reason in rec.idle_reasons]
    lines.append(f"  ({rec.layouts_examined} combinations searched in {rec.search_seconds:.2f} s)")
    return lines
