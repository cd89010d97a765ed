"""Actor-critic losses as pure, time-major functions (``[T, B]`` tensors, rlax style).

Each loss returns its terms separately so a learner can log them; nothing is detached here: the caller
decides where gradients stop by what it passes in (e.g. V-trace targets computed without gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ImpalaLossTerms", "impala_loss"]


class ImpalaLossTerms(NamedTuple):
    total: torch.Tensor  # policy + baseline_cost * baseline + entropy_cost * entropy
    policy: torch.Tensor
    baseline: torch.Tensor
    entropy: torch.Tensor  # minus the summed entropy: minimising it raises the entropy


def impala_loss(
    log_probs: torch.Tensor,
    entropy: torch.Tensor,
    values: torch.Tensor,
    vs: torch.Tensor,
    pg_advantages: torch.Tensor,
    baseline_cost: float,
    entropy_cost: float,
) -> ImpalaLossTerms:
    """IMPALA's loss (Espeholt et al. 2018), summed over time and batch as in torchbeast::

        policy   = -sum_{t,b} A_{t,b} log pi(a_{t,b} | x_{t,b})
        baseline = 0.5 * sum_{t,b} (v_s_{t,b} - V(x_{t,b}))^2
        entropy  = -sum_{t,b} H(pi(. | x_{t,b}))
        total    = policy + baseline_cost * baseline + entropy_cost * entropy

    Args:
        log_probs: ``[T, B]`` log-probabilities of the taken actions under the learner's policy.
        entropy: ``[T, B]`` entropies of the learner's policy.
        values: ``[T, B]`` baseline ``V(x_t)`` (without the bootstrap value).
        vs: ``[T, B]`` value targets (V-trace ``v_s``); gradients flow into them if they carry any.
        pg_advantages: ``[T, B]`` policy-gradient advantages ``A``; likewise.
        baseline_cost, entropy_cost: weights of the baseline and entropy terms.
    """
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be time-major [T, B], got shape {tuple(log_probs.shape)}")
    for name, tensor in (
        ("entropy", entropy),
        ("values", values),
        ("vs", vs),
        ("pg_advantages", pg_advantages),
    ):
        if tensor.shape != log_probs.shape:
            raise ValueError(
                f"{name} must have the shape of log_probs [T, B] = {tuple(log_probs.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    policy = -(pg_advantages * log_probs).sum()
    baseline = 0.5 * ((vs - values) ** 2).sum()
    negative_entropy = -entropy.sum()
    total = policy + baseline_cost * baseline + entropy_cost * negative_entropy
    return ImpalaLossTerms(total, policy, baseline, negative_entropy)
