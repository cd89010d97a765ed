"""Episodes of a MAML meta-batch: T tasks x N rollouts as ONE batched env, and their advantages.

Layout is time-major: ``[H, T, N, ...]`` for H steps (at most the horizon: see :func:`rollouts`), T
tasks of the meta-batch and N rollouts per task. Env copy ``t * N + n`` is rollout n of task t, so
policies stacked along T (``[T, ...]`` leaves, see :mod:`pipeline.rl.policy`) act on observations
reshaped to ``[T, N, obs]`` with one batched matmul per layer; no Python loop over tasks or rollouts.

An episode lasts at most ``horizon`` steps, fewer when the family terminates it (cart-pole falls,
hopper falls) or its time limit truncates it; ``mask`` is 1 on the steps that belong to the episode.
Returns are not bootstrapped at the horizon (the finite-horizon objective of the MAML paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..envs.batched import BatchedTaskEnv
from ..rl import policy as pol
from ..rl.returns import lambda_returns

BASELINE_REG = 1e-5  # ridge coefficient of the linear feature baseline (rllab's LinearFeatureBaseline)


class Episodes(NamedTuple):
    """N rollouts of each of T tasks, time-major. ``advantages`` are constants (no gradient)."""

    obs: Tensor  # [H, T, N, obs_dim]
    actions: Tensor  # [H, T, N, action_features] (one-hot where discrete)
    rewards: Tensor  # [H, T, N], 0 after the episode's end
    mask: Tensor  # [H, T, N], 1.0 on the episode's steps
    advantages: Tensor  # [H, T, N]

    @property
    def tasks(self) -> int:
        return self.mask.shape[1]

    def task_returns(self) -> Tensor:
        """[T] mean undiscounted episode return of each task."""
        return self.rewards.sum(0).mean(-1)

    def env_steps(self) -> int:
        return int(self.mask.sum())


def task_rows(x: Tensor) -> Tensor:
    """``[H, T, N, ...]`` -> ``[T, H * N, ...]``: the layout stacked policies take (``[L, rows, ...]``)."""
    horizon, tasks, rollouts = x.shape[:3]
    return x.transpose(0, 1).reshape(tasks, horizon * rollouts, *x.shape[3:])


def draw_noise(
    spec: pol.PolicySpec, env: BatchedTaskEnv, tasks: int, rollouts: int, horizon: int, generator
) -> tuple[Tensor, Tensor]:
    """Action noise ``[H, T, N, action_dim]`` (for :func:`pol.act`) and reset noise ``[T * N, noise]``,
    drawn on the CPU generator (the same numbers on every device), then moved to the env's device."""
    shape = (horizon, tasks, rollouts, spec.action_dim)
    raw = (
        torch.randn(shape, generator=generator)
        if not spec.discrete
        else torch.rand(shape, generator=generator)
    )
    reset = torch.rand(tasks * rollouts, env.noise_dim, generator=generator)
    return pol.action_noise(spec, raw).to(env.device, env.dtype), reset.to(env.device)


@torch.no_grad()
def rollouts(
    spec: pol.PolicySpec, env: BatchedTaskEnv, params: dict, action_noise: Tensor, reset_noise: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the stacked policies ``params`` ([T] leaves) for H steps in ``env`` (T * N copies, task-major).

    Returns time-major ``(obs, actions, rewards, mask)`` of shapes ``[H', T, N, ...]``. After an episode
    ends its copy is reset by the env (auto-reset); those steps are masked out, so the reset noise of a
    step is never seen and a constant is passed. Once every episode has ended the loop stops: ``H' <= H``
    is the longest episode, and the all-masked steps it leaves out would add nothing to any sum (a
    cart-pole that falls in 20 steps costs 20 steps, not the 500 of its time limit). The noise is drawn
    for all H steps beforehand, so the random stream does not depend on when the episodes end.
    """
    horizon, tasks, rollouts_per_task = action_noise.shape[:3]
    copies = tasks * rollouts_per_task
    if env.num_envs != copies:
        raise ValueError(f"env has {env.num_envs} copies, the noise is for {tasks} x {rollouts_per_task}")
    obs = env.reset(reset_noise)
    unused_reset = torch.full((copies, env.noise_dim), 0.5, device=env.device)
    alive = torch.ones(copies, dtype=torch.bool, device=env.device)
    steps: dict[str, list[Tensor]] = {"obs": [], "actions": [], "rewards": [], "mask": []}
    for t in range(horizon):
        action = pol.act(spec, params, obs.view(tasks, rollouts_per_task, -1), action_noise[t])
        flat = action.reshape(copies, -1)
        result = env.step(flat.argmax(-1) if spec.discrete else flat, unused_reset)
        live = alive.to(obs.dtype)
        steps["obs"].append(obs)
        steps["actions"].append(flat)
        steps["rewards"].append(result.reward.to(obs.dtype) * live)
        steps["mask"].append(live)
        alive = alive & ~(result.terminated | result.truncated)
        obs = result.obs
        if not bool(alive.any()):
            break
    shape = (len(steps["mask"]), tasks, rollouts_per_task)
    obs_steps, action_steps = torch.stack(steps["obs"]), torch.stack(steps["actions"])
    return (
        obs_steps.reshape(*shape, -1),
        action_steps.reshape(*shape, -1),
        torch.stack(steps["rewards"]).reshape(shape),
        torch.stack(steps["mask"]).reshape(shape),
    )


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * m_{t+1} * G_{t+1}`` (``G_H = 0``) of ``[H, T, N]`` episodes."""
    horizon = rewards.shape[0]
    flat_rewards, flat_mask = rewards.reshape(horizon, -1), mask.reshape(horizon, -1)
    discounts = gamma * torch.cat([flat_mask[1:], torch.zeros_like(flat_mask[:1])])
    zeros = torch.zeros_like(flat_rewards)
    return lambda_returns(flat_rewards, discounts, zeros, zeros[0], 1.0).reshape(rewards.shape)


def baseline_features(obs: Tensor) -> Tensor:
    """rllab's linear-baseline features of ``[H, T, N, obs]``: ``[o, o^2, t, t^2, t^3, 1]`` with ``o``
    clipped to [-10, 10] and ``t`` the step index / 100."""
    horizon = obs.shape[0]
    clipped = obs.clamp(-10.0, 10.0)
    t = (torch.arange(horizon, dtype=obs.dtype, device=obs.device) / 100.0).view(-1, 1, 1, 1)
    t = t.expand(*obs.shape[:3], 1)
    return torch.cat([clipped, clipped.square(), t, t.square(), t**3, torch.ones_like(t)], dim=-1)


def linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = BASELINE_REG) -> Tensor:
    """The linear feature baseline (Duan et al. 2016, used by the MAML paper), fitted per task.

    For each task t: ``w_t = argmin_w sum_{valid steps} (phi(s)^T w - G)^2 + reg * |w|^2``, solved in
    closed form ``(X^T X + reg I) w = X^T G`` (float64, all T tasks in one batched solve); returns
    ``b(s) = phi(s)^T w_t`` as ``[H, T, N]``. Fitted on the very episodes it is used for, as
    pytorch-maml-rl does.
    """
    features = baseline_features(obs.double())  # [H, T, N, F]
    weights = mask.double().unsqueeze(-1)
    x = task_rows(features * weights)  # [T, H*N, F]; masked rows are zero and drop out of the fit
    y = task_rows(returns.double() * mask.double()).unsqueeze(-1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(x.transpose(1, 2) @ x + reg * eye, x.transpose(1, 2) @ y)  # [T, F, 1]
    values = torch.einsum("htnf,tf->htn", features, w.squeeze(-1))
    return values.to(obs.dtype)


def advantages(obs: Tensor, rewards: Tensor, mask: Tensor, gamma: float, normalize: bool) -> Tensor:
    """``A = G - b(s)`` on the valid steps (0 elsewhere); ``normalize``: per task to mean 0, std 1 over
    the valid steps (as pytorch-maml-rl and rllab's ``center_adv`` do)."""
    returns = discounted_returns(rewards, mask, gamma)
    adv = (returns - linear_baseline(obs, returns, mask)) * mask
    if normalize:
        count = mask.sum((0, 2), keepdim=True).clamp_min(1.0)
        mean = adv.sum((0, 2), keepdim=True) / count
        var = ((adv - mean).square() * mask).sum((0, 2), keepdim=True) / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    return adv


def sample_episodes(
    spec: pol.PolicySpec,
    env: BatchedTaskEnv,
    params: dict,
    rollouts_per_task: int,
    horizon: int,
    generator: torch.Generator,
    gamma: float,
    normalize_advantages: bool,
) -> Episodes:
    """N rollouts of each task by its stacked policy ([T] leaves), with advantages."""
    tasks = env.num_envs // rollouts_per_task
    action_noise, reset_noise = draw_noise(spec, env, tasks, rollouts_per_task, horizon, generator)
    obs, actions, rewards, mask = rollouts(spec, env, params, action_noise, reset_noise)
    return Episodes(obs, actions, rewards, mask, advantages(obs, rewards, mask, gamma, normalize_advantages))
