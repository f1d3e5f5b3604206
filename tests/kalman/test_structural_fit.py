"""Structural EM (damping, AR, the prior), the linear segment path, the multi-step criterion,
calibration and the fast forecast path of the structural Kalman models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsssm.errors import ConfigError
from tsssm.kalman import forecast, kalman_filter, sample
from tsssm.kalman.filter import filtered_last, rows_times
from tsssm.kalman.fit import (
    _linear_em_statistics,
    fit_structural_em,
    fit_structural_lbfgs,
    forecast_maps,
    multistep_mse,
    segments_loglik,
    structural_em_statistics,
    window_moments,
)
from tsssm.kalman.forecast import forecast_observations
from tsssm.kalman.models import StructuralModel, block_em_update
from tsssm.models.kalman import KalmanForecaster

F64 = torch.float64


def _random_prior(n: int, C: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(C, n, n, generator=g, dtype=F64)
    return torch.randn(C, n, generator=g, dtype=F64), A @ A.mT / n + 0.2 * torch.eye(n,
                                                                                    dtype=F64)


def _model() -> StructuralModel:
    return StructuralModel(components=("level", "damped", "seasonal", "ar"), seasonal_period=6,
                           seasonal_harmonics=2, ar_order=2)


def test_damped_trend_matrices_and_forecast_limit():
    m = StructuralModel(components=("level", "damped"))
    assert m.param_names == ("log_var_level", "log_var_trend", "logit_damping", "log_var_obs")
    theta = torch.tensor([-3.0, -4.0, math.log(0.8 / 0.2), -1.0], dtype=F64)
    F, _ = m.transition(theta)
    assert torch.allclose(F, torch.tensor([[1.0, 1.0], [0.0, 0.8]], dtype=F64))
    # from level 2, slope 0.5 the forecast levels off at 2 + 0.5 / (1 - 0.8) = 4.5
    ssm = m.to_ssm(theta)
    mean, _ = forecast_observations(ssm, torch.tensor([2.0, 0.5], dtype=F64),
                                    torch.eye(2, dtype=F64), 400)
    assert mean[-1, 0].item() == pytest.approx(4.5, abs=1e-9)
    with pytest.raises(ConfigError, match="damped"):
        StructuralModel(components=("level", "trend", "damped"))
    with pytest.raises(ConfigError, match="damped"):
        StructuralModel(components=("damped",))


def test_linear_em_statistics_equal_the_filter_and_smoother():
    """The second-moment E-step (cost independent of the number of segments) against the
    general filter + smoother, on a random model and random data."""
    g = torch.Generator().manual_seed(1)
    m = _model()
    C, G, T = 3, 7, 30
    theta = 0.3 * torch.randn(C, m.n_params, generator=g, dtype=F64)
    ssm = m.to_ssm(theta, *_random_prior(m.n_states, C, g))
    y = torch.randn(G, C, T, 1, generator=g, dtype=F64)
    ll_fast, fast = _linear_em_statistics(ssm, y)
    y_gap = y.clone()
    y_gap[0, 0, 3] = float("nan")  # a missing value takes the general path
    # the general path on the same data: a model with a (constant) time-varying field
    tv = ssm._replace(R=ssm.R.unsqueeze(-3).expand(C, T, 1, 1), time_varying=("R",))
    ll_ref, ref = structural_em_statistics(tv, y)
    assert torch.allclose(ll_fast, ll_ref, rtol=1e-11)
    for key in ref:
        assert torch.allclose(fast[key].expand_as(ref[key]), ref[key], rtol=1e-10,
                              atol=1e-10), key
    assert torch.allclose(segments_loglik(ssm, y), kalman_filter(ssm, y).loglik.sum(0),
                          rtol=1e-12)
    assert segments_loglik(ssm, y_gap).shape == (C,)


def test_long_segments_take_the_filter_not_the_quadratic_path(monkeypatch):
    """The linear E-step keeps O(T^2 n) maps: a whole stream (one long segment) must take the
    filter + smoother (a 9,405-step SKAB stream took 24 GB before the guard)."""
    from tsssm.kalman import fit as fit_module

    g = torch.Generator().manual_seed(2)
    m = _model()
    ssm = m.to_ssm(0.3 * torch.randn(2, m.n_params, generator=g, dtype=F64),
                   *_random_prior(m.n_states, 2, g))
    short = torch.randn(4, 2, 30, 1, generator=g, dtype=F64)
    long = torch.randn(1, 2, 4000, 1, generator=g, dtype=F64)
    assert fit_module._linear_ok(ssm, short)
    assert not fit_module._linear_ok(ssm, long)
    # a smaller budget sends the short segments to the filter too, with the same statistics
    ll_fast, fast = structural_em_statistics(ssm, short)
    monkeypatch.setattr(fit_module, "LINEAR_PATH_MAX_BYTES", 1)
    ll_ref, ref = structural_em_statistics(ssm, short)
    assert torch.allclose(ll_fast, ll_ref, rtol=1e-10)
    for key in ref:
        assert torch.allclose(fast[key].expand_as(ref[key]), ref[key], rtol=1e-9,
                              atol=1e-9), key


def test_segments_loglik_gradient_matches_the_filter():
    g = torch.Generator().manual_seed(2)
    m = _model()
    theta = (0.3 * torch.randn(2, m.n_params, generator=g, dtype=F64)).requires_grad_(True)
    m0, P0 = _random_prior(m.n_states, 2, g)
    y = torch.randn(5, 2, 25, 1, generator=g, dtype=F64)
    (g_fast,) = torch.autograd.grad(segments_loglik(m.to_ssm(theta, m0, P0), y).sum(), theta)
    (g_ref,) = torch.autograd.grad(kalman_filter(m.to_ssm(theta, m0, P0), y).loglik.sum(),
                                   theta)
    assert torch.allclose(g_fast, g_ref, rtol=1e-9, atol=1e-10)


def _simulated(T: int = 6000, seed: int = 3) -> tuple[torch.Tensor, float, float]:
    """One channel: level + damped slope + AR(1) + noise with known damping and AR coefficient."""
    g = torch.Generator().manual_seed(seed)
    phi_d, phi_a = 0.7, 0.6
    m = StructuralModel(components=("level", "damped", "ar"), ar_order=1)
    theta = torch.tensor([math.log(0.01), math.log(0.02), math.log(phi_d / (1 - phi_d)),
                          math.atanh(phi_a), math.log(0.3), math.log(0.1)], dtype=F64)
    x, y = sample(m.to_ssm(theta), T=T, generator=g)
    return y.reshape(1, T, 1), phi_d, phi_a


def test_em_with_damping_and_ar_is_monotone_and_recovers_the_coefficients():
    y, phi_d, phi_a = _simulated()
    model = KalmanForecaster(n_channels=1, components=["level", "damped", "ar"], ar_order=1)
    model.initialize(y)
    history = model.fit_em([y], n_iter=150, tol=0.0, segment=200, fit_prior=True)
    gains = np.diff(history)
    assert (gains >= -1e-9 * np.abs(history[1:])).all(), gains.min()
    assert history[-1] > history[0] + 100
    names = model.param_names
    th = model.theta.detach()[0]
    assert torch.sigmoid(th[names.index("logit_damping")]).item() == pytest.approx(phi_d,
                                                                                   abs=0.15)
    assert math.tanh(th[names.index("pacf_ar1")].item()) == pytest.approx(phi_a, abs=0.15)
    assert bool(model.prior_fitted) and torch.isfinite(model.prior_cov).all()
    assert (torch.linalg.eigvalsh(model.prior_cov) > 0).all()


def test_lbfgs_polish_climbs_past_em():
    y, _, _ = _simulated(T=2000, seed=4)
    model = KalmanForecaster(n_channels=1, components=["level", "damped", "ar"], ar_order=1)
    model.initialize(y)
    history = model.fit_em([y], n_iter=10, segment=40, fit_prior=True, polish_iters=12)
    em_end = history[10]
    assert history[-1] > em_end
    with torch.no_grad():
        segs = y.reshape(50, 40, 1).unsqueeze(1)  # (G, C=1, 40, 1)
        ll = float(segments_loglik(model.ssm(), segs).sum())
    assert ll == pytest.approx(history[-1], rel=1e-9)


def test_ar_update_stays_stationary():
    """A regression that would leave the stationary region is shortened."""
    b = StructuralModel(components=("ar",), ar_order=2).blocks[0]
    theta = torch.tensor([[0.1, 0.0, -1.0]], dtype=F64)
    # statistics of a 'process' with a_t = 1.5 a_{t-1} - 0.2 a_{t-2}: explosive
    S00 = torch.tensor([[[1.0, 0.9], [0.9, 1.0]]], dtype=F64)
    S10 = torch.tensor([[[1.5 - 0.2 * 0.9, 1.0], [1.0, 0.9]]], dtype=F64)
    S11 = 3 * torch.eye(2, dtype=F64)[None]
    new = block_em_update(b, theta, S11, S10, S00, 1.0, torch.tensor([1e-12], dtype=F64))
    F, _ = b.matrices(new)
    assert (torch.linalg.eigvals(F).abs() < 1).all()
    arma = StructuralModel(components=("arma",), ar_order=1, ma_order=1).blocks[0]
    with pytest.raises(ConfigError, match="MA"):
        block_em_update(arma, torch.zeros(1, 3, dtype=F64), S11, S10, S00, 1.0,
                        torch.tensor([1e-12], dtype=F64))


def test_fit_structural_em_and_lbfgs_directly():
    g = torch.Generator().manual_seed(5)
    m = StructuralModel(components=("level", "seasonal"), seasonal_period=4,
                        seasonal_kind="dummy")
    theta = torch.tensor([[-3.0, -4.0, -1.0]], dtype=F64)
    _, y = sample(m.to_ssm(theta[0]), T=800, generator=g)
    segs = [y.reshape(20, 40, 1).unsqueeze(1)]  # (G, C=1, T, 1)
    m0, P0 = torch.zeros(1, m.n_states, dtype=F64), torch.eye(m.n_states, dtype=F64)[None]
    em = fit_structural_em(m, torch.zeros_like(theta) - 2, segs, m0, P0, n_iter=30, tol=0)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(em.history, em.history[1:]))
    lb = fit_structural_lbfgs(m, em.theta, segs, em.m0, em.P0, max_iter=10)
    assert lb.history[-1] >= em.history[-1] - 1e-9


# -------------------------------------------------------------------------------- multi-step


def _seasonal_streams(T: int = 900, C: int = 2, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=F64)
    y = torch.cumsum(0.05 * torch.randn(1, T, C, generator=g, dtype=F64), 1)
    return y + torch.sin(2 * math.pi * t / 12)[None, :, None] + 0.3 * torch.randn(
        1, T, C, generator=g, dtype=F64)


def _windows(y: torch.Tensor, L: int, H: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = range(0, y.shape[1] - L - H + 1, stride)
    ctx = torch.stack([y[0, s : s + L] for s in starts])
    fut = torch.stack([y[0, s + L : s + L + H] for s in starts])
    return ctx, fut


def test_window_moments_give_the_forecast_errors_of_every_window():
    y = _seasonal_streams()
    y[0, 300, 1] = float("nan")  # windows through it are left out for that channel
    model = KalmanForecaster(n_channels=2, components=["level", "seasonal", "ar"],
                             seasonal_period=12, seasonal_harmonics=2, ar_order=1)
    model.initialize(y)
    model.fit_em([y], n_iter=3, segment=48, fit_prior=True)
    L, H, stride = 48, 10, 3
    mom = window_moments([model._channels_as_batch(y)], L, H, stride)
    ssm = model.ssm()
    mse = multistep_mse(forecast_maps(ssm, L, H, ssm.F.shape[:-2]), mom)  # (C, H)
    ctx, fut = _windows(y, L, H, stride)
    fc = model.forecast(ctx.nan_to_num(), H).mean  # (N, H, C) (NaN windows masked below)
    ok = ~(torch.isnan(ctx).any(1) | torch.isnan(fut).any(1))  # (N, C)
    err = (fc - fut.nan_to_num()) ** 2
    ref = torch.stack([err[ok[:, c], :, c].mean(0) for c in range(2)])
    assert torch.allclose(mse, ref, rtol=1e-9)
    assert mom.count.tolist() == ok.sum(0).tolist()


def test_multistep_fit_lowers_the_criterion_and_calibration_matches_the_errors():
    y = _seasonal_streams(T=1500)
    model = KalmanForecaster(n_channels=2, components=["level", "seasonal", "ar"],
                             seasonal_period=12, seasonal_harmonics=2, ar_order=1)
    model.initialize(y)
    model.fit_em([y], n_iter=5, segment=48, fit_prior=True)
    history = model.fit_multistep([y], 48, 24, stride=2, max_iter=40)
    assert history[-1] < history[0]
    scale = model.calibrate([y], 48, 24, stride=1)
    assert scale.shape == (2, 24) and (scale > 0).all()
    ctx, fut = _windows(y, 48, 24, 1)
    fc = model.forecast(ctx, 24)
    z2 = ((fc.mean - fut) ** 2 / fc.var).mean(0)  # (H, C): 1 by construction
    assert torch.allclose(z2, torch.ones_like(z2), rtol=1e-6)
    longer = model.forecast(ctx[:3], 30)  # leads past the calibrated ones use the last factor
    assert torch.isfinite(longer.var).all() and longer.var.shape == (3, 30, 2)


def test_multistep_fit_keeps_its_best_point_when_a_trial_step_leaves_the_valid_models(
        monkeypatch, caplog):
    """A line-search trial that makes the model invalid (the filter's NumericalError, as when
    a variance ratio whose optimum is infinite runs to an overflow) ends the fit at its best
    evaluation, with a warning, instead of failing the whole training; an invalid start is
    still an error. Log-variances stay at or below MULTISTEP_LOG_VAR_MAX."""
    import tsssm.kalman.fit as fit
    from tsssm.errors import NumericalError

    y = _seasonal_streams(T=600)
    model = KalmanForecaster(n_channels=2, components=["level", "ar"])
    model.initialize(y)
    model.fit_em([y], n_iter=3, segment=48, fit_prior=True)
    real, calls = fit.forecast_maps, []

    def failing_after(n):
        def maps(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise NumericalError("the innovation variance is not positive definite")
            return real(*args, **kwargs)
        return maps

    reference = KalmanForecaster(n_channels=2, components=["level", "ar"])
    reference.load_state_dict(model.state_dict())
    full = reference.fit_multistep([y], 48, 12, stride=4, max_iter=6)
    monkeypatch.setattr(fit, "forecast_maps", failing_after(4))
    with caplog.at_level("WARNING", logger="tsssm"):
        history = model.fit_multistep([y], 48, 12, stride=4, max_iter=6)
    assert len(history) == 4 and history == full[:4]  # the same path up to the failure
    assert "multi-step fit: stopped after 4 evaluations" in caplog.text
    # the parameters are those of the best of the 4 evaluations: their criterion is its value
    monkeypatch.setattr(fit, "forecast_maps", real)
    mom = model._window_moments([y], 48, 12, 4)
    with torch.no_grad():
        ssm = model.ssm()
        crit = float(fit.multistep_mse(fit.forecast_maps(ssm, 48, 12, ssm.F.shape[:-2]),
                                       mom).mean())
    assert crit == pytest.approx(min(history), rel=1e-9)
    calls.clear()
    monkeypatch.setattr(fit, "forecast_maps", failing_after(0))
    with pytest.raises(NumericalError, match="at the start of the multi-step fit"):
        model.fit_multistep([y], 48, 12, stride=4, max_iter=6)
    monkeypatch.setattr(fit, "forecast_maps", real)
    with torch.no_grad():  # a log-variance above the bound comes back at the bound
        model.theta[:, model.param_names.index("log_var_level")] = 40.0
    model.fit_multistep([y], 48, 12, stride=4, max_iter=1)
    level = model.theta[:, model.param_names.index("log_var_level")]
    assert (level <= fit.MULTISTEP_LOG_VAR_MAX).all()


def test_diffuse_level_makes_forecasts_move_with_the_data():
    y = _seasonal_streams(T=1200)
    model = KalmanForecaster(n_channels=2, components=["level", "seasonal", "ar"],
                             seasonal_period=12, seasonal_harmonics=2, ar_order=1,
                             diffuse_level=True)
    model.initialize(y)
    model.fit_em([y], n_iter=5, segment=48, fit_prior=True)
    ctx = y[:, 500:548]
    a, b = model.forecast(ctx, 20), model.forecast(ctx + 5.0, 20)
    assert torch.allclose(b.mean, a.mean + 5.0, atol=1e-4)
    assert torch.allclose(a.var, b.var)


# ------------------------------------------------------------------------ fast forecast path


def test_filtered_last_and_forecast_observations_equal_the_library():
    g = torch.Generator().manual_seed(8)
    m = _model()
    theta = 0.3 * torch.randn(3, m.n_params, generator=g, dtype=F64)
    ssm = m.to_ssm(theta, *_random_prior(m.n_states, 3, g))
    y = torch.randn(4, 3, 40, 1, generator=g, dtype=F64)
    res = kalman_filter(ssm, y)
    mean, cov = filtered_last(ssm, y)
    assert torch.allclose(mean, res.filtered_mean[..., -1, :], rtol=1e-10, atol=1e-12)
    assert torch.allclose(cov, res.filtered_cov[..., -1, :, :], rtol=1e-10, atol=1e-12)
    y[1, 2, 5] = float("nan")  # falls back to the filter
    res = kalman_filter(ssm, y)
    mean, cov = filtered_last(ssm, y)
    assert torch.allclose(mean, res.filtered_mean[..., -1, :])
    ref = forecast(ssm, res, 50)
    om, oc = forecast_observations(ssm, res.filtered_mean[..., -1, :],
                                   res.filtered_cov[..., -1, :, :], 50)
    assert torch.allclose(om, ref.obs_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(oc, ref.obs_cov, rtol=1e-10, atol=1e-12)


def test_forecaster_fast_path_equals_the_stepwise_path():
    y = _seasonal_streams(T=400, C=2).float()
    model = KalmanForecaster(n_channels=2, components=["level", "damped", "seasonal", "ar"],
                             seasonal_period=12, seasonal_harmonics=3, ar_order=2)
    model.initialize(y)
    fast = model.forecast(y[:, :96], 30)
    _, state = model.one_step(y[:, :96])
    slow = model.forecast(y[:, :0], 30, state)
    assert torch.allclose(fast.mean, slow.mean, atol=1e-5)
    assert torch.allclose(fast.var, slow.var, rtol=1e-5)


@pytest.mark.parametrize(("vs", "ms"), [((5, 3, 7, 4), (3, 2, 4)), ((5, 1, 7, 4), (3, 2, 4)),
                                        ((7, 4), (3, 2, 4)), ((2, 5, 3, 7, 4), (5, 1, 2, 4)),
                                        ((5, 3, 7, 4), (2, 4)), ((1, 3, 7, 4), (6, 3, 2, 4))])
def test_rows_times_is_a_broadcast_matmul(vs, ms):
    g = torch.Generator().manual_seed(9)
    v, M = torch.randn(vs, generator=g, dtype=F64), torch.randn(ms, generator=g, dtype=F64)
    out = rows_times(v, M)
    ref = v @ M.mT
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_old_bundles_without_the_new_buffers_load():
    model = KalmanForecaster(n_channels=2, components=["level", "seasonal"], seasonal_period=4)
    state = {k: v for k, v in model.state_dict().items()
             if k not in ("prior_cov", "prior_fitted", "var_scale")}
    fresh = KalmanForecaster(n_channels=2, components=["level", "seasonal"], seasonal_period=4)
    fresh.load_state_dict(state)
    assert not bool(fresh.prior_fitted) and fresh.var_scale.shape == (2, 0)
    calibrated = dict(model.state_dict(), var_scale=torch.full((2, 7), 2.0, dtype=F64))
    fresh.load_state_dict(calibrated)
    assert fresh.var_scale.shape == (2, 7)
