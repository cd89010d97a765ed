"""The EPG inner loop (Houthooft et al. 2018, Algorithm 1), for a whole population at once.

A *lifetime* is one freshly initialised policy trained for U = ``lifetime_steps`` env steps on one
task: every M = ``update_every`` steps it takes minibatch Adam steps on a loss computed over the
buffer of the last N = ``buffer_size`` steps. P population members (loss parameters phi_p) times W
workers (tasks) give P x W lifetimes, and they all run as ONE batched computation: one batched env,
policies stacked along a leading dimension, ``torch.func.vmap`` over members (phi) and workers.

Common random numbers: every random draw (policy init, action noise, resets, minibatch order) is made
for the W workers and shared by all members, so members differ only through their loss. The same
seed therefore gives the same lifetime whether a member runs alone or inside the batch. The draws come
from a CPU generator on every device, so a GPU run meets the very same random numbers as a CPU run.

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
from .loss_net import LossNetwork, ParamLayout, loss_context, loss_input_dim, step_losses

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
    device: torch.device | str = "cpu",
) -> LifetimeResult:
    """Train P x W fresh policies (P members, W = len(tasks) workers) in one batched computation on
    ``device``; the result's tensors are on the CPU."""
    return Lifetimes(family, tasks, config, loss, loss_net_config, crn_seed, device).run()


class Lifetimes:
    """The state of P x W lifetimes trained together; parameters are stacked [P * W, ...] leaves."""

    def __init__(
        self,
        family,
        tasks,
        config: InnerLoopConfig,
        loss: LossSetting,
        loss_net_config,
        crn_seed,
        device="cpu",
    ):
        self.family, self.tasks, self.config, self.loss = family, tasks, config, loss
        self.loss_net_config = loss_net_config
        self.device = torch.device(device)
        self.phi = loss.phi.to(self.device) if loss.phi is not None else None
        self.members, self.workers = loss.members, len(tasks)
        self.lifetimes = self.members * self.workers
        self.env = make_env(family, tasks * self.members, device=self.device)  # copy = member * W + worker
        self.spec = policy_spec(self.env, config)
        self.generator = torch.Generator().manual_seed(int(crn_seed))
        self.head_fn = partial(pol.policy_head, self.spec)  # stacked params, inputs [L, rows, obs]

        def leaves(params: dict) -> dict:
            return {k: self.per_worker(v.to(self.device)).clone().requires_grad_() for k, v in params.items()}

        self.policy = leaves(pol.init_policy(self.spec, self.workers, self.generator))
        self.value = (
            leaves(pol.init_value(self.spec, self.workers, self.generator)) if loss.uses_value else {}
        )
        units = loss_net_config.memory_units if loss.method == "epg" else 0
        # Memory units m = tanh(W . 1 + b): extra inner-loop parameters that only the loss sees.
        self.memory = (
            leaves({"w": torch.zeros(self.workers, units), "b": torch.zeros(self.workers, units)})
            if units
            else {}
        )
        self.optimizer = torch.optim.Adam([*self.parameter_groups_flat()], lr=config.lr, foreach=True)
        if loss.method == "epg":
            template = LossNetwork(loss_net_input_dim(self.env, self.spec, units), loss_net_config)
            layout = ParamLayout.of(template)
            if self.phi.shape[1] != layout.size:
                raise ValueError(f"phi has {self.phi.shape[1]} entries, the loss network needs {layout.size}")
            # vmap over members (own phi), inside it over workers (shared phi).
            context = vmap(partial(loss_context, template, layout), in_dims=(None, 0))
            self.loss_context = vmap(context, in_dims=(0, 0))  # (phi [P], buffer [P, W, N, D]) -> [P, W, C]
            losses = vmap(partial(step_losses, template, layout), in_dims=(None, 0, 0))
            self.step_losses = vmap(
                losses, in_dims=(0, 0, 0)
            )  # (phi, steps [P, W, n, D], context) -> [P, W, n]
        # The loss buffer of the last N steps (time-major; zero where no step has happened yet) and the
        # window of the last M steps that the next update trains on.
        n, m, lifetimes = config.buffer_size, config.update_every, self.lifetimes
        self.buffer = {
            "obs": self.zeros(n, lifetimes, self.env.obs_dim),
            "act": self.zeros(n, lifetimes, self.spec.action_features),
            "rew": self.zeros(n, lifetimes),
            "done": self.zeros(n, lifetimes),
        }
        self.window = {key: self.zeros(m, *value.shape[1:]) for key, value in self.buffer.items()}
        self.window["logp"] = self.zeros(m, lifetimes)
        self.dead = self.zeros(lifetimes, dtype=torch.bool)

    def zeros(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    def per_worker(self, x: torch.Tensor) -> torch.Tensor:
        """Draws made for the W workers, shared by every member: [W, ...] -> [P * W, ...]."""
        return x.unsqueeze(0).expand(self.members, *x.shape).reshape(self.lifetimes, *x.shape[1:])

    def parameter_groups_flat(self):
        for params in (self.policy, self.value, self.memory):
            yield from params.values()

    def draw(self, *shape: int, normal: bool = False) -> torch.Tensor:
        """Drawn on the CPU generator (identical streams on every device), then moved."""
        return (torch.randn if normal else torch.rand)(*shape, generator=self.generator).to(self.device)

    # ------------------------------------------------------------------------------------ the lifetime
    def run(self) -> LifetimeResult:
        config, env, spec, lifetimes = self.config, self.env, self.spec, self.lifetimes
        steps_per_update = config.update_every
        episode_sum, episode_count = self.zeros(lifetimes), self.zeros(lifetimes)
        total_sum, total_count = self.zeros(lifetimes), self.zeros(lifetimes)
        curve, curve_steps = [], []
        obs = env.reset(self.per_worker(self.draw(self.workers, env.noise_dim)))
        window = self.window
        for step in range(config.lifetime_steps):
            with torch.no_grad():
                head = self.head_fn(self.policy, obs.unsqueeze(1)).squeeze(1)
                noise = self.draw(self.workers, spec.action_dim, normal=not spec.discrete)
                action = pol.sample(spec, head, self.per_worker(noise))
                result = env.step(
                    action.argmax(-1) if spec.discrete else action,
                    self.per_worker(self.draw(self.workers, env.noise_dim)),
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
                for key in self.buffer:
                    self.buffer[key] = torch.cat([self.buffer[key][steps_per_update:], window[key]])
                self.dead |= self.update(obs)
                curve.append(
                    torch.where(episode_count > 0, episode_sum / episode_count.clamp_min(1), torch.nan)
                )
                curve_steps.append(step + 1)
                total_sum += episode_sum
                total_count += episode_count
                episode_sum.zero_()
                episode_count.zero_()

        env_steps = lifetimes * config.lifetime_steps
        lifetime_returns = torch.where(total_count > 0, total_sum / total_count.clamp_min(1), torch.nan)
        final_returns = torch.full((lifetimes,), torch.nan, device=self.device)
        if config.fitness == "final_episodes":
            final_returns, extra_steps = self.final_episodes(config.fitness_episodes)
            env_steps += extra_steps
        fitness = final_returns if config.fitness == "final_episodes" else lifetime_returns
        fitness = torch.where(self.dead | ~torch.isfinite(fitness), -torch.inf, fitness)

        def grid(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(*x.shape[:-1], self.members, self.workers).cpu()

        return LifetimeResult(
            fitness=grid(fitness),
            final_returns=grid(final_returns),
            lifetime_returns=grid(lifetime_returns),
            nonfinite=grid(self.dead),
            curve=grid(torch.stack(curve)) if curve else torch.empty(0, self.members, self.workers),
            curve_steps=curve_steps,
            env_steps=env_steps,
        )

    # ------------------------------------------------------------------------------------ updates
    def update(self, next_obs: torch.Tensor) -> torch.Tensor:
        """One update of every lifetime: ``epochs`` passes of minibatch Adam steps over the last M steps.
        Returns the lifetimes whose loss or parameters went non-finite (their parameters are zeroed)."""
        config, loss, window = self.config, self.loss, self.window
        advantages = returns = None
        if loss.uses_value:
            with torch.no_grad():
                values = pol.mlp(self.value, window["obs"].transpose(0, 1)).squeeze(-1).T  # [M, L]
                bootstrap = pol.mlp(self.value, next_obs.unsqueeze(1)).reshape(-1)
                gae_lambda = 1.0 if loss.method == "pg" else config.ppo.gae_lambda
                returns = lambda_returns(
                    window["rew"],
                    config.ppo.gamma * (1.0 - window["done"]),
                    values,
                    bootstrap,
                    gae_lambda,
                    stop_value_gradients=True,
                )
                advantages = returns - values
        bad = self.zeros(self.lifetimes, dtype=torch.bool)
        first_new_step = config.buffer_size - config.update_every  # where the window sits in the buffer
        fixed_context = None
        if loss.method == "epg" and not self.loss_net_config.context_gradient:
            with torch.no_grad():  # an input summarising the buffer under the policy before this update
                fixed_context = self.loss_context(self.phi, self.loss_inputs(slice(None)))
        for _ in range(config.epochs):
            order = torch.randperm(config.update_every, generator=self.generator).to(self.device)
            for batch in order.split(config.minibatch_size):
                total = self.zeros(self.lifetimes)
                if loss.method == "epg":
                    total = (1.0 - loss.alpha) * self.evolved_loss(batch + first_new_step, fixed_context)
                if loss.uses_value:
                    weight = loss.alpha if loss.method == "epg" else 1.0
                    total = total + weight * self.policy_gradient_loss(batch, advantages, returns)
                bad |= ~torch.isfinite(total.detach())
                self.optimizer.zero_grad(set_to_none=True)
                # Lifetimes are independent: the gradient of the sum gives each lifetime its own gradient.
                total.sum().backward()
                self.optimizer.step()
        with torch.no_grad():
            for tensor in self.parameter_groups_flat():
                bad |= ~torch.isfinite(tensor.reshape(self.lifetimes, -1)).all(-1)
            if bad.any():
                for tensor in self.parameter_groups_flat():
                    tensor.copy_(torch.where(bad.view(-1, *[1] * (tensor.dim() - 1)), 0.0, tensor))
        return bad

    def loss_inputs(self, index) -> torch.Tensor:
        """Loss-network inputs [P, W, steps, D] of the buffer steps ``index``, with the policy's current
        outputs (differentiable unless called under no_grad)."""
        buffer = self.buffer
        obs = buffer["obs"].transpose(0, 1)[:, index]  # [L, steps, obs]
        heads = self.head_fn(self.policy, obs)
        parts = [
            obs,
            buffer["act"].transpose(0, 1)[:, index],
            buffer["rew"].T[:, index].unsqueeze(-1),
            buffer["done"].T[:, index].unsqueeze(-1),
            heads,
        ]
        if self.memory:
            units = torch.tanh(self.memory["w"] + self.memory["b"])  # memory m = tanh(W . 1 + b)
            parts.append(units.unsqueeze(1).expand(-1, heads.shape[1], -1))
        return torch.cat(parts, dim=-1).reshape(self.members, self.workers, heads.shape[1], -1)

    def evolved_loss(self, step_index: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Mean L_phi over the minibatch steps, per lifetime [L].

        ``context`` None: computed here from the whole buffer *with* gradient through the policy
        outputs at every buffer step (the official code); otherwise a precomputed constant."""
        if context is None:
            everything = self.loss_inputs(slice(None))
            context = self.loss_context(self.phi, everything)
            steps = everything[:, :, step_index]
        else:
            steps = self.loss_inputs(step_index)
        per_step = self.step_losses(self.phi, steps, context)  # [P, W, batch]
        return per_step.mean(-1).reshape(self.lifetimes)

    def policy_gradient_loss(self, batch, advantages, returns) -> torch.Tensor:
        """Clipped PPO (``ppo``, also the annealed term of ``epg``) or REINFORCE with baseline (``pg``)."""
        config, window, spec = self.config, self.window, self.spec
        obs = window["obs"][batch].transpose(0, 1)  # [L, b, obs]
        adv, target = advantages[batch].T, returns[batch].T  # [L, b]
        heads = self.head_fn(self.policy, obs)
        log_probs = pol.log_prob(spec, heads, window["act"][batch].transpose(0, 1))
        if self.loss.method == "pg":
            policy_loss = -(log_probs * adv).mean(-1)
        else:
            adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
            ratio = torch.exp(log_probs - window["logp"][batch].T)
            clipped = torch.clamp(ratio, 1 - config.ppo.clip, 1 + config.ppo.clip)
            policy_loss = -torch.minimum(ratio * adv, clipped * adv).mean(-1)
        value_loss = 0.5 * ((pol.mlp(self.value, obs).squeeze(-1) - target) ** 2).mean(-1)
        entropy = pol.entropy(spec, heads).mean(-1) if config.ppo.entropy_coef else 0.0
        return policy_loss + config.ppo.value_coef * value_loss - config.ppo.entropy_coef * entropy

    # ------------------------------------------------------------------------------------ fitness
    def final_episodes(self, episodes: int) -> tuple[torch.Tensor, int]:
        """Mean return of ``episodes`` fresh episodes per lifetime with the trained policy, in parallel."""
        members, workers, lifetimes, spec = self.members, self.workers, self.lifetimes, self.spec
        env = make_env(
            self.family,
            [t for _ in range(members) for t in self.tasks for _ in range(episodes)],
            device=self.device,
        )

        def per_worker(x: torch.Tensor) -> torch.Tensor:  # [W, K, ...] -> [P * W * K, ...]
            return x.unsqueeze(0).expand(members, *x.shape).reshape(lifetimes * episodes, *x.shape[2:])

        obs = env.reset(per_worker(self.draw(workers, episodes, env.noise_dim)))
        first_return = torch.full((lifetimes * episodes,), torch.nan, device=self.device)
        with torch.no_grad():
            for _ in range(env.max_episode_steps):
                head = self.head_fn(self.policy, obs.reshape(lifetimes, episodes, -1)).reshape(
                    lifetimes * episodes, -1
                )
                noise = self.draw(workers, episodes, spec.action_dim, normal=not spec.discrete)
                action = pol.sample(spec, head, per_worker(noise))
                result = env.step(
                    action.argmax(-1) if spec.discrete else action,
                    per_worker(self.draw(workers, episodes, env.noise_dim)),
                )
                ended = (result.terminated | result.truncated) & torch.isnan(first_return)
                first_return = torch.where(ended, result.episode_return, first_return)
                obs = result.obs
        returns = first_return.reshape(lifetimes, episodes).mean(-1)
        return returns, lifetimes * episodes * env.max_episode_steps
