"""How long sequences really are, for the planner: a mean and a cap for prompts and responses, and how responses
spread between them (config section ``planning``; every default is the caps, the upper bound).

Each use takes the figure that bounds it:
- compute (FLOPs, the learner's packed tokens): the means;
- memory (activations of the largest micro-batch, a sequence's KV cache): the caps;
- generation time: the long tail. A decode step runs for every sequence still going, so a batch takes as many
  steps as its longest response, while the work of a step (KV read, FLOPs) shrinks as sequences finish:
  n·mean sequence-steps over ``longest(n)`` steps.

Response lengths (L ≤ cap, mean m), by ``planning.response_length_distribution``:
- ``exponential``: min(X, cap) with X exponential (a constant chance to stop at every token), its rate λ set so
  that E[min(X, cap)] = m: (1 − e^(−λ·cap)) / λ = m. The share that hits the cap is e^(−λ·cap).
      E[max of k] = (1/λ) · Σ_{j=1..k} U^j / j,  U = 1 − e^(−λ·cap)     (∫ 1 − F(x)^k dx, F(x) = 1 − e^(−λx))
      E[L²]       = (2/λ²) · (1 − e^(−λ·cap) · (1 + λ·cap))
- ``fixed``: every response exactly m: E[max of k] = m, E[L²] = m².
Both are every response at the cap when m = cap (λ → 0), which is the planner's behaviour without a mean.
Prompts are taken at their mean (no spread): the prompt varies far less than a sampled response.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class ResponseLengths:
    """Response lengths: mean ``mean``, at most ``cap`` tokens, spread as ``distribution`` says."""
    mean: float
    cap: int
    distribution: str = "exponential"

    def longest(self, k: int) -> float:
        """E[the longest of k responses] (tokens): the decode steps a batch of k runs for."""
        if k <= 0:
            return 0.0
        return DISTRIBUTIONS[self.distribution].longest(self.mean, self.cap, int(k))

    def mean_square(self) -> float:
        """E[L²] (tokens²): what causal attention and the length-weighted decode context depend on."""
        return DISTRIBUTIONS[self.distribution].mean_square(self.mean, self.cap)

    def capped_share(self) -> float:
        """The share of responses cut at the cap (what an RL run logs as its clip ratio)."""
        return DISTRIBUTIONS[self.distribution].capped_share(self.mean, self.cap)

    def decode_context(self) -> float:
        """Mean position of a decode step, weighted by the steps each response takes: E[L²] / (2·E[L]) (a
        response of L tokens attends over 0…L−1 generated tokens; long responses take more of the steps)."""
        return self.mean_square() / (2 * self.mean) if self.mean else 0.0


class Fixed:
    """Every response exactly the mean."""

    @staticmethod
    def longest(mean: float, cap: int, k: int) -> float:
        return mean

    @staticmethod
    def mean_square(mean: float, cap: int) -> float:
        return mean * mean

    @staticmethod
    def capped_share(mean: float, cap: int) -> float:
        return 1.0 if mean >= cap else 0.0


class TruncatedExponential:
    """min(X, cap), X exponential with the rate that gives the mean (the module docstring's formulas)."""

    @staticmethod
    def longest(mean: float, cap: int, k: int) -> float:
        rate = _rate(mean, cap)
        if rate == 0.0:
            return float(cap)
        return _longest(rate, cap, k)

    @staticmethod
    def mean_square(mean: float, cap: int) -> float:
        rate = _rate(mean, cap)
        if rate == 0.0:
            return float(cap) ** 2
        x = rate * cap
        return 2 / rate**2 * (1 - math.exp(-x) * (1 + x))

    @staticmethod
    def capped_share(mean: float, cap: int) -> float:
        rate = _rate(mean, cap)
        return math.exp(-rate * cap)


DISTRIBUTIONS = {"exponential": TruncatedExponential, "fixed": Fixed}


@lru_cache(maxsize=256)
def _rate(mean: float, cap: int) -> float:
    """λ with (1 − e^(−λ·cap)) / λ = mean, by bisection on x = λ·cap: (1 − e^(−x)) / x = mean / cap; 0 at the cap."""
    ratio = mean / cap
    if ratio >= 1.0 - 1e-9:
        return 0.0
    low, high = 1e-12, 2.0 / ratio + 50.0          # (1 − e^(−x)) / x falls from 1 towards 1/x
    for _ in range(100):
        mid = (low + high) / 2
        if (1 - math.exp(-mid)) / mid > ratio:
            low = mid
        else:
            high = mid
    return (low + high) / 2 / cap


@lru_cache(maxsize=4096)
def _longest(rate: float, cap: int, k: int) -> float:
    """(1/λ)·Σ_{j=1..k} U^j/j; the terms past the point where U^j/j stops counting are dropped."""
    u = 1 - math.exp(-rate * cap)
    total, power = 0.0, 1.0
    for j in range(1, k + 1):
        power *= u
        term = power / j
        total += term
        if term < 1e-12 * total:
            break
    return min(total / rate, float(cap))


@dataclass(frozen=True)
class Lengths:
    """A run's prompt and response lengths as the planner uses them (``lengths_of(cfg)``)."""
    prompt_mean: float
    prompt_cap: int
    response: ResponseLengths

    @property
    def cap(self) -> int:
        """The longest sequence: what memory is sized for (activations, a sequence's KV cache)."""
        return self.prompt_cap + self.response.cap

    @property
    def mean_tokens(self) -> float:
        """Real tokens of a sequence on average: what padding-free forwards compute."""
        return self.prompt_mean + self.response.mean

    def mean_square_tokens(self) -> float:
        """E[(prompt + response)²] with the prompt at its mean: p² + 2·p·E[L] + E[L²]."""
        p = self.prompt_mean
        return p * p + 2 * p * self.response.mean + self.response.mean_square()

    def padded_tokens(self, rows: int) -> float:
        """Positions of one row when ``rows`` sequences are padded together: prompts to the cap (the longest
        prompt of a batch is near it), responses to the longest of the ``rows``."""
        return self.prompt_cap + self.response.longest(rows)


def lengths_of(cfg) -> Lengths:
    """A PPO config's lengths: planning.* means (null: the caps, data.max_prompt_tokens and
    generation.max_new_tokens) and planning.response_length_distribution."""
    planning, prompt_cap, response_cap = cfg.planning, cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens
    return Lengths(prompt_mean=float(planning.prompt_tokens_mean or prompt_cap), prompt_cap=prompt_cap,
                   response=ResponseLengths(float(planning.response_tokens_mean or response_cap), response_cap,
                                            planning.response_length_distribution))
