"""The published PPO/GRPO runs of benchmarks/published_runs.yaml, planned by rlhf_ray.planning as their authors ran
them.

Each case becomes an ExperimentConfig (tiny_cpu.yaml with the case's models, lengths, batches, DeepSpeed settings and
role layout as overrides) and is planned on the case's GPUs. What the planner itself cannot express is done here, and
said in every case's notes:

- colocated runs (``layout.shared_gpus``): every role is planned on the GPUs it time-shares, as if it had them alone;
  the scoring passes (reward, reference, values and old logprobs) then add up instead of overlapping;
- generation in static batches (``layout.generation.batch``, where the source states one): each engine generates that
  many sequences at a time and waits for the longest before the next batch, as NeMo-Aligner's rollout micro-batches
  and OpenRLHF's micro_rollout_batch_size (2024) did; the planner's own generate_time prices one such batch (all in
  flight, to the longest of them), once per batch. Without it: continuous batching, as vLLM and SGLang run;
- weight sync: the published systems broadcast or reshard over NCCL; the planner's price of the broadcast
  ('collective') is compared (rlhf-ray's own 'auto' transport is reported beside it);
- a GPU kind missing from the catalogue: a Hardware from the case file's ``gpu_specs``, in --gpu-spec's fields;
- an architecture missing from the built-in table: its config.json values from the case file, in a temporary
  directory the planner reads like any local model (a mixture of experts by its MoE fields).

The published mean lengths go in as the planner's own inputs (planning.prompt_tokens_mean, planning.response_tokens_mean;
the caps as data.max_prompt_tokens and generation.max_new_tokens). What the plan shows it could not take (a parameter
count off the published one, a reference planned at KL 0) is said as ``needs: …``. Nothing is fitted here.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf_ray.config import load_config
from rlhf_ray.planning import Hardware, get_hardware, plan_experiment
from rlhf_ray.planning.hardware import gpu_from_fields
from rlhf_ray.planning.memory import generation_memory
from rlhf_ray.planning.search import variant
from rlhf_ray.planning.timing import ROLE_CALL_OVERHEAD_S, PhaseTime, generate_time, step_seconds

ROOT = Path(__file__).resolve().parent.parent
CASES_FILE = Path(__file__).with_name("published_runs.yaml")
BASE = ROOT / "configs" / "tiny_cpu.yaml"
# Rule-based rewards (math answer checks) cost the planner nothing; any registered function stands in for them.
REWARD_FUNCTION = "rlhf_ray.rewards.functions:concise_answer"
# The planner's inputs for a published mean length (rlhf_ray.config.planning)
MEAN_KEYS = {"prompt_tokens": "planning.prompt_tokens_mean", "response_tokens": "planning.response_tokens_mean"}
# A model whose parameter count the planner gets this far from the published total is planned as something else
# (a mixture-of-experts read as dense).
PARAMETER_COUNT_TOLERANCE = 0.10
PHASES = ("generate", "score", "learn", "weight_sync")


def load_cases(path: Path = CASES_FILE) -> dict:
    """The case file: {'gpu_specs': …, 'architectures': …, 'cases': [...]}."""
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------------- inputs

def hardware_for(kind: str, specs: dict) -> tuple[Hardware, str]:
    """The catalogue's entry for ``kind``, else a GPU described by the case file's ``gpu_specs`` entry in the fields
    of the CLI's --gpu-spec (rlhf_ray.planning.hardware.GPU_SPEC_FIELDS; a catalogue entry of the same name wins)."""
    try:
        return get_hardware(kind), f"catalogue ({kind})"
    except ValueError:
        pass
    if kind not in specs:
        raise ValueError(f"GPU '{kind}': neither in the catalogue nor in gpu_specs of {CASES_FILE.name}")
    fields = {k: v for k, v in specs[kind].items() if k != "source"}
    return gpu_from_fields({"name": kind, **fields}), f"not in the catalogue: {specs[kind]['source']}"


def write_architectures(architectures: dict, directory: Path) -> dict[str, str]:
    """Each architecture's config.json in its own directory; name -> the directory (a model path for the planner)."""
    paths = {}
    for name, entry in architectures.items():
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(entry["config"], indent=1))
        paths[name] = str(target)
    return paths


# ------------------------------------------------------------------------------------------- config

@dataclass
class Built:
    """A case's config, the overrides it came from and what had to be adjusted."""
    overrides: list[str]
    cfg: object = None
    adjusted: list[str] = field(default_factory=list)


def model_overrides(case: dict, paths: dict) -> list[str]:
    models = case["models"]
    path = lambda name: paths.get(name, name)  # noqa: E731
    out = [f"models.policy={path(models['policy'])}", "models.reference=null", "models.dtype=bfloat16"]
    if models.get("reward"):
        out += ["models.reward.kind=model", f"models.reward.model={path(models['reward'])}",
                f"models.reward.batch_size={case.get('reward_batch', 8)}"]
    else:
        out += ["models.reward.kind=function", f"models.reward.function={REWARD_FUNCTION}", "models.reward.model=null"]
    critic = models.get("critic")
    if case["algorithm"] == "ppo":
        if critic == models.get("reward"):
            out += ["models.value_init=reward", "models.value_model=null"]
        elif critic == models["policy"]:
            out += ["models.value_init=policy", "models.value_model=null"]
        else:
            out += ["models.value_init=reward", f"models.value_model={path(critic)}"]
    return out


def workload_overrides(case: dict) -> list[str]:
    """The workload as overrides: lengths as caps and, where published, means (the planner's planning.* inputs; a
    mean not published is planned at its cap), batches, epochs, KL and overlap."""
    w = case["workload"]
    out = [f"data.max_prompt_tokens={w['prompt_tokens']['cap']}",
           f"generation.max_new_tokens={w['response_tokens']['cap']}",
           f"generation.n_samples_per_prompt={w['samples_per_prompt']}", f"ppo.rollout_batch_size={w['prompts']}",
           f"ppo.total_episodes={w['prompts']}", f"ppo.epochs={w['epochs']}", f"ppo.kl_coef={w['kl_coef']}",
           f"ppo.async_steps={w['async_steps']}", "ppo.old_logprobs=learner"]
    if case["algorithm"] == "grpo":
        out += ["ppo.advantage=grpo", "ppo.kl_in=loss", "ppo.kl_estimator=k3"]
    for length, key in MEAN_KEYS.items():
        mean, cap = w[length]["mean"], w[length]["cap"]
        if mean is not None and mean < cap:
            out.append(f"{key}={round(mean)}")
    return out


def learner_overrides(case: dict) -> list[str]:
    ds = case["learner"]
    return [f"deepspeed.zero_stage={ds['zero_stage']}", "deepspeed.precision=bf16",
            f"deepspeed.gradient_checkpointing={str(ds['gradient_checkpointing']).lower()}",
            f"deepspeed.offload_optimizer={str(ds['offload_optimizer']).lower()}"]


def layout_overrides(case: dict, shard: dict) -> list[str]:
    """The roles' actors and GPUs. A run without a reference (KL 0) still gets reference actors here, on the learner's
    GPU count, for a planner that plans one anyway; the plan then says whether it did."""
    layout = case["layout"]
    gen = layout["generation"]
    out = [f"resources.learner.num_actors={layout['learner']}", "resources.learner.num_gpus=1",
           f"resources.generation.num_actors={gen['engines']}", f"resources.generation.num_gpus={gen['tp']}",
           f"resources.generation.tensor_parallel_size={gen['tp']}"]
    for role in ("reference", "reward"):
        count = layout.get(role) or layout["learner"]
        out += [f"resources.{role}.num_actors={count}", f"resources.{role}.num_gpus=1",
                f"resources.{role}.sharded={str(shard.get(role, False)).lower()}"]
    return out


def batch_overrides(case: dict, micro: int) -> tuple[list[str], list[str]]:
    """Mini- and micro-batch; a mini-batch the learner ranks cannot split evenly is raised to the smallest multiple
    of ranks × micro-batch that still divides the rollout (recorded)."""
    w, learners = case["workload"], case["layout"]["learner"]
    rollout = w["prompts"] * w["samples_per_prompt"]
    mini = w["mini_batch"]
    if mini % (learners * micro):
        raised = math.lcm(mini, learners * micro)
        if rollout % raised:
            raise ValueError(f"{case['id']}: no mini-batch ≥ {mini} splits over {learners} ranks × micro {micro} "
                             f"and divides the rollout of {rollout}")
        adjusted = [f"mini-batch {mini} -> {raised} sequences (rlhf-ray splits it evenly over {learners} ranks)"]
        mini = raised
    else:
        adjusted = []
    return [f"ppo.mini_batch_size={mini}", f"ppo.micro_batch_size={micro}"], adjusted


def build(case: dict, paths: dict, micro: int, shard: dict) -> Built:
    batches, adjusted = batch_overrides(case, micro)
    overrides = (model_overrides(case, paths) + workload_overrides(case) + learner_overrides(case) + batches
                 + layout_overrides(case, shard) + ["weights.transport=auto"])
    return Built(overrides, load_config(BASE, overrides), adjusted)


# ------------------------------------------------------------------------------------------- planning

def plan(built: Built, hw: Hardware, gpus: int):
    """The plan of a built case on ``gpus`` GPUs, or on as many as its roles reserve when they time-share fewer."""
    from rlhf_ray.planning.planner import requested_gpus_of

    return plan_experiment(built.cfg, hw, gpus=max(gpus, requested_gpus_of(built.cfg)), search=False)


def frozen_sharding(case: dict, paths: dict, hw: Hardware) -> dict:
    """Frozen models replicated one per GPU where a copy fits, else sharded over the role's GPUs."""
    shard = {"reference": False, "reward": False}
    trial = plan(build(case, paths, 1, shard), hw, case["gpus"])
    for problem in trial.problems:
        if problem.role in shard:
            shard[problem.role] = True
    return shard


def fitted(case: dict, paths: dict, hw: Hardware, shard: dict) -> tuple[Built, object]:
    """The published micro-batch, or (none published) the largest of 8/4/2/1 that fits, as the runs picked theirs."""
    given = case["workload"]["micro_batch"]
    for micro in ([given] if given else [8, 4, 2, 1]):
        try:
            built = build(case, paths, micro, shard)
        except ValueError:
            continue
        planned = plan(built, hw, case["gpus"])
        if given or planned.fits:
            return built, planned
    built = build(case, paths, 1, shard)
    built.adjusted.append("no micro-batch fits: planned at 1")
    return built, plan(built, hw, case["gpus"])


def compared_phases(planned, shared: bool) -> dict[str, float]:
    """The phases compared with the published system's: the scoring passes added up when the roles time-share
    GPUs, and the weight sync as the planner's broadcast ('collective': NCCL on GPUs)."""
    phases = {name: planned.phases[name].seconds for name in PHASES}
    if shared:
        parts = planned.phases["score"].parts
        phases["score"] = sum(parts.values()) - (len(parts) - 1) * ROLE_CALL_OVERHEAD_S
    sync = planned.phases["weight_sync"]
    phases["weight_sync"] = sync.alternatives.get("collective", sync.seconds)  # absent: collective is the one chosen
    return phases


def static_batch_generate(cfg, planned, batch: int) -> float:
    """Generation when each engine generates ``batch`` sequences at a time and waits for the longest of them before the
    next (the published system's static batches): generate_time of a rollout of ``batch`` sequences per engine (all in
    flight, as many as the KV cache holds), once per batch of the engine's share."""
    gen, policy = cfg.resources.generation, planned.models["policy"]
    per_engine = cfg.rollout_sequences // gen.num_actors
    batch = min(batch, per_engine)
    one = variant(cfg, {"ppo.rollout_batch_size": max(1, gen.num_actors * batch // cfg.generation.n_samples_per_prompt)})
    hw = planned.hardware
    _, kv = generation_memory(policy, one, True, hw.memory_bytes)
    return math.ceil(per_engine / batch) * generate_time(one, policy, hw, kv["concurrent"]).seconds


def compared_step(phases: dict[str, float], async_steps: int) -> float:
    return step_seconds({name: PhaseTime(name, phases[name]) for name in PHASES}, async_steps)


def missing_inputs(case: dict, planned, architectures: dict) -> list[str]:
    """What the plan shows the planner could not take: a policy parameter count off the published one (a MoE read as
    dense), a reference planned for a run at KL 0."""
    needs = []
    entry = architectures.get(case["models"]["policy"], {})
    if entry.get("total_params_b"):
        got, published = planned.models["policy"].parameters("lm") / 1e9, entry["total_params_b"]
        if abs(got / published - 1) > PARAMETER_COUNT_TOLERANCE:
            active = f" / {entry['active_params_b']:g}B active" if entry.get("active_params_b") else ""
            needs.append(f"MoE: planned as {got:.1f}B dense, published {published:g}B total{active}")
    if not case["models"].get("reference", True) and "reference" in planned.models:
        needs.append("no reference at KL 0 (planned with one)")
    return needs


def published_step(case: dict) -> tuple[float, str]:
    pub = case["published"]
    if "step_s" in pub:
        return float(pub["step_s"]), "per step"
    steps = pub["run_prompts"] / case["workload"]["prompts"]
    how = f"{pub['run_hours']:g} h for {pub['run_prompts']} prompts / {steps:.0f} steps"
    return pub["run_hours"] * 3600 / steps, how


def phase_errors(published: dict, predicted: dict) -> dict:
    """Signed error of each published phase ('a+b': the sum of predicted phases a and b); 'other' has no prediction."""
    rows = {}
    for name, seconds in (published or {}).items():
        parts = name.split("+")
        if all(p in predicted for p in parts):
            value = sum(predicted[p] for p in parts)
            rows[name] = {"published_s": seconds, "predicted_s": value, "error": value / seconds - 1}
        else:
            rows[name] = {"published_s": seconds, "predicted_s": None, "error": None}
    return rows


def run_case(case: dict, data: dict, paths: dict) -> dict:
    hw, hw_note = hardware_for(case["gpu"], data.get("gpu_specs", {}))
    shared = case["layout"]["shared_gpus"]
    shard = frozen_sharding(case, paths, hw)
    built, planned = fitted(case, paths, hw, shard)
    phases = compared_phases(planned, shared)
    continuous = phases["generate"]
    if case["layout"]["generation"].get("batch"):
        phases["generate"] = static_batch_generate(built.cfg, planned, case["layout"]["generation"]["batch"])
    step = compared_step(phases, case["workload"]["async_steps"])
    needs = missing_inputs(case, planned, data.get("architectures", {}))
    published, published_how = published_step(case)
    result = {
        "id": case["id"], "system": case["system"], "algorithm": case["algorithm"], "model": case["models"]["policy"],
        "gpu": case["gpu"], "gpus": case["gpus"], "hardware": hw_note, "shared_gpus": shared,
        "lengths_published": case["workload"]["lengths_published"], "published_step_s": published,
        "published_how": published_how, "predicted_step_s": step, "error": step / published - 1,
        "predicted_phases_s": phases, "published_phases_s": case["published"].get("phases_s"),
        "generation_batch": case["layout"]["generation"].get("batch"), "predicted_generate_s_continuous": continuous,
        "phase_errors": phase_errors(case["published"].get("phases_s"), phases),
        "predicted_step_s_rlhf_ray_transport": compared_step(
            phases | {"weight_sync": planned.phases["weight_sync"].seconds}, case["workload"]["async_steps"]),
        "rlhf_ray_transport": planned.phases["weight_sync"].bound,
        "fits_as_separate_roles": planned.fits, "problems": [p.message for p in planned.problems],
        "needs": needs, "adjusted": built.adjusted, "frozen_sharded": shard, "overrides": built.overrides,
        "source": case["source"], "assumptions": case.get("assumptions", []),
        "published_layout": case.get("published_layout"),
    }
    return result


def run_all(path: Path = CASES_FILE) -> list[dict]:
    data = load_cases(path)
    with tempfile.TemporaryDirectory(prefix="published_runs_") as tmp:
        paths = write_architectures(data.get("architectures", {}), Path(tmp))
        return [run_case(case, data, paths) for case in data["cases"]]
