"""The batched environment base that every EPG task family implements.

``B`` copies step together; each copy has its own task parameters (a ``[B]`` tensor per parameter). The
environments own no RNG: the caller passes ``U(0, 1)`` noise for resets, which is how common random
numbers across ES population members are realised. Episodes auto-reset inside :meth:`BatchedTaskEnv.step`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import gymnasium
import torch
from torch import Tensor


class StepResult(NamedTuple):
    obs: Tensor  # [B, obs_dim]; first obs of the new episode where an episode ended this step
    reward: Tensor  # [B]
    terminated: Tensor  # [B] bool
    truncated: Tensor  # [B] bool (time limit)
    episode_return: Tensor  # [B] undiscounted return of the episode that ended this step, else 0
    episode_length: Tensor  # [B] int64 length of the episode that ended this step, else 0


class BatchedTaskEnv(ABC):
    """``B`` copies of one task family, each with its own task parameters.

    A family keeps a physical *state* ``[B, state_dim]`` (dtype :attr:`state_dtype`, the env's dtype
    where None) and shows the agent an *observation* ``[B, obs_dim]`` made from it by :meth:`_observe`;
    for point-goal and cart-pole the two are the same, so :meth:`set_state` takes an observation there.
    """

    family: ClassVar[str]
    obs_dim: ClassVar[int]
    state_dim: ClassVar[int]
    state_dtype: ClassVar[torch.dtype | None] = None  # None: the env's dtype
    discrete: ClassVar[bool]
    action_dim: ClassVar[int]  # number of actions if discrete, else the action vector size
    noise_dim: ClassVar[int]  # U(0,1) numbers one copy needs to reset
    max_episode_steps: ClassVar[int]
    max_step_reward: ClassVar[float | None] = None  # a bound on one step's reward, where there is one
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
        self._state = torch.zeros(b, self.state_dim, dtype=self._state_dtype, device=self.device)
        self._final_obs = self._observe(self._state)
        self._ep_return = torch.zeros(b, dtype=dtype, device=self.device)
        self._ep_length = torch.zeros(b, dtype=torch.int64, device=self.device)

    # -- family specific -------------------------------------------------------------------------------
    @abstractmethod
    def _setup(self) -> None:
        """Precompute per-copy constants from ``self.params``."""

    @abstractmethod
    def _reset_state(self, noise: Tensor) -> Tensor:
        """Initial state ``[B, state_dim]`` from noise ``[B, noise_dim]`` in [0, 1)."""

    @abstractmethod
    def _transition(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(next_state, reward, terminated)`` for one step of every copy."""

    def _observe(self, state: Tensor) -> Tensor:
        """Observation ``[B, obs_dim]`` of a state; the state itself unless a family says otherwise."""
        return state

    @property
    def _state_dtype(self) -> torch.dtype:
        return self.state_dtype or self.dtype

    # -- public API ------------------------------------------------------------------------------------
    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def state(self) -> Tensor:
        """Current physical state, ``[B, state_dim]``; a copy."""
        return self._state.clone()

    @property
    def final_obs(self) -> Tensor:
        """Observation reached by the last :meth:`step` *before* auto-reset, ``[B, obs_dim]``."""
        return self._final_obs

    def set_state(self, state: Tensor) -> Tensor:
        """Put every copy in ``state`` ``[B, state_dim]`` and start a new episode there (counters zeroed);
        returns the observation."""
        state = torch.as_tensor(state, dtype=self._state_dtype, device=self.device)
        if tuple(state.shape) != (self._num_envs, self.state_dim):
            expected = (self._num_envs, self.state_dim)
            raise ValueError(f"state must have shape {expected}, got {tuple(state.shape)}")
        self._state = state.clone()
        self._final_obs = self._observe(self._state)
        self._ep_return = torch.zeros_like(self._ep_return)
        self._ep_length = torch.zeros_like(self._ep_length)
        return self._observe(self._state)

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
        self._final_obs = self._observe(next_state)
        self._state = torch.where(done.unsqueeze(1), fresh, next_state)
        self._ep_return = ep_return.masked_fill(done, 0.0)
        self._ep_length = ep_length.masked_fill(done, 0)
        return StepResult(
            self._observe(self._state),
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
