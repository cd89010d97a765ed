"""RMSProp as in TensorFlow's RMSPropOptimizer, which IMPALA (and the meta-gradient paper) used.

    v <- alpha * v + (1 - alpha) * g^2          (v starts at 1, not 0)
    theta <- theta - lr * g / sqrt(v + eps)     (eps inside the square root)

torch.optim.RMSprop differs in both places (v starts at 0, eps outside the root). With IMPALA's
eps = 0.01 that is not a detail: torch's version takes ~10x larger first steps and divides small
gradients by ~0.01 instead of ~0.1. Measured here on Pong (16 envs x 5 steps, Nature CNN), it left 78 %
of the first convolution's channels dead after 3M frames and the policy at maximal entropy after 10M.
(stable-baselines3 ships an "RMSpropTFLike" for the same reason.)
"""

from __future__ import annotations

import torch


class TFRMSprop(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float, alpha: float = 0.99, eps: float = 0.01, initial_accumulator: float = 1.0
    ):
        if lr <= 0 or not 0 < alpha < 1 or eps <= 0:
            raise ValueError(f"invalid TFRMSprop settings: lr={lr}, alpha={alpha}, eps={eps}")
        super().__init__(
            params, {"lr": lr, "alpha": alpha, "eps": eps, "initial_accumulator": initial_accumulator}
        )

    def _group(self, param: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    def preconditioner(self, param: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(v + eps) for ``param`` as of the last step (what multiplies lr * g)."""
        return torch.rsqrt(self.state[param]["square_avg"] + self._group(param)["eps"])

    def step_jacobian(self, param: torch.Tensor) -> torch.Tensor:
        """d(g / sqrt(v + eps))/dg of the last step, elementwise (the step is elementwise), with v the
        accumulator after the step (which took in (1 - alpha) g^2) and P = 1 / sqrt(v + eps):

            d(g P)/dg = P - g * (1 - alpha) * g * P^3 = P * (1 - (1 - alpha) g^2 P^2)

        ``param.grad`` must still hold the gradient of that step.
        """
        preconditioner = self.preconditioner(param)
        decay = 1.0 - self._group(param)["alpha"]
        return preconditioner * (1.0 - decay * (param.grad * preconditioner) ** 2)

    def stepped(self, param: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What the next step would make of ``param`` if it stood at ``value`` and got ``grad``, out of
        place and differentiable in ``value`` and ``grad`` (the optimizer's state is not touched)."""
        group = self._group(param)
        state = self.state[param]
        square_avg = (
            state["square_avg"].detach().clone()
            if state
            else torch.full_like(value, group["initial_accumulator"])
        )
        square_avg = group["alpha"] * square_avg + (1 - group["alpha"]) * grad**2
        return value - group["lr"] * grad / torch.sqrt(square_avg + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.full_like(p, group["initial_accumulator"])
            grads = [p.grad for p in params]
            square_avgs = [self.state[p]["square_avg"] for p in params]
            torch._foreach_mul_(square_avgs, group["alpha"])
            torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - group["alpha"])
            denominators = torch._foreach_add(square_avgs, group["eps"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])
        return loss
