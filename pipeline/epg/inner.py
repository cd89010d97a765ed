"""The EPG inner loop (Houthooft et al. 2018, Algorithm 1), for a whole population at once.

A *lifetime* is one freshly initialised policy trained for U = ``lifetime_steps`` env steps on one
task: every M = ``update_every`` steps it takes minibatch Adam steps on a loss computed over the
buffer of the last N = ``buffer_size`` steps. P population members (loss parameters phi_p) times W
workers (tasks) give P x W lifetimes, and they all run as ONE batched computation: one batched env,
policies stacked along a leading dimension, ``torch.func.vmap`` over members (phi) and workers.

Common random numbers: every random draw (policy init, action noise, resets, minibatch order) is made
for the W workers and shared by all members, so members differ only through their loss. The same
seed therefore gives the same lifetime whether a member runs alone or inside the batch.

The loss is one of ``epg`` (the evolved loss L_phi, optionally mixed with PPO: (1 - alpha) L_phi +
alpha L_PPO), ``ppo`` or ``pg`` (REINFORCE with a learned baseline); the evaluation baselines reuse
this very trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch.func import vmap

from ..config import InnerLoopConfig, LossNetConfig
from ..envs.tasks import make_env
from ..rl.returns import lambda_returns
from . import policy as pol
from .loss_net import LossNetwork, ParamLayout, apply_loss_net, loss_input_dim

METHODS = ("epg", "ppo", "pg")


@dataclass(frozen=True)
class LossSetting:
    """Which loss trains the lifetimes. ``phi`` [P, dim] is required for ``epg``."""

    method: str = "epg"
    phi: torch.Tensor | None = None
    alpha: float = 0.0  # weight of the PPO term mixed into the evolved loss
    num_members: int = 1  # P for the loss-free methods

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown inner-loop method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.method == "epg" and (self.phi is None or self.phi.dim() != 2):
            raise ValueError("method 'epg' needs phi as a [members, dim] tensor")

    @property
    def members(self) -> int:
        return self.phi.shape[0] if self.method == "epg" else self.num_members

    @property
    def uses_value(self) -> bool:
        return self.method != "epg" or self.alpha > 0


class LifetimeResult(NamedTuple):
    fitness: torch.Tensor  # [P, W] as configured (final episodes or lifetime mean); -inf if non-finite
    final_returns: torch.Tensor  # [P, W] mean return of the post-training episodes (nan if not run)
    lifetime_returns: torch.Tensor  # [P, W] mean return of the episodes finished during the lifetime
    nonfinite: torch.Tensor  # [P, W] bool: a loss or parameter went non-finite
    curve: torch.Tensor  # [updates, P, W] mean return of episodes finished in each update window
    curve_steps: list[int]  # env steps (per lifetime) at the end of each window
    env_steps: int  # all env steps taken, summed over lifetimes


def loss_net_input_dim(family_env, spec: pol.PolicySpec, memory_units: int) -> int:
    return loss_input_dim(family_env.obs_dim, spec.action_features, spec.output_features, memory_units)


def policy_spec(env, config: InnerLoopConfig) -> pol.PolicySpec:
    return pol.PolicySpec(
        env.obs_dim, env.action_dim, env.discrete, tuple(config.policy_hidden), config.init_log_std
    )


def run_lifetimes(
    family: str,
    tasks: list[dict],
    config: InnerLoopConfig,
    loss: LossSetting,
    loss_net_config: LossNetConfig,
    crn_seed: int,
) -> LifetimeResult:
    """Train P x W fresh policies (P members, W = len(tasks) workers) in one batched computation."""
    members, workers = loss.members, len(tasks)
    lifetimes = members * workers
    env = make_env(family, tasks * members)  # copy index = member * W + worker
    spec = policy_spec(env, config)
    generator = torch.Generator().manual_seed(int(crn_seed))

    def per_worker(x: torch.Tensor) -> torch.Tensor:
        """Draws made for the W workers, shared by every member: [W, ...] -> [P * W, ...]."""
        return x.unsqueeze(0).expand(members, *x.shape).reshape(lifetimes, *x.shape[1:])

    def leaves(params: dict) -> dict:
        return {k: per_worker(v).clone().requires_grad_() for k, v in params.items()}

    policy = leaves(pol.init_policy(spec, workers, generator))
    value = leaves(pol.init_value(spec, workers, generator)) if loss.uses_value else {}
    memory_units = loss_net_config.memory_units if loss.method == "epg" else 0
    # Memory units m = tanh(W . 1 + b): extra inner-loop parameters that only the loss sees.
    memory = (
        leaves({"w": torch.zeros(workers, memory_units), "b": torch.zeros(workers, memory_units)})
        if memory_units
        else {}
    )
    optimizer = torch.optim.Adam([*policy.values(), *value.values(), *memory.values()], lr=config.lr)

    if loss.method == "epg":
        template = LossNetwork(loss_net_input_dim(env, spec, memory_units), loss_net_config)
        layout = ParamLayout.of(template)
        if loss.phi.shape[1] != layout.size:
            raise ValueError(f"phi has {loss.phi.shape[1]} entries, the loss network needs {layout.size}")
        # vmap over members (own phi), inside it over workers (shared phi).
        per_member = vmap(partial(apply_loss_net, template, layout), in_dims=(None, 0, 0))
        epg_losses = vmap(per_member, in_dims=(0, 0, 0))
    head_fn = partial(pol.policy_head, spec)  # stacked params, inputs [L, rows, obs]
    value_fn = pol.mlp

    steps_per_update, buffer_size = config.update_every, config.buffer_size
    obs_dim, act_dim = env.obs_dim, spec.action_features
    # The loss buffer of the last N steps, time-major, zero where no step has happened yet.
    buffer = {
        "obs": torch.zeros(buffer_size, lifetimes, obs_dim),
        "act": torch.zeros(buffer_size, lifetimes, act_dim),
        "rew": torch.zeros(buffer_size, lifetimes),
        "done": torch.zeros(buffer_size, lifetimes),
    }
    window = {key: torch.zeros(steps_per_update, *value.shape[1:]) for key, value in buffer.items()}
    window["logp"] = torch.zeros(steps_per_update, lifetimes)

    dead = torch.zeros(lifetimes, dtype=torch.bool)
    episode_sum = torch.zeros(lifetimes)
    episode_count = torch.zeros(lifetimes)
    total_sum = torch.zeros(lifetimes)
    total_count = torch.zeros(lifetimes)
    curve, curve_steps = [], []
    obs = env.reset(per_worker(torch.rand(workers, env.noise_dim, generator=generator)))

    for step in range(config.lifetime_steps):
        with torch.no_grad():
            head = head_fn(policy, obs.unsqueeze(1)).squeeze(1)
            noise = (torch.rand if spec.discrete else torch.randn)(
                workers, spec.action_dim, generator=generator
            )
            action = pol.sample(spec, head, per_worker(noise))
            result = env.step(
                action.argmax(-1) if spec.discrete else action,
                per_worker(torch.rand(workers, env.noise_dim, generator=generator)),
            )
            done = (result.terminated | result.truncated).float()
            slot = step % steps_per_update
            window["obs"][slot], window["act"][slot] = obs, action
            window["rew"][slot], window["done"][slot] = result.reward, done
            window["logp"][slot] = pol.log_prob(spec, head, action)
            episode_sum += result.episode_return * done
            episode_count += done
            obs = result.obs
        if slot == steps_per_update - 1:
            for key in buffer:
                buffer[key] = torch.cat([buffer[key][steps_per_update:], window[key]])
            dead |= _update(
                config,
                loss,
                spec,
                generator,
                optimizer,
                policy,
                value,
                memory,
                buffer,
                window,
                obs,
                head_fn,
                value_fn,
                epg_losses if loss.method == "epg" else None,
                lifetimes,
                members,
                workers,
            )
            curve.append(torch.where(episode_count > 0, episode_sum / episode_count.clamp_min(1), torch.nan))
            curve_steps.append(step + 1)
            total_sum += episode_sum
            total_count += episode_count
            episode_sum.zero_()
            episode_count.zero_()

    env_steps = lifetimes * config.lifetime_steps
    lifetime_returns = torch.where(total_count > 0, total_sum / total_count.clamp_min(1), torch.nan)
    final_returns = torch.full((lifetimes,), torch.nan)
    if config.fitness == "final_episodes":
        final_returns, extra_steps = _final_episodes(
            family, tasks, members, config.fitness_episodes, spec, policy, head_fn, generator
        )
        env_steps += extra_steps
    fitness = final_returns if config.fitness == "final_episodes" else lifetime_returns
    fitness = torch.where(dead | ~torch.isfinite(fitness), -torch.inf, fitness)

    def grid(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], members, workers)

    return LifetimeResult(
        fitness=grid(fitness),
        final_returns=grid(final_returns),
        lifetime_returns=grid(lifetime_returns),
        nonfinite=grid(dead),
        curve=grid(torch.stack(curve)) if curve else torch.empty(0, members, workers),
        curve_steps=curve_steps,
        env_steps=env_steps,
    )


def _update(
    config,
    loss,
    spec,
    generator,
    optimizer,
    policy,
    value,
    memory,
    buffer,
    window,
    next_obs,
    head_fn,
    value_fn,
    epg_losses,
    lifetimes,
    members,
    workers,
) -> torch.Tensor:
    """One update of every lifetime (one or more epochs of minibatch Adam steps over the last M steps).
    Returns the lifetimes whose loss or parameters went non-finite (their parameters are zeroed)."""
    steps_per_update, buffer_size = config.update_every, config.buffer_size
    time_major = lambda x: x.transpose(0, 1)  # [T, L, ...] <-> [L, T, ...]
    advantages = returns = None
    if loss.uses_value:
        with torch.no_grad():
            values = value_fn(value, time_major(window["obs"])).squeeze(-1)  # [L, M]
            bootstrap = value_fn(value, next_obs.unsqueeze(1)).squeeze(-1).squeeze(-1)
            gae_lambda = 1.0 if loss.method == "pg" else config.ppo.gae_lambda
            returns = lambda_returns(
                window["rew"],
                config.ppo.gamma * (1.0 - window["done"]),
                time_major(values),
                bootstrap,
                gae_lambda,
                stop_value_gradients=True,
            )
            advantages = returns - time_major(values)
    bad = torch.zeros(lifetimes, dtype=torch.bool)
    for _ in range(config.epochs):
        order = torch.randperm(steps_per_update, generator=generator)
        for batch in order.split(config.minibatch_size):
            total = torch.zeros(lifetimes)
            if loss.method == "epg":
                total = (1.0 - loss.alpha) * _evolved_loss(
                    loss,
                    spec,
                    policy,
                    memory,
                    buffer,
                    batch + buffer_size - steps_per_update,
                    head_fn,
                    epg_losses,
                    members,
                    workers,
                )
            if loss.uses_value:
                weight = loss.alpha if loss.method == "epg" else 1.0
                total = total + weight * _policy_gradient_loss(
                    config, loss, spec, policy, value, window, batch, advantages, returns, head_fn, value_fn
                )
            bad |= ~torch.isfinite(total.detach())
            optimizer.zero_grad(set_to_none=True)
            # Lifetimes are independent, so the gradient of the sum gives each lifetime its own gradient.
            total.sum().backward()
            optimizer.step()
    with torch.no_grad():
        for params in (policy, value, memory):
            for tensor in params.values():
                bad |= ~torch.isfinite(tensor.reshape(lifetimes, -1)).all(-1)
        if bad.any():
            for params in (policy, value, memory):
                for tensor in params.values():
                    tensor.copy_(torch.where(bad.view(-1, *[1] * (tensor.dim() - 1)), 0.0, tensor))
    return bad


def _evolved_loss(loss, spec, policy, memory, buffer, step_index, head_fn, epg_losses, members, workers):
    """Mean L_phi over the minibatch steps, per lifetime [L]; the context sees the whole buffer."""
    obs = buffer["obs"].transpose(0, 1)  # [L, N, obs]
    heads = head_fn(policy, obs)  # with gradient: the loss differentiates through the policy
    lifetimes, steps = obs.shape[:2]
    parts = [
        obs,
        buffer["act"].transpose(0, 1),
        buffer["rew"].T.unsqueeze(-1),
        buffer["done"].T.unsqueeze(-1),
        heads,
    ]
    if memory:
        units = torch.tanh(memory["w"] + memory["b"])  # W . 1 + b
        parts.append(units.unsqueeze(1).expand(-1, steps, -1))
    features = torch.cat(parts, dim=-1).reshape(members, workers, steps, -1)
    per_step = epg_losses(loss.phi, features, features[:, :, step_index])  # [P, W, batch]
    return per_step.mean(-1).reshape(lifetimes)


def _policy_gradient_loss(
    config, loss, spec, policy, value, window, batch, advantages, returns, head_fn, value_fn
):
    """Clipped PPO (``ppo`` and the annealed term of ``epg``) or REINFORCE with baseline (``pg``), [L]."""
    obs = window["obs"][batch].transpose(0, 1)  # [L, b, obs]
    actions = window["act"][batch].transpose(0, 1)
    adv = advantages[batch].T  # [L, b]
    target = returns[batch].T
    log_probs = pol.log_prob(spec, head_fn(policy, obs), actions)
    if loss.method == "pg":
        policy_loss = -(log_probs * adv).mean(-1)
    else:
        adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
        ratio = torch.exp(log_probs - window["logp"][batch].T)
        clipped = torch.clamp(ratio, 1 - config.ppo.clip, 1 + config.ppo.clip)
        policy_loss = -torch.minimum(ratio * adv, clipped * adv).mean(-1)
    value_loss = 0.5 * ((value_fn(value, obs).squeeze(-1) - target) ** 2).mean(-1)
    entropy = pol.entropy(spec, head_fn(policy, obs)).mean(-1) if config.ppo.entropy_coef else 0.0
    return policy_loss + config.ppo.value_coef * value_loss - config.ppo.entropy_coef * entropy


def _final_episodes(family, tasks, members, episodes, spec, policy, head_fn, generator):
    """Mean return of ``episodes`` fresh episodes per lifetime with the trained policy, run in parallel."""
    workers = len(tasks)
    env = make_env(family, [task for _ in range(members) for task in tasks for _ in range(episodes)])
    lifetimes = members * workers

    def per_worker(x: torch.Tensor) -> torch.Tensor:  # [W, K, ...] -> [P * W * K, ...]
        return x.unsqueeze(0).expand(members, *x.shape).reshape(lifetimes * episodes, *x.shape[2:])

    obs = env.reset(per_worker(torch.rand(workers, episodes, env.noise_dim, generator=generator)))
    first_return = torch.full((lifetimes * episodes,), torch.nan)
    with torch.no_grad():
        for _ in range(env.max_episode_steps):
            head = head_fn(policy, obs.reshape(lifetimes, episodes, -1)).reshape(lifetimes * episodes, -1)
            shape = (workers, episodes, spec.action_dim)
            noise = (
                torch.rand(shape, generator=generator)
                if spec.discrete
                else torch.randn(shape, generator=generator)
            )
            action = pol.sample(spec, head, per_worker(noise))
            result = env.step(
                action.argmax(-1) if spec.discrete else action,
                per_worker(torch.rand(workers, episodes, env.noise_dim, generator=generator)),
            )
            ended = (result.terminated | result.truncated) & torch.isnan(first_return)
            first_return = torch.where(ended, result.episode_return, first_return)
            obs = result.obs
    returns = first_return.reshape(lifetimes, episodes).mean(-1)
    return returns, lifetimes * episodes * env.max_episode_steps
