"""planning: what the planner (python -m rlhf_ray.plan, and the plan at startup) should assume about a PPO run that
the other sections do not say — how long its sequences really are. Nothing here changes how the run trains.

Every default is the caps (data.max_prompt_tokens, generation.max_new_tokens): the planner's upper bound. Give the
means an earlier run logged (its response/tokens metric, a peer's response_length/mean) and the plan follows them:
compute by the means, memory and KV room by the caps, generation time by the longest response of each batch
(rlhf_ray.planning.lengths has the formulas).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from rlhf_ray.config.sections import StrictSection

# rlhf_ray.planning.lengths.DISTRIBUTIONS holds one class per name (a test keeps the two lists equal)
LengthDistribution = Literal["exponential", "fixed"]


class PlanningConfig(StrictSection):
    prompt_tokens_mean: Optional[int] = Field(
        None, gt=0, description="Mean prompt length in tokens, template included (at most data.max_prompt_tokens); "
                                "null: every prompt at data.max_prompt_tokens.")
    response_tokens_mean: Optional[int] = Field(
        None, gt=0, description="Mean response length in tokens (at most generation.max_new_tokens), e.g. an earlier "
                                "run's response/tokens; null: every response runs to generation.max_new_tokens (the "
                                "upper bound). The plan computes FLOPs and learner tokens from the means, memory and "
                                "KV room from the caps, and decoding until each batch's longest response ends.")
    response_length_distribution: LengthDistribution = Field(
        "exponential", description="How responses spread around response_tokens_mean, up to generation.max_new_tokens: "
                                   "'exponential' (a constant chance to stop at every token, cut at the cap: a long "
                                   "tail, and a share of cut responses when the mean is near the cap) or 'fixed' (every "
                                   "response exactly the mean). It sets how long the longest response of a batch runs, "
                                   "which bounds decoding and padded forwards.")
