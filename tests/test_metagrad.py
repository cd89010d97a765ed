"""Tests for the metagrad stage: networks, the meta-gradient learner, the training loop and the stage script.

The central test checks the learner's meta-gradient dJ/d(eta logits) against central finite differences
of J(theta'(eta)), in float64, for both gradient modes and both meta-objectives.
"""

from __future__ import annotations

import copy
import functools
import math
import types
from dataclasses import dataclass

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from pipeline.config import AtariEnvConfig, MetaConfig, MetagradConfig
from pipeline.metagrad.learner import MetaGradientLearner, Rollout, lr_factor
from pipeline.nets.atari import OBS_SCALE, AtariActorCritic
from pipeline.rl.losses import impala_loss
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


def features_in_float64(net: AtariActorCritic, obs: torch.Tensor) -> torch.Tensor:
    """AtariActorCritic.features casts frames with .float(); cast them to the network's dtype instead."""
    return net.torso((obs.to(F64) * OBS_SCALE).contiguous(memory_format=torch.channels_last))


def to_float64(learner: MetaGradientLearner) -> MetaGradientLearner:
    """The same learner computing in float64 (for finite differences)."""
    net = learner.net.double()  # in place: the RMSProp optimizer keeps the same Parameter objects
    # a bound method, so that copy.deepcopy of the learner rebinds it to the copied network
    net.features = types.MethodType(features_in_float64, net)
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


# --------------------------------------------------------------------------------------------- IMPALA loss
def test_impala_loss_on_a_2x2_example_worked_by_hand():
    """T = B = 2, baseline cost 0.5, entropy cost 0.01:
    policy   = -sum A log pi = -[(1)(-1) + (-1)(-2) + (2)(-0.5) + (0.5)(-1)] = -(-0.5) = 0.5
    baseline = 0.5 * sum (v_s - V)^2 = 0.5 * (1 + 0 + 4 + 1)                     = 3
    entropy  = -sum H = -(1 + 0.5 + 0.25 + 0.25)                                = -2
    total    = 0.5 + 0.5 * 3 + 0.01 * (-2)                                      = 1.98
    and d total / d log pi = -A, d total / d V = -0.5 (v_s - V), d total / d H = -0.01."""
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]], dtype=F64, requires_grad=True)
    entropy = torch.tensor([[1.0, 0.5], [0.25, 0.25]], dtype=F64, requires_grad=True)
    values = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=F64, requires_grad=True)
    vs = torch.tensor([[1.0, 1.0], [0.0, 4.0]], dtype=F64)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)

    terms = impala_loss(log_probs, entropy, values, vs, advantages, baseline_cost=0.5, entropy_cost=0.01)

    assert terms.policy.item() == pytest.approx(0.5, abs=1e-15)
    assert terms.baseline.item() == pytest.approx(3.0, abs=1e-15)
    assert terms.entropy.item() == pytest.approx(-2.0, abs=1e-15)
    assert terms.total.item() == pytest.approx(1.98, abs=1e-15)
    terms.total.backward()
    torch.testing.assert_close(log_probs.grad, -advantages, rtol=0, atol=1e-15)
    expected_value_grad = torch.tensor([[-0.5, 0.0], [1.0, -0.5]], dtype=F64)
    torch.testing.assert_close(values.grad, expected_value_grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(entropy.grad, torch.full((2, 2), -0.01, dtype=F64), rtol=0, atol=1e-15)


def test_impala_loss_rejects_mismatched_shapes():
    ok = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="values must have the shape of log_probs"):
        impala_loss(ok, ok, torch.zeros(4, 2), ok, ok, 0.5, 0.01)
    with pytest.raises(ValueError, match="time-major"):
        impala_loss(torch.zeros(6), ok, ok, ok, ok, 0.5, 0.01)


# --------------------------------------------------------------------------------------------- meta-gradient
def switch_off_eta_input(net: AtariActorCritic) -> None:
    """Zero weights and a negative bias: the embedding's ReLU outputs 0 and passes no gradient, so the
    outputs and their parameter gradients do not depend on the network's eta input. The meta-gradient
    ignores that input by design (eta reaches J only through the targets); with it switched off, a
    perturbed eta in a copy of the learner changes exactly what the meta-gradient differentiates."""
    with torch.no_grad():
        net.eta_embedding.weight.zero_()
        net.eta_embedding.bias.fill_(-1.0)


def frozen_target_objective(learner: MetaGradientLearner, objective: str, theta_new: dict, rollout: Rollout):
    """J(rollout, theta', eta_bar) with its targets frozen at ``theta_new`` (the meta-gradient treats
    them as constants: "targets carry no gradient")."""
    gamma_bar, lambda_bar = learner.eta_bar
    with torch.no_grad():
        log_probs_0, _, values_0 = unroll_outputs(learner.net, theta_new, rollout, learner.eta_bar)
        frozen = vtrace_of(rollout, log_probs_0, values_0, gamma_bar, lambda_bar, learner.config)

    def meta_objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            log_probs, _, values = unroll_outputs(learner.net, params, rollout, learner.eta_bar)
        if objective == "policy_gradient":
            return -(frozen.pg_advantages * log_probs).sum()
        return 0.5 * ((frozen.vs - values[:-1]) ** 2).sum()

    return meta_objective


@dataclass(frozen=True)
class MetaGradientCase:
    learner_grad: torch.Tensor  # dJ/d(eta logits) the learner applied in its meta step
    logged_grad: torch.Tensor  # the same, as reported in the update's stats
    finite_difference: torch.Tensor  # through the learner's own inner step on deep copies
    replay_error: float  # |theta' of the unperturbed copy - the learner's new parameters|
    clip_coef: float  # of the differentiated inner step


@functools.cache
def meta_gradient_case(
    objective: str, grad_mode: str, grad_clip: float = 0.5, step: float = 1e-3
) -> MetaGradientCase:
    """Three updates on synthetic rollouts; the meta step of update 2 differentiates update 1's inner step.

    update 0 (tau_0): inner step only, nothing to meta-learn yet (it gives RMSProp a non-zero state);
    update 1 (tau_1): meta step for update 0 evaluated on tau_1, then the inner step on tau_1 whose
                      meta-gradient is checked here;
    update 2 (tau_2): meta step for update 1, J evaluated on tau_2.

    The finite differences run update 1's inner step itself (``learner.inner_step``, the code training
    runs) on deep copies of the learner with perturbed eta logits: clipping, learning rate and RMSProp
    are the real ones, nothing is rebuilt here.
    """
    config = metagrad_config(
        grad_clip=grad_clip,  # 0.5: below the gradient norm, clipping binds
        meta=MetaConfig(objective=objective, grad_mode=grad_mode, init_gamma=0.9, init_lambda=0.8),
    )

    def float64_learner() -> MetaGradientLearner:
        learner = to_float64(make_learner(config, "gamma_lambda"))
        switch_off_eta_input(learner.net)
        return learner

    learner = float64_learner()
    tau_0, tau_1, tau_2 = (synthetic_rollout(seed, F64) for seed in (10, 11, 12))
    learner.update(tau_0)
    # A twin (same seed, same steps) in the state update 1's inner step starts from; the learner's own
    # state cannot be copied there (the naive mode's pending graph is not deep-copyable).
    before_inner = float64_learner()
    before_inner.update(tau_0)
    before_inner.meta_step(tau_1)
    stats = learner.update(tau_1)
    theta_new = snapshot(learner.net)
    meta_stats = learner.update(tau_2)
    learner_grad = learner.eta_logits.grad.detach().clone()
    logged_grad = torch.tensor(
        [meta_stats["meta/grad_gamma_logit"], meta_stats["meta/grad_lambda_logit"]], dtype=F64
    )

    def theta_prime(shift: torch.Tensor) -> dict[str, torch.Tensor]:
        perturbed = copy.deepcopy(before_inner)
        with torch.no_grad():
            perturbed.eta_logits += shift
        perturbed.inner_step(tau_1)
        return snapshot(perturbed.net)

    replayed = theta_prime(torch.zeros(2, dtype=F64))
    replay_error = max((replayed[n] - theta_new[n]).abs().max().item() for n in theta_new)

    meta_objective = frozen_target_objective(learner, objective, theta_new, tau_2)
    finite_difference = torch.zeros(2, dtype=F64)
    for i in range(2):
        shift = torch.zeros(2, dtype=F64)
        shift[i] = step
        plus, minus = meta_objective(theta_prime(shift)), meta_objective(theta_prime(-shift))
        finite_difference[i] = (plus - minus) / (2 * step)
    clip_coef = min(1.0, config.grad_clip / (stats["grad_norm"] + 1e-6))
    return MetaGradientCase(learner_grad, logged_grad, finite_difference, replay_error, clip_coef)


@pytest.mark.parametrize("grad_mode", ["naive", "jvp"])
@pytest.mark.parametrize("objective", ["policy_gradient", "value_error"])
def test_meta_gradient_matches_finite_differences_through_the_clipped_update(objective, grad_mode):
    case = meta_gradient_case(objective, grad_mode)
    assert case.replay_error < 1e-13, "the copies must replay the learner's own inner step"
    assert case.clip_coef < 0.9, "clipping must bind for this test to see it"
    assert torch.all(case.finite_difference.abs() > 1e-6), "degenerate case: a zero meta-gradient"
    torch.testing.assert_close(case.learner_grad, case.finite_difference, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(case.logged_grad, case.learner_grad, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("grad_mode", ["naive", "jvp"])
def test_meta_gradient_matches_finite_differences_where_clipping_does_not_bind(grad_mode):
    case = meta_gradient_case("policy_gradient", grad_mode, grad_clip=1e3)
    assert case.replay_error < 1e-13
    assert case.clip_coef == 1.0
    torch.testing.assert_close(case.learner_grad, case.finite_difference, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("objective", ["policy_gradient", "value_error"])
def test_naive_and_jvp_meta_gradients_agree(objective):
    naive = meta_gradient_case(objective, "naive").learner_grad
    fast = meta_gradient_case(objective, "jvp").learner_grad
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=0.0)


def test_meta_objectives_give_different_meta_gradients():
    policy = meta_gradient_case("policy_gradient", "jvp").learner_grad
    value = meta_gradient_case("value_error", "jvp").learner_grad
    assert not torch.allclose(policy, value, rtol=1e-3)


def test_inner_step_is_one_tf_rmsprop_step_on_the_clipped_impala_gradient():
    """The learner's update rebuilt from the test's own outputs, V-trace, loss, clipping and RMSProp."""
    config = metagrad_config(grad_clip=0.5, meta=MetaConfig(init_gamma=0.9, init_lambda=0.8))
    learner = to_float64(make_learner(config, "gamma_lambda"))
    tau_0, tau_1 = (synthetic_rollout(seed, F64) for seed in (10, 11))
    learner.update(tau_0)
    theta = {name: p.clone().requires_grad_() for name, p in snapshot(learner.net).items()}
    square_avg = {
        n: learner.optimizer.state[p]["square_avg"].clone() for n, p in learner.net.named_parameters()
    }
    eta = learner.eta().detach()
    stats = learner.inner_step(tau_1)

    log_probs, entropy, values = unroll_outputs(learner.net, theta, tau_1, eta)
    targets = vtrace_of(tau_1, log_probs, values, eta[0], eta[1], config)
    loss = (
        -(targets.pg_advantages * log_probs).sum()
        + config.baseline_cost * 0.5 * ((targets.vs - values[:-1]) ** 2).sum()
        - config.entropy_cost * entropy.sum()
    )
    grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert stats["grad_norm"] == pytest.approx(norm.item(), rel=1e-12)
    clip = config.grad_clip / (norm + 1e-6)
    assert clip < 0.9
    alpha, eps = config.rmsprop_alpha, config.rmsprop_eps
    for name, p in learner.net.named_parameters():
        clipped = clip * grads[name]
        accumulator = alpha * square_avg[name] + (1 - alpha) * clipped**2
        expected = theta[name] - stats["lr"] * clipped / torch.sqrt(accumulator + eps)
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=0, atol=1e-13)


def test_reusing_the_torso_pass_for_the_tangent_changes_nothing():
    """jvp mode takes the tangent pass from the torso activations of the inner step's forward pass;
    with torch.func.jvp recomputing them instead, five updates (float32, as trained) end the same."""
    config = metagrad_config(grad_clip=0.5, meta=MetaConfig(init_gamma=0.9, init_lambda=0.8))
    runs = []
    for reuse in (True, False):
        learner = make_learner(config, "gamma_lambda")
        assert learner.reuse_torso_pass  # the Nature torso is a chain
        learner.reuse_torso_pass = reuse
        stats = [learner.update(synthetic_rollout(seed)) for seed in range(5)]
        runs.append((snapshot(learner.net), learner.eta_logits.detach().clone(), stats))
    (params, logits, stats), (params_jvp, logits_jvp, stats_jvp) = runs
    # Bit for bit: the tangent pass runs the same convolutions and products as torch.func.jvp.
    assert stats == stats_jvp
    assert torch.equal(logits, logits_jvp)
    for name, p in params.items():
        assert torch.equal(p, params_jvp[name]), name


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
        # the out-of-place, differentiable step the naive meta-gradient takes
        differentiable_grad = grad.clone().requires_grad_()
        stepped = optimizer.stepped(param, param.detach(), differentiable_grad)
        (stepped_derivative,) = torch.autograd.grad(stepped.sum(), differentiable_grad)
        param.grad = grad.clone()
        optimizer.step()
        square_avg = 0.9 * square_avg + 0.1 * grad**2
        expected = expected - 0.1 * grad / torch.sqrt(square_avg + 0.01)
        assert torch.allclose(param.detach(), expected)
        torch.testing.assert_close(stepped.detach(), param.detach(), rtol=1e-15, atol=1e-15)
        preconditioner = 1.0 / torch.sqrt(square_avg + 0.01)
        assert torch.allclose(optimizer.preconditioner(param), preconditioner)
        # d(g P(g))/dg with the accumulator's own dependence on g: P - 0.1 g^2 P^3
        jacobian = preconditioner - 0.1 * grad**2 * preconditioner**3
        torch.testing.assert_close(optimizer.step_jacobian(param), jacobian, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(-stepped_derivative / 0.1, jacobian, rtol=1e-12, atol=0.0)
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


def test_lr_decays_linearly_to_its_floor_through_the_real_updates():
    config = metagrad_config(lr=1e-3, lr_decay=True, lr_final=2.5e-4)
    learner = make_learner(config, "impala", total_updates=4)
    rollout = synthetic_rollout(0)
    seen = []
    for _ in range(6):
        learner.update(rollout)
        seen.append(learner.optimizer.param_groups[0]["lr"])
    # linear from 1e-3 at update 0 to 2.5e-4 at update 4, then flat
    assert seen == pytest.approx([8.125e-4, 6.25e-4, 4.375e-4, 2.5e-4, 2.5e-4, 2.5e-4], rel=1e-12)
    constant = make_learner(metagrad_config(lr=1e-3, lr_decay=False), "impala", total_updates=4)
    constant.update(rollout)
    assert constant.optimizer.param_groups[0]["lr"] == 1e-3


def test_lr_final_zero_is_the_former_decay_to_zero_bit_for_bit():
    config = metagrad_config(lr=6e-4, lr_decay=True)
    total = 31_250
    for update in [*range(0, 50), *range(total - 5, total + 5), 12_345, 2 * total]:
        assert lr_factor(update, total, config) == max(0.0, 1.0 - update / total)


def test_lr_final_must_be_a_floor_of_a_decaying_lr():
    with pytest.raises(ValueError, match=r"lr_final \(0.002\) must be at most lr \(0.001\)"):
        metagrad_config(lr=1e-3, lr_final=2e-3)
    with pytest.raises(ValueError, match="lr_decay is false"):
        metagrad_config(lr=1e-3, lr_decay=False, lr_final=1e-4)
