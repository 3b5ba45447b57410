"""Pure tensor maths for learning from preference pairs (reward modelling now; DPO belongs here too).

``B`` is the number of pairs; ``chosen`` and ``rejected`` are the scores of the preferred and the other
response of each pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       num_pairs: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the preferences under the Bradley–Terry model, with an optional margin
    (Llama 2's RM loss):

        loss = Σ_i −log σ(r_chosen_i − r_rejected_i − m_i) / N

    chosen, rejected, margin: [B]. ``N`` (``num_pairs``) is the count the mean is over — the global
    mini-batch across micro-batches and ranks, so that accumulated gradients are those of its mean;
    default B. Returns the loss and detached sums divided by N: accuracy (chosen scored strictly higher),
    the mean score difference and the mean scores of each side.
    """
    n = float(num_pairs if num_pairs is not None else chosen.shape[0])
    diff = chosen.float() - rejected.float()
    target = diff if margin is None else diff - margin.to(diff)
    loss = -F.logsigmoid(target).sum() / n
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().sum() / n, "score_margin": diff.sum() / n,
                 "chosen_score": chosen.float().sum() / n, "rejected_score": rejected.float().sum() / n}
    return loss, stats


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Fraction of pairs whose preferred response scores strictly higher (ties count as wrong), as in
    RewardBench."""
    return float((chosen > rejected).float().mean()) if chosen.numel() else float("nan")
