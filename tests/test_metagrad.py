"""Tests for the metagrad stage: networks, the meta-gradient learner, the training loop and the stage script.

The central test checks the learner's meta-gradient dJ/d(eta logits) against central finite differences
of J(theta'(eta)), in float64, for both gradient modes and both meta-objectives.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from pipeline.config import AtariEnvConfig, MetaConfig, MetagradConfig
from pipeline.metagrad.learner import MetaGradientLearner, Rollout
from pipeline.nets.atari import OBS_SCALE, AtariActorCritic
from pipeline.rl.returns import vtrace

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


# ------------------------------------------------------------------------------ optimizer, init, learning


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
