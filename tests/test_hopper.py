"""RandomHopper (pipeline.envs.hopper) against gymnasium's Hopper-v5 with the same physics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")
gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("imageio")  # gymnasium's MuJoCo envs import it for rendering

from pipeline.envs.hopper import RandomHopperEnv  # noqa: E402
from pipeline.envs.tasks import make_env, sample_tasks  # noqa: E402

F64 = torch.float64


def _gym_hopper(params: dict[str, float]):
    """Hopper-v5 whose model is changed the way RandomHopper documents it."""
    env = gymnasium.make("Hopper-v5").unwrapped
    env.reset(seed=0)
    model = env.model
    model.body_mass[:] *= params["mass_scale"]
    model.body_inertia[:] *= params["mass_scale"]
    model.geom_friction[:, 0] *= params["friction_scale"]
    model.opt.gravity[:] = (0.0, 0.0, -params["gravity"])
    return env


@pytest.mark.parametrize("split", ["train", "ood"])
def test_hopper_matches_gymnasium_step_for_step(split):
    """Several copies with their own physics, random (also out-of-range) actions, through terminations:
    obs, reward, termination and the final observation equal Hopper-v5's to float64 round-off."""
    tasks = sample_tasks("random_hopper", split, 3, seed=4)
    env = make_env("random_hopper", tasks, dtype=F64)
    gyms = [_gym_hopper(t["params"]) for t in tasks]
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(1)
    starts = []
    for g in gyms:
        qpos = g.init_qpos + rng.uniform(-5e-3, 5e-3, 6)
        qvel = g.init_qvel + rng.uniform(-5e-3, 5e-3, 6)
        g.set_state(qpos, qvel)
        starts.append(np.concatenate([qpos, qvel]))
    obs = env.set_state(torch.tensor(np.stack(starts)))
    for i, g in enumerate(gyms):
        np.testing.assert_allclose(obs[i].numpy(), g._get_obs(), rtol=0, atol=1e-12)
    episodes_ended = 0
    for _ in range(150):
        actions = rng.uniform(-1.3, 1.3, (len(gyms), 3))
        res = env.step(torch.tensor(actions), torch.rand(len(gyms), env.noise_dim, generator=gen))
        for i, g in enumerate(gyms):
            gym_obs, gym_reward, terminated, _, _ = g.step(actions[i])
            assert res.reward[i].item() == pytest.approx(gym_reward, abs=1e-9)
            assert bool(res.terminated[i]) == terminated
            np.testing.assert_allclose(env.final_obs[i].numpy(), gym_obs, rtol=0, atol=1e-9)
            if terminated:  # continue the comparison from the auto-reset state
                episodes_ended += 1
                g.set_state(env.state[i, :6].numpy(), env.state[i, 6:].numpy())
                np.testing.assert_allclose(res.obs[i].numpy(), g._get_obs(), rtol=0, atol=1e-12)
            else:
                np.testing.assert_allclose(res.obs[i].numpy(), gym_obs, rtol=0, atol=1e-9)
    assert episodes_ended >= 3


def test_task_parameters_change_the_dynamics():
    nominal = dict(RandomHopperEnv.nominal_params)
    variants = [nominal, {**nominal, "mass_scale": 2.0}, {**nominal, "friction_scale": 0.3}]
    variants.append({**nominal, "gravity": 13.0})
    env = make_env("random_hopper", [{"params": p} for p in variants], dtype=F64)
    env.set_state(torch.tensor([0.0, 1.25] + [0.0] * 10, dtype=F64).repeat(4, 1))
    for _ in range(10):
        env.step(torch.full((4, 3), 0.8, dtype=F64), torch.zeros(4, env.noise_dim))
    states = env.state
    for i in range(1, 4):
        assert not torch.allclose(states[0], states[i]), variants[i]


def test_reset_noise_and_observation_layout():
    env = make_env("random_hopper", sample_tasks("random_hopper", "train", 5, seed=0))
    noise = torch.rand(5, env.noise_dim, generator=torch.Generator().manual_seed(0))
    obs = env.reset(noise)
    state = env.state
    assert state.dtype == F64 and state.shape == (5, 12)
    assert obs.dtype == torch.float32 and obs.shape == (5, RandomHopperEnv.obs_dim)
    initial = torch.tensor([0.0, 1.25, 0, 0, 0, 0] + [0.0] * 6, dtype=F64)
    assert ((state - initial).abs() <= 5e-3).all()
    torch.testing.assert_close(state, initial + noise.double() * 1e-2 - 5e-3)
    torch.testing.assert_close(obs, state[:, 1:].float())
    with pytest.raises(ValueError, match=r"state must have shape \(5, 12\)"):
        env.set_state(torch.zeros(5, 11))
