"""Filter, smoother and forecasts equal statsmodels' for the same model and data (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

from tsssm.kalman import forecast, kalman_filter, rts_smoother

FILTER_METHODS = ["sequential", "loop", "sqrt", "parallel"]
SMOOTHER_METHODS = ["sequential", "loop", "parallel"]

CASES = {
    # name: (n, p, T, time_varying, intercepts, missing)
    "univariate": (2, 1, 80, (), False, "none"),
    "univariate-missing": (2, 1, 80, (), False, "steps"),
    "multivariate": (3, 2, 60, (), True, "none"),
    "multivariate-missing": (3, 2, 60, (), True, "channels"),
    "time-varying": (3, 2, 40, ("F", "H", "Q", "R", "d", "c"), True, "channels"),
    "time-varying-obs": (2, 3, 40, ("H", "R"), False, "steps"),
}


def make_case(oracle, name: str, seed: int = 0):
    n, p, T, tv, intercepts, missing = CASES[name]
    rng = np.random.default_rng(seed)
    model = oracle.random_model(rng, n, p, T=T, time_varying=tv, intercepts=intercepts)
    y = rng.normal(size=(T, p)) * 2.0
    if missing == "steps":
        y[rng.random(T) < 0.2] = np.nan
        y[-1] = np.nan
    elif missing == "channels":
        mask = rng.random((T, p)) < 0.25
        y[mask] = np.nan
        y[5] = np.nan  # a whole step too
    return model, y, tv


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", FILTER_METHODS)
def test_filter_matches_statsmodels(case, method, oracle):
    model, y, tv = make_case(oracle, case)
    ref = oracle.statsmodels_smooth(model, y, tv)
    res = kalman_filter(oracle.to_ssm(model, tv), oracle.t64(y), method=method)
    oracle.assert_close(res.loglik, ref.llf_obs.sum(), what="loglik")
    oracle.assert_close(res.log_liks, ref.llf_obs, what="log_liks")
    oracle.assert_close(res.filtered_mean, ref.filtered_state.T, what="filtered mean")
    oracle.assert_close(res.filtered_cov, np.moveaxis(ref.filtered_state_cov, -1, 0),
                        what="filtered cov")
    oracle.assert_close(res.predicted_mean, ref.predicted_state.T[:-1], what="predicted mean")
    oracle.assert_close(res.predicted_cov, np.moveaxis(ref.predicted_state_cov, -1, 0)[:-1],
                 what="predicted cov")
    oracle.assert_close(res.predicted_obs_mean, ref.forecasts.T, what="forecasts")
    oracle.assert_close(res.predicted_obs_cov, np.moveaxis(ref.forecasts_error_cov, -1, 0),
                 what="forecast error cov")
    observed = ~np.isnan(y)
    assert (res.observed.numpy() == observed).all()
    oracle.assert_close(res.innovation, np.where(observed, ref.forecasts_error.T, 0.0),
                        what="innovation")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", SMOOTHER_METHODS)
def test_smoother_matches_statsmodels(case, method, oracle):
    model, y, tv = make_case(oracle, case, seed=1)
    ref = oracle.statsmodels_smooth(model, y, tv)
    ssm = oracle.to_ssm(model, tv)
    sm = rts_smoother(ssm, kalman_filter(ssm, oracle.t64(y)), method=method)
    oracle.assert_close(sm.mean, ref.smoothed_state.T, what="smoothed mean")
    oracle.assert_close(sm.cov, np.moveaxis(ref.smoothed_state_cov, -1, 0), what="smoothed cov")
    # statsmodels' smoothed_state_autocov[..., t] = Cov[x_{t+1}, x_t | y]
    oracle.assert_close(sm.lag_one_cov, np.moveaxis(ref.smoothed_state_autocov, -1, 0)[:-1],
                 what="lag-one cov")


def test_nis_is_the_normalised_innovation(oracle):
    model, y, tv = make_case(oracle, "multivariate-missing", seed=2)
    ref = oracle.statsmodels_smooth(model, y, tv)
    res = kalman_filter(oracle.to_ssm(model, tv), oracle.t64(y))
    nis = []
    for t in range(y.shape[0]):
        o = ~np.isnan(y[t])
        v = ref.forecasts_error[o, t]
        S = ref.forecasts_error_cov[np.ix_(o, o, [t])][..., 0]
        nis.append(float(v @ np.linalg.solve(S, v)) if o.any() else 0.0)
    oracle.assert_close(res.nis, np.array(nis), what="NIS")


@pytest.mark.parametrize("case", ["univariate", "multivariate-missing"])
def test_forecast_matches_statsmodels(case, oracle):
    model, y, _ = make_case(oracle, case, seed=3)
    T, p = y.shape
    n = model["F"].shape[-1]
    kf = KalmanFilter(k_endog=p, k_states=n, k_posdef=n, tolerance=0)
    kf.bind(y.copy())
    kf["design"], kf["obs_cov"] = model["H"], model["R"]
    kf["transition"], kf["state_cov"], kf["selection"] = model["F"], model["Q"], np.eye(n)
    if "d" in model:
        kf["obs_intercept"], kf["state_intercept"] = model["d"], model["c"]
    kf.initialize_known(model["m0"], model["P0"])
    horizon = 7
    pred = kf.filter().predict(start=T, end=T + horizon)
    ssm = oracle.to_ssm(model)
    fc = forecast(ssm, kalman_filter(ssm, oracle.t64(y)), horizon)
    oracle.assert_close(fc.state_mean, pred.predicted_state.T, what="state mean")
    oracle.assert_close(fc.state_cov, np.moveaxis(pred.predicted_state_cov, -1, 0),
                        what="state cov")
    oracle.assert_close(fc.obs_mean, pred.forecasts.T, what="obs mean")
    oracle.assert_close(fc.obs_cov, np.moveaxis(pred.forecasts_error_cov, -1, 0), what="obs cov")


def test_steady_state_shortcut_is_exact(oracle):
    """A long time-invariant series: the shortcut stops the Riccati recursion early."""
    rng = np.random.default_rng(4)
    model = oracle.random_model(rng, 2, 1)
    y = rng.normal(size=(3000, 1))
    y[1000:1010] = np.nan  # the mask changes: the recursion restarts there
    ref = oracle.statsmodels_smooth(model, y)
    ssm = oracle.to_ssm(model)
    fast = kalman_filter(ssm, oracle.t64(y))
    oracle.assert_close(fast.loglik, ref.llf_obs.sum(), rtol=1e-10, what="loglik")
    oracle.assert_close(fast.filtered_mean, ref.filtered_state.T, what="filtered mean")
    oracle.assert_close(fast.filtered_cov, np.moveaxis(ref.filtered_state_cov, -1, 0), what="cov")
    full = kalman_filter(ssm, oracle.t64(y), steady_state=False)
    oracle.assert_close(fast.log_liks, full.log_liks.numpy(), rtol=1e-12, what="vs full recursion")


def test_float32_agrees_with_float64(oracle):
    model, y, tv = make_case(oracle, "multivariate-missing", seed=5)
    ssm = oracle.to_ssm(model, tv)
    r64 = kalman_filter(ssm, oracle.t64(y))
    ssm32 = ssm._replace(**{k: getattr(ssm, k).float() for k in ("F", "H", "Q", "R", "m0", "P0",
                                                                 "d", "c")})
    for method in FILTER_METHODS:
        r32 = kalman_filter(ssm32, oracle.t64(y).float(), method=method)
        assert r32.loglik.dtype == torch.float32
        oracle.assert_close(r32.loglik.double(), r64.loglik.numpy(), rtol=1e-4, what=method)
        oracle.assert_close(r32.filtered_mean.double(), r64.filtered_mean.numpy(), rtol=1e-4,
                     what=method)
