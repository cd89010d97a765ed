"""IMPALA learner whose return parameters eta = (gamma, lambda) can be meta-learned online.

Inner update (Espeholt et al. 2018, V-trace actor-critic), on a rollout tau with the current eta:

    L(tau, theta, eta) = -sum_t A_t(eta) log pi_theta(a_t|s_t)                     (policy gradient)
                         + c_v * 0.5 * sum_t (v_t^s(eta) - v_theta(s_t))^2          (baseline)
                         - c_H * sum_t H(pi_theta(.|s_t))                          (entropy)
    theta' = theta + f(tau, theta, eta),   f = -alpha * P (.) clip(grad_theta L)

with P the RMSProp preconditioner 1 / sqrt(v + eps) (TensorFlow's RMSProp, as IMPALA: see optim.py),
treated as a constant for the meta-gradient.

Meta update (Xu et al. 2018, one-step, online cross-validation): on the *next* rollout tau' the
meta-objective J(tau', theta', eta_bar) is evaluated with fixed gamma_bar and lambda_bar, and eta
(stored as logits) takes an Adam step along dJ/deta = u . df/deta with u = grad_theta' J. tau' then
drives the next inner update, so meta-learning needs no extra environment samples.

Two ways to get dJ/deta (``grad_mode``):

* ``naive``: keep the graph of grad_theta L (create_graph=True) and backpropagate J through theta'.
* ``jvp``: eta enters f only through the targets A_t and v_t^s, so
      u . df/deta = d/deta [ sum_t A_t(eta) w_t + c_v sum_t v_t^s(eta) z_t ]
  with w_t = u~ . grad_theta log pi_t(a_t), z_t = u~ . grad_theta v_t, u~ = alpha * clip * P (.) u.
  w and z are directional derivatives, all T x B of them from one forward-mode pass (torch.func.jvp).
  The naive mode is the test oracle for this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.func import functional_call, jvp
from torch.nn import functional as F

from ..config import METAGRAD_VARIANTS, MetagradConfig
from ..nets.atari import AtariActorCritic
from ..rl.returns import vtrace
from .optim import TFRMSprop


@dataclass
class Rollout:
    """One unroll of T steps from B envs, time-major. ``obs`` has T + 1 entries (bootstrap state)."""

    obs: torch.Tensor  # [T+1, B, C, H, W] uint8
    actions: torch.Tensor  # [T, B] int64
    behaviour_log_probs: torch.Tensor  # [T, B] log mu(a_t|s_t) of the acting policy
    rewards: torch.Tensor  # [T, B] clipped rewards
    dones: torch.Tensor  # [T, B] bool, terminal for learning (game over or lost life)

    def to(self, device) -> Rollout:
        return Rollout(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


class PolicyOutputs(NamedTuple):
    log_probs: torch.Tensor  # [T, B] log pi(a_t|s_t)
    entropy: torch.Tensor  # [T, B]
    values: torch.Tensor  # [T+1, B], the last one is the bootstrap value


def flat_observations(rollout: Rollout) -> torch.Tensor:
    return rollout.obs.reshape(-1, *rollout.obs.shape[2:])


def policy_outputs(
    net, params: dict | None, rollout: Rollout, eta_input: torch.Tensor, features: torch.Tensor | None = None
) -> PolicyOutputs:
    """Run the network on all T+1 observations of a rollout (``params`` None: the module's own).

    ``features``: torso features of the rollout already computed with the module's own parameters.
    """
    steps, batch = rollout.obs.shape[:2]
    if features is not None:
        logits, values = net.heads(features, eta_input)
    elif params is None:
        logits, values = net(flat_observations(rollout), eta_input)
    else:
        logits, values = functional_call(net, params, (flat_observations(rollout), eta_input))
    logits = logits.reshape(steps, batch, -1)[:-1]
    log_softmax = F.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, rollout.actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return PolicyOutputs(log_probs, entropy, values.reshape(steps, batch))


def vtrace_targets(rollout: Rollout, outputs: PolicyOutputs, gamma, lambda_, clip_rho: float, clip_c: float):
    """V-trace value targets and advantages; differentiable in gamma and lambda, never in theta."""
    discounts = gamma * (~rollout.dones).to(outputs.values.dtype)
    log_rhos = outputs.log_probs.detach() - rollout.behaviour_log_probs
    return vtrace(
        log_rhos,
        discounts,
        rollout.rewards,
        outputs.values[:-1],
        outputs.values[-1],
        lambda_=lambda_,
        clip_rho=clip_rho,
        clip_c=clip_c,
        stop_value_gradients=True,
    )


class LossTerms(NamedTuple):
    total: torch.Tensor
    policy: torch.Tensor
    baseline: torch.Tensor
    entropy: torch.Tensor


def impala_loss(outputs: PolicyOutputs, targets, baseline_cost: float, entropy_cost: float) -> LossTerms:
    """Summed over time and batch, as in torchbeast's IMPALA."""
    policy = -(targets.pg_advantages * outputs.log_probs).sum()
    baseline = 0.5 * ((targets.vs - outputs.values[:-1]) ** 2).sum()
    entropy = -outputs.entropy.sum()
    total = policy + baseline_cost * baseline + entropy_cost * entropy
    return LossTerms(total, policy, baseline, entropy)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class MetaGradientLearner:
    """The paper's four variants, one code path: ``impala`` ({}), ``lambda``, ``gamma``, ``gamma_lambda``."""

    def __init__(self, config: MetagradConfig, variant: str, num_actions: int, total_updates: int, device):
        if variant not in METAGRAD_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(METAGRAD_VARIANTS)}")
        self.config = config
        self.variant = variant
        self.learned = METAGRAD_VARIANTS[variant]
        self.device = torch.device(device)
        self.net = AtariActorCritic(num_actions, config.network, config.env.stack, config.meta.embedding_dim)
        self.net.to(self.device)
        self.optimizer = TFRMSprop(
            self.net.parameters(), lr=config.lr, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps
        )
        decay = (
            (lambda update: max(0.0, 1.0 - update / total_updates)) if config.lr_decay else (lambda _: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        meta = config.meta
        # eta as logits; the entries that are not meta-learned simply never receive an Adam step.
        init = [
            logit(meta.init_gamma) if "gamma" in self.learned else logit(config.gamma),
            logit(meta.init_lambda) if "lambda" in self.learned else 0.0,
        ]
        self.eta_logits = torch.tensor(init, device=self.device, requires_grad=bool(self.learned))
        self.meta_optimizer = (
            torch.optim.Adam([self.eta_logits], lr=meta.lr, betas=(meta.adam_beta1, meta.adam_beta2))
            if self.learned
            else None
        )
        self.eta_bar = torch.tensor([meta.gamma_bar, meta.lambda_bar], device=self.device)
        self._pending: dict | None = None  # what the next meta step needs from the last inner step

    # ------------------------------------------------------------------ eta
    def eta(self) -> torch.Tensor:
        """(gamma, lambda); learned entries are sigmoids of the logits (with graph), others fixed."""
        sig = torch.sigmoid(self.eta_logits)
        gamma = sig[0] if "gamma" in self.learned else torch.tensor(self.config.gamma, device=self.device)
        lambda_ = (
            sig[1] if "lambda" in self.learned else torch.tensor(self.config.lambda_, device=self.device)
        )
        return torch.stack([gamma, lambda_])

    # ------------------------------------------------------------------ updates
    def update(self, rollout: Rollout) -> dict[str, float]:
        """One learner step: the meta step for the previous update (evaluated on this rollout), then
        the ordinary update on this rollout."""
        stats: dict[str, float] = {}
        features = None
        if self.learned and self._pending is not None:
            if self.config.meta.grad_mode == "jvp":
                # J(tau', theta', eta_bar) and L(tau', theta', eta) differ only in the heads' eta input:
                # one torso pass serves both gradients.
                features = self.net.features(flat_observations(rollout))
            stats.update(self.meta_step(rollout, features))
        stats.update(self.inner_step(rollout, features))
        return stats

    def inner_step(self, rollout: Rollout, features: torch.Tensor | None = None) -> dict[str, float]:
        config = self.config
        keep_graph = bool(self.learned) and config.meta.grad_mode == "naive"
        eta = self.eta()
        eta_input = eta.detach()
        params = dict(self.net.named_parameters())
        # The naive meta-gradient differentiates through this update later, so its graph must hold a
        # copy of theta that the optimizer's in-place step below does not touch.
        theta = (
            {name: p.detach().clone().requires_grad_() for name, p in params.items()} if keep_graph else None
        )
        outputs = policy_outputs(self.net, theta, rollout, eta_input, features)
        targets = vtrace_targets(rollout, outputs, eta[0], eta[1], config.clip_rho, config.clip_c)
        if not keep_graph:
            targets = type(targets)(*(t.detach() for t in targets))
        loss = impala_loss(outputs, targets, config.baseline_cost, config.entropy_cost)
        differentiated = list(theta.values()) if theta is not None else list(params.values())
        grads = torch.autograd.grad(loss.total, differentiated, create_graph=keep_graph)
        old_params = {name: p.detach().clone() for name, p in params.items()} if self.learned else None
        grad_norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
        clip_coef = torch.clamp(config.grad_clip / (grad_norm + 1e-6), max=1.0)
        for p, g in zip(params.values(), grads, strict=True):
            p.grad = g.detach() * clip_coef
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.learned:
            preconditioner = {name: self.optimizer.preconditioner(p) for name, p in params.items()}
            scale = {name: lr * clip_coef * preconditioner[name] for name in params}
            if keep_graph:
                # theta' as a differentiable function of eta; numerically equal to the new parameters.
                new_params = {
                    name: theta[name].detach() - scale[name] * g
                    for (name, g) in zip(params, grads, strict=True)
                }
                self._pending = {"new_params": new_params}
            else:
                self._pending = {
                    "old_params": old_params,
                    "rollout": rollout,
                    "eta_input": eta_input,
                    "scale": scale,
                }
        return {
            "loss/total": loss.total.item(),
            "loss/policy": loss.policy.item(),
            "loss/baseline": loss.baseline.item(),
            "loss/entropy": loss.entropy.item(),
            "entropy": outputs.entropy.mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "gamma": eta_input[0].item(),
            "lambda": eta_input[1].item(),
        }

    def meta_objective(self, params: dict | None, rollout: Rollout, features=None) -> torch.Tensor:
        """J(tau', theta', eta_bar): fixed gamma_bar, lambda_bar; targets carry no gradient."""
        meta = self.config.meta
        outputs = policy_outputs(self.net, params, rollout, self.eta_bar, features)
        with torch.no_grad():
            targets = vtrace_targets(
                rollout, outputs, self.eta_bar[0], self.eta_bar[1], self.config.clip_rho, self.config.clip_c
            )
        if meta.objective == "policy_gradient":
            return -(targets.pg_advantages * outputs.log_probs).sum()
        return 0.5 * ((targets.vs - outputs.values[:-1]) ** 2).sum()

    def meta_gradient(self, next_rollout: Rollout, features: torch.Tensor | None = None) -> torch.Tensor:
        """dJ/d(eta logits) for the last inner update, J evaluated on ``next_rollout``."""
        pending = self._pending
        if "new_params" in pending:  # naive: backpropagate through theta'(eta)
            objective = self.meta_objective(pending["new_params"], next_rollout)
            (grad,) = torch.autograd.grad(objective, [self.eta_logits])
            return grad
        params = dict(self.net.named_parameters())  # numerically theta'
        objective = self.meta_objective(None, next_rollout, features)
        u = torch.autograd.grad(
            objective,
            list(params.values()),
            allow_unused=True,
            materialize_grads=True,
            retain_graph=features is not None,  # the inner step backpropagates through the same torso
        )
        tangents = {name: pending["scale"][name] * u_i for name, u_i in zip(params, u, strict=True)}
        rollout = pending["rollout"]

        def log_probs_and_values(theta):
            outputs = policy_outputs(self.net, theta, rollout, pending["eta_input"])
            return outputs.log_probs, outputs.values

        (log_probs, values), (w, z) = jvp(log_probs_and_values, (pending["old_params"],), (tangents,))
        old_outputs = PolicyOutputs(log_probs, torch.zeros_like(log_probs), values)
        eta = self.eta()
        targets = vtrace_targets(
            rollout, old_outputs, eta[0], eta[1], self.config.clip_rho, self.config.clip_c
        )
        surrogate = (targets.pg_advantages * w.detach()).sum() + self.config.baseline_cost * (
            targets.vs * z[:-1].detach()
        ).sum()
        (grad,) = torch.autograd.grad(surrogate, [self.eta_logits])
        return grad

    def meta_step(self, next_rollout: Rollout, features: torch.Tensor | None = None) -> dict[str, float]:
        grad = self.meta_gradient(next_rollout, features)
        self._pending = None
        mask = torch.tensor(["gamma" in self.learned, "lambda" in self.learned], device=self.device)
        self.meta_optimizer.zero_grad()
        self.eta_logits.grad = torch.where(mask, grad, torch.zeros_like(grad))
        self.meta_optimizer.step()
        return {"meta/grad_gamma_logit": grad[0].item(), "meta/grad_lambda_logit": grad[1].item()}

    # ------------------------------------------------------------------ acting and state
    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions for a batch of observations; returns (actions, their log-probabilities)."""
        logits, _ = self.net(obs, self.eta().detach())
        log_softmax = F.log_softmax(logits, dim=-1)
        actions = torch.multinomial(log_softmax.exp(), 1).squeeze(-1)
        return actions, log_softmax.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "eta_logits": self.eta_logits.detach().clone(),
            "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer else None,
            # The next update's meta step needs the last inner step's inputs: without them a resumed
            # run would skip one meta step. Naive mode keeps an autograd graph, which cannot be saved.
            "pending": None if self._pending is None or "new_params" in self._pending else self._pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        with torch.no_grad():
            self.eta_logits.copy_(state["eta_logits"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        pending = state.get("pending")
        self._pending = None if pending is None else _to_device(pending, self.device)


def _to_device(tree, device: torch.device):
    """Tensors of nested dicts and rollouts moved to ``device`` (checkpoints are loaded on the CPU)."""
    if isinstance(tree, dict):
        return {key: _to_device(value, device) for key, value in tree.items()}
    return tree.to(device)
