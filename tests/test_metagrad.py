"""Tests for the metagrad stage: networks, the meta-gradient learner, the training loop and the stage script.

The central test checks the learner's meta-gradient dJ/d(eta logits) against central finite differences
of J(theta'(eta)), in float64, for both gradient modes and both meta-objectives.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch.func import functional_call
from torch.nn import functional as F

from pipeline.cli import main as cli_main
from pipeline.config import AtariEnvConfig, MetaConfig, MetagradConfig
from pipeline.io import torch_load
from pipeline.metagrad import train as train_module
from pipeline.metagrad.learner import MetaGradientLearner, Rollout
from pipeline.metagrad.run import checkpoint_histories
from pipeline.metagrad.train import train_variant
from pipeline.nets.atari import OBS_SCALE, AtariActorCritic
from pipeline.rl.returns import vtrace

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
T, B, A = 3, 2, 6  # unroll, envs, actions (pong's minimal action set)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are tiny: one thread is faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- helpers
def synthetic_rollout(seed: int, dtype: torch.dtype = torch.float32) -> Rollout:
    """Random frames, actions and rewards; off-policy ratios on both sides of the V-trace clips."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (T + 1, B, 4, 84, 84), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, A, (T, B), generator=g)
    # the initial policy is close to uniform (1/6); behaviour probabilities in [0.05, 0.35]
    behaviour_log_probs = torch.log(0.05 + 0.3 * torch.rand(T, B, generator=g, dtype=dtype))
    rewards = 2 * torch.rand(T, B, generator=g, dtype=dtype) - 1
    dones = torch.zeros(T, B, dtype=torch.bool)
    dones[1, 0] = True  # one episode boundary inside the unroll
    return Rollout(obs, actions, behaviour_log_probs, rewards, dones)


def metagrad_config(**overrides) -> MetagradConfig:
    base = dict(
        games=["pong"],
        variants=["impala", "gamma_lambda"],
        num_envs=B,
        unroll=T,
        device="cpu",
        env=AtariEnvConfig(env_threads=1),
    )
    return MetagradConfig(**{**base, **overrides})


def make_learner(config: MetagradConfig, variant: str, total_updates: int = 10) -> MetaGradientLearner:
    torch.manual_seed(0)  # same initial network for every learner built here
    return MetaGradientLearner(config, variant, A, total_updates, "cpu")


def to_float64(learner: MetaGradientLearner) -> MetaGradientLearner:
    """The same learner computing in float64 (for finite differences)."""
    net = learner.net.double()  # in place: the RMSProp optimizer keeps the same Parameter objects
    # AtariActorCritic.features casts frames with .float(); cast them to the network's dtype instead.
    net.features = lambda obs: net.torso(
        (obs.to(F64) * OBS_SCALE).contiguous(memory_format=torch.channels_last)
    )
    learner.eta_logits.data = learner.eta_logits.data.to(F64)  # same tensor object: Adam still owns it
    learner.eta_bar = learner.eta_bar.to(F64)
    return learner


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def unroll_outputs(net, params, rollout: Rollout, eta_input: torch.Tensor):
    """log pi(a_t|s_t) [T, B], entropy [T, B], values [T+1, B]; written independently of the learner."""
    obs = rollout.obs.reshape(-1, *rollout.obs.shape[2:])
    logits, values = functional_call(net, params, (obs, eta_input))
    log_pi = F.log_softmax(logits.reshape(T + 1, B, -1)[:-1], dim=-1)
    log_probs = log_pi.gather(-1, rollout.actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return log_probs, entropy, values.reshape(T + 1, B)


def vtrace_of(rollout: Rollout, log_probs, values, gamma, lambda_, config: MetagradConfig):
    return vtrace(
        log_probs.detach() - rollout.behaviour_log_probs,
        gamma * (~rollout.dones).to(values.dtype),
        rollout.rewards,
        values[:-1].detach(),
        values[-1].detach(),
        lambda_=lambda_,
        clip_rho=config.clip_rho,
        clip_c=config.clip_c,
    )


# --------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("network", ["nature", "impala_resnet"])
def test_network_shapes_and_detached_eta(network):
    torch.manual_seed(0)
    net = AtariActorCritic(A, network, in_channels=4, embedding_dim=16)
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    eta = torch.tensor([0.9, 0.8], requires_grad=True)
    logits, values = net(obs, eta)
    assert logits.shape == (5, A)
    assert values.shape == (5,)
    (logits.sum() + values.sum()).backward()
    assert eta.grad is None, "eta must reach the meta-gradient only through the return targets"
    assert net.eta_embedding.weight.grad is not None  # ... though the network does use it as input

    with torch.no_grad():
        _, other_values = net(obs, torch.tensor([0.5, 0.1]))
        # the torso does not see eta, the heads do
        feature_logits, feature_values = net.heads(net.features(obs), eta)
    assert not torch.allclose(values, other_values)
    torch.testing.assert_close(feature_logits, logits.detach())
    torch.testing.assert_close(feature_values, values.detach())


def test_unknown_network_is_rejected():
    with pytest.raises(ValueError, match="nature"):
        AtariActorCritic(A, "resnet50")


# --------------------------------------------------------------------------------------------- meta-gradient
@dataclass(frozen=True)
class MetaGradientCase:
    learner_grad: torch.Tensor  # dJ/d(eta logits) the learner applied in its meta step
    logged_grad: torch.Tensor  # the same, as reported in the update's stats
    finite_difference: torch.Tensor
    reconstruction_error: float  # |theta'(eta) rebuilt here - the learner's new parameters|
    objective_mismatch: float  # |J with frozen targets - learner.meta_objective| at theta'


@functools.cache
def meta_gradient_case(objective: str, grad_mode: str, step: float = 1e-4) -> MetaGradientCase:
    """Three updates on synthetic rollouts; the meta step of update 2 differentiates update 1's inner step.

    update 0 (tau_0): inner step only, nothing to meta-learn yet (it gives RMSProp a non-zero state);
    update 1 (tau_1): meta step for update 0 evaluated on tau_1, then the inner step on tau_1 whose
                      meta-gradient is checked here;
    update 2 (tau_2): meta step for update 1, J evaluated on tau_2.
    """
    config = metagrad_config(
        grad_clip=0.5,  # below the gradient norm: the clip coefficient is part of the update
        meta=MetaConfig(objective=objective, grad_mode=grad_mode, init_gamma=0.9, init_lambda=0.8),
    )
    learner = to_float64(make_learner(config, "gamma_lambda"))
    tau_0, tau_1, tau_2 = (synthetic_rollout(seed, F64) for seed in (10, 11, 12))

    learner.update(tau_0)
    theta = snapshot(learner.net)
    stats = learner.update(tau_1)
    eta_logits = learner.eta_logits.detach().clone()  # the eta update 1's inner step used
    theta_new = snapshot(learner.net)
    # What the meta-gradient treats as constants: learning rate, clip coefficient, RMSProp preconditioner.
    lr = stats["lr"]
    assert lr < config.lr  # linear decay has started
    clip = min(1.0, config.grad_clip / (stats["grad_norm"] + 1e-6))
    assert clip < 1.0
    preconditioner = {
        name: 1.0 / (learner.optimizer.state[p]["square_avg"] + config.rmsprop_eps).sqrt()  # TF RMSProp
        for name, p in learner.net.named_parameters()
    }
    meta_stats = learner.update(tau_2)
    learner_grad = learner.eta_logits.grad.detach().clone()
    logged_grad = torch.tensor(
        [meta_stats["meta/grad_gamma_logit"], meta_stats["meta/grad_lambda_logit"]], dtype=F64
    )

    # theta'(eta): one RMSProp step on L(tau_1, theta, eta). The network's eta input stays at the eta
    # of the step (by design eta reaches the meta-gradient only through the V-trace targets).
    eta_input = torch.sigmoid(eta_logits)
    theta_leaves = {name: p.clone().requires_grad_() for name, p in theta.items()}

    def theta_prime(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        gamma, lambda_ = torch.sigmoid(logits)
        log_probs, entropy, values = unroll_outputs(learner.net, theta_leaves, tau_1, eta_input)
        targets = vtrace_of(tau_1, log_probs, values, gamma, lambda_, config)
        vs, advantages = targets.vs.detach(), targets.pg_advantages.detach()
        loss = (
            -(advantages * log_probs).sum()
            + config.baseline_cost * 0.5 * ((vs - values[:-1]) ** 2).sum()
            - config.entropy_cost * entropy.sum()
        )
        grads = torch.autograd.grad(loss, list(theta_leaves.values()))
        return {
            name: theta[name] - lr * clip * preconditioner[name] * g
            for name, g in zip(theta, grads, strict=True)
        }

    theta_prime_0 = theta_prime(eta_logits)
    reconstruction_error = max((theta_prime_0[n] - theta_new[n]).abs().max().item() for n in theta)

    # J(tau_2, theta', eta_bar). Its targets are constants for the meta-gradient ("targets carry no
    # gradient"), so they are frozen at theta'(eta) here as well.
    gamma_bar, lambda_bar = learner.eta_bar
    with torch.no_grad():
        log_probs_0, _, values_0 = unroll_outputs(learner.net, theta_prime_0, tau_2, learner.eta_bar)
        frozen = vtrace_of(tau_2, log_probs_0, values_0, gamma_bar, lambda_bar, config)

    def meta_objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            log_probs, _, values = unroll_outputs(learner.net, params, tau_2, learner.eta_bar)
        if objective == "policy_gradient":
            return -(frozen.pg_advantages * log_probs).sum()
        return 0.5 * ((frozen.vs - values[:-1]) ** 2).sum()

    with torch.no_grad():
        objective_mismatch = abs(
            meta_objective(theta_prime_0).item() - learner.meta_objective(theta_prime_0, tau_2).item()
        )
    finite_difference = torch.zeros(2, dtype=F64)
    for i in range(2):
        shift = torch.zeros(2, dtype=F64)
        shift[i] = step
        plus = meta_objective(theta_prime(eta_logits + shift))
        minus = meta_objective(theta_prime(eta_logits - shift))
        finite_difference[i] = (plus - minus) / (2 * step)
    return MetaGradientCase(
        learner_grad, logged_grad, finite_difference, reconstruction_error, objective_mismatch
    )


@pytest.mark.parametrize("grad_mode", ["naive", "jvp"])
@pytest.mark.parametrize("objective", ["policy_gradient", "value_error"])
def test_meta_gradient_matches_finite_differences(objective, grad_mode):
    case = meta_gradient_case(objective, grad_mode)
    # the reconstruction is the learner's own update and objective (else the comparison means nothing)
    assert case.reconstruction_error < 1e-12
    assert case.objective_mismatch < 1e-10
    assert torch.all(case.finite_difference.abs() > 1e-6), "degenerate case: a zero meta-gradient"
    torch.testing.assert_close(case.learner_grad, case.finite_difference, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(case.logged_grad, case.learner_grad, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("objective", ["policy_gradient", "value_error"])
def test_naive_and_jvp_meta_gradients_agree(objective):
    naive = meta_gradient_case(objective, "naive").learner_grad
    fast = meta_gradient_case(objective, "jvp").learner_grad
    torch.testing.assert_close(fast, naive, rtol=1e-6, atol=0.0)


def test_meta_objectives_give_different_meta_gradients():
    policy = meta_gradient_case("policy_gradient", "jvp").learner_grad
    value = meta_gradient_case("value_error", "jvp").learner_grad
    assert not torch.allclose(policy, value, rtol=1e-3)


# --------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize(
    ("variant", "learned"), [("impala", ()), ("gamma", ("gamma",)), ("lambda", ("lambda",))]
)
def test_only_the_variants_meta_parameters_change(variant, learned):
    config = metagrad_config(gamma=0.95, lambda_=0.9, meta=MetaConfig(init_gamma=0.99, init_lambda=0.99))
    learner = make_learner(config, variant)
    fixed = {"gamma": config.gamma, "lambda": config.lambda_}
    initial = {"gamma": config.meta.init_gamma, "lambda": config.meta.init_lambda}
    if not learned:
        assert learner.meta_optimizer is None
        assert not learner.eta_logits.requires_grad
    start_logits = learner.eta_logits.detach().clone()

    seen = []
    for seed in range(4):
        stats = learner.update(synthetic_rollout(seed))
        assert all(math.isfinite(v) for v in stats.values())
        assert ("meta/grad_gamma_logit" in stats) == (bool(learned) and seed > 0)
        seen.append({"gamma": stats["gamma"], "lambda": stats["lambda"]})
    final = dict(zip(("gamma", "lambda"), learner.eta().tolist(), strict=True))

    for name in ("gamma", "lambda"):
        index = ("gamma", "lambda").index(name)
        if name in learned:
            assert seen[0][name] == pytest.approx(initial[name], abs=1e-6)
            assert abs(final[name] - initial[name]) > 1e-6, f"{name} was not meta-learned"
            assert learner.eta_logits[index].item() != start_logits[index].item()
        else:
            assert [s[name] for s in seen] == pytest.approx([fixed[name]] * 4, abs=1e-7)
            assert final[name] == pytest.approx(fixed[name], abs=1e-7)
            assert learner.eta_logits[index].item() == start_logits[index].item()
    assert (
        learner.meta_optimizer is None
        or learner.meta_optimizer.param_groups[0]["params"][0] is learner.eta_logits
    )


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="gamma_lambda"):
        make_learner(metagrad_config(), "delta")


# --------------------------------------------------------------------------------------------- training loop
class RecordingTracker:
    """Stands in for the stage's MLflow run."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.flushes = 0

    def queue_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def flush_metrics(self):
        self.flushes += 1


FRAMES_PER_UPDATE = 4 * 5 * 4  # num_envs x unroll x frameskip


def training_config(**overrides) -> MetagradConfig:
    return metagrad_config(
        **{"frames": 4 * FRAMES_PER_UPDATE, "num_envs": 4, "unroll": 5, "checkpoint_every": 2, **overrides}
    )


@dataclass
class TrainedRun:
    config: MetagradConfig
    checkpoint: Path
    result: train_module.VariantResult
    learner: MetaGradientLearner
    tracker: RecordingTracker


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    """One short gamma_lambda run on pong: 4 updates, checkpoints after updates 2 and 4."""
    config = training_config()
    checkpoint = tmp_path_factory.mktemp("train") / "pong_gamma_lambda.pt"
    tracker = RecordingTracker()
    result, learner = train_variant(config, "pong", "gamma_lambda", 0, checkpoint, tracker=tracker)
    return TrainedRun(config, checkpoint, result, learner, tracker)


def copy_checkpoint(run: TrainedRun, folder: Path) -> Path:
    target = folder / run.checkpoint.name
    target.write_bytes(run.checkpoint.read_bytes())
    return target


def test_train_variant_learns_eta_and_checkpoints(trained):
    config, result = trained.config, trained.result
    assert (result.updates, result.frames) == (4, 4 * FRAMES_PER_UPDATE)
    assert result.history.update_frames == [FRAMES_PER_UPDATE * k for k in range(1, 5)]
    metrics = trained.tracker.metrics
    assert [step for step, _ in metrics] == result.history.update_frames
    losses = [m[f"pong.gamma_lambda.loss/{k}"] for _, m in metrics for k in ("total", "policy", "baseline")]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    # the first update has nothing to meta-learn yet; afterwards gamma and lambda move
    assert "pong.gamma_lambda.meta/grad_gamma_logit" not in metrics[0][1]
    assert all("pong.gamma_lambda.meta/grad_gamma_logit" in m for _, m in metrics[1:])
    assert result.history.gammas[0] == pytest.approx(config.meta.init_gamma, abs=1e-6)
    assert result.history.lambdas[0] == pytest.approx(config.meta.init_lambda, abs=1e-6)
    assert abs(result.gamma - config.meta.init_gamma) > 1e-6
    assert abs(result.lambda_ - config.meta.init_lambda) > 1e-8  # moved (meta steps are ~1e-5 at most here)
    assert result.gamma == pytest.approx(trained.learner.eta()[0].item())

    assert trained.checkpoint.exists()
    state = torch_load(trained.checkpoint)
    assert (state["updates"], state["frames"], state["done"]) == (4, 4 * FRAMES_PER_UPDATE, True)
    assert state["history"]["gammas"] == result.history.gammas


def test_finished_run_resumes_at_its_end(trained, tmp_path):
    checkpoint = copy_checkpoint(trained, tmp_path)
    again, learner = train_variant(trained.config, "pong", "gamma_lambda", 0, checkpoint)
    assert (again.updates, again.frames) == (4, 4 * FRAMES_PER_UPDATE)  # nothing left to train
    assert again.history == trained.result.history
    torch.testing.assert_close(learner.eta_logits, trained.learner.eta_logits, rtol=0, atol=0)
    for (name, p), q in zip(learner.net.named_parameters(), trained.learner.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


class Killed(Exception):
    pass


def test_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    config = training_config(frames=3 * FRAMES_PER_UPDATE)
    checkpoint = tmp_path / "pong_gamma_lambda.pt"
    original_update = MetaGradientLearner.update
    calls = []

    def dies_in_update_3(self, rollout):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return original_update(self, rollout)

    monkeypatch.setattr(MetaGradientLearner, "update", dies_in_update_3)
    with pytest.raises(Killed):
        train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
    state = torch_load(checkpoint)  # written after update 2
    assert (state["updates"], state["frames"], state["done"]) == (2, 2 * FRAMES_PER_UPDATE, False)
    saved = state["history"]

    monkeypatch.setattr(MetaGradientLearner, "update", original_update)
    result, _ = train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
    assert (result.updates, result.frames) == (3, 3 * FRAMES_PER_UPDATE)
    assert result.history.update_frames == [FRAMES_PER_UPDATE * k for k in range(1, 4)]
    # the earlier entries survive the resume
    assert result.history.gammas[:2] == saved["gammas"]
    assert result.history.lambdas[:2] == saved["lambdas"]
    assert len(result.history.gammas) == 3


def start_of_training(config: MetagradConfig, checkpoint: Path, monkeypatch) -> bool:
    """Run train_variant up to its first rollout (if any is left); True if it resumed from ``checkpoint``."""
    loaded = []
    original_load = MetaGradientLearner.load_state_dict

    def spy(self, state):
        loaded.append(state)
        original_load(self, state)

    def no_actor(*args, **kwargs):
        raise Killed  # training would start here

    with monkeypatch.context() as patch:
        patch.setattr(MetaGradientLearner, "load_state_dict", spy)
        patch.setattr(train_module, "Actor", no_actor)
        try:
            train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
        except Killed:
            pass
    return bool(loaded)


def test_checkpoint_of_other_params_is_not_resumed(trained, tmp_path, monkeypatch):
    checkpoint = copy_checkpoint(trained, tmp_path)
    assert start_of_training(trained.config, checkpoint, monkeypatch) is True  # the spy sees a resume
    for change in ({"lr": 1e-3}, {"gamma": 0.9}, {"num_envs": 2}):
        other = trained.config.model_copy(update=change)
        assert start_of_training(other, checkpoint, monkeypatch) is False, change
    assert torch_load(checkpoint)["updates"] == 4  # untouched: no run got as far as a checkpoint


def test_variant_seed_is_shared_by_variants_and_differs_by_game():
    assert train_module.variant_seed(0, "pong") == train_module.variant_seed(0, "pong")
    assert train_module.variant_seed(0, "pong") != train_module.variant_seed(0, "breakout")
    assert train_module.variant_seed(0, "pong") != train_module.variant_seed(1, "pong")


# --------------------------------------------------------------------------------------------- stage script
STAGE_FRAMES = 1280  # 20 updates of 4 envs x 4 steps x 4 frames per variant


def write_params(path: Path, **metagrad) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["metagrad"].update(metagrad)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(params: Path, output_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        "PIPELINE_LOG_LEVEL": "WARNING",
        "PIPELINE_RUN_ID": "test-metagrad",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "metagrad.py"),
            "--params",
            str(params),
            "--output-root",
            str(output_root),
        ],
        cwd=cwd,  # MLflow puts the artifacts of a sqlite store under the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_stage_script_writes_models_metrics_and_curves(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(
        tmp_path / "params.yaml",
        frames=STAGE_FRAMES,
        num_envs=4,
        unroll=4,
        device="cpu",
        env={"frameskip": 4, "stack": 4, "noop_max": 30, "max_episode_frames": 108000, "env_threads": 1},
    )
    out = tmp_path / "out"
    done = run_stage(params, out, work)
    assert done.returncode == 0, done.stderr[-3000:]

    updates = STAGE_FRAMES // (4 * 4 * 4)
    for variant in ("impala", "gamma_lambda"):
        model = torch_load(out / "models/metagrad/pong" / f"{variant}.pt")
        assert (model["game"], model["variant"], model["frames"]) == ("pong", variant, STAGE_FRAMES)
        net = AtariActorCritic(model["num_actions"], model["network"], model["stack"], model["embedding_dim"])
        net.load_state_dict(model["state_dict"])
    assert torch_load(out / "models/metagrad/pong/impala.pt")["eta"] == pytest.approx([0.99, 1.0])

    metrics = json.loads((out / "metrics/metagrad.json").read_text())
    assert set(metrics["pong"]) == {"impala", "gamma_lambda"}
    for variant, entry in metrics["pong"].items():
        assert (entry["frames"], entry["updates"]) == (STAGE_FRAMES, updates), variant
    assert (metrics["pong"]["impala"]["gamma"], metrics["pong"]["impala"]["lambda"]) == pytest.approx(
        (0.99, 1.0)
    )
    assert metrics["pong"]["gamma_lambda"]["gamma"] != pytest.approx(0.99, abs=1e-7)
    run_id = metrics["mlflow_run_id"]
    with sqlite3.connect(work / "mlflow.db") as db:
        status = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchall()
    assert status == [("FINISHED",)]

    plots = out / "plots/metagrad"
    for variant in ("impala", "gamma_lambda"):
        columns, rows = read_rows(plots / f"eta_pong_{variant}.csv")
        assert columns == ["frames", "gamma", "lambda"]
        assert [int(r["frames"]) for r in rows] == [64 * k for k in range(1, updates + 1)]
        columns, rows = read_rows(plots / f"returns_pong_{variant}.csv")
        assert columns == ["frames", "episode_return"]
    _, impala_rows = read_rows(plots / "eta_pong_impala.csv")
    assert all(float(r["gamma"]) == pytest.approx(0.99) and float(r["lambda"]) == 1.0 for r in impala_rows)
    _, learned_rows = read_rows(plots / "eta_pong_gamma_lambda.csv")
    assert float(learned_rows[-1]["gamma"]) != float(learned_rows[0]["gamma"])
    for name in ("returns_pong.png", "gamma_pong.png", "lambda_pong.png"):
        assert (plots / name).stat().st_size > 0


def test_stage_script_rejects_unknown_game_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(tmp_path / "params.yaml", games=["pongg"])
    out = tmp_path / "out"
    done = run_stage(params, out, work)
    assert done.returncode == 2
    assert "metagrad.games" in done.stderr and "pong" in done.stderr
    assert not out.exists()
    assert list(work.iterdir()) == []


def test_tf_rmsprop_matches_its_formula_and_starts_its_accumulator_at_one():
    from pipeline.metagrad.optim import TFRMSprop

    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = TFRMSprop([param], lr=0.1, alpha=0.9, eps=0.01)
    expected, square_avg = param.detach().clone(), torch.ones(3, dtype=torch.float64)
    for step in range(3):
        grad = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64) * (step + 1)
        param.grad = grad.clone()
        optimizer.step()
        square_avg = 0.9 * square_avg + 0.1 * grad**2
        expected = expected - 0.1 * grad / torch.sqrt(square_avg + 0.01)
        assert torch.allclose(param.detach(), expected)
        assert torch.allclose(optimizer.preconditioner(param), 1.0 / torch.sqrt(square_avg + 0.01))
    state = optimizer.state_dict()
    fresh = TFRMSprop([torch.nn.Parameter(param.detach().clone())], lr=0.1, alpha=0.9, eps=0.01)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.state_dict()["state"][0]["square_avg"], square_avg)


def test_curves_command_reads_checkpoints_of_a_stopped_run(trained, tmp_path):
    """`python -m pipeline curves` renders a run's curves from its checkpoints, without its outputs."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    copy_checkpoint(trained, folder)
    (folder / "run.json").write_text("{}")  # the stage's run file sits beside the checkpoints
    histories = checkpoint_histories(folder)
    assert list(histories) == ["pong"] and list(histories["pong"]) == ["gamma_lambda"]
    assert histories["pong"]["gamma_lambda"] == trained.result.history

    out = tmp_path / "curves"
    assert cli_main(["curves", str(folder), "--out", str(out)]) == 0
    _, rows = read_rows(out / "eta_pong_gamma_lambda.csv")
    assert [float(r["gamma"]) for r in rows] == pytest.approx(trained.result.history.gammas)
    assert (out / "returns_pong.png").stat().st_size > 0

    assert cli_main(["curves", str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_nature_network_keeps_feature_scale_and_starts_near_uniform():
    """ReLU-gain init: features of random frames keep an O(1) scale (PyTorch's default gives ~0.02),
    and the policy starts almost uniform (policy head gain 0.01)."""
    torch.manual_seed(0)
    obs = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
    net = AtariActorCritic(6, "nature")
    with torch.no_grad():
        features = net.features(obs)
        logits, _ = net.heads(features, torch.tensor([0.99, 1.0]))
    assert features.pow(2).mean().sqrt() > 0.2
    assert logits.abs().max() < 0.05
    layers = [m for m in net.torso.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    biases = [layer.bias.detach() for layer in layers]
    assert len(biases) == 4 and all(float(b.abs().max()) == 0.0 for b in biases)


@pytest.mark.parametrize("variant", ["impala", "gamma_lambda"])
def test_learner_solves_a_contextual_bandit_from_frames(variant):
    """End to end through act -> V-trace -> loss -> RMSProp: a frame with a bright stripe on the left
    pays for action 0, one with the stripe on the right for action 1 (one-step episodes). A sign error,
    a detached policy loss or a stalled optimizer leaves the policy at chance (1/6 here)."""
    config = metagrad_config(num_envs=8, unroll=4)
    learner = make_learner(config, variant, total_updates=1000)
    generator = torch.Generator().manual_seed(1)
    contexts = torch.full((2, 4, 84, 84), 60, dtype=torch.uint8)
    contexts[0, ..., :20] = 200
    contexts[1, ..., -20:] = 200

    for _ in range(100):
        context = torch.randint(0, 2, (5, 8), generator=generator)
        obs = contexts[context]
        steps = [learner.act(obs[t]) for t in range(4)]
        actions = torch.stack([a for a, _ in steps])
        rewards = (actions == context[:4]).float()
        dones = torch.ones(4, 8, dtype=torch.bool)
        learner.update(Rollout(obs, actions, torch.stack([lp for _, lp in steps]), rewards, dones))
    context = torch.arange(256) % 2
    actions, _ = learner.act(contexts[context])
    assert (actions == context).float().mean() > 0.85
