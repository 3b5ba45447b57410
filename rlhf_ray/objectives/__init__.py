"""What the learner optimises: a registry of objectives run by one generic DeepSpeed learner.

The learner (actors/learner.py) owns everything objectives share — the process group, the engine, AdamW
and the LR schedule, epochs over a batch, mini-batches, gradient accumulation, checkpoints, saving the
model. An objective says only:

    build(spec)               the trainable module (from spec.model, spec.value_model)
    units(batch)              what its loss is a mean over (response tokens, pairs), counted on this rank
    loss(module, micro, N, fresh)  one micro-batch's loss as a share of the mean over N units (N: global
                              mini-batch); fresh: the weights are still those the update started from
    evaluate(module, batch, **options)  forward passes without gradients (PPO: values, old logprobs; RM: scores)
    exported(module)          the Hugging Face model that ``save`` writes and ``publish_weights`` sends

A new objective is a new module here (ppo.py, reward_model.py, …) with a registered class and, where it has options,
its ``Options`` class (LearnerSpec.options); no learner changes. The interface and registry: ``base``.
"""
# the registered objectives (imported for their @register)
from rlhf_ray.objectives import dpo, ppo, reward_model, sft  # noqa: E402,F401
from rlhf_ray.objectives.base import OBJECTIVES, LearnerSpec, NoOptions, Objective, make_objective, register

__all__ = ["OBJECTIVES", "LearnerSpec", "NoOptions", "Objective", "make_objective", "register"]
