"""Batched torch task families for Evolved Policy Gradients (meta-RL).

Each environment holds ``B`` copies that step together in one short sequence of tensor ops; every copy has
its own task parameters (a ``[B]`` tensor per parameter).  The environments own no RNG: the caller passes
``U(0, 1)`` noise for resets, which is how common random numbers across ES population members are realised.

Families
--------
``point_goal``        2-D point mass that must reach an unobserved goal (a small analogue of GoalAnt).
``random_cartpole``   gymnasium ``CartPole-v1`` dynamics, per-copy physics (a RandomHopper analogue).

Episodes auto-reset inside :meth:`BatchedTaskEnv.step`: for a copy whose episode ends, the returned ``obs``
is the first observation of its next episode (built from ``reset_noise``); the last observation of the
finished episode is kept in :attr:`BatchedTaskEnv.final_obs` (useful for bootstrapping on truncation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import gymnasium
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FAMILIES",
    "SPLITS",
    "BatchedTaskEnv",
    "PointGoalEnv",
    "RandomCartPoleEnv",
    "StepResult",
    "make_env",
    "sample_tasks",
    "task_param_ranges",
]

SPLITS: tuple[str, ...] = ("train", "test", "ood")


class StepResult(NamedTuple):
    obs: Tensor  # [B, obs_dim]; first obs of the new episode where an episode ended this step
    reward: Tensor  # [B]
    terminated: Tensor  # [B] bool
    truncated: Tensor  # [B] bool (time limit)
    episode_return: Tensor  # [B] undiscounted return of the episode that ended this step, else 0
    episode_length: Tensor  # [B] int64 length of the episode that ended this step, else 0


class BatchedTaskEnv(ABC):
    """``B`` copies of one task family, each with its own task parameters.

    The observation is the full physical state for both families, so :meth:`set_state` takes a
    ``[B, obs_dim]`` tensor.
    """

    family: ClassVar[str]
    obs_dim: ClassVar[int]
    discrete: ClassVar[bool]
    action_dim: ClassVar[int]  # number of actions if discrete, else the action vector size
    noise_dim: ClassVar[int]  # U(0,1) numbers one copy needs to reset
    max_episode_steps: ClassVar[int]
    param_names: ClassVar[tuple[str, ...]]
    nominal_params: ClassVar[dict[str, float]]
    train_ranges: ClassVar[dict[str, tuple[float, float]]]  # half-open [lo, hi); lo == hi means constant
    ood_ranges: ClassVar[dict[str, tuple[float, float]]]
    single_observation_space: ClassVar[gymnasium.spaces.Box]
    single_action_space: ClassVar[gymnasium.spaces.Space]

    def __init__(self, task_params: dict[str, Tensor], *, dtype: torch.dtype = torch.float32, device="cpu"):
        if set(task_params) != set(self.param_names):
            raise ValueError(
                f"{self.family}: task_params must have exactly the keys {sorted(self.param_names)}, "
                f"got {sorted(task_params)}"
            )
        self.dtype = dtype
        self.device = torch.device(device)
        params = {
            k: torch.as_tensor(task_params[k], dtype=dtype, device=self.device) for k in self.param_names
        }
        sizes = {tuple(v.shape) for v in params.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"{self.family}: every task parameter must be a 1-D tensor of one length [B]")
        self.params: dict[str, Tensor] = params
        self._num_envs = int(next(iter(sizes))[0])
        self._setup()
        b = self._num_envs
        self._state = torch.zeros(b, self.obs_dim, dtype=dtype, device=self.device)
        self._final_obs = self._state
        self._ep_return = torch.zeros(b, dtype=dtype, device=self.device)
        self._ep_length = torch.zeros(b, dtype=torch.int64, device=self.device)

    # -- family specific -------------------------------------------------------------------------------
    @abstractmethod
    def _setup(self) -> None:
        """Precompute per-copy constants from ``self.params``."""

    @abstractmethod
    def _reset_state(self, noise: Tensor) -> Tensor:
        """Initial state ``[B, obs_dim]`` from noise ``[B, noise_dim]`` in [0, 1)."""

    @abstractmethod
    def _transition(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(next_state, reward, terminated)`` for one step of every copy."""

    # -- public API ------------------------------------------------------------------------------------
    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def state(self) -> Tensor:
        """Current state (= observation), ``[B, obs_dim]``; a copy."""
        return self._state.clone()

    @property
    def final_obs(self) -> Tensor:
        """Observation reached by the last :meth:`step` *before* auto-reset, ``[B, obs_dim]``."""
        return self._final_obs

    def set_state(self, state: Tensor) -> Tensor:
        """Put every copy in ``state`` ``[B, obs_dim]`` and start a new episode there (counters zeroed)."""
        state = torch.as_tensor(state, dtype=self.dtype, device=self.device)
        if tuple(state.shape) != (self._num_envs, self.obs_dim):
            expected = (self._num_envs, self.obs_dim)
            raise ValueError(f"state must have shape {expected}, got {tuple(state.shape)}")
        self._state = state.clone()
        self._final_obs = self._state
        self._ep_return = torch.zeros_like(self._ep_return)
        self._ep_length = torch.zeros_like(self._ep_length)
        return self._state

    def reset(self, noise: Tensor) -> Tensor:
        """Reset ALL copies from ``noise`` ``[B, noise_dim]`` (uniform in [0, 1)); returns obs."""
        self._check_noise(noise)
        return self.set_state(self._reset_state(noise.to(self.dtype)))

    def step(self, actions: Tensor, reset_noise: Tensor) -> StepResult:
        """Step every copy once; copies whose episode ends are reset from their row of ``reset_noise``."""
        self._check_noise(reset_noise)
        next_state, reward, terminated = self._transition(self._state, actions)
        ep_return = self._ep_return + reward
        ep_length = self._ep_length + 1
        # Same semantics as gymnasium's TimeLimit: truncated may be True together with terminated.
        truncated = ep_length >= self.max_episode_steps
        done = terminated | truncated
        fresh = self._reset_state(reset_noise.to(self.dtype))
        self._final_obs = next_state
        self._state = torch.where(done.unsqueeze(1), fresh, next_state)
        self._ep_return = ep_return.masked_fill(done, 0.0)
        self._ep_length = ep_length.masked_fill(done, 0)
        return StepResult(
            self._state,
            reward,
            terminated,
            truncated,
            ep_return - self._ep_return,  # exact: x - x == 0 and x - 0 == x
            ep_length - self._ep_length,
        )

    def _check_noise(self, noise: Tensor) -> None:
        if tuple(noise.shape) != (self._num_envs, self.noise_dim):
            raise ValueError(
                f"{self.family}: noise must have shape {(self._num_envs, self.noise_dim)}, "
                f"got {tuple(noise.shape)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, num_envs={self._num_envs}, dtype={self.dtype})"


class PointGoalEnv(BatchedTaskEnv):
    """2-D point mass; the goal ``g = r (cos θ, sin θ)`` is not observed and must be inferred from reward.

    ``obs = [p, v]``; ``v' = 0.9 v + 0.1 a``, ``p' = p + 0.1 v'`` (dt = 0.1), reward
    ``-||p' - g|| - 0.01 ||a||^2``.  The action is clipped to ``[-1, 1]^2`` and then scaled into the unit
    disk, so full throttle gives a top speed of exactly 1.0 unit/s in every direction (0.1 per step).
    """

    family = "point_goal"
    obs_dim = 4
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
    discrete = True
    action_dim = 2
    noise_dim = 4
    max_episode_steps = 500
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


FAMILIES: dict[str, type[BatchedTaskEnv]] = {cls.family: cls for cls in (PointGoalEnv, RandomCartPoleEnv)}


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

    "train" and "test" share one distribution but use different seed streams; "ood" uses the
    out-of-distribution ranges.  Each task: ``{"task_id", "seed", "params": {name: float}}``.
    """
    cls = _family(family)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    family_key = sorted(FAMILIES).index(family)
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(family_key, SPLITS.index(split)))
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
