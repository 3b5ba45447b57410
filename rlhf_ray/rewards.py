"""Verifiable reward functions for `models.reward.kind: function` (text in, float out)."""
from __future__ import annotations


def char_frequency(prompt: str, response: str, char: str = "e") -> float:
    """Fraction of the response's characters equal to ``char`` (0 for an empty response)."""
    return response.count(char) / len(response) if response else 0.0

