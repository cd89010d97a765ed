"""Running mean and variance of a stream of feature vectors, batched over independent streams.

Used to normalise what EPG policies and loss networks see (observations, continuous actions), as the
official EPG code does with its running normaliser. The state is a :class:`RunningMoments` of tensors
with any leading batch shape ``[B...]`` (e.g. one stream per lifetime) and a feature dimension ``D``.
Samples arrive time-major, ``x [T, B..., D]``, and are folded in with the parallel-variance formula of
Chan, Golub & LeVeque (1979) for merging two sets of moments: with ``n = n_a + n_b`` and
``delta = mean_b - mean_a``::

    mean = mean_a + delta * n_b / n
    var  = (n_a * var_a + n_b * var_b + delta^2 * n_a * n_b / n) / n      (population variance)

A fresh state has count 0, mean 0 and variance 1, so normalising with it is the identity and the first
fold gives exactly the batch's own moments. Everything here is a pure function: no in-place updates.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RunningMoments", "init_moments", "normalize", "update_moments"]

MIN_STD = 0.1  # the official EPG normaliser's floor: sqrt(max(var, 0.01))


class RunningMoments(NamedTuple):
    """Moments of every sample seen so far, per stream: count [B...], mean and var [B..., D]."""

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def init_moments(
    batch_shape: tuple[int, ...], dim: int, device=None, dtype: torch.dtype = torch.float32
) -> RunningMoments:
    """The state of ``batch_shape`` streams of ``dim`` features that have seen no sample yet."""
    return RunningMoments(
        torch.zeros(batch_shape, device=device, dtype=dtype),
        torch.zeros(*batch_shape, dim, device=device, dtype=dtype),
        torch.ones(*batch_shape, dim, device=device, dtype=dtype),
    )


def update_moments(state: RunningMoments, x: torch.Tensor) -> RunningMoments:
    """Fold the samples ``x`` [T, B..., D] (time-major; every stream gets T samples) into ``state``.

    No gradient flows through the moments (they are statistics of data, not parameters).
    """
    if x.dim() != state.mean.dim() + 1 or x.shape[1:] != state.mean.shape:
        raise ValueError(
            f"x must be [T, *{tuple(state.mean.shape)}] (time-major samples), got shape {tuple(x.shape)}"
        )
    x = x.detach()
    n_b = x.shape[0]
    if n_b == 0:
        return state
    mean_b = x.mean(0)
    var_b = x.var(0, correction=0)
    n_a = state.count.unsqueeze(-1)
    n = n_a + n_b
    delta = mean_b - state.mean
    mean = state.mean + delta * (n_b / n)
    var = (n_a * state.var + n_b * var_b + delta.square() * (n_a * n_b / n)) / n
    return RunningMoments(state.count + n_b, mean, var)


def normalize(state: RunningMoments, x: torch.Tensor, min_std: float = MIN_STD) -> torch.Tensor:
    """``(x - mean) / max(std, min_std)``, per stream: x [..., B..., D] (any leading dims) with the
    state's batch shape just before the feature dimension. Differentiable in ``x``."""
    std = state.var.clamp_min(min_std**2).sqrt()
    return (x - state.mean) / std
