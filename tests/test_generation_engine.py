"""The generation role's engine (actors.generation.GenerationActor, built in this process: no Ray) on the tiny policy."""
from __future__ import annotations

import pytest

from rlhf_ray.data.sources import Prompt

pytestmark = pytest.mark.e2e


def test_seeded_sampling_survives_prompts_past_one_scheduler_step_and_does_not_depend_on_the_batch(tiny_cache):
    """24 prompts of 400 tokens × 2 samples: more prompt tokens than one vLLM scheduler step takes (4096), which on CPU
    split a prompt's prefill across steps and killed the engine on a seeded request ("CPU Generator does not use
    offset", rlhf_ray.runtime.engines.engine_options). Each prompt's samples are those it gets alone: a step's rollout
    is the same whatever else the engine samples with it (exact resume and recovery rely on it)."""
    from rlhf_ray.actors.generation import GenerationActor
    from rlhf_ray.models.specs import resolve_model

    engine = GenerationActor(resolve_model("tiny:policy", tiny_cache), {"max_new_tokens": 6, "temperature": 1.0,
                                                                        "n_samples_per_prompt": 2}, 512, seed=0)
    prompts = [Prompt(token_ids=[5 + (i * 7 + j) % 200 for j in range(400)], text=f"p{i}",
                      messages=[{"role": "user", "content": f"p{i}"}]) for i in range(24)]
    seeds = [100 + i for i in range(24)]
    together, _ = engine.generate(prompts, seeds)
    assert together.input_ids.shape[0] == 48
    for i in (0, 13, 23):
        alone, _ = engine.generate([prompts[i]], [seeds[i]])
        assert alone.response_texts == together.response_texts[2 * i:2 * i + 2]
