"""The TRPO outer step of MAML (Schulman et al. 2015, as the MAML paper uses it).

Maximise the surrogate ``S(theta)`` subject to ``mean KL(theta_old || theta) <= delta``:

    g = grad S(theta_old),   F v = grad (grad KL(theta_old) . v) + damping * v   (Fisher = KL Hessian)
    s = F^-1 g by conjugate gradient,   full step = sqrt(2 delta / s^T F s) * s
    backtracking: theta_old + backtrack^j * full step, j = 0, 1, ..., the first candidate with
    KL <= delta and S > S(theta_old) is taken; none -> theta_old is kept.

The surrogate and KL gradients use one autograd graph of the objective (built once per step) so the
conjugate-gradient Hessian-vector products reuse it; through MAML's inner step that makes them
third-order derivatives of the log-likelihood, which autograd handles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Objective = Callable[[dict], tuple[Tensor, Tensor]]  # params -> (surrogate to maximise, mean KL)


class TrpoResult(NamedTuple):
    params: dict  # the accepted parameters (detached), or the old ones
    surrogate_before: float
    surrogate_after: float
    kl: float  # mean KL of the accepted step (0 if none)
    line_search_steps: int  # candidates evaluated
    accepted: bool


def flatten(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, template: dict) -> dict:
    out, start = {}, 0
    for name, value in template.items():
        out[name] = vector[start : start + value.numel()].view_as(value)
        start += value.numel()
    return out


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int, tolerance: float = 1e-10
) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive definite ``A`` given as ``matvec``."""
    x = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    residual_sq = residual @ residual
    for _ in range(iterations):
        if residual_sq <= tolerance:
            break
        a_direction = matvec(direction)
        step = residual_sq / (direction @ a_direction)
        x = x + step * direction
        residual = residual - step * a_direction
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def trpo_step(
    objective: Objective,
    params: dict,
    max_kl: float,
    cg_iterations: int = 10,
    cg_damping: float = 1e-5,
    line_search_steps: int = 15,
    backtrack: float = 0.5,
) -> TrpoResult:
    """One trust-region step on ``params`` (see module docstring)."""
    old = {name: value.detach() for name, value in params.items()}
    leaves = {name: value.clone().requires_grad_() for name, value in old.items()}
    surrogate, kl = objective(leaves)
    gradient = flatten(torch.autograd.grad(surrogate, list(leaves.values()), retain_graph=True))
    kl_gradient = flatten(torch.autograd.grad(kl, list(leaves.values()), create_graph=True))

    def fisher_vector(vector: Tensor) -> Tensor:
        hvp = torch.autograd.grad(kl_gradient @ vector, list(leaves.values()), retain_graph=True)
        return flatten(hvp) + cg_damping * vector

    direction = conjugate_gradient(fisher_vector, gradient, cg_iterations)
    curvature = float(direction @ fisher_vector(direction))
    before = float(surrogate.detach())
    if not (curvature > 0 and math.isfinite(curvature)):
        return TrpoResult(old, before, before, 0.0, 0, False)
    full_step = direction * math.sqrt(2.0 * max_kl / curvature)
    start = flatten(old.values())
    with torch.no_grad():
        for j in range(line_search_steps):
            candidate = unflatten(start + backtrack**j * full_step, old)
            new_surrogate, new_kl = (float(x) for x in objective(candidate))
            if new_kl <= max_kl and new_surrogate > before:
                return TrpoResult(candidate, before, new_surrogate, new_kl, j + 1, True)
    return TrpoResult(old, before, before, 0.0, line_search_steps, False)
