"""Capacity and step-time planning for a PPO experiment config (python -m rlhf_ray.plan).

    from rlhf_ray.planning import plan_experiment, format_plan
    plan = plan_experiment(cfg, "h100-80gb", gpus=16, nodes=2)   # no weights are loaded
    print("\\n".join(format_plan(plan)))

Modules: hardware (device catalogue, GPUs described field by field, this machine), models (architectures, dense or
mixture of experts, from config.json or a built-in table), lengths (prompt and response means, caps and the tail:
config section ``planning``), memory (bytes per role and device), placement (actors onto GPUs and nodes), timing
(seconds per phase; transports priced by the hardware that carries them), checks (host memory, context, the lengths
note), changes (key=value config changes), search (layouts over any count, ranked by the step ppo.async_steps gives),
fixes (combined fix candidates for a role that does not fit), planner (the plan, problems and fixes, the recommended
layout), render (console lines). Every search and fix is sized by the same memory and phase functions as the plan.
"""
from rlhf_ray.planning.changes import with_overrides
from rlhf_ray.planning.hardware import GPU_NAMES, Hardware, get_hardware
from rlhf_ray.planning.models import Architecture, PlannerError, resolve_architecture
from rlhf_ray.planning.planner import Fix, Plan, Problem, plan_experiment, write_plan
from rlhf_ray.planning.render import format_plan

__all__ = ["GPU_NAMES", "Architecture", "Fix", "Hardware", "Plan", "PlannerError", "Problem", "format_plan",
           "get_hardware", "plan_experiment", "resolve_architecture", "with_overrides", "write_plan"]
