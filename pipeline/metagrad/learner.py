"""IMPALA learner whose return parameters eta = (gamma, lambda) can be meta-learned online.

Inner update (Espeholt et al. 2018, V-trace actor-critic), on a rollout tau with the current eta:

    L(tau, theta, eta) = -sum_t A_t(eta) log pi_theta(a_t|s_t)                     (policy gradient)
                         + c_v * 0.5 * sum_t (v_t^s(eta) - v_theta(s_t))^2          (baseline)
                         - c_H * sum_t H(pi_theta(.|s_t))                          (entropy)
    g = grad_theta L,   c = min(1, C / (|g| + 1e-6))                     (global-norm clipping at C)
    theta' = theta + f(tau, theta, eta),   f = -lr * P (.) (c g)

with P the RMSProp preconditioner 1 / sqrt(v + eps) (TensorFlow's RMSProp, as IMPALA: see optim.py).
A_t is V-trace's lambda-mixed advantage (rlax's ``vtrace_td_error_and_advantage``: g_eta - v on-policy).

Meta update (Xu et al. 2018, one-step, online cross-validation): on the *next* rollout tau' the
meta-objective J(tau', theta', eta_bar) is evaluated with fixed gamma_bar and lambda_bar, and eta
(stored as logits) takes an Adam step along dJ/deta = u . df/deta with u = grad_theta' J. tau' then
drives the next inner update, so meta-learning needs no extra environment samples.

What df/deta differentiates: the update as it is taken, h = c g through RMSProp, with only the
learning rate constant. Where clipping binds (c < 1; at the quick profile's clip 40 it does on
practically every update), c depends on g and so on eta:

    d(c g)/dg = c (I - kappa g^ g^^T),   g^ = g / |g|,   kappa = |g| / (|g| + 1e-6)

which removes the component of dg/deta along g that the normalisation cancels (with c frozen, the
meta-gradient was 20 % and 110 % off finite differences on the test fixture). RMSProp's accumulator
takes in this step's h^2, so the step's derivative in h is elementwise (optim.py, step_jacobian)

    d(h P)/dh = P (1 - (1 - alpha) h^2 P^2),   P = 1 / sqrt(v + eps) after the step,

which on the test fixture is 0.5 % of the meta-gradient when the step is not clipped and 4e-6 when it
is (clipping spreads |h| = C over all parameters).

Two ways to get dJ/deta (``grad_mode``):

* ``naive``: keep the graph of g and |g| (create_graph=True), take the RMSProp step out of place
  (optim.py, stepped) and backpropagate J through theta'.
* ``jvp``: eta enters f only through the targets A_t and v_t^s, so
      u . df/deta = d/deta [ sum_t A_t(eta) w_t + c_v sum_t v_t^s(eta) z_t ]
  with w_t = u~ . grad_theta log pi_t(a_t), z_t = u~ . grad_theta v_t, and the tangent
      u~ = c (m - kappa g^ (g^ . m)),   m = lr * P (1 - (1 - alpha) h^2 P^2) (.) u   (m where c = 1),
  i.e. u pulled back through the RMSProp step and the clip (both Jacobians are symmetric).
  w and z are directional derivatives, all T x B of them from one forward-mode pass (torch.func.jvp).
  The naive mode is the test oracle for this one; both equal finite differences through the real
  update (tests/test_metagrad.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn import functional as F

from ..config import METAGRAD_VARIANTS, MetagradConfig
from ..nets.atari import AtariActorCritic, NatureTorso
from ..rl.losses import impala_loss
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
    if features is not None:
        logits, values = net.heads(features, eta_input)
    elif params is None:
        logits, values = net(flat_observations(rollout), eta_input)
    else:
        logits, values = functional_call(net, params, (flat_observations(rollout), eta_input))
    return outputs_from_heads(logits, values, rollout)


def outputs_from_heads(logits: torch.Tensor, values: torch.Tensor, rollout: Rollout) -> PolicyOutputs:
    steps, batch = rollout.obs.shape[:2]
    logits = logits.reshape(steps, batch, -1)[:-1]
    log_softmax = F.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, rollout.actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return PolicyOutputs(log_probs, entropy, values.reshape(steps, batch))


class Heads(nn.Module):
    """The network's heads as a module of their own, so that torch.func can call them with other
    parameters (``functional_call`` runs a module's forward, and the network's forward includes the torso)."""

    def __init__(self, net: AtariActorCritic):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor, eta_input: torch.Tensor):
        return self.net.heads(features, eta_input)


class TorsoTrace(NamedTuple):
    """What a torso's forward pass leaves for a later tangent pass at the same parameters and frames."""

    layer_inputs: list[torch.Tensor]  # the input of each Conv2d / Linear layer, in call order
    features: torch.Tensor


CHAIN_TORSOS = (NatureTorso,)  # conv/linear layers in a chain, a ReLU after each (chain_torso_tangent)


def layers_of(torso: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in torso.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@contextmanager
def recorded_layer_inputs(torso: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the (detached) input of every Conv2d / Linear layer of ``torso`` run inside the block."""
    inputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(lambda _layer, args: inputs.append(args[0].detach()))
        for _, layer in layers_of(torso)
    ]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def torso_entries(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The torso's entries of a dict keyed by the network's parameter names, keyed as in the torso."""
    return {name.removeprefix("torso."): t for name, t in named.items() if name.startswith("torso.")}


def affine(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``layer``'s map with other weights: conv2d or linear."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if layer.padding_mode != "zeros":
        raise ValueError(f"chain_torso_tangent supports zero padding only, not {layer.padding_mode!r}")
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def chain_torso_tangent(
    torso: nn.Module, params: dict[str, torch.Tensor], trace: TorsoTrace, tangents: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Forward-mode derivative of a chain torso's features at ``params`` along ``tangents`` (both keyed
    as in the torso), from the activations its forward pass at ``params`` recorded: for each layer
    y = relu(W x + b),

        y_dot = 1[y > 0] (.) (W x_dot + W_dot x + b_dot),   x_dot = 0 for the frames,

    with y the next layer's recorded input (the features after the last layer). The same products as
    torch.func.jvp, without recomputing the forward pass the jvp would run alongside.
    """
    layers = layers_of(torso)
    if len(layers) != len(trace.layer_inputs):
        raise ValueError(f"trace holds {len(trace.layer_inputs)} layer inputs, the torso has {len(layers)}")
    outputs = [*trace.layer_inputs[1:], trace.features]
    tangent = None
    for (name, layer), x, y in zip(layers, trace.layer_inputs, outputs, strict=True):
        out = affine(layer, x, tangents[f"{name}.weight"], tangents[f"{name}.bias"])
        if tangent is not None:
            if isinstance(layer, nn.Linear):
                tangent = tangent.flatten(1)
            out = out + affine(layer, tangent, params[f"{name}.weight"], None)
        tangent = out * (y.reshape(out.shape) > 0)
    return tangent


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


CLIP_EPS = 1e-6  # in the clip coefficient's denominator (torch.nn.utils.clip_grad_norm_'s)


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """c = min(1, max_norm / (|g| + eps)): global-norm clipping scales the gradient g to c * g."""
    return torch.clamp(max_norm / (grad_norm + CLIP_EPS), max=1.0)


def clip_vjp(cotangent: dict, grads: dict, grad_norm: torch.Tensor, max_norm: float) -> dict:
    """v^T d(c g)/dg for the clipped gradient c g (``grads`` g, ``grad_norm`` |g|, over all entries).

    Where clipping binds (c < 1), c = max_norm / (|g| + eps) depends on g (eps = CLIP_EPS):

        d(c g)/dg = c (I - kappa g^ g^^T),   g^ = g / |g|,   kappa = |g| / (|g| + eps)

    so v^T d(c g)/dg = c v - c (g . v) g / (|g| (|g| + eps)): the component of v along g, which the
    normalisation cancels, is (all but eps) removed. Where c = 1 the Jacobian is the identity.
    The Jacobian is symmetric: this is also its product with a tangent.
    """
    clip_coef = clip_coefficient(grad_norm, max_norm)
    if clip_coef >= 1.0:
        return cotangent
    along = sum((cotangent[name] * g).sum() for name, g in grads.items())
    radial = clip_coef * along / (grad_norm * (grad_norm + CLIP_EPS))
    return {name: clip_coef * v - radial * grads[name] for name, v in cotangent.items()}


def lr_factor(update: int, total_updates: int, config: MetagradConfig) -> float:
    """The multiple of ``config.lr`` at ``update``: 1 without ``lr_decay``; else linear from 1 at update
    0 to ``lr_final / lr`` at ``total_updates``, and that floor afterwards. With ``lr_final`` 0 this is
    ``max(0, 1 - update / total_updates)``, bit for bit (IMPALA's decay to 0)."""
    if not config.lr_decay:
        return 1.0
    progress = min(1.0, update / total_updates)
    return 1.0 - (1.0 - config.lr_final / config.lr) * progress


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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: lr_factor(update, total_updates, config)
        )
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
        # jvp mode: the tangent pass reuses the torso activations of the inner step's forward pass
        # (chain torsos only; torch.func.jvp recomputes them otherwise). Same result, less work.
        self.reuse_torso_pass = isinstance(self.net.torso, CHAIN_TORSOS)
        self._heads = Heads(self.net)

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
        features, trace = None, None
        if self.learned and self.config.meta.grad_mode == "jvp":
            # J(tau', theta', eta_bar) and L(tau', theta', eta) differ only in the heads' eta input:
            # one torso pass serves both gradients, and its activations the next meta step's tangent
            # pass (same parameters theta', same frames tau').
            with recorded_layer_inputs(self.net.torso) as layer_inputs:
                features = self.net.features(flat_observations(rollout))
            if self.reuse_torso_pass:
                trace = TorsoTrace(layer_inputs, features.detach())
        if self.learned and self._pending is not None:
            stats.update(self.meta_step(rollout, features))
        stats.update(self.inner_step(rollout, features))
        if trace is not None:
            self._pending["torso_trace"] = trace
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
        loss = self.inner_loss(rollout, outputs, eta, keep_target_graph=keep_graph)
        differentiated = list(theta.values()) if theta is not None else list(params.values())
        grads = torch.autograd.grad(loss.total, differentiated, create_graph=keep_graph)
        old_params = {name: p.detach().clone() for name, p in params.items()} if self.learned else None
        # Naive mode: the norm keeps its graph, so theta'(eta) below is the clipped update itself.
        grad_norm = torch.sqrt(sum((g**2).sum() for g in grads))
        clip_coef = clip_coefficient(grad_norm, config.grad_clip)
        if keep_graph:
            # theta' as a differentiable function of eta, numerically the new parameters: the same
            # clipped RMSProp step, taken out of place before the optimizer takes it in place.
            self._pending = {
                "new_params": {
                    name: self.optimizer.stepped(p, theta[name].detach(), clip_coef * g)
                    for (name, p), g in zip(params.items(), grads, strict=True)
                }
            }
        for p, g in zip(params.values(), grads, strict=True):
            p.grad = g.detach() * clip_coef.detach()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.learned and not keep_graph:
            self._pending = {
                "old_params": old_params,
                "rollout": rollout,
                "eta_input": eta_input,
                # d theta'/d(c g), elementwise: lr * RMSProp's step Jacobian
                "step_jacobian": {name: lr * self.optimizer.step_jacobian(p) for name, p in params.items()},
                "grads": dict(zip(params, grads, strict=True)),
                "grad_norm": grad_norm,
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

    def inner_loss(
        self, rollout: Rollout, outputs: PolicyOutputs, eta: torch.Tensor, keep_target_graph: bool
    ):
        """L(tau, theta, eta) with V-trace targets at ``eta``; they keep their graph only for the naive
        meta-gradient (the jvp mode differentiates the targets separately)."""
        config = self.config
        targets = vtrace_targets(rollout, outputs, eta[0], eta[1], config.clip_rho, config.clip_c)
        if not keep_target_graph:
            targets = type(targets)(*(t.detach() for t in targets))
        return impala_loss(
            outputs.log_probs,
            outputs.entropy,
            outputs.values[:-1],
            targets.vs,
            targets.pg_advantages,
            config.baseline_cost,
            config.entropy_cost,
        )

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
        # u pulled back through the RMSProp step, then through the clip: u . dtheta'/dg
        through_step = {
            name: pending["step_jacobian"][name] * u_i for name, u_i in zip(params, u, strict=True)
        }
        tangents = clip_vjp(through_step, pending["grads"], pending["grad_norm"], self.config.grad_clip)
        log_probs, values, w, z = self.directional_derivatives(pending, tangents)
        old_outputs = PolicyOutputs(log_probs, torch.zeros_like(log_probs), values)
        eta = self.eta()
        targets = vtrace_targets(
            pending["rollout"], old_outputs, eta[0], eta[1], self.config.clip_rho, self.config.clip_c
        )
        surrogate = (targets.pg_advantages * w.detach()).sum() + self.config.baseline_cost * (
            targets.vs * z[:-1].detach()
        ).sum()
        (grad,) = torch.autograd.grad(surrogate, [self.eta_logits])
        return grad

    def directional_derivatives(self, pending: dict, tangents: dict):
        """log pi(a_t|s_t), V(s_t) of the last inner step's rollout and parameters, and their derivatives
        w, z along ``tangents``; from its torso activations where they were kept, else by jvp."""
        rollout, eta_input = pending["rollout"], pending["eta_input"]
        trace = pending.get("torso_trace")
        if trace is None:

            def log_probs_and_values(theta):
                outputs = policy_outputs(self.net, theta, rollout, eta_input)
                return outputs.log_probs, outputs.values

            (log_probs, values), (w, z) = jvp(log_probs_and_values, (pending["old_params"],), (tangents,))
            return log_probs, values, w, z
        features_tangent = chain_torso_tangent(
            self.net.torso, torso_entries(pending["old_params"]), trace, torso_entries(tangents)
        )
        heads_params = {f"net.{name}": p for name, p in pending["old_params"].items()}
        heads_tangents = {f"net.{name}": t for name, t in tangents.items()}

        def log_probs_and_values_from(features, params):
            logits, values = functional_call(self._heads, params, (features, eta_input))
            outputs = outputs_from_heads(logits, values, rollout)
            return outputs.log_probs, outputs.values

        (log_probs, values), (w, z) = jvp(
            log_probs_and_values_from, (trace.features, heads_params), (features_tangent, heads_tangents)
        )
        return log_probs, values, w, z

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
            # The torso trace is left out: without it the tangent pass recomputes the torso with jvp,
            # which gives the same numbers (tested), so the checkpoint stays small and the resume exact.
            "pending": None
            if self._pending is None or "new_params" in self._pending
            else {key: value for key, value in self._pending.items() if key != "torso_trace"},
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
