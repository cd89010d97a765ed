"""MAML: inner step and meta-gradient against finite differences, batched == per-task loop, TRPO,
learning on a tiny family, the stage's kill/resume, the maml-policy registry and bad params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_MAML, killed_at_call, stage_project

from pipeline.config import EPG_METHODS, MamlConfig, PipelineConfig
from pipeline.envs.tasks import make_env, sample_tasks
from pipeline.maml import meta
from pipeline.maml.learner import (
    MamlLearner,
    adaptation_returns,
    init_theta,
    meta_batch,
    policy_spec,
    sample_adaptation,
)
from pipeline.maml.sampling import (
    Episodes,
    discounted_returns,
    draw_noise,
    linear_baseline,
    rollouts,
)
from pipeline.maml.trpo import conjugate_gradient, trpo_step
from pipeline.rl import policy as pol

REPO = Path(__file__).resolve().parents[1]
TINY = MamlConfig(
    meta_batch_size=3, rollouts_per_task=3, horizon=8, inner_lr=0.5, policy_hidden=[8], init_log_std=-0.3
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the stage runs (maml.threads = 1)


def double_theta(spec: pol.PolicySpec, seed: int = 0, scale: float = 0.5) -> dict:
    """A float64 theta0 away from the near-uniform init, so that every derivative is far from zero."""
    generator = torch.Generator().manual_seed(seed + 100)
    theta = init_theta(spec, seed)
    return {
        k: v.double() + scale * torch.randn(v.shape, generator=generator).double() for k, v in theta.items()
    }


def tiny_batch(family: str, config: MamlConfig = TINY, seed: int = 0):
    spec = policy_spec(family, config)
    theta = double_theta(spec, seed)
    tasks = sample_tasks(family, "train", config.meta_batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    episodes, adapted = sample_adaptation(spec, config, theta, family, tasks, config.inner_steps, generator)
    return spec, theta, meta_batch(spec, episodes, adapted)


def random_direction(params: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}


def directional_fd(function, params: dict, direction: dict, eps: float = 1e-6) -> float:
    def at(sign):
        return float(function({k: params[k] + sign * eps * direction[k] for k in params}))

    return (at(1) - at(-1)) / (2 * eps)


def dot(a: dict, b: dict) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def task_slice(x, t: int):
    if isinstance(x, Episodes):
        return Episodes(*(field[:, t : t + 1] for field in x))
    return x[t : t + 1]


# ------------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("family", ["point_goal", "random_cartpole"])
def test_inner_step_is_the_finite_difference_gradient_of_the_inner_loss(family):
    spec, theta, batch = tiny_batch(family)
    params = meta.expand_tasks(theta, batch.tasks)
    train = batch.train[0]
    stepped = meta.inner_step(spec, params, train, TINY.inner_lr, first_order=False)
    gradient = {k: (params[k] - stepped[k]) / TINY.inner_lr for k in params}  # per task
    for seed in range(3):
        direction = random_direction(params, seed)
        fd = directional_fd(lambda p: meta.inner_losses(spec, p, train).sum(), params, direction)
        assert dot(gradient, direction) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_stacked_inner_gradient_equals_vmap_of_per_task_gradients():
    spec, theta, batch = tiny_batch("point_goal")
    train = batch.train[0]
    params = {k: v.contiguous() for k, v in meta.expand_tasks(theta, batch.tasks).items()}
    stepped = meta.inner_step(spec, params, train, TINY.inner_lr, first_order=False)

    def one_task_loss(p, obs, actions, advantages, mask):  # unbatched policy, one task's rows
        log_prob = pol.log_prob(spec, pol.policy_head(spec, p, obs), actions)
        return -(log_prob * advantages * mask).sum() / mask.sum()

    rows = [meta.task_rows(x) for x in (train.obs, train.actions, train.advantages, train.mask)]
    per_task = torch.func.vmap(torch.func.grad(one_task_loss))(params, *rows)
    for k in params:
        torch.testing.assert_close(params[k] - stepped[k], TINY.inner_lr * per_task[k])


@pytest.mark.parametrize("family", ["point_goal", "random_cartpole"])
def test_second_order_meta_gradient_matches_finite_differences_and_differs_from_first_order(family):
    spec, theta, batch = tiny_batch(family)

    def post_adaptation(first_order):
        return lambda th: meta.meta_objective(spec, th, batch, TINY.inner_lr, first_order)[0].mean()

    def gradient(first_order):
        leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
        grads = torch.autograd.grad(post_adaptation(first_order)(leaves), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    second, first = gradient(False), gradient(True)
    for seed in range(3):
        direction = random_direction(theta, seed)
        fd = directional_fd(post_adaptation(False), theta, direction)
        assert dot(second, direction) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    difference = sum(float((second[k] - first[k]).norm()) for k in theta)
    assert difference > 1e-3 * sum(float(second[k].norm()) for k in theta)


def test_first_order_meta_gradient_is_the_outer_gradient_at_the_adapted_parameters():
    spec, theta, batch = tiny_batch("point_goal")
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    surrogate, _ = meta.meta_objective(spec, leaves, batch, TINY.inner_lr, first_order=True)
    fomaml = torch.autograd.grad(surrogate.mean(), list(leaves.values()))
    adapted = meta.adapt(spec, theta, batch.train, TINY.inner_lr, first_order=True)
    adapted = {k: v.detach().clone().requires_grad_() for k, v in adapted.items()}
    valid = batch.valid
    head = pol.policy_head(spec, adapted, meta.task_rows(valid.obs))
    log_prob = pol.log_prob(spec, head, meta.task_rows(valid.actions))
    old = pol.log_prob(spec, batch.old_head, meta.task_rows(valid.actions))
    outer = meta.masked_task_mean(
        torch.exp(log_prob - old) * meta.task_rows(valid.advantages), meta.task_rows(valid.mask)
    )
    direct = torch.autograd.grad(outer.mean(), list(adapted.values()))
    for a, b in zip(fomaml, direct, strict=True):
        torch.testing.assert_close(a, b.sum(0, keepdim=True))


@pytest.mark.parametrize("discrete", [False, True])
def test_kl_divergence_matches_torch_distributions(discrete):
    spec = pol.PolicySpec(obs_dim=3, action_dim=4, discrete=discrete, hidden=(5,))
    generator = torch.Generator().manual_seed(0)
    params = [pol.init_policy(spec, 2, generator) for _ in range(2)]
    for p in params:
        for k in p:
            p[k] = p[k].double() + torch.randn(p[k].shape, generator=generator).double()
    obs = torch.randn(2, 7, 3, generator=generator, dtype=torch.float64)
    old, new = (pol.policy_head(spec, p, obs) for p in params)
    if discrete:
        expected = torch.distributions.kl_divergence(
            torch.distributions.Categorical(probs=old), torch.distributions.Categorical(probs=new)
        )
    else:

        def normal(head):
            mean, log_std = head.split(4, -1)
            return torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1)

        expected = torch.distributions.kl_divergence(normal(old), normal(new))
    torch.testing.assert_close(meta.kl_divergence(spec, old, new), expected)


def test_discounted_returns_and_linear_baseline_match_slow_references():
    generator = torch.Generator().manual_seed(0)
    horizon, tasks, rollouts_per_task = 6, 2, 3
    rewards = torch.randn(horizon, tasks, rollouts_per_task, generator=generator, dtype=torch.float64)
    mask = torch.ones_like(rewards)
    mask[4:, 0, 1] = 0.0  # an episode that ended after 4 steps
    rewards = rewards * mask
    returns = discounted_returns(rewards, mask, 0.9)
    for t in range(tasks):
        for n in range(rollouts_per_task):
            running = 0.0
            for h in reversed(range(horizon)):
                continues = float(mask[h + 1, t, n]) if h + 1 < horizon else 0.0
                running = float(rewards[h, t, n]) + 0.9 * continues * running
                assert float(returns[h, t, n]) == pytest.approx(running)
    # The baseline reproduces targets that are linear in its features (to the ridge term's precision)
    obs = torch.randn(horizon, tasks, rollouts_per_task, 2, generator=generator, dtype=torch.float64)
    step = torch.arange(horizon, dtype=torch.float64).view(-1, 1, 1) / 100
    target = 2.0 * obs[..., 0] - obs[..., 1].square() + 3.0 * step + torch.tensor([0.5, -1.0]).view(1, 2, 1)
    noisy = torch.where(mask.bool(), target, torch.full_like(target, 1e3))  # masked steps must not count
    fitted = linear_baseline(obs, noisy, mask)
    torch.testing.assert_close(fitted * mask, target * mask, atol=1e-3, rtol=0)


def test_conjugate_gradient_solves_a_positive_definite_system():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    matrix = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: matrix @ v, b, 20), torch.linalg.solve(matrix, b))


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("family", ["point_goal", "random_cartpole"])
def test_batched_meta_batch_equals_a_per_task_loop(family):
    spec = policy_spec(family, TINY)
    theta = double_theta(spec)
    tasks = sample_tasks(family, "train", 3, 0)
    n, horizon = TINY.rollouts_per_task, TINY.horizon
    env = make_env(family, [t for t in tasks for _ in range(n)], dtype=torch.float64)
    action_noise, reset_noise = draw_noise(
        spec, env, len(tasks), n, horizon, torch.Generator().manual_seed(1)
    )
    params = meta.expand_tasks(theta, len(tasks))
    batched = rollouts(spec, env, params, action_noise, reset_noise)
    for t, task in enumerate(tasks):
        alone = make_env(family, [task] * n, dtype=torch.float64)
        single = rollouts(spec, alone, theta, action_noise[:, t : t + 1], reset_noise[t * n : (t + 1) * n])
        steps = single[0].shape[0]  # alone, the loop stops when this task's episodes have all ended
        for together, apart in zip(batched, single, strict=True):
            torch.testing.assert_close(together[:steps, t : t + 1], apart, rtol=1e-12, atol=1e-12)
        assert not batched[3][steps:, t].any(), "steps after the task's episodes ended are masked out"

    _, theta, batch = tiny_batch(family)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    surrogate, kl = meta.meta_objective(spec, leaves, batch, TINY.inner_lr, False)
    grads = torch.autograd.grad(surrogate.mean(), list(leaves.values()))
    per_task = []
    for t in range(batch.tasks):
        part = meta.MetaBatch(
            tuple(task_slice(e, t) for e in batch.train),
            task_slice(batch.valid, t),
            batch.old_head[t : t + 1],
        )
        leaves_t = {k: v.clone().requires_grad_() for k, v in theta.items()}
        s_t, kl_t = meta.meta_objective(spec, leaves_t, part, TINY.inner_lr, False)
        torch.testing.assert_close(s_t, surrogate[t : t + 1].detach())
        torch.testing.assert_close(kl_t, kl[t : t + 1].detach())
        per_task.append(torch.autograd.grad(s_t.sum(), list(leaves_t.values())))
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, sum(p[i] for p in per_task) / batch.tasks)


# ------------------------------------------------------------------------------------------ TRPO, learning
@pytest.mark.parametrize("family", ["point_goal", "random_cartpole"])
def test_trpo_step_keeps_the_kl_within_delta_and_improves_the_surrogate(family):
    spec, theta, batch = tiny_batch(family)

    def objective(th):
        surrogate, kl = meta.meta_objective(spec, th, batch, TINY.inner_lr, False)
        return surrogate.mean(), kl.mean()

    result = trpo_step(objective, theta, max_kl=0.01)
    assert result.accepted
    with torch.no_grad():
        surrogate, kl = objective(result.params)
        before, kl_before = objective(theta)
    assert float(kl_before) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < float(kl) <= 0.01
    assert float(surrogate) > float(before)
    assert result.surrogate_after == pytest.approx(float(surrogate))


@pytest.mark.parametrize("family", ["point_goal", "random_cartpole", "random_hopper"])
def test_every_family_takes_a_meta_step(family):
    config = TINY.model_copy(update={"family": family, "inner_steps": 2})
    learner = MamlLearner(config, sample_tasks(family, "train", 4, 0), seed=0)
    assert ("log_std" in learner.theta) is (family != "random_cartpole")  # cart-pole: categorical
    before = {k: v.clone() for k, v in learner.theta.items()}
    row = learner.step()
    assert all(torch.isfinite(torch.tensor(float(v))) for v in row.values())
    assert 0 <= row["kl"] <= config.max_kl
    assert row["step_accepted"] == 0.0 or any(not torch.equal(before[k], learner.theta[k]) for k in before)
    if family == "random_cartpole":
        head = pol.policy_head(learner.spec, learner.theta, torch.zeros(1, 2, 4))
        torch.testing.assert_close(head.sum(-1), torch.ones(1, 2))


def test_maml_raises_the_post_adaptation_return_on_point_goal():
    config = MamlConfig(meta_batch_size=6, rollouts_per_task=6, horizon=20, policy_hidden=[16])
    learner = MamlLearner(config, sample_tasks("point_goal", "train", 32, 0), seed=0)
    test_tasks = sample_tasks("point_goal", "test", 8, 0)

    def post_adaptation_return():
        return adaptation_returns(learner.spec, config, learner.theta, test_tasks, 1, seed=7)[1]

    before = post_adaptation_return()
    for _ in range(8):
        learner.step()
    after = post_adaptation_return()
    assert after > before + 0.05 * abs(before), (before, after)


# ------------------------------------------------------------------------------------------ the stage
def tiny_pipeline_config(**maml) -> PipelineConfig:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["maml"].update(TINY_MAML, **maml)
    return PipelineConfig.model_validate(params)


def test_killed_maml_resumes_to_the_same_policy_in_the_same_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.io import read_json, torch_load
    from pipeline.maml.run import run_maml

    config = tiny_pipeline_config()
    tasks = stage_project(tmp_path, monkeypatch, config)

    def maml_into(folder):
        return run_maml(
            config,
            tasks,
            folder / "policy.pt",
            folder / "pretrained.pt",
            folder / "metrics.json",
            folder / "plots",
            folder / "ckpt",
        )

    uninterrupted = maml_into(tmp_path / "a")
    # MAML's step, then the baseline's, in every iteration: call 6 is the baseline's step of iteration 3,
    # after the checkpoint of iteration 2
    killed_at_call(monkeypatch, MamlLearner, "step", 6, lambda: maml_into(tmp_path / "b"))
    killed_run = read_json(tmp_path / "b/ckpt/run.json")["mlflow_run_id"]
    resumed = maml_into(tmp_path / "b")

    for policy in ("policy.pt", "pretrained.pt"):
        a, b = torch_load(tmp_path / "a" / policy), torch_load(tmp_path / "b" / policy)
        for name in a["theta"]:
            assert torch.equal(a["theta"][name], b["theta"][name])
        assert a["test_returns"] == b["test_returns"]
    maml, pretrained = (torch_load(tmp_path / "a" / name)["theta"] for name in ("policy.pt", "pretrained.pt"))
    assert any(not torch.equal(maml[name], pretrained[name]) for name in maml)
    assert resumed["mlflow_run_id"] == killed_run != uninterrupted["mlflow_run_id"]
    assert resumed["iterations"] == 4
    assert resumed["registered_version"] == "2"
    history = MlflowClient().get_metric_history(killed_run, "post_adaptation_return")
    assert sorted(m.step for m in history) == [0, 1, 2, 3], "an iteration was lost or logged twice"
    for name in ("pre_adaptation_return", "kl", "surrogate_gain", "line_search_steps"):
        assert len(MlflowClient().get_metric_history(killed_run, name)) == 4
    baseline = MlflowClient().get_metric_history(killed_run, "pretrained/return")
    assert sorted(m.step for m in baseline) == [0, 1, 2, 3]
    assert len(MlflowClient().get_metric_history(killed_run, "pretrained/test_return")) == 2


def test_maml_policy_registry_round_trip(tmp_path, monkeypatch):
    from pipeline import registry
    from pipeline.maml.run import POLICY_ARTIFACT_DIR, REGISTERED_MODEL, download_policy
    from pipeline.tracking import StageRun

    (tmp_path / "dvc.yaml").touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    files = []
    for i in range(2):
        path = tmp_path / f"v{i}" / "policy.pt"
        path.parent.mkdir()
        torch.save({"theta": {"w0": torch.full((1, 2, 2), float(i))}}, path)
        files.append(path)
        with StageRun("maml", {"seed": i}, f"hash{i}", experiment="test-exp") as run:
            version = registry.register_file(
                run, path, REGISTERED_MODEL, artifact_dir=POLICY_ARTIFACT_DIR, tags={"family": "point_goal"}
            )
        assert version == str(i + 1)
    assert download_policy(f"models:/{REGISTERED_MODEL}@candidate") == files[1].read_bytes()
    assert download_policy(f"models:/{REGISTERED_MODEL}/1") == files[0].read_bytes()
    versions = registry.list_versions(REGISTERED_MODEL)
    assert [v["aliases"] for v in versions] == [[], ["candidate"]]
    assert versions[0]["tags"]["family"] == "point_goal"


def test_bad_maml_params_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys, monkeypatch):
    from pipeline.stage import stage_main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["maml"].update(inner_lr=-0.1, bogus_knob=1, first_order="sometimes")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        stage_main("maml", lambda config, root: pytest.fail("the stage ran"), ["--params", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for key in ("maml.inner_lr", "maml.bogus_knob", "maml.first_order"):
        assert key in err
    assert sorted(tmp_path.rglob("*")) == before

    params["maml"] = {"family": "random_hopper"}
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):
        stage_main("maml", lambda config, root: pytest.fail("the stage ran"), ["--params", str(bad)])
    assert "maml.family 'random_hopper' must be listed in prepare.task_families" in capsys.readouterr().err


def test_maml_compared_with_epg_must_share_its_task_family():
    from pipeline.config import check_maml_compared_on_epg_family

    message = "maml.family 'point_goal' must equal evolve.family 'random_cartpole'"
    with pytest.raises(ValueError, match=message):
        check_maml_compared_on_epg_family("point_goal", "random_cartpole", ["evolved", "maml"])
    check_maml_compared_on_epg_family("point_goal", "random_cartpole", ["evolved", "ppo"])  # not compared
    check_maml_compared_on_epg_family("random_cartpole", "random_cartpole", ["maml", "pretrained"])


@pytest.mark.skipif("maml" not in EPG_METHODS, reason="evaluate.epg.methods cannot list maml yet")
def test_maml_on_another_family_than_epg_exits_2_when_evaluate_compares_them(tmp_path, capsys):
    from pipeline.stage import stage_main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["task_families"] = ["point_goal", "random_cartpole"]
    params["maml"]["family"], params["evolve"]["family"] = "point_goal", "random_cartpole"
    params["evaluate"]["epg"]["methods"] = ["evolved", "maml"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_info:
        stage_main("evaluate", lambda config, root: pytest.fail("the stage ran"), ["--params", str(bad)])
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "maml.family" in line]
    assert "maml.family 'point_goal' must equal evolve.family 'random_cartpole'" in line


@pytest.mark.e2e
def test_maml_stage_killed_with_sigkill_resumes_to_the_uninterrupted_policy(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.io import read_json, torch_load, write_json
    from pipeline.prepare import task_splits

    config = tiny_pipeline_config(iterations=20)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["maml"] = config.maml.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    env.pop("PIPELINE_RUN_ID", None)

    def stage(root: Path) -> subprocess.Popen:
        write_json(root / "data/prepared/tasks.json", task_splits(config.prepare, config.seed))
        command = [sys.executable, str(REPO / "stages/maml.py"), "--params", str(tmp_path / "params.yaml")]
        return subprocess.Popen(
            [*command, "--output-root", str(root)], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
        )

    assert stage(tmp_path / "a").wait(timeout=600) == 0
    process = stage(tmp_path / "b")
    checkpoint = tmp_path / "b/checkpoints/maml/maml.pt"
    while process.poll() is None and not (checkpoint.exists() and torch_load(checkpoint)["iteration"] >= 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "b/metrics/maml.json").exists(), "the stage finished before it was killed"
    killed_run = read_json(tmp_path / "b/checkpoints/maml/run.json")["mlflow_run_id"]
    assert stage(tmp_path / "b").wait(timeout=600) == 0

    for policy in ("policy.pt", "pretrained.pt"):
        a, b = (torch_load(tmp_path / f"{x}/models/maml/{policy}") for x in "ab")
        for name in a["theta"]:
            assert torch.equal(a["theta"][name], b["theta"][name])
    assert read_json(tmp_path / "b/metrics/maml.json")["mlflow_run_id"] == killed_run
