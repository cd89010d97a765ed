"""Time-major RL losses as pure functions (rlax style, ``[T, B]`` tensors): clipped PPO, REINFORCE and the
value regression of the EPG inner loop, and IMPALA's actor-critic loss of the meta-gradient learner.

PPO / REINFORCE / value: every loss is the mean over the T steps of each column, returned as ``[B]`` so that
independent learners stacked along B (the EPG inner loop's P x W lifetimes) each get their own loss;
``loss.sum().backward()`` then gives each column its own gradient. Advantages and the behaviour
log-probabilities are constants of these surrogates (detached here, whatever the caller passes); gradients
flow into ``log_probs`` and ``values`` only.

IMPALA: returns its terms separately so a learner can log them; nothing is detached there: the caller
decides where gradients stop by what it passes in (e.g. V-trace targets computed without gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .returns import _check_shape, _time_batch_shape

__all__ = [
    "ImpalaLossTerms",
    "impala_loss",
    "normalize_advantages",
    "ppo_clipped_surrogate",
    "reinforce_surrogate",
    "value_loss",
]


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-column standardisation over time, ``(A - mean_t A) / (std_t A + eps)``, ``[T, B]``.

    ``std_t`` is the unbiased (n - 1) standard deviation, as ``torch.std``: with T = 1 it is nan, and so
    is the result (the EPG inner loop then marks the lifetime non-finite).
    """
    _time_batch_shape("advantages", advantages)
    mean = advantages.mean(0, keepdim=True)
    return (advantages - mean) / (advantages.std(0, keepdim=True) + eps)


def ppo_clipped_surrogate(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped PPO policy loss (Schulman et al. 2017) per column, ``[B]``, in CleanRL's form::

        r_t     = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        loss_b  = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - clip, 1 + clip))

    which equals ``-mean_t min(r_t A_t, clip(r_t) A_t)``. ``log_probs`` [T, B] carries the gradient;
    ``old_log_probs`` and ``advantages`` [T, B] are constants (normalise the advantages beforehand with
    :func:`normalize_advantages` if wanted).
    """
    time_steps, batch = _time_batch_shape("log_probs", log_probs)
    _check_shape("old_log_probs", old_log_probs, (time_steps, batch), "[T, B]")
    _check_shape("advantages", advantages, (time_steps, batch), "[T, B]")
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    advantages = advantages.detach()
    ratio = torch.exp(log_probs - old_log_probs.detach())
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(pg_loss1, pg_loss2).mean(0)


def reinforce_surrogate(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992), ``[B]``: ``loss_b = -mean_t log pi(a_t|s_t) A_t``.

    ``advantages`` [T, B] (returns minus the baseline) are constants; ``log_probs`` [T, B] carries the
    gradient.
    """
    time_steps, batch = _time_batch_shape("log_probs", log_probs)
    _check_shape("advantages", advantages, (time_steps, batch), "[T, B]")
    return -(log_probs * advantages.detach()).mean(0)


def value_loss(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared-error value regression per column, ``[B]``: ``loss_b = mean_t 0.5 (v_t - G_t)^2``.

    ``targets`` [T, B] are constants; ``values`` [T, B] carries the gradient.
    """
    time_steps, batch = _time_batch_shape("values", values)
    _check_shape("targets", targets, (time_steps, batch), "[T, B]")
    return 0.5 * ((values - targets.detach()) ** 2).mean(0)


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
