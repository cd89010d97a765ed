"""The running normaliser: parallel-variance folds equal numpy's moments of all the data seen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.rl.normalizer import MIN_STD, init_moments, normalize, update_moments


@pytest.mark.parametrize("chunks", [[1], [7], [1, 1, 1], [5, 1, 30, 2], [64, 64, 64]])
def test_folding_chunks_gives_numpys_mean_and_variance_of_everything_seen(chunks):
    rng = np.random.default_rng(len(chunks) * 100 + sum(chunks))
    streams, dim = (3, 2), 4  # batch shape [3, 2]: six independent streams
    # per-stream offsets and scales so that mixing the streams up would show
    data = rng.normal(size=(sum(chunks), *streams, dim)) * rng.uniform(0.1, 5, (*streams, dim))
    data += rng.uniform(-10, 10, (*streams, dim))
    state, start = init_moments(streams, dim, dtype=torch.float64), 0
    for size in chunks:
        state = update_moments(state, torch.as_tensor(data[start : start + size], dtype=torch.float64))
        start += size
    assert torch.equal(state.count, torch.full(streams, float(sum(chunks)), dtype=state.count.dtype))
    np.testing.assert_allclose(state.mean.numpy(), data.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(state.var.numpy(), data.var(0), rtol=1e-6, atol=1e-9)


def test_float32_moments_stay_accurate_over_a_long_lifetime():
    """8 192 steps folded 64 at a time in float32 (an EPG lifetime) against float64 numpy."""
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 0.5, size=(8192, 5, 3))
    state = init_moments((5,), 3)
    for chunk in np.split(data, 128):
        state = update_moments(state, torch.as_tensor(chunk, dtype=torch.float32))
    np.testing.assert_allclose(state.mean.numpy(), data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(state.var.numpy(), data.var(0), rtol=1e-3)


def test_normalised_data_has_zero_mean_and_unit_std_and_the_fresh_state_is_the_identity():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(5.0, 2.0, size=(500, 4, 3)), dtype=torch.float32)
    fresh = init_moments((4,), 3)
    assert torch.equal(normalize(fresh, x), x)
    state = update_moments(fresh, x)
    z = normalize(state, x)
    assert z.mean(0).abs().max() < 1e-4
    assert (z.std(0, correction=0) - 1).abs().max() < 1e-4


def test_std_is_floored_so_constant_features_are_not_blown_up():
    x = torch.zeros(10, 2, 1) + 3.0
    x[:, 1] += torch.linspace(-1, 1, 10).unsqueeze(-1)
    state = update_moments(init_moments((2,), 1), x)
    z = normalize(state, x + 0.5)
    assert torch.allclose(z[:, 0], torch.full((10, 1), 0.5 / MIN_STD))  # constant stream: floor
    assert torch.allclose(z[:, 1], (x[:, 1] + 0.5 - 3.0) / x[:, 1].std(0, correction=0))


def test_no_gradient_flows_into_the_moments_but_normalize_is_differentiable():
    x = torch.randn(8, 2, 3, requires_grad=True)
    state = update_moments(init_moments((2,), 3), x)
    assert not state.mean.requires_grad and not state.var.requires_grad
    normalize(state, x).sum().backward()
    assert torch.allclose(x.grad, (1 / state.var.clamp_min(MIN_STD**2).sqrt()).expand_as(x))


def test_wrong_shapes_are_rejected():
    with pytest.raises(ValueError, match="time-major"):
        update_moments(init_moments((4,), 3), torch.zeros(4, 3))
