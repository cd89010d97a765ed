"""Batched torch task families for Evolved Policy Gradients (meta-RL).

Each environment holds ``B`` copies that step together in one short sequence of tensor ops; every copy has
its own task parameters (a ``[B]`` tensor per parameter).  The environments own no RNG: the caller passes
``U(0, 1)`` noise for resets, which is how common random numbers across ES population members are realised.

Families
--------
``point_goal``        2-D point mass that must reach an unobserved goal (a small analogue of GoalAnt).
``random_cartpole``   gymnasium ``CartPole-v1`` dynamics, per-copy physics (a RandomHopper analogue).
``random_hopper``     gymnasium ``Hopper-v5`` in MuJoCo with per-copy masses, friction and gravity (the
                      paper's RandomHopper; :mod:`pipeline.envs.hopper`).

Episodes auto-reset inside :meth:`BatchedTaskEnv.step`: for a copy whose episode ends, the returned ``obs``
is the first observation of its next episode (built from ``reset_noise``); the last observation of the
finished episode is kept in :attr:`BatchedTaskEnv.final_obs` (useful for bootstrapping on truncation).
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium
import numpy as np
import torch
from torch import Tensor

from ..config import TASK_SPLITS
from ..io import read_json
from ..seeding import name_key
from .batched import BatchedTaskEnv, StepResult
from .hopper import RandomHopperEnv

__all__ = [
    "FAMILIES",
    "SPLITS",
    "BatchedTaskEnv",
    "PointGoalEnv",
    "RandomCartPoleEnv",
    "RandomHopperEnv",
    "StepResult",
    "load_tasks",
    "make_env",
    "sample_tasks",
    "task_param_ranges",
]

SPLITS = TASK_SPLITS


class PointGoalEnv(BatchedTaskEnv):
    """2-D point mass; the goal ``g = r (cos θ, sin θ)`` is not observed and must be inferred from reward.

    ``obs = [p, v]``; ``v' = 0.9 v + 0.1 a``, ``p' = p + 0.1 v'`` (dt = 0.1), reward
    ``-||p' - g|| - 0.01 ||a||^2``.  The action is clipped to ``[-1, 1]^2`` and then scaled into the unit
    disk, so full throttle gives a top speed of exactly 1.0 unit/s in every direction (0.1 per step).
    """

    family = "point_goal"
    obs_dim = 4
    state_dim = 4  # the observation is the state
    discrete = False
    action_dim = 2
    noise_dim = 2
    max_episode_steps = 50
    param_names = ("goal_angle", "goal_radius")
    nominal_params = {"goal_angle": math.pi / 2, "goal_radius": 1.0}
    train_ranges = {"goal_angle": (0.0, math.pi), "goal_radius": (1.0, 1.0)}
    ood_ranges = {"goal_angle": (math.pi, 2.0 * math.pi), "goal_radius": (1.0, 1.0)}
    single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
    single_action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    dt = 0.1
    damping = 0.9
    ctrl_cost = 0.01
    reset_scale = 0.05

    def _setup(self) -> None:
        angle, radius = self.params["goal_angle"], self.params["goal_radius"]
        self.goal = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)  # [B, 2]

    def _reset_state(self, noise: Tensor) -> Tensor:
        pos = noise * (2.0 * self.reset_scale) - self.reset_scale
        return torch.cat([pos, torch.zeros_like(pos)], dim=1)

    def _transition(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = actions.to(self.dtype).clamp(-1.0, 1.0)
        sq = (a * a).sum(1, keepdim=True)
        a = a / sq.sqrt().clamp_min(1.0)  # project into the unit disk
        vel = state[:, 2:] * self.damping + a * (1.0 - self.damping)
        pos = state[:, :2] + vel * self.dt
        # ||a_projected||^2 == min(||a||^2, 1)
        ctrl = sq.squeeze(1).clamp_max(1.0)
        reward = -torch.linalg.vector_norm(pos - self.goal, dim=1) - self.ctrl_cost * ctrl
        terminated = torch.zeros(self._num_envs, dtype=torch.bool, device=self.device)
        return torch.cat([pos, vel], dim=1), reward, terminated


class RandomCartPoleEnv(BatchedTaskEnv):
    """gymnasium ``CartPole-v1`` (Euler integration) with per-copy ``gravity``, ``masscart``, ``masspole``
    and ``length`` (HALF the pole length, as in gymnasium).  Reward 1.0 every step, including the
    terminating one; episodes are truncated after 500 steps."""

    family = "random_cartpole"
    obs_dim = 4
    state_dim = 4  # the observation is the state
    discrete = True
    action_dim = 2
    noise_dim = 4
    max_episode_steps = 500
    max_step_reward = 1.0
    param_names = ("gravity", "masscart", "masspole", "length")
    nominal_params = {"gravity": 9.8, "masscart": 1.0, "masspole": 0.1, "length": 0.5}
    train_ranges = {
        "gravity": (8.0, 11.5),
        "masscart": (0.5, 1.5),
        "masspole": (0.05, 0.2),
        "length": (0.3, 0.7),
    }
    ood_ranges = {
        "gravity": (11.5, 14.0),
        "masscart": (1.5, 2.5),
        "masspole": (0.2, 0.4),
        "length": (0.7, 1.2),
    }

    force_mag = 10.0
    tau = 0.02
    x_threshold = 2.4
    theta_threshold_radians = 12 * 2 * math.pi / 360
    _high = np.array([x_threshold * 2, np.inf, theta_threshold_radians * 2, np.inf], dtype=np.float32)
    single_observation_space = gymnasium.spaces.Box(-_high, _high, dtype=np.float32)
    single_action_space = gymnasium.spaces.Discrete(2)

    def _setup(self) -> None:
        p = self.params
        self.gravity, self.masspole, self.length = p["gravity"], p["masspole"], p["length"]
        self.total_mass = p["masspole"] + p["masscart"]
        self.polemass_length = p["masspole"] * p["length"]

    def _reset_state(self, noise: Tensor) -> Tensor:
        return noise * 0.1 - 0.05

    def _transition(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Component-major contiguous copy: elementwise kernels (sin/cos above all) are slow on strided views.
        x, x_dot, theta, theta_dot = state.t().contiguous().unbind(0)
        force = actions.to(self.dtype) * (2.0 * self.force_mag) - self.force_mag  # 1 -> +10, 0 -> -10
        costheta, sintheta = torch.cos(theta), torch.sin(theta)
        # Same expressions and evaluation order as gymnasium's CartPoleEnv.step.
        temp = (force + self.polemass_length * theta_dot.square() * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta.square() / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        tau = self.tau
        nxt = torch.stack(
            [x + tau * x_dot, x_dot + tau * xacc, theta + tau * theta_dot, theta_dot + tau * thetaacc], 1
        )
        terminated = (nxt[:, 0].abs() > self.x_threshold) | (nxt[:, 2].abs() > self.theta_threshold_radians)
        return nxt, torch.ones_like(x), terminated


FAMILIES: dict[str, type[BatchedTaskEnv]] = {
    cls.family: cls for cls in (PointGoalEnv, RandomCartPoleEnv, RandomHopperEnv)
}


def _family(family: str) -> type[BatchedTaskEnv]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown task family {family!r}; allowed: {sorted(FAMILIES)}") from None


def task_param_ranges(family: str) -> dict[str, dict[str, tuple[float, float]]]:
    """``{"train"|"test"|"ood": {param: (lo, hi)}}``; draws uniform on ``[lo, hi)`` (lo == hi: constant)."""
    cls = _family(family)
    return {
        "train": dict(cls.train_ranges),
        "test": dict(cls.train_ranges),
        "ood": dict(cls.ood_ranges),
    }


def sample_tasks(family: str, split: str, n: int, seed: int) -> list[dict]:
    """Draw ``n`` tasks of ``family`` for ``split``; deterministic given ``(family, split, n, seed)``.

    The random stream is keyed by hashes of the family and split names, so the draws of one family do
    not depend on which other families exist. "train" and "test" share one distribution but use
    different seed streams; "ood" uses the out-of-distribution ranges. Each task:
    ``{"task_id", "seed", "params": {name: float}}``.
    """
    cls = _family(family)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Keyed by names, not positions: a family or split added later leaves every other draw unchanged.
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(name_key(family), name_key(split)))
    param_rng, seed_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    ranges = task_param_ranges(family)[split]
    columns = {}
    for name in cls.param_names:  # fixed order -> deterministic draws
        lo, hi = ranges[name]
        columns[name] = lo + (hi - lo) * param_rng.random(n)
    task_seeds = seed_rng.integers(0, 2**31 - 1, size=n)
    return [
        {
            "task_id": f"{family}/{split}/{i}",
            "seed": int(task_seeds[i]),
            "params": {name: float(columns[name][i]) for name in cls.param_names},
        }
        for i in range(n)
    ]


def load_tasks(tasks_path: str | Path, family: str) -> dict:
    """The train / test / ood task lists of one family from the prepare stage's ``tasks.json``."""
    data = read_json(Path(tasks_path))
    families = data.get("families", {})
    if family not in families:
        raise ValueError(f"{tasks_path} has no tasks for family {family!r}; it has: {', '.join(families)}")
    return families[family]


def make_env(
    family: str, tasks: list[dict], *, dtype: torch.dtype = torch.float32, device="cpu"
) -> BatchedTaskEnv:
    """One env copy per task (in order), task parameters stacked into ``[B]`` tensors."""
    cls = _family(family)
    if not tasks:
        raise ValueError("make_env needs at least one task")
    params = {
        name: torch.tensor([float(t["params"][name]) for t in tasks], dtype=dtype, device=device)
        for name in cls.param_names
    }
    return cls(params, dtype=dtype, device=device)
