"""The window filter (tsssm.kalman.window): every output and every gradient equal the sequential
filter's on random structural and random dense models, for every batch layout it folds, at the
edge lengths; anything it does not cover runs the sequential filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.errors import NumericalError
from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.parallel import invariant_filtered_covariances
from tsssm.kalman.window import WINDOW_MAX_STEPS, window_applies, window_predictions

DT = torch.float64
STRUCTURES = [
    dict(components=("level", "seasonal"), seasonal_period=24, seasonal_kind="trig",
         seasonal_harmonics=4),
    dict(components=("level", "trend")),
    dict(components=("level", "seasonal", "ar"), seasonal_period=12, seasonal_kind="trig",
         seasonal_harmonics=3, ar_order=1),
    dict(components=("level", "seasonal"), seasonal_period=4, seasonal_kind="dummy"),
    dict(components=("level", "damped")),
]


def _structural(spec: dict, channels: int, seed: int) -> tuple[StructuralModel, torch.Tensor]:
    st = StructuralModel(prior_scale=10.0, **spec)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(channels, st.n_params, dtype=DT, generator=g) * 0.7 - 1.5
    return st, theta.requires_grad_()


def _ssm(st: StructuralModel, theta: torch.Tensor, m0: torch.Tensor) -> LinearGaussianSSM:
    F, Q = st.transition(theta)
    _, P0 = st.default_prior(theta, F, Q, variance=torch.full((theta.shape[0],), 3.0,
                                                               dtype=DT))
    return st.to_ssm(theta, m0, P0)


def _loss(res) -> torch.Tensor:
    """A scalar that depends on every output (weights break symmetries)."""
    w = torch.linspace(0.5, 1.5, res.predicted_obs_mean.shape[-2], dtype=DT)
    return (res.loglik.sum() + (res.predicted_obs_mean[..., 0] * w).sum()
            + (res.filtered_mean * 0.3).sum() + res.filtered_cov.sum()
            + res.predicted_cov.sum() + (res.predicted_obs_cov[..., 0, 0] * w).sum()
            + res.nis.sum())


def _assert_same(a, b) -> None:
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        if x.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            assert torch.isfinite(y).all(), name
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("spec", STRUCTURES, ids=lambda s: "+".join(s["components"]))
@pytest.mark.parametrize("covariances", ["all", "last"])
def test_equals_sequential_on_structural_models(spec, covariances):
    C, B, T = 3, 4, 37
    st, theta = _structural(spec, C, seed=1)
    m0 = torch.randn(C, st.n_states, dtype=DT, generator=torch.Generator().manual_seed(2))
    m0.requires_grad_()
    y = torch.randn(B, C, T, 1, dtype=DT, generator=torch.Generator().manual_seed(3)) * 2
    y.requires_grad_()
    out = {}
    for method in ("sequential", "window"):
        res = kalman_filter(_ssm(st, theta, m0), y, method=method, covariances=covariances)
        grads = torch.autograd.grad(_loss(res), (theta, m0, y))
        out[method] = res, grads
    _assert_same(out["sequential"][0], out["window"][0])
    for gs, gw, name in zip(out["sequential"][1], out["window"][1], ("theta", "m0", "y")):
        assert torch.isfinite(gw).all(), name
        torch.testing.assert_close(gw, gs, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("seed", range(4))
def test_equals_sequential_on_random_dense_models(oracle, seed):
    """Dense F, Q, P0 (nothing structural), the model batch leading or trailing the series."""
    rng = np.random.default_rng(seed)
    n, T = 4, 23
    F = oracle.t64(rng.normal(size=(2, n, n)) / np.sqrt(n))
    H = oracle.t64(rng.normal(size=(2, 1, n)))
    Q, P0 = oracle.t64(oracle.random_spd(rng, n, 2)), oracle.t64(oracle.random_spd(rng, n, 2))
    R = oracle.t64(rng.uniform(0.1, 1.0, size=(2, 1, 1)))
    m0 = oracle.t64(rng.normal(size=(2, n)))
    params = [x.requires_grad_() for x in (F, H, Q, R, m0, P0)]
    for shape in [(5, 2, T, 1), (2, T, 1), (1, 2, T, 1), (3, 1, 2, T, 1)]:
        y = oracle.t64(rng.normal(size=shape))
        out = {}
        for method in ("sequential", "window"):
            res = kalman_filter(LinearGaussianSSM(*params), y, method=method)
            out[method] = res, torch.autograd.grad(_loss(res), params)
        _assert_same(out["sequential"][0], out["window"][0])
        names = ["F", "H", "Q", "R", "m0", "P0"]
        for name, gs, gw in zip(names, out["sequential"][1], out["window"][1]):
            if name in ("Q", "R", "P0"):  # symmetric inputs: the gradient of a function of
                gs, gw = (0.5 * (g + g.mT) for g in (gs, gw))  # (X + X')/2, both conventions
            torch.testing.assert_close(gw, gs, rtol=1e-8, atol=1e-9, msg=name)


def test_per_series_prior_and_short_windows(oracle):
    """A prior per series (a carried state: the covariances then have the series' batch) and
    the lengths 1 and 2 (no doubling, one doubling)."""
    rng = np.random.default_rng(7)
    st, theta = _structural(STRUCTURES[0], 2, seed=4)
    P0 = oracle.t64(oracle.random_spd(rng, st.n_states, 3, 2))  # (B, C, n, n)
    m0 = oracle.t64(rng.normal(size=(3, 2, st.n_states)))
    for T in (1, 2, 3, 17):
        y = oracle.t64(rng.normal(size=(3, 2, T, 1)))
        a = kalman_filter(st.to_ssm(theta, m0, P0), y, method="sequential")
        b = kalman_filter(st.to_ssm(theta, m0, P0), y, method="window")
        _assert_same(a, b)
        ga = torch.autograd.grad(_loss(a), theta)[0]
        gb = torch.autograd.grad(_loss(b), theta)[0]
        torch.testing.assert_close(gb, ga, rtol=1e-8, atol=1e-9)


def test_window_predictions_are_the_filter_outputs():
    st, theta = _structural(STRUCTURES[2], 3, seed=5)
    m0 = torch.zeros(3, st.n_states, dtype=DT)
    y = torch.randn(6, 3, 30, 1, dtype=DT, generator=torch.Generator().manual_seed(6))
    res = kalman_filter(_ssm(st, theta, m0), y, method="sequential", covariances="last")
    win = window_predictions(_ssm(st, theta, m0), y)
    torch.testing.assert_close(win.predicted_obs_mean, res.predicted_obs_mean[..., 0])
    torch.testing.assert_close(win.predicted_obs_var.expand(6, 3, 30),
                               res.predicted_obs_cov[..., 0, 0])
    torch.testing.assert_close(win.innovation, res.innovation[..., 0])
    torch.testing.assert_close(win.filtered_mean, res.filtered_mean[..., -1, :])
    torch.testing.assert_close(win.filtered_cov.expand(6, 3, -1, -1),
                               res.filtered_cov[..., -1, :, :])
    torch.testing.assert_close(win.loglik, res.loglik)
    gw = torch.autograd.grad(win.loglik.sum() + win.predicted_obs_mean.sum(), theta)[0]
    gs = torch.autograd.grad(res.loglik.sum() + res.predicted_obs_mean.sum(), theta)[0]
    torch.testing.assert_close(gw, gs, rtol=1e-8, atol=1e-9)


def test_what_it_does_not_cover_runs_sequentially():
    st, theta = _structural(STRUCTURES[0], 2, seed=8)
    ssm = _ssm(st, theta, torch.zeros(2, st.n_states, dtype=DT))
    y = torch.randn(3, 2, 20, 1, dtype=DT)
    assert window_applies(ssm, y)
    missing = y.clone()
    missing[0, 1, 5] = missing[2, 0, 0] = float("nan")
    assert not window_applies(ssm, missing)
    _assert_same(kalman_filter(ssm, missing), kalman_filter(ssm, missing, method="window"))
    # too long, time-varying, intercepts: not covered, same numbers from the sequential filter
    long = torch.randn(1, 2, WINDOW_MAX_STEPS + 1, 1, dtype=DT)
    assert not window_applies(ssm, long)
    tv = ssm._replace(R=ssm.R.unsqueeze(-3).expand(2, 20, 1, 1), time_varying=("R",))
    assert not window_applies(tv, y)
    _assert_same(kalman_filter(tv, y), kalman_filter(tv, y, method="window"))
    with_d = ssm._replace(d=torch.ones(2, 1, dtype=DT))
    assert not window_applies(with_d, y)
    _assert_same(kalman_filter(with_d, y), kalman_filter(with_d, y, method="window"))
    # an infinite value gets the sequential filter's clear error
    bad = y.clone()
    bad[0, 0, 3] = float("inf")
    with pytest.raises(Exception, match="inf"):
        kalman_filter(ssm, bad, method="window")


def test_a_non_positive_innovation_variance_is_a_clear_error():
    st, theta = _structural(STRUCTURES[1], 1, seed=9)
    ssm = _ssm(st, theta, torch.zeros(1, st.n_states, dtype=DT))
    bad = ssm._replace(R=-ssm.R - 10.0 * ssm.P0[..., :1, :1])
    with pytest.raises(NumericalError, match="not positive definite"):
        kalman_filter(bad, torch.randn(2, 1, 10, 1, dtype=DT), method="window")


def test_covariance_doubling_equals_the_riccati_recursion():
    """The doubled elements give the sequential covariance recursion's filtered covariances
    at every step (the data-free half on its own)."""
    st, theta = _structural(STRUCTURES[0], 2, seed=10)
    ssm = _ssm(st, theta, torch.zeros(2, st.n_states, dtype=DT))
    for T in (1, 2, 5, 64, 65, 100):
        P, info = invariant_filtered_covariances(ssm, T)
        assert not bool(info.any())
        ref = kalman_filter(ssm, torch.zeros(2, T, 1, dtype=DT), steady_state=False)
        torch.testing.assert_close(P, ref.filtered_cov, rtol=1e-9, atol=1e-11)
