"""Verifiable reward functions for `models.reward.kind: function` (text in, float out)."""
from __future__ import annotations


def char_frequency(prompt: str, response: str, char: str = "e") -> float:
    """Fraction of the response's characters equal to ``char`` (0 for an empty response)."""
    return response.count(char) / len(response) if response else 0.0



def concise_answer(prompt: str, response: str, max_words: int = 25) -> float:
    """1 for an answer of 1..max_words words, max_words / words beyond that, 0 for an empty one.

    A verifiable stand-in for a reward model on a real chat model: it rewards finishing the answer
    (pair it with ppo.non_eos_penalty for answers cut off at the length cap) and saying it briefly.
    """
    words = len(response.split())
    if words == 0:
        return 0.0
    return 1.0 if words <= max_words else max_words / words
