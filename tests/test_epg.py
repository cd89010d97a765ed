"""Evolved Policy Gradients: loss network, vectorized inner loop, ES outer loop, checkpoint/resume."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from epg_helpers import TINY_INNER, TINY_NET, evolve_config, tiny_phi, with_tiny_evolve
from evotorch import Problem
from helpers import killed_at_call, stage_project
from torch.func import vmap

from pipeline.config import EvolveConfig, InnerLoopConfig, LossNetConfig
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.epg import inner as inner_module
from pipeline.epg.inner import LossSetting, run_lifetimes
from pipeline.epg.loss_net import LossNetwork, MemberLosses, ParamLayout, apply_loss_net
from pipeline.epg.problem import EPGProblem, OpenAIES, learning_rate, ppo_weight
from pipeline.rl.normalizer import MIN_STD, update_moments


# ----------------------------------------------------------------------------------------- loss network
def test_loss_network_shapes_and_flat_layout_round_trip():
    net = LossNetwork(input_dim=10, config=TINY_NET)
    layout = ParamLayout.of(net)
    assert layout.size == sum(p.numel() for p in net.parameters())
    phi = layout.flatten(net)
    buffer, steps = torch.randn(64, 10), torch.randn(7, 10)
    direct = net(steps, net(buffer))
    assert direct.shape == (7,)
    assert torch.allclose(apply_loss_net(net, layout, phi, buffer, steps), direct)


def test_vmapped_loss_over_members_equals_a_loop():
    net = LossNetwork(input_dim=10, config=TINY_NET)
    layout = ParamLayout.of(net)
    phis = layout.flatten(net) + 0.1 * torch.randn(3, layout.size)
    buffers, steps = torch.randn(3, 64, 10), torch.randn(3, 5, 10)
    batched = vmap(partial(apply_loss_net, net, layout))(phis, buffers, steps)
    looped = torch.stack([apply_loss_net(net, layout, phis[i], buffers[i], steps[i]) for i in range(3)])
    assert torch.allclose(batched, looped, atol=1e-6)


@pytest.mark.parametrize("memory_units", [5, 0])
@pytest.mark.parametrize("conv", [([16, 32], [6, 4], [5, 2]), ([8, 8, 4], [3, 3, 2], [2, 1, 1])])
def test_member_losses_equal_the_vmapped_loss_network_in_value_and_gradient(memory_units, conv):
    channels, kernels, strides = conv
    config = LossNetConfig(
        memory_units=memory_units, conv_channels=channels, conv_kernels=kernels, conv_strides=strides
    )
    data_dim, policy_dim, members, workers, steps = 8, 4, 3, 2, 64
    net = LossNetwork(data_dim + policy_dim + memory_units, config)
    layout = ParamLayout.of(net)
    phis = layout.flatten(net) + 0.1 * torch.randn(members, layout.size)
    data = torch.randn(members, workers, steps, data_dim)
    policy = torch.randn(members, workers, steps, policy_dim, requires_grad=True)
    memory = torch.randn(members, workers, memory_units, requires_grad=True) if memory_units else None
    rows = slice(40, 56)

    per_step = [data, policy] + ([memory.unsqueeze(2).expand(-1, -1, steps, -1)] if memory_units else [])
    inputs = torch.cat(per_step, dim=-1)
    per_lifetime = vmap(partial(apply_loss_net, net, layout), in_dims=(None, 0, 0))
    reference = vmap(per_lifetime)(phis, inputs, inputs[:, :, rows])

    losses = MemberLosses(net, phis, data_dim, memory_units)
    data_conv, data_head = losses.data_terms(data, rows)
    context = losses.context(data_conv, policy, memory)
    fast = losses.step_losses(data_head, policy[:, :, rows], memory, context)
    assert fast.shape == reference.shape == (members, workers, 16)
    assert torch.allclose(fast, reference, atol=1e-5)
    leaves = [policy] + ([memory] if memory_units else [])
    for got, want in zip(
        torch.autograd.grad(fast.sum(), leaves), torch.autograd.grad(reference.sum(), leaves), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-5)


EMPTY_ROWS = 8  # buffer steps that have not happened yet in lifetimes_with_random_buffer


def lifetimes_with_random_buffer(net: LossNetConfig, members: int = 1) -> inner_module.Lifetimes:
    """Point-goal lifetimes (2 workers) whose loss buffer holds random (but fixed) data, all but its
    first EMPTY_ROWS steps having happened, and whose normaliser has seen other random data."""
    family = "point_goal"
    tasks = sample_tasks(family, "train", 2, 0)
    setting = LossSetting("epg", phi=tiny_phi(family, members))
    lifetimes = inner_module.Lifetimes(family, tasks, TINY_INNER, setting, net, crn_seed=0)
    generator = torch.Generator().manual_seed(1)
    for tensor in lifetimes.buffer.values():
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    lifetimes.buffered_steps = TINY_INNER.buffer_size - EMPTY_ROWS
    seen = 3 * torch.randn(32, lifetimes.lifetimes, 6, generator=generator) + 2
    lifetimes.obs_moments = update_moments(lifetimes.obs_moments, seen[..., :4])
    lifetimes.act_moments = update_moments(lifetimes.act_moments, seen[..., 4:])
    with torch.no_grad():  # memory units away from zero, so that a wrong column order shows
        for tensor in lifetimes.memory.values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / 4)
    lifetimes.prepare_loss()
    return lifetimes


def test_the_inner_loop_feeds_the_loss_network_the_documented_input():
    """[obs, action, reward, done, policy output, memory] per buffer step, as LossNetwork takes it:
    observations and actions normalised per lifetime (zero at steps yet to happen), memory units
    tanh(1 . W + b)."""
    lifetimes = lifetimes_with_random_buffer(TINY_NET, members=2)
    batch = torch.tensor([3, 0, 17, 31])
    got = lifetimes.evolved_loss(batch).reshape(2, 2)
    buffer, n = lifetimes.buffer, TINY_INNER.buffer_size

    def normalised(x, moments):  # x [L, N, D], one lifetime at a time
        rows = []
        for i in range(x.shape[0]):
            row = (x[i] - moments.mean[i]) / moments.var[i].clamp_min(0.01).sqrt()
            row[:EMPTY_ROWS] = 0.0
            rows.append(row)
        return torch.stack(rows)

    with torch.no_grad():
        obs = normalised(buffer["obs"], lifetimes.obs_moments)
        heads = lifetimes.head_fn(lifetimes.policy, obs)
        ones = torch.ones(inner_module.MEMORY_INPUTS)
        memory = torch.tanh(ones @ lifetimes.memory["w"] + lifetimes.memory["b"])
        memory = memory.unsqueeze(1).expand(-1, n, -1)
        inputs = torch.cat(
            [
                obs,
                normalised(buffer["act"], lifetimes.act_moments),
                buffer["rew"][..., None],
                buffer["done"][..., None],
                heads,
                memory,
            ],
            -1,
        ).reshape(2, 2, n, -1)
        net = LossNetwork(inputs.shape[-1], TINY_NET)
        rows = batch + n - TINY_INNER.update_every
        per_lifetime = vmap(partial(apply_loss_net, net, ParamLayout.of(net)), in_dims=(None, 0, 0))
        want = vmap(per_lifetime)(lifetimes.loss.phi, inputs, inputs[:, :, rows]).mean(-1)
    assert torch.allclose(got.detach(), want, atol=1e-5)


def test_gradients_reach_policy_and_memory_through_the_evolved_loss():
    lifetimes = lifetimes_with_random_buffer(TINY_NET)
    losses = lifetimes.evolved_loss(torch.arange(0, 16))
    assert losses.shape == (2,)
    losses.sum().backward()
    for name, tensor in {**lifetimes.policy, **lifetimes.memory}.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_one_adam_step_moves_the_memory_pre_activation_by_about_65_lr():
    """m = tanh(1 . W + b) with a 64-wide ones-vector: Adam's first step moves each of the 65 entries
    feeding a unit by lr, all in the same direction (their gradients are equal)."""
    lifetimes = lifetimes_with_random_buffer(TINY_NET)

    def pre_activation():
        return (lifetimes.memory["w"].sum(1) + lifetimes.memory["b"]).detach().clone()

    before = pre_activation()
    lifetimes.optimizer.zero_grad()
    lifetimes.evolved_loss(torch.arange(0, 16)).sum().backward()
    lifetimes.optimizer.step()
    moved = (pre_activation() - before).abs()
    expected = (inner_module.MEMORY_INPUTS + 1) * TINY_INNER.lr
    assert torch.allclose(moved, torch.full_like(moved, expected), rtol=1e-3), moved


def test_memory_units_start_near_zero_and_are_shared_by_members():
    """As in the official code: every input's row of W has norm 0.01 and b = 0, so with U units the
    pre-activation has std ~ 0.01 sqrt(64 / U)."""
    lifetimes = lifetimes_with_random_buffer(TINY_NET, members=2)
    fresh = inner_module.Lifetimes("point_goal", lifetimes.tasks, TINY_INNER, lifetimes.loss, TINY_NET, 0)
    assert torch.allclose(fresh.memory["w"].norm(dim=-1), torch.tensor(0.01))
    assert not fresh.memory["b"].any()
    units = fresh.memory_units()
    assert 0 < units.abs().max() < 0.2
    assert torch.equal(units[0], units[1]), "members must start from the same memory (common random numbers)"


def test_a_lifetimes_moments_are_those_of_its_own_observations_and_actions():
    """With the buffer as long as the lifetime it ends up holding every step, so the moments must be
    exactly the per-lifetime mean and variance of the buffer (members apart: they act differently)."""
    config = TINY_INNER.model_copy(update={"lifetime_steps": 128, "buffer_size": 128})
    tasks = sample_tasks("point_goal", "train", 2, 0)
    lifetimes = inner_module.Lifetimes(
        "point_goal", tasks, config, LossSetting("epg", phi=tiny_phi("point_goal", 2)), TINY_NET, 0
    )
    lifetimes.run()
    for moments, key in ((lifetimes.obs_moments, "obs"), (lifetimes.act_moments, "act")):
        data = lifetimes.buffer[key]  # [L, N, D]
        assert torch.equal(moments.count, torch.full((4,), 128.0))
        assert torch.allclose(moments.mean, data.mean(1), atol=1e-5)
        assert torch.allclose(moments.var, data.var(1, correction=0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(lifetimes.obs_moments.mean[0], lifetimes.obs_moments.mean[2])


def test_the_policy_sees_normalised_observations_on_a_hopper_lifetime(monkeypatch):
    """Once the moments have seen a few windows (the second half of the lifetime), what the policy acts on
    has |mean| < 0.5 and std ~ 1 per feature, where raw Hopper observations do not (the torso height sits
    near 1.25, stds range from 0.02 to 2). Features that barely move stay below 1 (the std is floored at
    MIN_STD), and as the policy changes the distribution a running normaliser lags behind it: hence the
    loose per-feature band around a median near 1."""
    seen = []
    act = inner_module.pol.act

    def recording_act(spec, params, obs, noise):
        seen.append(obs.detach().clone())
        return act(spec, params, obs, noise)

    monkeypatch.setattr(inner_module.pol, "act", recording_act)
    config = InnerLoopConfig(
        lifetime_steps=512, update_every=64, buffer_size=64, minibatch_size=32, fitness="lifetime"
    )
    tasks = sample_tasks("random_hopper", "train", 2, 0)
    run_lifetimes("random_hopper", tasks, config, LossSetting("ppo", num_members=1), TINY_NET, 0)
    normalised = torch.stack(seen[config.lifetime_steps // 2 :]).squeeze(2)  # [T, L, obs]
    raw = torch.stack(seen[: config.update_every]).squeeze(2)  # the first window: moments not yet seen
    # per feature |mean| < 0.5 for the typical feature; a few (e.g. velocities after a fall) lag the
    # running moments by more, so the median over features is what is bounded
    assert normalised.mean(0).abs().median() < 0.5, normalised.mean(0)
    assert raw.mean(0).abs().max() > 0.5
    moving = raw.std(0) > 2 * MIN_STD  # features whose raw std is well above the floor
    std = normalised.std(0)[moving]
    assert ((std > 0.4) & (std < 2.5)).all(), normalised.std(0)
    assert 0.7 < std.median() < 1.3, normalised.std(0)
    assert not ((raw.std(0) > 0.4) & (raw.std(0) < 2.5)).all()


def test_context_gradient_switch_only_changes_the_gradient_path():
    results = {}
    for context_gradient in (True, False):
        # without it, prepare_loss computes the context once, without gradient, as the update does
        lifetimes = lifetimes_with_random_buffer(
            TINY_NET.model_copy(update={"context_gradient": context_gradient})
        )
        loss = lifetimes.evolved_loss(torch.arange(0, 16))
        loss.sum().backward()
        results[context_gradient] = (loss.detach(), lifetimes.policy["w0"].grad.clone())
    assert torch.allclose(results[True][0], results[False][0], atol=1e-6), "the loss value must not change"
    assert not torch.allclose(results[True][1], results[False][1]), "the gradient path must differ"


# ----------------------------------------------------------------------------------------- inner loop
@pytest.mark.parametrize("family", ["point_goal", "random_cartpole", "random_hopper"])
def test_vectorized_lifetimes_equal_a_per_member_loop(family):
    tasks = sample_tasks(family, "train", 3, 1)
    phis = tiny_phi(family, 3)
    batched = run_lifetimes(family, tasks, TINY_INNER, LossSetting("epg", phi=phis), TINY_NET, crn_seed=7)
    for member in range(3):
        alone = run_lifetimes(
            family, tasks, TINY_INNER, LossSetting("epg", phi=phis[member : member + 1]), TINY_NET, crn_seed=7
        )
        assert torch.allclose(batched.fitness[member], alone.fitness[0], atol=1e-4), member
        assert torch.allclose(batched.lifetime_returns[member], alone.lifetime_returns[0], atol=1e-4)
    assert batched.fitness.shape == (3, 3)
    assert (
        batched.env_steps == 9 * TINY_INNER.lifetime_steps + 9 * 2 * make_env(family, tasks).max_episode_steps
    )


def test_members_differ_only_through_their_loss():
    tasks = sample_tasks("point_goal", "train", 2, 1)
    phi = tiny_phi("point_goal", 1)
    same = run_lifetimes(
        "point_goal", tasks, TINY_INNER, LossSetting("epg", phi=phi.repeat(2, 1)), TINY_NET, 3
    )
    assert torch.equal(same.fitness[0], same.fitness[1])
    different = run_lifetimes(
        "point_goal", tasks, TINY_INNER, LossSetting("epg", phi=tiny_phi("point_goal", 2)), TINY_NET, 3
    )
    assert not torch.equal(different.fitness[0], different.fitness[1])


def test_nonfinite_member_gets_the_worst_fitness_and_spares_the_others():
    tasks = sample_tasks("point_goal", "train", 2, 1)
    phis = tiny_phi("point_goal", 2)
    poisoned = phis.clone()
    poisoned[1] = torch.nan
    result = run_lifetimes("point_goal", tasks, TINY_INNER, LossSetting("epg", phi=poisoned), TINY_NET, 5)
    assert result.nonfinite[1].all() and not result.nonfinite[0].any()
    assert torch.all(result.fitness[1] == -math.inf)
    alone = run_lifetimes("point_goal", tasks, TINY_INNER, LossSetting("epg", phi=phis[:1]), TINY_NET, 5)
    assert torch.allclose(result.fitness[0], alone.fitness[0], atol=1e-4)


@pytest.mark.parametrize("method", ["ppo", "pg"])
def test_baseline_methods_share_the_trainer_and_learn_cartpole_a_little(method):
    config = InnerLoopConfig(lifetime_steps=2048, update_every=64, buffer_size=64, minibatch_size=32, lr=3e-3)
    tasks = sample_tasks("random_cartpole", "train", 8, 0)
    result = run_lifetimes("random_cartpole", tasks, config, LossSetting(method, num_members=1), TINY_NET, 0)
    early, late = result.curve[:4].nanmean(), result.curve[-4:].nanmean()
    assert late > early, f"{method}: episode return did not rise ({early:.1f} -> {late:.1f})"


def test_loss_setting_rejects_unknown_methods_and_missing_phi():
    with pytest.raises(ValueError, match="allowed: epg, ppo, pg"):
        LossSetting("a2c")
    with pytest.raises(ValueError, match="phi"):
        LossSetting("epg")


# ----------------------------------------------------------------------------------------- outer loop
def run_generations(config: EvolveConfig, generations: int) -> torch.Tensor:
    tasks = sample_tasks(config.family, "train", 8, 0)
    phi0 = tiny_phi(config.family, 1, scale=0.0)[0]
    problem = EPGProblem(config, tasks, phi0, seed=11)
    searcher = OpenAIES(problem, config, phi0)
    for generation in range(generations):
        problem.set_generation(generation, center=None)
        searcher.step()
    return searcher.center.clone()


@pytest.mark.parametrize("family", ["point_goal", "random_hopper"])
def test_fixed_seed_gives_identical_phi_after_two_generations(family):
    config = evolve_config(family=family)
    first, second = run_generations(config, 2), run_generations(config, 2)
    assert torch.equal(first, second)
    assert not torch.equal(first, tiny_phi(family, 1, scale=0.0)[0]), "the center never moved"


class Sphere(Problem):
    """max -||x - 1||^2: a tiny problem on which any working ES must improve."""

    def __init__(self):
        super().__init__("max", solution_length=8, initial_bounds=(-1, 1), seed=3)

    def _evaluate_batch(self, batch):
        batch.set_evals(-((batch.values - 1.0) ** 2).sum(-1))


def test_openai_es_improves_fitness_on_a_tiny_problem():
    config = evolve_config(popsize=16, sigma=0.1, lr_start=0.05, lr_end=0.05, l2=0.0)
    problem = Sphere()
    searcher = OpenAIES(problem, config, torch.zeros(8))
    start = -((searcher.center - 1.0) ** 2).sum()
    for _ in range(60):
        searcher.step()
    end = -((searcher.center - 1.0) ** 2).sum()
    assert end > start + 4.0, f"ES did not improve: {start:.2f} -> {end:.2f}"


def test_l2_decay_shrinks_phi_when_fitness_is_flat():
    class Flat(Sphere):
        def _evaluate_batch(self, batch):
            batch.set_evals(torch.zeros(len(batch)))

    config = evolve_config(popsize=4, sigma=0.1, lr_start=0.01, lr_end=0.01, l2=1.0, antithetic=True)
    searcher = OpenAIES(Flat(), config, torch.ones(8))
    for _ in range(5):
        searcher.step()
    # centered ranks of ties are not all zero, so compare against the same run without decay
    baseline = OpenAIES(
        Flat(), evolve_config(popsize=4, sigma=0.1, lr_start=0.01, lr_end=0.01, l2=0.0), torch.ones(8)
    )
    for _ in range(5):
        baseline.step()
    assert searcher.center.norm() < baseline.center.norm()


def test_schedules():
    config = evolve_config(
        generations=100, lr_start=1e-2, lr_end=1e-3, lr_decay_fraction=0.5, ppo_anneal_fraction=0.125
    )
    assert learning_rate(config, 0) == pytest.approx(1e-2)
    assert learning_rate(config, 50) == pytest.approx(1e-3)
    assert learning_rate(config, 99) == pytest.approx(1e-3)
    assert ppo_weight(config, 0) == 1.0 and ppo_weight(config, 13) == 0.0
    assert ppo_weight(evolve_config(ppo_anneal_fraction=0.0), 0) == 0.0


def test_common_random_numbers_depend_on_generation_not_member():
    config = evolve_config()
    tasks = sample_tasks("point_goal", "train", 8, 0)
    problem = EPGProblem(config, tasks, tiny_phi("point_goal", 1, scale=0.0)[0], seed=11)
    assert problem.tasks_for(3) == problem.tasks_for(3)
    assert problem.crn_seed(3) == problem.crn_seed(3) != problem.crn_seed(4)
    assert len(problem.tasks_for(0)) == config.workers


# ----------------------------------------------------------------------------------------- Ray actors
@pytest.mark.ray
def test_ray_actors_give_the_serial_fitness(monkeypatch):
    """The one test that starts Ray: 2 local actors split the batch, common random numbers keep results."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "")  # never join a cluster from the test suite
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tasks = sample_tasks("point_goal", "train", 8, 0)
        phis = tiny_phi("point_goal", 4)
        center = tiny_phi("point_goal", 1, scale=0.0)[0]
        results = {}
        for actors in (0, 2):
            config = evolve_config(num_actors=actors)
            problem = EPGProblem(config, tasks, center, seed=11)
            problem.set_generation(1, center=center)
            batch = problem.generate_batch(4)
            batch.set_values(phis)
            problem.evaluate(batch)
            results[actors] = (batch.evals[:, 0].clone(), problem.center_fitness)
            if problem.actors:
                problem.kill_actors()
        assert torch.allclose(results[0][0], results[2][0], atol=1e-4)
        assert results[0][1] == pytest.approx(results[2][1], abs=1e-4)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------- checkpoint/resume
def tiny_pipeline_config(generations: int = 4):
    import yaml

    from pipeline.config import PipelineConfig

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    with_tiny_evolve(params, generations=generations, checkpoint_every=2)
    return PipelineConfig.model_validate(params)


def test_killed_evolve_resumes_to_the_same_phi_in_the_same_mlflow_run(tmp_path, monkeypatch):
    from pipeline.epg.evolve import run_evolve
    from pipeline.io import read_json, torch_load

    config = tiny_pipeline_config()
    tasks = stage_project(tmp_path, monkeypatch, config)

    def evolve_into(folder):
        return run_evolve(
            config,
            tasks,
            folder / "loss.pt",
            folder / "metrics.json",
            folder / "plots",
            folder / "checkpoints",
        )

    uninterrupted = evolve_into(tmp_path / "a")
    killed_at_call(monkeypatch, OpenAIES, "step", 3, lambda: evolve_into(tmp_path / "b"))  # generation 3
    killed_run = read_json(tmp_path / "b/checkpoints/run.json")["mlflow_run_id"]
    resumed = evolve_into(tmp_path / "b")

    assert torch.equal(torch_load(tmp_path / "a/loss.pt")["phi"], torch_load(tmp_path / "b/loss.pt")["phi"])
    assert resumed["mlflow_run_id"] == killed_run != uninterrupted["mlflow_run_id"]
    assert resumed["generations"] == uninterrupted["generations"] == 4
    assert resumed["best_center_fitness"] == uninterrupted["best_center_fitness"]
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(killed_run, "fitness/center")
    assert sorted(m.step for m in history) == [0, 1, 2, 3], "a generation was lost or logged twice"


def test_keep_freed_cpu_memory_applies_where_the_c_library_is_glibc():
    import platform

    from pipeline.devices import keep_freed_cpu_memory

    applied = keep_freed_cpu_memory()
    assert applied is (platform.libc_ver()[0] == "glibc")
    assert keep_freed_cpu_memory() is applied  # idempotent
