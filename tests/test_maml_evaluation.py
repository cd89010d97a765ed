"""MAML's adaptation curves (pipeline.maml.evaluation): shapes and env-step accounting, the first point
and first step against MAML's own sampling and inner step, determinism, learning over the PG steps."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import MamlConfig
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.evaluation.epg_eval import evaluation_lifetimes
from pipeline.maml import meta
from pipeline.maml.evaluation import AdaptationCurves, adaptation_curves
from pipeline.maml.learner import init_theta, policy_spec
from pipeline.maml.sampling import sample_episodes
from pipeline.seeding import derived_seed

FAMILY = "random_cartpole"
CONFIG = MamlConfig(
    family=FAMILY, rollouts_per_task=3, horizon=60, inner_steps=2, inner_lr=0.5, policy_hidden=[8]
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def policy_file(config: MamlConfig = CONFIG, seed: int = 0) -> dict:
    """What models/maml/policy.pt holds, for an untrained theta0."""
    spec = policy_spec(config.family, config)
    return {
        "theta": init_theta(spec, seed),
        "family": config.family,
        "obs_dim": spec.obs_dim,
        "action_dim": spec.action_dim,
        "discrete": spec.discrete,
        "maml": config.model_dump(mode="json"),
    }


def test_curves_have_one_row_per_lifetime_and_count_env_steps_within_the_budget():
    tasks = sample_tasks(FAMILY, "test", 3, 0)
    curves = adaptation_curves(policy_file(), tasks, seeds=2, env_step_budget=400, seed=0)
    assert isinstance(curves, AdaptationCurves) and curves.inner_steps == CONFIG.inner_steps
    points = len(curves.env_steps)
    assert curves.returns.shape == (6, points) and curves.returns.dtype == torch.float32
    assert points > CONFIG.inner_steps + 1
    assert curves.env_steps[0] == 0
    # every episode takes at least one step: the count strictly grows, and stays within the budget
    assert all(b > a for a, b in zip(curves.env_steps, curves.env_steps[1:], strict=False))
    assert curves.env_steps[-1] <= 400
    # a cart-pole episode returns 1 per step: a point's return times N is its episodes' total length;
    # the count is the largest over lifetimes of the steps before the point, and the curves stop at the
    # first point whose episodes would take a lifetime past the budget
    lengths = curves.returns * CONFIG.rollouts_per_task
    before = torch.cat([torch.zeros(6, 1), lengths.cumsum(1)], 1).max(0).values
    assert curves.env_steps == pytest.approx(before[:-1].tolist())
    assert float(before[-1]) > 400


def test_first_points_are_maml_sampling_and_its_inner_step_on_the_same_episodes():
    """Points 0 and 1 re-derived with MAML's own pieces: the episodes of theta0 sampled as meta-training
    samples them, adapted with meta.adapt (the inner step of the meta-objective), sampled again."""
    tasks = sample_tasks(FAMILY, "test", 2, 1)
    policy = policy_file()
    curves = adaptation_curves(policy, tasks, seeds=2, env_step_budget=10_000, seed=3)
    spec = policy_spec(FAMILY, CONFIG)
    lifetimes = evaluation_lifetimes(tasks, 2)
    env = make_env(FAMILY, [t for t in lifetimes for _ in range(CONFIG.rollouts_per_task)])
    generator = torch.Generator().manual_seed(derived_seed(3, "maml", "adaptation"))

    def sample(params):
        return sample_episodes(
            spec, env, params, CONFIG.rollouts_per_task, CONFIG.horizon, generator, CONFIG.gamma, True
        )

    first = sample(meta.expand_tasks(policy["theta"], len(lifetimes)))
    adapted = meta.adapt(spec, policy["theta"], [first], CONFIG.inner_lr, first_order=False)
    second = sample({k: v.detach() for k, v in adapted.items()})
    torch.testing.assert_close(curves.returns[:, 0], first.task_returns())
    torch.testing.assert_close(curves.returns[:, 1], second.task_returns())
    assert curves.env_steps[1] == int(first.mask.sum((0, 2)).max())


def test_curves_are_deterministic_for_a_seed_and_differ_across_seeds():
    tasks = sample_tasks(FAMILY, "test", 2, 0)
    a, b, c = (adaptation_curves(policy_file(), tasks, 1, 300, seed) for seed in (5, 5, 6))
    assert a.env_steps == b.env_steps and torch.equal(a.returns, b.returns)
    assert a.env_steps != c.env_steps or not torch.equal(a.returns, c.returns)


def test_a_budget_below_the_first_episodes_gives_theta0_alone():
    tasks = sample_tasks(FAMILY, "test", 2, 0)
    alone = adaptation_curves(policy_file(), tasks, 1, 5, 0)
    longer = adaptation_curves(policy_file(), tasks, 1, 300, 0)
    assert alone.env_steps == [0] and alone.returns.shape == (2, 1)
    torch.testing.assert_close(alone.returns[:, 0], longer.returns[:, 0])


def test_the_pg_steps_raise_the_return():
    config = CONFIG.model_copy(update={"rollouts_per_task": 5, "horizon": 200, "inner_lr": 1.0})
    tasks = sample_tasks(FAMILY, "test", 4, 0)
    curves = adaptation_curves(policy_file(config), tasks, seeds=2, env_step_budget=2500, seed=0)
    mean = curves.returns.mean(0)
    assert float(mean[-3:].mean()) > float(mean[:3].mean()) + 10, mean
