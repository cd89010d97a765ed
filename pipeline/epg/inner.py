"""The EPG inner loop (Houthooft et al. 2018, Algorithm 1), for a whole population at once.

A *lifetime* is one freshly initialised policy trained for U = ``lifetime_steps`` env steps on one
task: every M = ``update_every`` steps it takes minibatch Adam steps on a loss computed over the
buffer of the last N = ``buffer_size`` steps. P population members (loss parameters phi_p) times W
workers (tasks) give P x W lifetimes, and they all run as ONE batched computation: one batched env,
policies stacked along a leading dimension, and the P loss networks as per-member weight stacks
(:class:`~pipeline.epg.loss_net.MemberLosses`); no Python loop over members, workers or envs.

Common random numbers: every random draw (policy init, action noise, resets, minibatch order) is made
for the W workers and shared by all members, so members differ only through their loss. The same
seed therefore gives the same lifetime whether a member runs alone or inside the batch. The draws come
from a CPU generator on every device, so a GPU run meets the very same random numbers as a CPU run.

The loss is one of ``epg`` (the evolved loss L_phi, optionally mixed with PPO: (1 - alpha) L_phi +
alpha L_PPO), ``ppo`` or ``pg`` (REINFORCE with a learned baseline); the evaluation baselines reuse
this very trainer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch

from ..config import InnerLoopConfig, LossNetConfig
from ..envs.tasks import make_env
from ..rl import losses
from ..rl import policy as pol
from ..rl.normalizer import init_moments, normalize, update_moments
from ..rl.returns import lambda_returns
from .loss_net import LossNetwork, MemberLosses, ParamLayout, loss_input_dim

METHODS = ("epg", "ppo", "pg")
MEMORY_INPUTS = 64  # width of the constant ones-vector that the memory units read (the official code)


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
    # Wall-clock seconds of acting, updates and fitness episodes as the Python thread saw them (on a GPU,
    # asynchronous work can shift time from one part to the next).
    seconds: dict[str, float] | None = None


def loss_net_input_dim(family_env, spec: pol.PolicySpec, memory_units: int) -> int:
    return loss_input_dim(family_env.obs_dim, spec.action_features, spec.output_features, memory_units)


def policy_spec(env, config: InnerLoopConfig) -> pol.PolicySpec:
    return pol.PolicySpec(
        env.obs_dim, env.action_dim, env.discrete, tuple(config.policy_hidden), config.init_log_std
    )


def init_memory(units: int, count: int, generator: torch.Generator) -> dict:
    """``count`` sets of memory units m = tanh(1 . W + b), W [MEMORY_INPUTS, units], b [units], as in the
    official code: W random with every input's row scaled to norm 0.01, b = 0, so m starts near 0. Under
    Adam each of W's entries moves by about lr per step, so the pre-activation moves ~(64 + 1) lr: the
    units adapt as fast as a layer's output, not like a lone bias."""
    w = torch.randn(count, MEMORY_INPUTS, units, generator=generator)
    return {"w": w * (0.01 / w.norm(dim=-1, keepdim=True)), "b": torch.zeros(count, units)}


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
    """The state of P x W lifetimes trained together; parameters are stacked [P * W, ...] leaves.

    Each lifetime keeps running moments of its own observations (and continuous actions), as the
    official EPG code does: the policy and value function see observations normalised with them, and
    the loss network sees normalised observations and actions next to the raw reward and done flag.
    The moments take in each update window's M steps at its end, just before the update, so the update
    and the next window's acting use the same statistics. They live and die with the lifetime (a fresh
    policy starts from fresh moments), so an evolve checkpoint, written between generations, has
    nothing of theirs to save.
    """

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
        # a plain tensor: subclasses (EvoTorch hands over read-only ones) would spread to every result
        self.phi = loss.phi.to(self.device).as_subclass(torch.Tensor) if loss.phi is not None else None
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
        # Memory units: extra inner-loop parameters that only the loss sees.
        self.memory = leaves(init_memory(units, self.workers, self.generator)) if units else {}
        # fused: one kernel per tensor for the whole step (~3x faster than foreach here, on CPU and GPU)
        self.optimizer = torch.optim.Adam([*self.parameter_groups_flat()], lr=config.lr, fused=True)
        if loss.method == "epg":
            template = LossNetwork(loss_net_input_dim(self.env, self.spec, units), loss_net_config)
            layout = ParamLayout.of(template)
            if self.phi.shape[1] != layout.size:
                raise ValueError(f"phi has {self.phi.shape[1]} entries, the loss network needs {layout.size}")
            data_dim = self.env.obs_dim + self.spec.action_features + 2
            self.member_losses = MemberLosses(template, self.phi, data_dim, units)
        # The loss buffer of the last N steps (lifetime-major [L, N, ...]; zero where no step has happened
        # yet) and the window of the last M steps (time-major [M, L, ...]) that the next update trains on.
        n, lifetimes = config.buffer_size, self.lifetimes
        self.buffer = {
            "obs": self.zeros(lifetimes, n, self.env.obs_dim),
            "act": self.zeros(lifetimes, n, self.spec.action_features),
            "rew": self.zeros(lifetimes, n),
            "done": self.zeros(lifetimes, n),
        }
        self.window: dict[str, torch.Tensor] = {}  # the same keys, stacked by run() before each update
        self.loss_terms: dict[str, torch.Tensor | None] = {}  # per-update shares of the loss (prepare_loss)
        self.dead = self.zeros(lifetimes, dtype=torch.bool)
        self.obs_moments = init_moments((lifetimes,), self.env.obs_dim, self.device)
        self.act_moments = (
            None if self.spec.discrete else init_moments((lifetimes,), self.spec.action_dim, self.device)
        )
        self.buffered_steps = 0  # steps held in the buffer so far (at most N)

    def zeros(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.device)

    def per_worker(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Draws made for the W workers (dimension ``dim``), shared by every member: [..., W, ...] ->
        [..., P * W, ...] (member-major, as lifetimes are laid out)."""
        x = x.unsqueeze(dim)
        shape = list(x.shape)
        shape[dim] = self.members
        return x.expand(shape).flatten(dim, dim + 1)

    def parameter_groups_flat(self):
        for params in (self.policy, self.value, self.memory):
            yield from params.values()

    def normalized_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations [L, ..., obs] (lifetime-major) normalised with each lifetime's moments."""
        return normalize(self.obs_moments, obs.movedim(0, -2)).movedim(-2, 0)

    def draw(self, *shape: int, normal: bool = False) -> torch.Tensor:
        """Drawn on the CPU generator (identical streams on every device), then moved."""
        return (torch.randn if normal else torch.rand)(*shape, generator=self.generator).to(self.device)

    # ------------------------------------------------------------------------------------ the lifetime
    def run(self) -> LifetimeResult:
        """The whole lifetime: act M steps, update on them, repeat; then the fitness episodes if asked."""
        config, env, steps_per_update = self.config, self.env, self.config.update_every
        totals = (self.zeros(self.lifetimes), self.zeros(self.lifetimes))  # episode returns summed, counted
        curve, curve_steps = [], []
        start, update_seconds = time.perf_counter(), 0.0
        obs = env.reset(self.per_worker(self.draw(self.workers, env.noise_dim)))
        # The window's steps, kept as lists and stacked once per update: per-step work stays minimal.
        recent: dict[str, list[torch.Tensor]] = {key: [] for key in (*self.buffer, "episode_return")}
        for step in range(config.lifetime_steps):
            slot = step % steps_per_update
            if slot == 0:
                action_noise, reset_noise = self.window_noise()
            obs = self.act(obs, action_noise[slot], reset_noise[slot], recent)
            if slot == steps_per_update - 1:
                episode_return = self.take_window(recent, step)
                update_start = time.perf_counter()
                self.dead |= self.update(self.normalized_obs(obs))
                update_seconds += time.perf_counter() - update_start
                # episode_return is the finished episode's return on the step it ends, else 0
                episode_sum, episode_count = episode_return.sum(0), self.window["done"].sum(0)
                curve.append(
                    torch.where(episode_count > 0, episode_sum / episode_count.clamp_min(1), torch.nan)
                )
                curve_steps.append(step + 1)
                totals = (totals[0] + episode_sum, totals[1] + episode_count)
        acting = time.perf_counter() - start - update_seconds
        return self.result(totals, curve, curve_steps, {"acting": acting, "updates": update_seconds})

    def window_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next window's action and reset noise [M, L, ...], in two draws rather than two per step."""
        spec, shape = self.spec, (self.config.update_every, self.workers)
        uniform_or_normal = self.draw(*shape, spec.action_dim, normal=not spec.discrete)
        action_noise = self.per_worker(pol.action_noise(spec, uniform_or_normal), 1).unsqueeze(2)
        reset_noise = self.per_worker(self.draw(*shape, self.env.noise_dim), 1)
        return action_noise, reset_noise

    def act(self, obs, action_noise, reset_noise, recent: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """One env step of every lifetime, recorded in ``recent``; returns the next observations."""
        spec = self.spec
        with torch.no_grad():
            action = pol.act(spec, self.policy, self.normalized_obs(obs).unsqueeze(1), action_noise).squeeze(
                1
            )
            result = self.env.step(action.argmax(-1) if spec.discrete else action, reset_noise)
        recent["obs"].append(obs)
        recent["act"].append(action)
        recent["rew"].append(result.reward)
        recent["done"].append(result.terminated | result.truncated)
        recent["episode_return"].append(result.episode_return)
        return result.obs

    def take_window(self, recent: dict[str, list[torch.Tensor]], step: int) -> torch.Tensor:
        """Stack the window's steps into ``self.window`` and the loss buffer, update the moments and
        normalise the window's observations; returns its episode returns [M, L] (emptying ``recent``)."""
        steps_per_update = self.config.update_every
        window = {key: torch.stack(values).float() for key, values in recent.items()}
        for values in recent.values():
            values.clear()
        episode_return = window.pop("episode_return")
        self.window = window
        for key, values in window.items():
            self.buffer[key] = torch.cat(
                [self.buffer[key][:, steps_per_update:], values.transpose(0, 1)], dim=1
            )
        self.buffered_steps = min(step + 1, self.config.buffer_size)
        self.obs_moments = update_moments(self.obs_moments, window["obs"])
        if self.act_moments is not None:
            self.act_moments = update_moments(self.act_moments, window["act"])
        window["obs"] = normalize(self.obs_moments, window["obs"])  # what the update's policy sees
        return episode_return

    def result(
        self, totals, curve: list, curve_steps: list[int], seconds: dict[str, float]
    ) -> LifetimeResult:
        """The lifetimes' fitness (after the fitness episodes, if configured) as [P, W] grids on the CPU."""
        config = self.config
        env_steps = self.lifetimes * config.lifetime_steps
        total_sum, total_count = totals
        lifetime_returns = torch.where(total_count > 0, total_sum / total_count.clamp_min(1), torch.nan)
        final_returns = torch.full((self.lifetimes,), torch.nan, device=self.device)
        lifetime_end = time.perf_counter()
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
            seconds={**seconds, "fitness_episodes": time.perf_counter() - lifetime_end},
        )

    # ------------------------------------------------------------------------------------ updates
    def update(self, next_obs: torch.Tensor) -> torch.Tensor:
        """One update of every lifetime: ``epochs`` passes of minibatch Adam steps over the last M steps.
        Returns the lifetimes whose loss or parameters went non-finite (their parameters are zeroed)."""
        config, loss, window = self.config, self.loss, self.window
        advantages = returns = old_log_probs = None
        if loss.uses_value:
            with torch.no_grad():
                obs = window["obs"].transpose(0, 1)  # [L, M, obs]
                values = pol.mlp(self.value, obs).squeeze(-1).T  # [M, L]
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
                # The policy acted with these parameters throughout the window: its log-probabilities then.
                old_log_probs = pol.log_prob(
                    self.spec, self.head_fn(self.policy, obs), window["act"].transpose(0, 1)
                )
        if loss.method == "epg":
            self.prepare_loss()
        bad = self.zeros(self.lifetimes, dtype=torch.bool)
        for _ in range(config.epochs):
            order = torch.randperm(config.update_every, generator=self.generator).to(self.device)
            for batch in order.split(config.minibatch_size):
                total = self.zeros(self.lifetimes)
                if loss.method == "epg":
                    total = (1.0 - loss.alpha) * self.evolved_loss(batch)
                if loss.uses_value:
                    weight = loss.alpha if loss.method == "epg" else 1.0
                    total = total + weight * self.policy_gradient_loss(
                        batch, advantages, returns, old_log_probs
                    )
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

    def policy_outputs(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The policy's current outputs at buffer steps ``rows``, [P, W, steps, H] (differentiable unless
        called under no_grad); needs :meth:`prepare_loss` first."""
        obs = self.loss_terms["obs"][:, rows]  # [L, steps, obs], normalised
        return self.head_fn(self.policy, obs).reshape(self.members, self.workers, obs.shape[1], -1)

    def memory_units(self) -> torch.Tensor | None:
        """Memory units m = tanh(1 . W + b), [P, W, units] (None without memory)."""
        if not self.memory:
            return None
        units = torch.tanh(self.memory["w"].sum(1) + self.memory["b"])
        return units.reshape(self.members, self.workers, -1)

    def prepare_loss(self) -> None:
        """The shares of L_phi that stay fixed during an update, computed once per update: the buffer
        data's share of the first convolution and of the head's first layer at the window's steps, and,
        without ``context_gradient``, the whole context (under the policy before this update).

        Observations and continuous actions enter normalised, and as zeros at the buffer steps that have
        not happened yet (the official code pads the normalised buffer with zeros)."""
        buffer, n, m = self.buffer, self.config.buffer_size, self.config.update_every
        with torch.no_grad():
            happened = (torch.arange(n, device=self.device) >= n - self.buffered_steps).unsqueeze(-1)
            obs = self.normalized_obs(buffer["obs"]) * happened
            act = buffer["act"]
            if self.act_moments is not None:
                act = normalize(self.act_moments, act.movedim(0, -2)).movedim(-2, 0) * happened
            self.loss_terms = {"obs": obs}
            data = torch.cat([obs, act, buffer["rew"].unsqueeze(-1), buffer["done"].unsqueeze(-1)], -1)
            conv, head = self.member_losses.data_terms(
                data.reshape(self.members, self.workers, n, -1), slice(n - m, n)
            )
            context = None
            if not self.loss_net_config.context_gradient:
                context = self.member_losses.context(conv, self.policy_outputs(), self.memory_units())
        self.loss_terms.update(conv=conv, head=head, context=context)

    def evolved_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean L_phi over the minibatch ``batch`` (steps of the window), per lifetime [L]; needs
        :meth:`prepare_loss` first.

        With ``context_gradient`` the context is recomputed from the whole buffer *with* gradient through
        the policy outputs at every buffer step (the official code); otherwise it is the update's constant."""
        terms, memory = self.loss_terms, self.memory_units()
        rows = batch + (self.config.buffer_size - self.config.update_every)  # the window's buffer steps
        if terms["context"] is None:
            outputs = self.policy_outputs()
            context = self.member_losses.context(terms["conv"], outputs, memory)
            outputs = outputs[:, :, rows]
        else:
            context, outputs = terms["context"], self.policy_outputs(rows)
        per_step = self.member_losses.step_losses(terms["head"][:, :, batch], outputs, memory, context)
        return per_step.mean(-1).reshape(self.lifetimes)

    def policy_gradient_loss(self, batch, advantages, returns, old_log_probs) -> torch.Tensor:
        """Clipped PPO (``ppo``, also the annealed term of ``epg``) or REINFORCE with baseline (``pg``),
        plus the value regression, per lifetime [L]; the surrogates are time-major over the minibatch."""
        config, window, spec = self.config, self.window, self.spec
        obs = window["obs"][batch].transpose(0, 1)  # [L, b, obs]
        heads = self.head_fn(self.policy, obs)
        log_probs = pol.log_prob(spec, heads, window["act"][batch].transpose(0, 1)).T  # [b, L]
        adv = advantages[batch]  # [b, L]
        if self.loss.method == "pg":
            policy_loss = losses.reinforce_surrogate(log_probs, adv)
        else:
            policy_loss = losses.ppo_clipped_surrogate(
                log_probs, old_log_probs[:, batch].T, losses.normalize_advantages(adv), config.ppo.clip
            )
        values = pol.mlp(self.value, obs).squeeze(-1).T  # [b, L]
        value_loss = losses.value_loss(values, returns[batch])
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

        # Episode k of worker w is row w * K + k of the draws, shared by every member.
        obs = env.reset(self.per_worker(self.draw(workers * episodes, env.noise_dim)))
        steps = env.max_episode_steps
        uniform_or_normal = self.draw(steps, workers * episodes, spec.action_dim, normal=not spec.discrete)
        action_noise = pol.action_noise(spec, uniform_or_normal)
        reset_noise = self.draw(steps, workers * episodes, env.noise_dim)
        first_return = torch.full((lifetimes * episodes,), torch.nan, device=self.device)
        with torch.no_grad():
            for t in range(steps):
                noise = self.per_worker(action_noise[t]).reshape(lifetimes, episodes, -1)
                action = pol.act(
                    spec, self.policy, self.normalized_obs(obs.reshape(lifetimes, episodes, -1)), noise
                )
                action = action.reshape(lifetimes * episodes, -1)
                result = env.step(
                    action.argmax(-1) if spec.discrete else action, self.per_worker(reset_noise[t])
                )
                ended = (result.terminated | result.truncated) & torch.isnan(first_return)
                first_return = torch.where(ended, result.episode_return, first_return)
                obs = result.obs
        returns = first_return.reshape(lifetimes, episodes).mean(-1)
        return returns, lifetimes * episodes * env.max_episode_steps
