"""RandomHopper: gymnasium's ``Hopper-v5`` in MuJoCo with per-copy physics (Houthooft et al. 2018).

Each copy has its own compiled MuJoCo model, with every body's mass and inertia scaled by
``mass_scale``, every geom's sliding friction scaled by ``friction_scale`` and gravity set to
``gravity`` (m/s^2, pointing down). The paper's RandomHopper also randomises limb sizes; that needs a
recompiled model per task and is left out here.

All copies step in one call of MuJoCo's multi-threaded ``rollout`` (C++, no Python loop over copies):
``frame_skip`` = 4 physics steps of 2 ms per env step, the same as ``Hopper-v5``. Observation, reward,
health check and reset noise follow ``Hopper-v5`` exactly: obs = [qpos[1:], clip(qvel, -10, 10)],
reward = forward velocity + 1 (while healthy) - 1e-3 ||a||^2, terminated when unhealthy, 1 000-step
time limit, reset to the initial pose plus U(-5e-3, 5e-3) noise on every qpos and qvel.

The physical state is ``[qpos (6), qvel (6)]`` in float64 (MuJoCo computes in double precision); the
observation is in the env's dtype. MuJoCo runs on the CPU: on another device the states are copied
there and back every step.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import gymnasium
import numpy as np
import torch
from torch import Tensor

from .batched import BatchedTaskEnv

try:  # MuJoCo is a regular dependency, but keep the other families importable without it
    import mujoco
    from mujoco import rollout as mujoco_rollout
except ImportError:  # pragma: no cover - exercised only on installs without mujoco
    mujoco = None

NQ, NV = 6, 6  # Hopper: rootx, rootz, rooty, thigh, leg, foot
FRAME_SKIP = 4


@functools.cache
def _template_model():
    if mujoco is None:
        raise RuntimeError("task family 'random_hopper' needs the 'mujoco' package: pip install mujoco")
    path = Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets" / "hopper.xml"
    return mujoco.MjModel.from_xml_path(str(path))


class RandomHopperEnv(BatchedTaskEnv):
    family = "random_hopper"
    obs_dim = NQ - 1 + NV
    state_dim = NQ + NV
    state_dtype = torch.float64
    discrete = False
    action_dim = 3
    noise_dim = NQ + NV
    max_episode_steps = 1000
    param_names = ("gravity", "mass_scale", "friction_scale")
    nominal_params = {"gravity": 9.81, "mass_scale": 1.0, "friction_scale": 1.0}
    train_ranges = {"gravity": (8.0, 11.5), "mass_scale": (0.5, 1.5), "friction_scale": (0.5, 1.5)}
    ood_ranges = {"gravity": (11.5, 14.0), "mass_scale": (1.5, 2.5), "friction_scale": (0.2, 0.5)}
    single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(NQ - 1 + NV,), dtype=np.float32)
    single_action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)

    forward_reward_weight = 1.0
    ctrl_cost_weight = 1e-3
    healthy_reward = 1.0
    healthy_z_min = 0.7
    healthy_angle = 0.2
    healthy_state_bound = 100.0
    reset_noise_scale = 5e-3

    def _setup(self) -> None:
        template = _template_model()
        self.dt = template.opt.timestep * FRAME_SKIP
        self.models = []
        params = {k: v.double().cpu().numpy() for k, v in self.params.items()}
        for gravity, mass, friction in zip(
            params["gravity"], params["mass_scale"], params["friction_scale"], strict=True
        ):
            model = copy.copy(template)
            model.body_mass[:] = template.body_mass * mass
            model.body_inertia[:] = template.body_inertia * mass  # same shapes, denser material
            model.geom_friction[:, 0] = template.geom_friction[:, 0] * friction
            model.opt.gravity[:] = (0.0, 0.0, -gravity)
            self.models.append(model)
        threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, self._num_envs))
        self.datas = [mujoco.MjData(template) for _ in range(threads)]
        # Hopper-v5's initial pose (qpos0) at rest; every reset adds noise to it.
        self.initial_state = torch.cat(
            [torch.as_tensor(template.qpos0), torch.zeros(NV, dtype=torch.float64)]
        ).to(self.device)
        self.state_size = mujoco.mj_stateSize(template, mujoco.mjtState.mjSTATE_FULLPHYSICS)

    def _reset_state(self, noise: Tensor) -> Tensor:
        scale = self.reset_noise_scale
        return self.initial_state + noise.to(torch.float64) * (2.0 * scale) - scale

    def _observe(self, state: Tensor) -> Tensor:
        return torch.cat([state[:, 1:NQ], state[:, NQ:].clamp(-10.0, 10.0)], dim=1).to(self.dtype)

    def _transition(self, state: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch = self._num_envs
        physics = np.zeros((batch, self.state_size))  # [time, qpos, qvel]; hopper has no act state
        physics[:, 1 : 1 + NQ + NV] = state.detach().cpu().numpy()
        actions = actions.detach().to(torch.float64)
        control = actions.cpu().numpy()
        # MuJoCo clamps ctrl to the actuators' range [-1, 1]; the control cost uses the raw action.
        trajectory, _ = mujoco_rollout.rollout(
            self.models, self.datas, physics, control.reshape(batch, 1, -1), nstep=FRAME_SKIP
        )
        next_state = torch.as_tensor(trajectory[:, -1, 1 : 1 + NQ + NV], device=self.device)
        x_velocity = (next_state[:, 0] - state[:, 0]) / self.dt
        healthy = self._healthy(next_state)
        reward = (
            self.forward_reward_weight * x_velocity
            + self.healthy_reward * healthy.to(torch.float64)
            - self.ctrl_cost_weight * actions.square().sum(1)
        )
        return next_state, reward.to(self.dtype), ~healthy

    def _healthy(self, state: Tensor) -> Tensor:
        """Hopper-v5's ``is_healthy``: torso high and upright, every other coordinate bounded."""
        z, angle, rest = state[:, 1], state[:, 2], state[:, 2:]
        bound = self.healthy_state_bound
        return (
            ((rest > -bound) & (rest < bound)).all(1)
            & (z > self.healthy_z_min)
            & (angle > -self.healthy_angle)
            & (angle < self.healthy_angle)
        )
