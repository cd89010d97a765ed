"""Tests for pipeline.rl.returns against slow, literal reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.rl.returns import VTraceReturns, lambda_returns, vtrace

DTYPE = torch.float64
FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------------------


def make_trajectory(
    time_steps: int, batch_size: int, seed: int, episode_ends: bool = True
) -> dict[str, torch.Tensor]:
    """Random float64 trajectory; with ``episode_ends`` some discounts are exactly zero (done = 1)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=DTYPE)

    done_probability = 0.2 if episode_ends else 0.0
    done = torch.rand(time_steps, batch_size, generator=generator, dtype=DTYPE) < done_probability
    gamma = 0.5 + 0.5 * torch.rand(time_steps, batch_size, generator=generator, dtype=DTYPE)
    return {
        "rewards": randn(time_steps, batch_size),
        "discounts": gamma * (~done).to(DTYPE),
        "values": randn(time_steps, batch_size),
        "bootstrap_value": randn(batch_size),
        # Spread wide enough that ratios land on both sides of every clip.
        "log_rhos": 0.8 * randn(time_steps, batch_size),
        "lambdas": torch.rand(time_steps, batch_size, generator=generator, dtype=DTYPE),
    }


shapes = st.tuples(st.integers(1, 7), st.integers(1, 4))
seeds = st.integers(0, 2**31 - 1)
# Lambda given either as a python float, a 0-d tensor, a [T, 1] column or a full [T, B] tensor.
lambda_kinds = st.sampled_from(["float", "scalar_tensor", "per_time", "per_element"])
clips = st.sampled_from([None, 0.5, 1.0, 2.0])


def make_lambda(kind: str, lambdas: torch.Tensor) -> float | torch.Tensor:
    if kind == "float":
        return float(lambdas[0, 0])
    if kind == "scalar_tensor":
        return lambdas[0, 0].clone()
    if kind == "per_time":
        return lambdas[:, :1].clone()
    return lambdas


def as_lists(tensor: torch.Tensor) -> list:
    return tensor.tolist()


# --------------------------------------------------------------------------------------------------------
# Literal references (python floats, nested loops; deliberately not the implementation's recursion)
# --------------------------------------------------------------------------------------------------------


def reference_lambda_returns(rewards, discounts, values, bootstrap_value, lambdas):
    """Lambda-return as the weighted mixture of n-step returns (Sutton & Barto eq. 12.3, per-step lambda).

    The n-step return from t is ``sum_{k<n} (prod_{i<k} d_{t+i}) r_{t+k} + (prod_{i<n} d_{t+i}) v_{t+n}``.
    Its weight is ``(prod_{i=t}^{t+n-2} lambda_i) * (1 - lambda_{t+n-1})``, except the longest one (ending
    at the bootstrap), which takes all the remaining mass ``prod_{i=t}^{T-2} lambda_i``.
    """
    time_steps, batch_size = len(rewards), len(rewards[0])

    def value_at(step, b):
        return values[step][b] if step < time_steps else bootstrap_value[b]

    result = [[0.0] * batch_size for _ in range(time_steps)]
    for b in range(batch_size):
        for t in range(time_steps):
            longest = time_steps - t
            total = 0.0
            for n in range(1, longest + 1):
                n_step_return = 0.0
                discount_product = 1.0
                for k in range(n):
                    n_step_return += discount_product * rewards[t + k][b]
                    discount_product *= discounts[t + k][b]
                n_step_return += discount_product * value_at(t + n, b)

                weight = 1.0
                for i in range(t, t + n - 1):
                    weight *= lambdas[i][b]
                if n < longest:
                    weight *= 1.0 - lambdas[t + n - 1][b]
                total += weight * n_step_return
            result[t][b] = total
    return result


def reference_vtrace(
    log_rhos, discounts, rewards, values, bootstrap_value, lambdas, clip_rho, clip_c, clip_pg_rho
):
    """V-trace via the explicit sum of Espeholt et al. (2018), eq. (1), with per-step discounts and lambda:

    ``v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} d_i c_i) rho_t (r_t + d_t V(x_{t+1}) - V(x_t))``.
    """
    time_steps, batch_size = len(rewards), len(rewards[0])

    def clip(x, bound):
        return x if bound is None else min(bound, x)

    def value_at(step, b):
        return values[step][b] if step < time_steps else bootstrap_value[b]

    vs = [[0.0] * batch_size for _ in range(time_steps)]
    for b in range(batch_size):
        for s in range(time_steps):
            total = value_at(s, b)
            for t in range(s, time_steps):
                trace_product = 1.0
                for i in range(s, t):
                    trace_product *= discounts[i][b] * lambdas[i][b] * clip(math.exp(log_rhos[i][b]), clip_c)
                rho_t = clip(math.exp(log_rhos[t][b]), clip_rho)
                td_error = rewards[t][b] + discounts[t][b] * value_at(t + 1, b) - value_at(t, b)
                total += trace_product * rho_t * td_error
            vs[s][b] = total

    # The advantage bootstraps on lambda * v_{t+1} + (1 - lambda) * V(x_{t+1}) (rlax's
    # vtrace_td_error_and_advantage); at the last step both are V(x_T).
    pg_clip = clip_rho if clip_pg_rho is None else clip_pg_rho
    pg_advantages = [[0.0] * batch_size for _ in range(time_steps)]
    for b in range(batch_size):
        for t in range(time_steps):
            next_vs = vs[t + 1][b] if t + 1 < time_steps else bootstrap_value[b]
            mixed = lambdas[t][b] * next_vs + (1.0 - lambdas[t][b]) * value_at(t + 1, b)
            pg_rho = clip(math.exp(log_rhos[t][b]), pg_clip)
            pg_advantages[t][b] = pg_rho * (rewards[t][b] + discounts[t][b] * mixed - values[t][b])
    return vs, pg_advantages


def assert_close_to_lists(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=DTYPE), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------------


@FAST
@given(shape=shapes, seed=seeds, lambda_kind=lambda_kinds)
def test_lambda_returns_matches_n_step_mixture_reference(shape, seed, lambda_kind):
    traj = make_trajectory(*shape, seed)
    lambda_ = make_lambda(lambda_kind, traj["lambdas"])
    full_lambdas = torch.as_tensor(lambda_, dtype=DTYPE).expand(shape)

    actual = lambda_returns(
        traj["rewards"], traj["discounts"], traj["values"], traj["bootstrap_value"], lambda_
    )

    expected = reference_lambda_returns(
        as_lists(traj["rewards"]),
        as_lists(traj["discounts"]),
        as_lists(traj["values"]),
        as_lists(traj["bootstrap_value"]),
        as_lists(full_lambdas),
    )
    assert actual.shape == shape
    assert_close_to_lists(actual, expected)


@FAST
@given(shape=shapes, seed=seeds, lambda_kind=lambda_kinds, clip_rho=clips, clip_c=clips, clip_pg_rho=clips)
def test_vtrace_matches_explicit_sum_reference(shape, seed, lambda_kind, clip_rho, clip_c, clip_pg_rho):
    traj = make_trajectory(*shape, seed)
    lambda_ = make_lambda(lambda_kind, traj["lambdas"])
    full_lambdas = torch.as_tensor(lambda_, dtype=DTYPE).expand(shape)

    actual = vtrace(
        traj["log_rhos"],
        traj["discounts"],
        traj["rewards"],
        traj["values"],
        traj["bootstrap_value"],
        lambda_,
        clip_rho,
        clip_c,
        clip_pg_rho,
    )

    expected_vs, expected_pg = reference_vtrace(
        as_lists(traj["log_rhos"]),
        as_lists(traj["discounts"]),
        as_lists(traj["rewards"]),
        as_lists(traj["values"]),
        as_lists(traj["bootstrap_value"]),
        as_lists(full_lambdas),
        clip_rho,
        clip_c,
        clip_pg_rho,
    )
    assert isinstance(actual, VTraceReturns)
    assert actual.vs.shape == shape and actual.pg_advantages.shape == shape
    assert_close_to_lists(actual.vs, expected_vs)
    assert_close_to_lists(actual.pg_advantages, expected_pg)


# --------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------


@FAST
@given(shape=shapes, seed=seeds, lambda_kind=lambda_kinds, clip=st.sampled_from([None, 1.0, 3.0]))
def test_on_policy_vtrace_equals_lambda_returns(shape, seed, lambda_kind, clip):
    traj = make_trajectory(*shape, seed)
    lambda_ = make_lambda(lambda_kind, traj["lambdas"])
    on_policy = torch.zeros(shape, dtype=DTYPE)

    result = vtrace(
        on_policy,
        traj["discounts"],
        traj["rewards"],
        traj["values"],
        traj["bootstrap_value"],
        lambda_,
        clip_rho=clip,
        clip_c=clip,
    )
    returns = lambda_returns(
        traj["rewards"], traj["discounts"], traj["values"], traj["bootstrap_value"], lambda_
    )

    torch.testing.assert_close(result.vs, returns)
    # On-policy the advantage is the lambda-return minus the baseline: g_eta - v in the paper's update.
    torch.testing.assert_close(result.pg_advantages, returns - traj["values"])


def test_on_policy_advantage_is_lambda_return_minus_value_at_lambda_0_8():
    """IMPALA's r + gamma * v_{s+1} - V would be off here: it bootstraps as if lambda were 1."""
    traj = make_trajectory(6, 3, seed=7)
    rewards, discounts, values, bootstrap = (
        traj[key] for key in ("rewards", "discounts", "values", "bootstrap_value")
    )
    result = vtrace(torch.zeros(6, 3, dtype=DTYPE), discounts, rewards, values, bootstrap, lambda_=0.8)
    returns = lambda_returns(rewards, discounts, values, bootstrap, lambda_=0.8)
    torch.testing.assert_close(result.pg_advantages, returns - values, rtol=1e-12, atol=1e-12)
    next_vs = torch.cat([result.vs[1:], bootstrap[None]])
    lambda_one_advantage = rewards + discounts * next_vs - values
    assert not torch.allclose(result.pg_advantages, lambda_one_advantage)


@FAST
@given(shape=shapes, seed=seeds)
def test_lambda_one_is_bootstrapped_discounted_return(shape, seed):
    traj = make_trajectory(*shape, seed)
    rewards, discounts = as_lists(traj["rewards"]), as_lists(traj["discounts"])
    bootstrap_value = as_lists(traj["bootstrap_value"])
    time_steps, batch_size = shape

    expected = [[0.0] * batch_size for _ in range(time_steps)]
    for b in range(batch_size):
        for t in range(time_steps):
            discount_product = 1.0
            for k in range(t, time_steps):
                expected[t][b] += discount_product * rewards[k][b]
                discount_product *= discounts[k][b]
            expected[t][b] += discount_product * bootstrap_value[b]

    actual = lambda_returns(traj["rewards"], traj["discounts"], traj["values"], traj["bootstrap_value"], 1.0)
    assert_close_to_lists(actual, expected)


@FAST
@given(shape=shapes, seed=seeds)
def test_lambda_zero_is_one_step_td_target(shape, seed):
    traj = make_trajectory(*shape, seed)
    next_values = torch.cat([traj["values"][1:], traj["bootstrap_value"][None]])

    actual = lambda_returns(traj["rewards"], traj["discounts"], traj["values"], traj["bootstrap_value"], 0.0)
    torch.testing.assert_close(actual, traj["rewards"] + traj["discounts"] * next_values)


def test_float_and_tensor_lambda_agree():
    traj = make_trajectory(5, 3, seed=0)
    args = (traj["rewards"], traj["discounts"], traj["values"], traj["bootstrap_value"])
    from_float = lambda_returns(*args, 0.7)
    from_scalar_tensor = lambda_returns(*args, torch.tensor(0.7, dtype=DTYPE))
    from_full_tensor = lambda_returns(*args, torch.full((5, 3), 0.7, dtype=DTYPE))
    torch.testing.assert_close(from_float, from_scalar_tensor)
    torch.testing.assert_close(from_float, from_full_tensor)


# --------------------------------------------------------------------------------------------------------
# Gradients (finite differences via gradcheck, float64)
# --------------------------------------------------------------------------------------------------------


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("lambda_kind", ["scalar_tensor", "per_time", "per_element"])
def test_lambda_returns_gradcheck_rewards_discounts_lambda(lambda_kind):
    traj = make_trajectory(6, 3, seed=1)
    lambda_ = leaf(make_lambda(lambda_kind, traj["lambdas"]))
    inputs = (leaf(traj["rewards"]), leaf(traj["discounts"]), lambda_)

    def fn(rewards, discounts, lambda_):
        return lambda_returns(rewards, discounts, traj["values"], traj["bootstrap_value"], lambda_)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("lambda_kind", ["scalar_tensor", "per_time", "per_element"])
def test_vtrace_gradcheck_rewards_discounts_lambda(lambda_kind):
    traj = make_trajectory(6, 3, seed=2)
    lambda_ = leaf(make_lambda(lambda_kind, traj["lambdas"]))
    inputs = (leaf(traj["rewards"]), leaf(traj["discounts"]), lambda_)

    def fn(rewards, discounts, lambda_):
        result = vtrace(
            traj["log_rhos"],
            discounts,
            rewards,
            traj["values"],
            traj["bootstrap_value"],
            lambda_,
            clip_rho=1.0,
            clip_c=1.0,
        )
        return result.vs, result.pg_advantages

    assert torch.autograd.gradcheck(fn, inputs)


def test_meta_gradients_through_learned_gamma_and_scalar_lambda():
    """discounts = gamma * (1 - done) with a 0-d learned gamma, and a 0-d learned lambda."""
    traj = make_trajectory(7, 2, seed=3)
    done = (traj["discounts"] == 0).to(DTYPE)
    assert done.any(), "the seed should give at least one episode end"
    gamma = torch.tensor(0.9, dtype=DTYPE, requires_grad=True)
    lambda_ = torch.tensor(0.8, dtype=DTYPE, requires_grad=True)

    def returns_fn(gamma, lambda_):
        return lambda_returns(
            traj["rewards"],
            gamma * (1 - done),
            traj["values"],
            traj["bootstrap_value"],
            lambda_,
            stop_value_gradients=True,
        )

    def vtrace_fn(gamma, lambda_):
        result = vtrace(
            traj["log_rhos"],
            gamma * (1 - done),
            traj["rewards"],
            traj["values"],
            traj["bootstrap_value"],
            lambda_,
        )
        return result.vs, result.pg_advantages

    assert torch.autograd.gradcheck(returns_fn, (gamma, lambda_))
    assert torch.autograd.gradcheck(vtrace_fn, (gamma, lambda_))


def test_lambda_returns_value_gradients_when_not_stopped():
    traj = make_trajectory(5, 3, seed=4)
    inputs = (leaf(traj["values"]), leaf(traj["bootstrap_value"]))

    def fn(values, bootstrap_value):
        return lambda_returns(
            traj["rewards"], traj["discounts"], values, bootstrap_value, 0.6, stop_value_gradients=False
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_vtrace_value_gradients_when_not_stopped():
    traj = make_trajectory(5, 3, seed=5)
    inputs = (leaf(traj["values"]), leaf(traj["bootstrap_value"]))

    def fn(values, bootstrap_value):
        result = vtrace(
            traj["log_rhos"],
            traj["discounts"],
            traj["rewards"],
            values,
            bootstrap_value,
            0.6,
            stop_value_gradients=False,
        )
        return result.vs, result.pg_advantages

    assert torch.autograd.gradcheck(fn, inputs)


def assert_no_gradient(tensor: torch.Tensor) -> None:
    assert tensor.grad is None or torch.count_nonzero(tensor.grad) == 0


def assert_some_gradient(tensor: torch.Tensor) -> None:
    assert tensor.grad is not None and torch.count_nonzero(tensor.grad) > 0


# The stop-gradient tests use trajectories without episode ends: a zero final discount would cut the
# bootstrap value off by itself and make "no gradient" pass vacuously.  Each test also runs the same
# inputs with the stop switched off as a control that gradients do exist there.


@pytest.mark.parametrize("stop_value_gradients", [True, False])
def test_stop_value_gradients_lambda_returns(stop_value_gradients):
    traj = make_trajectory(5, 3, seed=6, episode_ends=False)
    rewards, values = leaf(traj["rewards"]), leaf(traj["values"])
    bootstrap_value = leaf(traj["bootstrap_value"])

    returns = lambda_returns(
        rewards, traj["discounts"], values, bootstrap_value, 0.9, stop_value_gradients=stop_value_gradients
    )
    returns.sum().backward()

    assert_some_gradient(rewards)
    check_values = assert_no_gradient if stop_value_gradients else assert_some_gradient
    check_values(values)
    check_values(bootstrap_value)


@pytest.mark.parametrize("stop_value_gradients", [True, False])
def test_vtrace_stop_value_gradients_and_log_rhos_never_get_gradient(stop_value_gradients):
    traj = make_trajectory(5, 3, seed=7, episode_ends=False)
    log_rhos, rewards = leaf(traj["log_rhos"]), leaf(traj["rewards"])
    values, bootstrap_value = leaf(traj["values"]), leaf(traj["bootstrap_value"])

    result = vtrace(
        log_rhos,
        traj["discounts"],
        rewards,
        values,
        bootstrap_value,
        0.9,
        stop_value_gradients=stop_value_gradients,
    )
    (result.vs.sum() + result.pg_advantages.sum()).backward()

    assert_no_gradient(log_rhos)
    assert_some_gradient(rewards)
    check_values = assert_no_gradient if stop_value_gradients else assert_some_gradient
    check_values(values)
    check_values(bootstrap_value)


def test_vtrace_stops_value_gradients_by_default():
    traj = make_trajectory(5, 3, seed=8, episode_ends=False)
    values, bootstrap_value = leaf(traj["values"]), leaf(traj["bootstrap_value"])

    result = vtrace(traj["log_rhos"], traj["discounts"], leaf(traj["rewards"]), values, bootstrap_value)
    (result.vs.sum() + result.pg_advantages.sum()).backward()

    assert_no_gradient(values)
    assert_no_gradient(bootstrap_value)


# --------------------------------------------------------------------------------------------------------
# Shape validation
# --------------------------------------------------------------------------------------------------------

T, B = 4, 3


def good_returns_args() -> dict:
    return {
        "rewards": torch.zeros(T, B),
        "discounts": torch.ones(T, B),
        "values": torch.zeros(T, B),
        "bootstrap_value": torch.zeros(B),
        "lambda_": 0.9,
    }


def good_vtrace_args() -> dict:
    return {
        "log_rhos": torch.zeros(T, B),
        "discounts": torch.ones(T, B),
        "rewards": torch.zeros(T, B),
        "values": torch.zeros(T, B),
        "bootstrap_value": torch.zeros(B),
        "lambda_": 0.9,
    }


BAD_SHAPES = [
    ("discounts", torch.ones(T, B + 1)),
    ("discounts", torch.ones(T + 1, B)),
    ("values", torch.zeros(T - 1, B)),
    ("values", torch.zeros(T * B)),
    ("bootstrap_value", torch.zeros(B + 1)),
    ("bootstrap_value", torch.zeros(1, B)),
    ("lambda_", torch.full((T, B + 1), 0.5)),
    ("lambda_", torch.full((T, B, 1), 0.5)),
]


def test_good_args_are_accepted():
    lambda_returns(**good_returns_args())
    vtrace(**good_vtrace_args())


@pytest.mark.parametrize(("name", "bad_value"), BAD_SHAPES + [("rewards", torch.zeros(T + 1, B))])
def test_vtrace_rejects_bad_shapes(name, bad_value):
    args = good_vtrace_args() | {name: bad_value}
    with pytest.raises(ValueError, match=name):
        vtrace(**args)


@pytest.mark.parametrize(("name", "bad_value"), BAD_SHAPES)
def test_lambda_returns_rejects_bad_shapes(name, bad_value):
    args = good_returns_args() | {name: bad_value}
    with pytest.raises(ValueError, match=name):
        lambda_returns(**args)


@pytest.mark.parametrize("bad_rewards", [torch.zeros(T), torch.zeros(0, B), torch.zeros(T, B, 1)])
def test_lambda_returns_rejects_non_time_major_rewards(bad_rewards):
    args = good_returns_args() | {"rewards": bad_rewards}
    with pytest.raises(ValueError, match="rewards"):
        lambda_returns(**args)


@pytest.mark.parametrize("bad_log_rhos", [torch.zeros(T), torch.zeros(T, B, 1)])
def test_vtrace_rejects_non_time_major_log_rhos(bad_log_rhos):
    args = good_vtrace_args() | {"log_rhos": bad_log_rhos}
    with pytest.raises(ValueError, match="log_rhos"):
        vtrace(**args)


def test_shape_error_message_reports_seen_and_expected_shapes():
    args = good_returns_args() | {"values": torch.zeros(T, B + 2)}
    with pytest.raises(ValueError) as error:
        lambda_returns(**args)
    message = str(error.value)
    assert "values" in message and str((T, B)) in message and str((T, B + 2)) in message
