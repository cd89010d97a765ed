"""Time-major return computations: lambda-returns and V-trace.

Everything here is a pure function of its arguments (no state, no in-place updates of inputs), written in
the style of DeepMind's rlax: tensors are time-major, ``[T, B]`` for per-step quantities and ``[B]`` for
the bootstrap value of the state reached after the last step.  ``discounts`` always already hold
``gamma * (1 - done)``, so an episode boundary inside the trajectory is a zero discount.

Gradients: every function says explicitly where gradients stop.  Nothing is detached implicitly except
the importance-sampling log-ratios of V-trace, so meta-gradients can flow into ``discounts`` (e.g. built
from a learned ``gamma``) and into ``lambda_``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["VTraceReturns", "lambda_returns", "vtrace"]


class VTraceReturns(NamedTuple):
    """Outputs of :func:`vtrace`.

    Attributes:
        vs: ``[T, B]`` V-trace value targets ``v_s``.
        pg_advantages: ``[T, B]`` importance-weighted policy-gradient advantages.
    """

    vs: torch.Tensor
    pg_advantages: torch.Tensor


def _time_batch_shape(name: str, tensor: torch.Tensor) -> tuple[int, int]:
    """Return ``(T, B)`` of the tensor that defines the trajectory shape, checking it is ``[T, B]``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} must be time-major with shape [T, B] and T >= 1, got shape {tuple(tensor.shape)}"
        )
    time_steps, batch_size = tensor.shape
    return time_steps, batch_size


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor`` has exactly the ``expected`` shape.

    ``layout`` is the symbolic shape (``"[T, B]"`` or ``"[B]"``) quoted in the message so the caller
    sees both what the axes mean and which sizes were inferred from the other arguments.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got shape {tuple(tensor.shape)}"
        )


def _broadcast_lambda(lambda_: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Turn ``lambda_`` (python float or tensor broadcastable to ``like``) into a ``[T, B]`` tensor.

    Broadcasting (not copying) keeps the autograd link, so a 0-d ``lambda_`` that requires grad receives
    the summed gradient of every time step and batch element.
    """
    target_shape = tuple(like.shape)
    if isinstance(lambda_, torch.Tensor):
        lambda_tensor = lambda_.to(dtype=like.dtype, device=like.device)
    else:
        lambda_tensor = torch.tensor(float(lambda_), dtype=like.dtype, device=like.device)
    try:
        broadcast_shape = torch.broadcast_shapes(tuple(lambda_tensor.shape), target_shape)
    except RuntimeError:
        broadcast_shape = None
    if broadcast_shape != target_shape:
        raise ValueError(
            f"lambda_ must be a float or a tensor broadcastable to [T, B] = {target_shape}, "
            f"got shape {tuple(lambda_tensor.shape)}"
        )
    return lambda_tensor.expand(target_shape)


def _next_step_values(values: torch.Tensor, bootstrap_value: torch.Tensor) -> torch.Tensor:
    """``[T, B]`` tensor whose row ``t`` is ``V(x_{t+1})``: ``values`` shifted by one, ending in bootstrap."""
    return torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)


def lambda_returns(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    lambda_: float | torch.Tensor,
    *,
    stop_value_gradients: bool = False,
) -> torch.Tensor:
    """Lambda-returns ``G_t`` of a time-major trajectory, computed backwards in time.

    With ``v_{t+1} = values[t + 1]`` for ``t + 1 < T`` and ``v_T = bootstrap_value``::

        G_{T-1} = r_{T-1} + d_{T-1} * v_T
        G_t     = r_t + d_t * ((1 - lambda_t) * v_{t+1} + lambda_t * G_{t+1})

    i.e. ``G_T := v_T``.  ``lambda_ = 1`` gives the bootstrapped discounted return to the end of the
    trajectory, ``lambda_ = 0`` the one-step TD target ``r_t + d_t * v_{t+1}``.

    Args:
        rewards: ``[T, B]`` rewards ``r_t``.
        discounts: ``[T, B]`` discounts ``d_t = gamma * (1 - done_t)``; may require grad.
        values: ``[T, B]`` value estimates ``V(x_t)``.
        bootstrap_value: ``[B]`` value ``V(x_T)`` of the state after the last step.
        lambda_: python float or tensor broadcastable to ``[T, B]`` (a 0-d tensor that requires grad
            is fine); ``lambda_t`` weights ``G_{t+1}`` against ``v_{t+1}`` in the step-``t`` target.
        stop_value_gradients: if True, ``values`` and ``bootstrap_value`` are detached, so gradients
            reach only ``rewards``, ``discounts`` and ``lambda_``.

    Returns:
        ``[T, B]`` tensor of lambda-returns.
    """
    time_steps, batch_size = _time_batch_shape("rewards", rewards)
    _check_shape("discounts", discounts, (time_steps, batch_size), "[T, B]")
    _check_shape("values", values, (time_steps, batch_size), "[T, B]")
    _check_shape("bootstrap_value", bootstrap_value, (batch_size,), "[B]")
    lambdas = _broadcast_lambda(lambda_, rewards)

    if stop_value_gradients:
        values = values.detach()
        bootstrap_value = bootstrap_value.detach()
    next_values = _next_step_values(values, bootstrap_value)

    # Build the per-step results in a list and stack them: writing into a preallocated tensor would be an
    # in-place op on a graph that autograd needs intact.
    returns_reversed = []
    next_return = bootstrap_value  # G_T := V(x_T)
    for t in reversed(range(time_steps)):
        mixed_next = (1.0 - lambdas[t]) * next_values[t] + lambdas[t] * next_return
        next_return = rewards[t] + discounts[t] * mixed_next
        returns_reversed.append(next_return)
    return torch.stack(returns_reversed[::-1], dim=0)


def _clip_max(ratios: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``min(clip, ratios)``, or ``ratios`` unchanged when ``clip`` is None (no clipping)."""
    return ratios if clip is None else torch.clamp(ratios, max=clip)


def vtrace(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    lambda_: float | torch.Tensor = 1.0,
    clip_rho: float | None = 1.0,
    clip_c: float | None = 1.0,
    clip_pg_rho: float | None = None,
    *,
    stop_value_gradients: bool = True,
) -> VTraceReturns:
    """V-trace targets and policy-gradient advantages (Espeholt et al., 2018) with lambda in the traces.

    With importance ratios ``pi / mu = exp(log_rhos)`` and ``V(x_T) = bootstrap_value``::

        rho_t   = min(clip_rho, exp(log_rhos_t))
        c_t     = lambda_t * min(clip_c, exp(log_rhos_t))
        delta_t = rho_t * (r_t + d_t * V(x_{t+1}) - V(x_t))
        v_s - V(x_s) = delta_s + d_s * c_s * (v_{s+1} - V(x_{s+1})),   with v_T - V(x_T) = 0

    which unrolls to ``v_s = V(x_s) + sum_{t >= s} (prod_{s <= i < t} d_i c_i) delta_t``, and, as rlax's
    ``vtrace_td_error_and_advantage``::

        q_t             = r_t + d_t * (lambda_t * v_{t+1} + (1 - lambda_t) * V(x_{t+1})),   v_T = V(x_T)
        pg_advantages_t = min(clip_pg_rho, exp(log_rhos_t)) * (q_t - V(x_t))

    The bootstrap mixes the next V-trace target with the next value by the same lambda as the traces, so
    on-policy (``log_rhos = 0``, clips >= 1) ``vs`` equals :func:`lambda_returns` with the same lambda and
    ``pg_advantages = lambda_returns - values`` (IMPALA's ``r_t + d_t * v_{t+1} - V(x_t)`` is the
    ``lambda = 1`` case).

    Args:
        log_rhos: ``[T, B]`` log importance ratios ``log pi(a_t|x_t) - log mu(a_t|x_t)``.  Always treated
            as constants: they are detached, so no gradient flows into them (or into the policy through
            them).
        discounts: ``[T, B]`` discounts ``d_t = gamma * (1 - done_t)``; may require grad.
        rewards: ``[T, B]`` rewards ``r_t``.
        values: ``[T, B]`` value estimates ``V(x_t)``.
        bootstrap_value: ``[B]`` value ``V(x_T)`` of the state after the last step.
        lambda_: python float or tensor broadcastable to ``[T, B]`` (0-d tensors that require grad work).
        clip_rho: upper clip ``rho_bar`` of the ratios in ``delta_t``; None means no clipping.
        clip_c: upper clip ``c_bar`` of the trace ratios; None means no clipping.
        clip_pg_rho: upper clip of the ratios in ``pg_advantages``; None means "same as ``clip_rho``"
            (pass ``float("inf")`` for no clipping while ``clip_rho`` is set).
        stop_value_gradients: if True (default), ``values`` and ``bootstrap_value`` are detached.
            Gradients still flow to ``rewards``, ``discounts`` and ``lambda_`` through both outputs; a
            learner that wants fixed targets must detach the outputs itself.

    Returns:
        ``VTraceReturns(vs, pg_advantages)``, both ``[T, B]``.
    """
    time_steps, batch_size = _time_batch_shape("log_rhos", log_rhos)
    _check_shape("discounts", discounts, (time_steps, batch_size), "[T, B]")
    _check_shape("rewards", rewards, (time_steps, batch_size), "[T, B]")
    _check_shape("values", values, (time_steps, batch_size), "[T, B]")
    _check_shape("bootstrap_value", bootstrap_value, (batch_size,), "[B]")
    lambdas = _broadcast_lambda(lambda_, rewards)

    # Importance weights correct for off-policy data; they are not a learning signal.
    rhos = torch.exp(log_rhos.detach())
    clipped_rhos = _clip_max(rhos, clip_rho)
    traces = lambdas * _clip_max(rhos, clip_c)
    clipped_pg_rhos = _clip_max(rhos, clip_rho if clip_pg_rho is None else clip_pg_rho)

    if stop_value_gradients:
        values = values.detach()
        bootstrap_value = bootstrap_value.detach()
    next_values = _next_step_values(values, bootstrap_value)
    deltas = clipped_rhos * (rewards + discounts * next_values - values)

    # Backward recursion on the corrections v_s - V(x_s); list + stack keeps autograd free of in-place ops.
    corrections_reversed = []
    next_correction = torch.zeros_like(bootstrap_value)  # v_T - V(x_T) = 0
    for t in reversed(range(time_steps)):
        next_correction = deltas[t] + discounts[t] * traces[t] * next_correction
        corrections_reversed.append(next_correction)
    vs = values + torch.stack(corrections_reversed[::-1], dim=0)

    next_vs = _next_step_values(vs, bootstrap_value)
    bootstrap = lambdas * next_vs + (1.0 - lambdas) * next_values
    pg_advantages = clipped_pg_rhos * (rewards + discounts * bootstrap - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)
