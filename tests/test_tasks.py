"""Tests for pipeline.envs.tasks: batched meta-RL task families."""

from __future__ import annotations

import json
import math

import gymnasium
import numpy as np
import pytest
import torch

from pipeline import seeding
from pipeline.envs.tasks import (
    FAMILIES,
    BatchedTaskEnv,
    PointGoalEnv,
    RandomCartPoleEnv,
    StepResult,
    load_tasks,
    make_env,
    sample_tasks,
    task_param_ranges,
)

F64 = torch.float64


def _tasks(family: str, n: int, **params: float) -> list[dict]:
    base = dict(FAMILIES[family].nominal_params, **params)
    return [{"task_id": f"{family}/x/{i}", "seed": i, "params": dict(base)} for i in range(n)]


def _gym_cartpole(params: dict[str, float] | None = None):
    env = gymnasium.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    if params:
        for k, v in params.items():
            setattr(env, k, v)
        env.total_mass = env.masspole + env.masscart
        env.polemass_length = env.masspole * env.length
    return env


def _controller(s: np.ndarray) -> int:
    return int(s[2] + 0.3 * s[3] + 0.02 * s[0] + 0.05 * s[1] > 0)


def _run_against_gymnasium(params: dict[str, float], steps: int = 300) -> None:
    b = 8
    env = make_env("random_cartpole", _tasks("random_cartpole", b, **params), dtype=F64)
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(2)
    starts = rng.uniform(-0.05, 0.05, (b, 4))
    starts[0] = [2.3, 1.0, 0.0, 0.0]  # leaves through x > 2.4
    starts[1] = [-2.3, -1.0, 0.01, 0.0]  # leaves through x < -2.4
    starts[2] = [0.0, 0.0, 0.19, 1.0]  # pole falls right
    starts[3] = [0.0, 0.0, -0.19, -1.0]  # pole falls left
    obs = env.set_state(torch.tensor(starts, dtype=F64))
    gyms = [_gym_cartpole(params) for _ in range(b)]
    for g, s in zip(gyms, starts, strict=True):
        g.state = s.copy()
    length = np.zeros(b, dtype=np.int64)
    episodes = 0
    for t in range(steps):
        # even copies act at random, odd copies balance (long episodes)
        acts = [_controller(g.state) if i % 2 else int(rng.integers(2)) for i, g in enumerate(gyms)]
        noise = torch.rand(b, 4, generator=gen, dtype=F64)
        res = env.step(torch.tensor(acts), noise)
        length += 1
        for i, g in enumerate(gyms):
            gobs, grew, gterm, _, _ = g.step(acts[i])
            assert grew == 1.0 and res.reward[i].item() == 1.0
            assert bool(res.terminated[i]) == gterm, (t, i)
            assert not bool(res.truncated[i])
            np.testing.assert_allclose(env.final_obs[i].numpy(), g.state, rtol=0, atol=1e-9)
            if gterm:
                episodes += 1
                assert res.episode_length[i].item() == length[i]
                assert res.episode_return[i].item() == float(length[i])
                fresh = noise[i] * 0.1 - 0.05
                torch.testing.assert_close(res.obs[i], fresh, rtol=0, atol=1e-12)
                assert res.obs[i].abs().max().item() <= 0.05
                length[i] = 0
                g.state = res.obs[i].numpy().copy()  # continue the comparison in the new episode
                g.steps_beyond_terminated = None
            else:
                assert res.episode_length[i].item() == 0 and res.episode_return[i].item() == 0.0
                np.testing.assert_allclose(res.obs[i].numpy(), g.state, rtol=0, atol=1e-9)
        obs = res.obs
    assert episodes >= 10
    assert obs.dtype == F64


def test_cartpole_matches_gymnasium_nominal():
    _run_against_gymnasium({})


def test_cartpole_matches_gymnasium_random_params():
    _run_against_gymnasium({"gravity": 12.7, "masscart": 0.6, "masspole": 0.33, "length": 0.9}, steps=150)


def test_cartpole_truncates_at_500():
    b = 16
    env = make_env("random_cartpole", _tasks("random_cartpole", b), dtype=F64)
    gen = torch.Generator().manual_seed(0)
    obs = env.reset(torch.rand(b, 4, generator=gen, dtype=F64))
    ever_terminated = torch.zeros(b, dtype=torch.bool)
    for t in range(1, 501):
        acts = ((obs[:, 2] + 0.3 * obs[:, 3] + 0.02 * obs[:, 0] + 0.05 * obs[:, 1]) > 0).long()
        noise = torch.rand(b, 4, generator=gen, dtype=F64)
        res = env.step(acts, noise)
        ever_terminated |= res.terminated
        if t < 500:
            assert not res.truncated.any()
        obs = res.obs
    survivors = ~ever_terminated
    assert survivors.sum() >= 4
    assert res.truncated[survivors].all()
    assert (res.episode_length[survivors] == 500).all()
    assert (res.episode_return[survivors] == 500.0).all()
    torch.testing.assert_close(res.obs[survivors], (noise * 0.1 - 0.05)[survivors])
    # the next episode starts counting from zero again
    res = env.step(torch.zeros(b, dtype=torch.long), noise)
    assert not res.truncated[survivors].any()


def test_point_goal_truncation_and_auto_reset():
    b = 5
    env = make_env("point_goal", sample_tasks("point_goal", "train", b, seed=3), dtype=F64)
    gen = torch.Generator().manual_seed(0)
    env.reset(torch.rand(b, 2, generator=gen, dtype=F64))
    total = torch.zeros(b, dtype=F64)
    for t in range(1, 51):
        noise = torch.rand(b, 2, generator=gen, dtype=F64)
        res = env.step(torch.rand(b, 2, generator=gen, dtype=F64) * 2 - 1, noise)
        total += res.reward
        assert not res.terminated.any()
        assert bool(res.truncated.all()) == (t == 50)
        if t < 50:
            assert (res.episode_length == 0).all() and (res.episode_return == 0).all()
    assert (res.episode_length == 50).all()
    torch.testing.assert_close(res.episode_return, total)
    torch.testing.assert_close(res.obs[:, :2], noise * 0.1 - 0.05)
    assert (res.obs[:, 2:] == 0).all() and res.obs.abs().max() <= 0.05


def _point_goal_rewards(angle: float, policy, steps: int = 50) -> torch.Tensor:
    env = make_env("point_goal", _tasks("point_goal", 1, goal_angle=angle), dtype=F64)
    obs = env.reset(torch.full((1, 2), 0.5, dtype=F64))  # start exactly at the origin
    rewards = []
    for _ in range(steps):
        res = env.step(policy(obs), torch.full((1, 2), 0.5, dtype=F64))
        rewards.append(res.reward)
        obs = res.obs
    if steps == 50:
        assert res.truncated.item()
        torch.testing.assert_close(res.episode_return, torch.stack(rewards).sum(0))
    return torch.stack(rewards).sum()


def test_point_goal_reward_prefers_moving_to_goal():
    angle = 0.7
    goal = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=F64)
    # constant full throttle: compare before it reaches (and overshoots) the goal, ~17 steps away
    toward = _point_goal_rewards(angle, lambda obs: goal, steps=15)
    still = _point_goal_rewards(angle, lambda obs: 0 * goal, steps=15)
    away = _point_goal_rewards(angle, lambda obs: -goal, steps=15)
    assert toward > still > away
    assert still == pytest.approx(-15.0)  # distance 1 every step, no control cost

    # whole episode: a PD controller that homes in on the goal beats standing still and fleeing
    def homing(obs):
        return 2.0 * (goal - obs[:, :2]) - 1.5 * obs[:, 2:]

    assert _point_goal_rewards(angle, homing) > _point_goal_rewards(angle, lambda obs: 0 * goal)
    assert _point_goal_rewards(angle, lambda obs: 0 * goal) > _point_goal_rewards(angle, lambda obs: -goal)


def test_point_goal_dynamics_and_reward_formula():
    env = make_env("point_goal", _tasks("point_goal", 1, goal_angle=math.pi / 3, goal_radius=1.0), dtype=F64)
    env.set_state(torch.tensor([[0.1, -0.2, 0.5, 0.3]], dtype=F64))
    a = torch.tensor([[0.4, -0.6]], dtype=F64)
    res = env.step(a, torch.zeros(1, 2, dtype=F64))
    v = 0.9 * torch.tensor([0.5, 0.3], dtype=F64) + 0.1 * a[0]
    p = torch.tensor([0.1, -0.2], dtype=F64) + 0.1 * v
    g = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)], dtype=F64)
    torch.testing.assert_close(res.obs[0], torch.cat([p, v]))
    torch.testing.assert_close(res.reward[0], -(p - g).norm() - 0.01 * (a * a).sum())


def test_point_goal_clips_actions_and_speed_is_bounded():
    env1 = make_env("point_goal", _tasks("point_goal", 2), dtype=F64)
    env2 = make_env("point_goal", _tasks("point_goal", 2), dtype=F64)
    zero = torch.zeros(2, 2, dtype=F64)
    env1.reset(zero + 0.5)
    env2.reset(zero + 0.5)
    r1 = env1.step(torch.tensor([[5.0, 0.0], [0.0, -30.0]], dtype=F64), zero)
    r2 = env2.step(torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64), zero)
    torch.testing.assert_close(r1.obs, r2.obs)
    torch.testing.assert_close(r1.reward, r2.reward)

    b = 256
    env = make_env("point_goal", sample_tasks("point_goal", "train", b, seed=0), dtype=F64)
    gen = torch.Generator().manual_seed(0)
    obs = env.reset(torch.rand(b, 2, generator=gen, dtype=F64))
    for _ in range(200):
        prev = obs
        acts = (torch.rand(b, 2, generator=gen, dtype=F64) * 2 - 1) * 4  # mostly saturating, any direction
        res = env.step(acts, torch.rand(b, 2, generator=gen, dtype=F64))
        final = env.final_obs
        assert final[:, 2:].norm(dim=1).max() <= 1.0 + 1e-12  # unit/s
        assert (final[:, :2] - prev[:, :2]).norm(dim=1).max() <= 0.1 + 1e-12  # per step of dt = 0.1
        obs = res.obs
    # full throttle (diagonal included) approaches, but never exceeds, top speed 1.0
    env = make_env("point_goal", _tasks("point_goal", 2), dtype=F64)
    env.reset(zero + 0.5)
    for _ in range(49):
        res = env.step(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64), zero)
    speed = res.obs[:, 2:].norm(dim=1)
    assert (speed > 0.99).all() and (speed <= 1.0).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sample_tasks_determinism_and_ranges(family):
    ranges = task_param_ranges(family)
    assert set(ranges) == {"train", "test", "ood"}
    assert ranges["train"] == ranges["test"]
    draws = {}
    for split in ("train", "test", "ood"):
        a = sample_tasks(family, split, 64, seed=11)
        assert a == sample_tasks(family, split, 64, seed=11)
        assert a != sample_tasks(family, split, 64, seed=12)
        assert [t["task_id"] for t in a] == [f"{family}/{split}/{i}" for i in range(64)]
        assert all(isinstance(t["seed"], int) for t in a)
        assert len({t["seed"] for t in a}) == 64
        for t in a:
            assert set(t["params"]) == set(FAMILIES[family].param_names)
            for name, value in t["params"].items():
                lo, hi = ranges[split][name]
                assert isinstance(value, float)
                assert lo <= value <= hi if lo == hi else lo <= value < hi
        draws[split] = a
    assert [t["params"] for t in draws["train"]] != [t["params"] for t in draws["test"]]
    assert {t["seed"] for t in draws["train"]}.isdisjoint({t["seed"] for t in draws["test"]})
    for name, (lo, hi) in ranges["ood"].items():
        tlo, thi = ranges["train"][name]
        if lo != hi or tlo != thi:  # every varying parameter: OOD range disjoint from train
            assert thi <= lo or hi <= tlo
    assert sample_tasks(family, "train", 0, seed=1) == []


def test_point_goal_draws_are_pinned():
    # Keyed by the family's name: these stay put whatever families are added (seed 0).
    train, ood = sample_tasks("point_goal", "train", 3, 0), sample_tasks("point_goal", "ood", 2, 0)
    assert [t["params"]["goal_angle"] for t in train] == pytest.approx(
        [2.6459816884771357, 2.489664497768703, 2.4696516471699663], abs=1e-15
    )
    assert [t["seed"] for t in train] == [799046048, 588593710, 1036533149]
    assert [t["params"]["goal_angle"] for t in ood] == pytest.approx(
        [3.270291436409888, 6.087949426748863], abs=1e-15
    )


def test_a_new_family_sorting_first_leaves_other_draws_unchanged(monkeypatch):
    before = {family: sample_tasks(family, "test", 4, 3) for family in FAMILIES}
    monkeypatch.setitem(FAMILIES, "aaa_point_goal", PointGoalEnv)
    for family, tasks in before.items():
        assert sample_tasks(family, "test", 4, 3) == tasks


def test_point_goal_ood_is_lower_half():
    for t in sample_tasks("point_goal", "ood", 200, seed=5):
        assert math.sin(t["params"]["goal_angle"]) <= 0.0
    for t in sample_tasks("point_goal", "train", 200, seed=5):
        assert math.sin(t["params"]["goal_angle"]) >= 0.0


def test_load_tasks_reads_one_family_of_the_prepare_output(tmp_path):
    tasks = {"train": sample_tasks("point_goal", "train", 2, 0), "test": [], "ood": []}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"format_version": 1, "families": {"point_goal": tasks}}))
    assert load_tasks(path, "point_goal") == tasks
    with pytest.raises(ValueError, match=r"no tasks for family 'random_cartpole'; it has: point_goal"):
        load_tasks(path, "random_cartpole")


def test_derived_seeds_are_pinned():
    # Values of the functions before they moved to pipeline/seeding.py: the move changed no seed.
    assert seeding.derived_seed(0, "crn", 3) == 1983632032
    assert seeding.derived_seed(5, "evaluate", "ood") == 1945032611
    assert seeding.variant_seed(0, "pong") == 3177736
    assert seeding.variant_seed(1, "pong") == 4177739
    assert seeding.variant_seed(0, "breakout") == 45927153


def test_make_env_stacks_params():
    tasks = sample_tasks("random_cartpole", "ood", 7, seed=0)
    env = make_env("random_cartpole", tasks)
    assert isinstance(env, RandomCartPoleEnv) and isinstance(env, BatchedTaskEnv)
    assert env.num_envs == 7 and env.params["gravity"].dtype == torch.float32
    assert env.params["length"].tolist() == pytest.approx([t["params"]["length"] for t in tasks])


def test_spaces_and_class_attributes():
    pg, cp = FAMILIES["point_goal"], FAMILIES["random_cartpole"]
    assert pg is PointGoalEnv and cp is RandomCartPoleEnv
    assert isinstance(pg.single_observation_space, gymnasium.spaces.Box)
    assert pg.single_observation_space.shape == (4,) and pg.obs_dim == 4
    assert isinstance(pg.single_action_space, gymnasium.spaces.Box)
    assert pg.single_action_space.shape == (2,) and not pg.discrete and pg.action_dim == 2
    assert (pg.noise_dim, pg.max_episode_steps) == (2, 50)
    assert isinstance(cp.single_observation_space, gymnasium.spaces.Box)
    assert cp.single_observation_space.shape == (4,)
    assert isinstance(cp.single_action_space, gymnasium.spaces.Discrete) and cp.single_action_space.n == 2
    assert cp.discrete and cp.action_dim == 2 and (cp.noise_dim, cp.max_episode_steps) == (4, 500)
    gym_space = gymnasium.make("CartPole-v1").observation_space
    np.testing.assert_array_equal(cp.single_observation_space.high, gym_space.high)


def test_unknown_family_or_split_raises():
    for fn in (
        lambda: sample_tasks("ant", "train", 3, 0),
        lambda: task_param_ranges("ant"),
        lambda: make_env("ant", _tasks("point_goal", 1)),
    ):
        with pytest.raises(ValueError, match="point_goal.*random_cartpole"):
            fn()
    with pytest.raises(ValueError, match="train.*test.*ood"):
        sample_tasks("point_goal", "valid", 3, 0)
    env = make_env("point_goal", _tasks("point_goal", 3))
    with pytest.raises(ValueError, match="noise"):
        env.reset(torch.rand(3, 4))
    with pytest.raises(ValueError, match="keys"):
        PointGoalEnv({"goal_angle": torch.zeros(3)})


def test_step_outputs_are_not_overwritten_by_later_steps():
    env = make_env("random_cartpole", _tasks("random_cartpole", 4))
    env.reset(torch.rand(4, 4))
    res = env.step(torch.ones(4, dtype=torch.long), torch.rand(4, 4))
    snapshot = [x.clone() for x in res]
    env.step(torch.zeros(4, dtype=torch.long), torch.rand(4, 4))
    for a, b in zip(res, snapshot, strict=True):
        assert torch.equal(a, b)
    assert isinstance(res, StepResult) and res.episode_length.dtype == torch.int64


# MuJoCo's hopper steps ~20 k copies/s here, the torch families millions: a smaller batch for it.
LARGE_BATCH = {"random_hopper": (512, 300)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_large_batch_stays_finite(family):
    b, steps = LARGE_BATCH.get(family, (4096, 2000))
    env = make_env(family, sample_tasks(family, "ood", b, seed=0))
    gen = torch.Generator().manual_seed(0)
    obs = env.reset(torch.rand(b, env.noise_dim, generator=gen))
    assert obs.shape == (b, env.obs_dim) and obs.dtype == torch.float32
    finished = 0
    for _ in range(steps):
        if env.discrete:
            acts = torch.randint(0, env.action_dim, (b,), generator=gen)
        else:
            acts = torch.rand(b, env.action_dim, generator=gen) * 4 - 2
        res = env.step(acts, torch.rand(b, env.noise_dim, generator=gen))
        finished += int((res.episode_length > 0).sum())
    assert torch.isfinite(res.obs).all() and torch.isfinite(env.state).all()
    assert res.obs.shape == (b, env.obs_dim) and res.reward.shape == (b,)
    assert finished >= b  # every copy finished at least one episode on average
