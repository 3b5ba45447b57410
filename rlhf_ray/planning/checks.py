"""What the plan checks beyond each device's memory: host memory per node while running and while the models load,
the longest sequence against the model's context, and the lengths the plan assumed (its note).

Each check returns plain messages (and overrides for a fix); rlhf_ray.planning.planner turns them into Problems.
"""
from __future__ import annotations

from rlhf_ray.planning.hardware import Hardware
from rlhf_ray.planning.lengths import lengths_of
from rlhf_ray.planning.memory import PROCESS_BASELINE_BYTES, GiB, RoleMemory
from rlhf_ray.planning.placement import Layout


def host_load_per_node(layout: Layout, roles: list[RoleMemory]) -> dict[int, float]:
    """Host memory each node needs while its actors load their models at once: each actor's load_host_bytes (a
    learner rank: its whole policy and critic in fp32) and its process baseline."""
    load_of = {r.role: r.load_host_bytes for r in roles}
    actors = {(dev.node, name.split(" ")[0]) for dev in layout.devices for name in dev.actors}
    per_node: dict[int, float] = {}
    for node, actor in actors:
        per_node[node] = per_node.get(node, 0.0) + load_of.get(actor.split("[")[0], 0.0) + PROCESS_BASELINE_BYTES
    return per_node


LOADING_WHY = ("loading: every learner rank reads its whole policy (and critic) in fp32 before DeepSpeed moves it to "
               "its GPU, and a frozen model on one GPU reads all of it first; fewer learner ranks per node or sharded "
               "frozen roles need less")


def host_shortfalls(layout: Layout, loading: dict[int, float], hardware: Hardware) -> list[str]:
    """A message for each node whose host memory is short while running (offloaded states, published weights) or,
    where that is more, while its actors load the models."""
    messages, capacity, running = [], layout.host_capacity_bytes, layout.host_bytes_per_node
    for node in sorted(set(running) | set(loading)):
        used, load = running.get(node, 0.0), loading.get(node, 0.0)
        if max(used, load) <= capacity:
            continue
        why = "offloaded states and published weights" if used >= load else LOADING_WHY
        messages.append(f"node {node}: host memory {max(used, load) / GiB:.0f} GiB of {capacity / GiB:.0f} ({why}) "
                        f"[host memory: {hardware.host_memory_source}]")
    return messages


def context_overrun(cfg, archs: dict) -> tuple[str, list[str]] | None:
    """(message, overrides that fix it) when the longest sequence, prompt cap + response cap, is over the policy's or
    the reference's context (Architecture.max_positions: max_position_embeddings or its config's limit), else None."""
    longest = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    limits = {role: archs[role] for role in ("policy", "reference")
              if role in archs and 0 < archs[role].max_positions < longest}
    if not limits:
        return None
    role, arch = min(limits.items(), key=lambda item: item[1].max_positions)
    where = arch.source.split("context: ")[-1] if "context: " in arch.source else arch.source
    message = (f"context: data.max_prompt_tokens={cfg.data.max_prompt_tokens} + generation.max_new_tokens="
               f"{cfg.generation.max_new_tokens} = {longest} tokens, over the {role}'s context of "
               f"{arch.max_positions} ({where})")
    return message, context_fix_overrides(cfg, arch.max_positions)


def context_fix_overrides(cfg, limit: int) -> list[str]:
    """Caps that fit ``limit`` tokens: the response cap lowered to what the prompt cap leaves (at least half the
    context: beyond that the prompt cap is halved too); a mean over its new cap comes down with it."""
    prompt = cfg.data.max_prompt_tokens if cfg.data.max_prompt_tokens <= limit // 2 else limit // 2
    response = limit - prompt
    overrides = ([f"data.max_prompt_tokens={prompt}"] if prompt != cfg.data.max_prompt_tokens else []) \
        + [f"generation.max_new_tokens={response}"]
    for key, mean, cap in (("planning.prompt_tokens_mean", cfg.planning.prompt_tokens_mean, prompt),
                           ("planning.response_tokens_mean", cfg.planning.response_tokens_mean, response)):
        if mean is not None and mean > cap:
            overrides.append(f"{key}={cap}")
    return overrides


def lengths_note(cfg) -> str:
    """The plan's assumption about lengths, in one line."""
    lengths, planning = lengths_of(cfg), cfg.planning
    prompt = (f"prompts {lengths.prompt_mean:.0f} tokens on average (planning.prompt_tokens_mean)"
              if planning.prompt_tokens_mean else f"prompts at their cap, {lengths.prompt_cap} tokens")
    response = lengths.response
    if not planning.response_tokens_mean:
        responses = (f"every response runs to its cap, {response.cap} tokens (planning.response_tokens_mean gives "
                     "the mean)")
    else:
        responses = (f"responses {response.mean:.0f} tokens on average of at most {response.cap}, "
                     f"{planning.response_length_distribution} ({response.capped_share():.1%} cut at the cap)")
    learner = ("the learner packs real tokens (deepspeed.padding_free)" if cfg.deepspeed.padding_free
               else "the learner pads the rollout to its longest prompt and response")
    return f"{prompt}; {responses}; memory and KV room sized at the caps; {learner}"
