"""The numpy Kalman filter equals KalmanForecaster.one_step (the torch filter, itself checked
against statsmodels), whole, in chunks that split gaps and missing stretches, and sample by
sample; the steady-state blocked solve equals the step-by-step recursion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.models.kalman import KalmanForecaster
from tsssm.scoring import kalman_steady
from tsssm.scoring.kalman_steady import KalmanSteadyFilter

STRUCTURES = {
    "level-trend": dict(components=("level", "trend")),
    "level": dict(components=("level",)),
    "trig-seasonal": dict(components=("level", "seasonal"), seasonal_period=12),
    "dummy-seasonal": dict(components=("level", "seasonal"), seasonal_period=7,
                           seasonal_kind="dummy"),
    "ar2": dict(components=("level", "ar"), ar_order=2),
}


def model(structure: str, channels: int = 3, seed: int = 0) -> KalmanForecaster:
    torch.manual_seed(seed)
    m = KalmanForecaster(channels, **STRUCTURES[structure]).eval()
    with torch.no_grad():
        m.theta.add_(0.7 * torch.randn_like(m.theta))
        m.prior_mean.normal_()
    return m


def data(rows: int, channels: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((rows, channels)).cumsum(0) * 0.1 + rng.standard_normal(
        (rows, channels))
    y[rng.random(y.shape) < 0.01] = np.nan  # scattered missing entries
    y[700:720] = np.nan  # a stretch with nothing observed
    y[1500:1540, 1] = np.nan  # one channel out for a while
    return y


def torch_moments(m, y):
    with torch.no_grad():
        g, state = m.one_step(torch.from_numpy(y)[None])
    return g.mean[0].numpy(), g.var[0].numpy(), state


@pytest.mark.parametrize("structure", STRUCTURES)
def test_equals_the_torch_filter(structure):
    m = model(structure)
    y = data(3000)
    mean, var, state = torch_moments(m, y)
    f = KalmanSteadyFilter.from_forecaster(m)
    assert f.steady is not None
    got_mean, got_var = f.filter(y)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got_var, var, rtol=1e-9, atol=1e-12)
    end = f.get_state()  # the state carries on as the torch filter's does
    np.testing.assert_allclose(end.mean, state.mean[0].numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(end.cov, state.cov[0].numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("cuts", [[1, 2, 3], [699, 701, 719, 721], [64, 2048, 2049],
                                  list(range(0, 3000, 97))])
def test_chunks_and_steps_equal_one_pass(cuts):
    m = model("level-trend")
    y = data(3000)
    f = KalmanSteadyFilter.from_forecaster(m)
    whole = f.filter(y)[0]
    f.reset()
    edges = [0, *cuts, len(y)]
    chunked = np.concatenate([f.filter(y[a:b])[0] for a, b in zip(edges, edges[1:]) if b > a])
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)
    f.reset()
    steps = np.stack([f.step(row)[0] for row in y[:1000]])
    np.testing.assert_allclose(steps, whole[:1000], rtol=1e-12, atol=1e-12)


def test_blocked_solve_equals_the_recursion(monkeypatch):
    """At the fixed point long runs are solved in blocks; forcing steps everywhere agrees."""
    m = model("trig-seasonal")
    rng = np.random.default_rng(5)
    y = rng.standard_normal((20_000, 3))  # fully observed: one long steady run
    f = KalmanSteadyFilter.from_forecaster(m)
    blocked = f.filter(y)[0]
    monkeypatch.setattr(kalman_steady, "BLOCK", 10**9)  # no block fits: step by step
    f2 = KalmanSteadyFilter.from_forecaster(m)
    stepped = f2.filter(y)[0]
    np.testing.assert_allclose(blocked, stepped, rtol=1e-10, atol=1e-10)


def test_continues_from_a_torch_state():
    m = model("ar2")
    y = data(1200)
    _, _, state = torch_moments(m, y[:800])
    want, _, _ = torch_moments(m, y)
    with torch.no_grad():
        g, _ = m.one_step(torch.from_numpy(y[800:])[None], state)
    f = KalmanSteadyFilter.from_forecaster(m)
    f.set_state(kalman_steady.FilterState(state.mean[0].numpy(), state.cov[0].numpy()))
    np.testing.assert_allclose(f.filter(y[800:])[0], g.mean[0].numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(f.filter(y[:0])[0], np.empty((0, 3)))


def test_without_a_fixed_point_every_step_is_exact():
    """A model whose Riccati recursion has no usable fixed point runs the full recursion."""
    m = model("level")
    f = KalmanSteadyFilter.from_forecaster(m)
    f.steady = None  # as if the DARE had no stable solution
    y = data(800)
    np.testing.assert_allclose(f.filter(y)[0], torch_moments(m, y)[0], rtol=1e-9, atol=1e-10)
