"""Classical baselines: exactness on known inputs, fitted parameters, chunking, detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.anomaly.scores import anomaly_scores
from tsssm.anomaly.thresholds import MaxThreshold
from tsssm.baselines import (
    BASELINES,
    DEFAULT_BASELINES,
    EWMAForecaster,
    IsolationForestDetector,
    LastValueForecaster,
    SeasonalNaiveForecaster,
    build_baseline,
    is_detector,
)
from tsssm.errors import ConfigError, DataError, ModelError
from tsssm.models.base import Forecaster


def _random_walk_with_gaps(B=3, T=240, C=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, T, C, generator=g, dtype=torch.float64).cumsum(1) * 0.3
    y = y + 0.2 * torch.sin(torch.arange(T, dtype=torch.float64) * 2 * np.pi / 12).view(1, T, 1)
    y[torch.rand(B, T, C, generator=g) < 0.1] = float("nan")
    y[1, 40:55] = float("nan")  # a long gap on all channels
    return y.to(dtype)


FORECASTERS = {
    "last_value": LastValueForecaster,
    "seasonal_12": lambda: SeasonalNaiveForecaster(12),
    "seasonal_5": lambda: SeasonalNaiveForecaster(5),
    "ewma_fitted": EWMAForecaster,
    "ewma_0.4": lambda: EWMAForecaster(alpha=0.4),
}


def test_last_value_is_exact_on_a_step():
    T = 100
    y = torch.zeros(1, T, 2)
    y[:, 50:, 0] = 1.0
    y[:, 30:, 1] = -2.0
    m = LastValueForecaster().fit(y)
    # increments: one jump of 1 (ch 0) / 2 (ch 1) among T - 1 pairs
    torch.testing.assert_close(m.sigma2, torch.tensor([1.0, 4.0], dtype=torch.float64) / (T - 1))
    pred, state = m.one_step(y)
    assert torch.equal(pred.mean[:, 1:], y[:, :-1])
    torch.testing.assert_close(pred.var[0, 1:], m.sigma2.float().expand(T - 1, 2))
    assert torch.equal(state.value[:, -1], y[:, -1].double())
    # the first step has no history: training mean with prior + one-step variance
    torch.testing.assert_close(pred.mean[0, 0], m.prior_mean.float())


def test_last_value_variance_grows_over_gaps_and_horizon():
    y = torch.tensor([[[0.0], [1.0], [float("nan")], [float("nan")], [4.0]]])
    train = torch.randn(1, 500, 1, generator=torch.Generator().manual_seed(0))
    m = LastValueForecaster().fit(train)
    s2 = float(m.sigma2)
    pred, _ = m.one_step(y)
    assert pred.mean[0, 2:5, 0].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(pred.var[0, 2:5, 0].numpy(), [s2, 2 * s2, 3 * s2], rtol=1e-6)
    f = m.forecast(y, horizon=4)
    assert torch.equal(f.mean, torch.full((1, 4, 1), 4.0))
    np.testing.assert_allclose(f.var[0, :, 0].numpy(), s2 * np.arange(1, 5), rtol=1e-6)


def test_seasonal_naive_repeats_the_season_and_period_one_is_last_value():
    period = 7
    season = torch.randn(period, 3, generator=torch.Generator().manual_seed(1))
    y = season.repeat(10, 1).unsqueeze(0)  # (1, 70, 3), exactly periodic
    m = SeasonalNaiveForecaster(period).fit(y)
    pred, _ = m.one_step(y)
    assert torch.equal(pred.mean[:, period:], y[:, :-period])
    f = m.forecast(y, 2 * period + 1)
    assert torch.equal(f.mean[0, :period], season)
    assert torch.equal(f.mean[0, period:2 * period], season)
    s2 = m.sigma2.float()
    torch.testing.assert_close(f.var[0, period], 2 * s2)
    torch.testing.assert_close(f.var[0, 2 * period], 3 * s2)

    y2 = _random_walk_with_gaps()
    a, b = SeasonalNaiveForecaster(1).fit(y2), LastValueForecaster().fit(y2)
    pa, pb = a.one_step(y2)[0], b.one_step(y2)[0]
    assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.var, pb.var)


@pytest.mark.parametrize("name", FORECASTERS)
def test_chunked_one_step_equals_one_pass(name):
    model = FORECASTERS[name]()
    y = _random_walk_with_gaps()
    model.fit(y[:, :120])
    assert isinstance(model, Forecaster)
    full, full_state = model.one_step(y)
    assert torch.isfinite(full.mean).all() and (full.var > 0).all()
    for cuts in ([3], [50, 51, 130], [1, 2, 3, 200]):
        parts, state, start = [], None, 0
        for end in [*cuts, y.shape[1]]:
            pred, state = model.one_step(y[:, start:end], state)
            parts.append(pred)
            start = end
        torch.testing.assert_close(torch.cat([p.mean for p in parts], 1), full.mean)
        torch.testing.assert_close(torch.cat([p.var for p in parts], 1), full.var)
        for a, b in zip(state, full_state):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", FORECASTERS)
def test_forecast_equals_one_step_over_missing_future(name):
    model = FORECASTERS[name]()
    # With the future all missing, the one-step predictions ARE the multi-step forecasts.
    y = _random_walk_with_gaps(dtype=torch.float64)
    model.fit(y)
    H = 30
    f = model.forecast(y[:, :100], H)
    future = torch.full((y.shape[0], H, y.shape[2]), float("nan"), dtype=y.dtype)
    pred, _ = model.one_step(torch.cat([y[:, :100], future], 1))
    torch.testing.assert_close(f.mean, pred.mean[:, 100:])
    torch.testing.assert_close(f.var, pred.var[:, 100:])
    # variance never shrinks from one season to the next (period 1 for the non-seasonal models)
    p = getattr(model, "period", 1)
    assert (f.var[:, p:] >= f.var[:, :-p]).all()


def test_ewma_recovers_the_smoothing_constant_and_is_calibrated():
    # ARIMA(0,1,1) y[t] = y[t-1] + e[t] - (1-alpha) e[t-1]: EWMA(alpha) is its optimal predictor
    # and the one-step errors are the innovations e ~ N(0, 1).
    alpha, T = 0.3, 6000
    rng = np.random.default_rng(3)
    e = rng.normal(size=(2, T + 1, 1))
    y = np.cumsum(e[:, 1:] - (1 - alpha) * e[:, :-1], axis=1)
    y = torch.from_numpy(y)
    m = EWMAForecaster().fit(y[:, :4000])
    assert m.alpha[0] == pytest.approx(alpha, abs=0.04)
    assert m.sigma2[0] == pytest.approx(1.0, rel=0.06)
    pred, _ = m.one_step(y)
    nis = anomaly_scores(y, pred)[:, 4000:]
    assert float(nis.mean()) == pytest.approx(1.0, abs=0.1)
    f = m.forecast(y, 5)
    np.testing.assert_allclose(f.var[0, :, 0].numpy(),
                               m.sigma2[0] * (1 + np.arange(5) * m.alpha[0] ** 2))


def test_all_missing_stream_gives_the_prior_and_no_nan():
    y = _random_walk_with_gaps()
    for make in FORECASTERS.values():
        model = make().fit(y)
        empty = torch.full((2, 20, 4), float("nan"))
        pred, _ = model.one_step(empty)
        assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.var).all()
        assert (pred.var > 0).all()


def _ar1(T=1400, C=3, seed=4):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(T, C))
    x = np.zeros_like(e)
    for i in range(1, T):
        x[i] = 0.8 * x[i - 1] + 0.6 * e[i]  # stationary, unit variance
    return torch.from_numpy(x).unsqueeze(0)


def test_isolation_forest_flags_an_injected_spike():
    y = _ar1()
    test = y[:, 1000:].clone()
    test[0, 200, :] += 5.0
    test[0, 250, 0] = float("nan")  # missing values must not break the features
    det = IsolationForestDetector(window=1, n_estimators=100).fit(y[:, :1000])
    assert is_detector(det) and not isinstance(det, Forecaster)
    s = det.score(test)
    assert s.shape == (1, 400) and np.isfinite(s).all()
    assert int(s.argmax()) == 200
    thr = MaxThreshold().fit(det.score(y[:, :1000]))
    assert np.flatnonzero(thr.flags(s)[0]).tolist() == [200]


def test_windowed_isolation_forest_flags_a_level_shift_and_is_deterministic():
    # A sustained shift (like SKAB's valve faults) is what the window is for; a single-sample
    # spike is diluted among window * C features.
    y = _ar1()
    test = y[:, 1000:].clone()
    test[0, 200:230, :] += 3.0
    det = IsolationForestDetector(window=10, n_estimators=100).fit(y[:, :1000])
    s = det.score(test)
    flags = MaxThreshold().fit(det.score(y[:, :1000])).flags(s)[0]
    inside = flags[200:240].sum()
    assert inside >= 20 and flags.sum() - inside <= 5
    again = IsolationForestDetector(window=10, n_estimators=100).fit(y[:, :1000]).score(test)
    assert np.array_equal(s, again)


def test_registry_and_errors():
    for name in DEFAULT_BASELINES:
        assert name in BASELINES
        build_baseline(name)
    assert isinstance(build_baseline("seasonal_naive", period=24), SeasonalNaiveForecaster)
    with pytest.raises(ConfigError, match="unknown baseline 'arima'"):
        build_baseline("arima")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_baseline("ewma", beta=0.3)
    with pytest.raises(ConfigError):
        SeasonalNaiveForecaster(0)
    with pytest.raises(ConfigError):
        EWMAForecaster(alpha=1.5)
    with pytest.raises(ModelError, match="not fitted"):
        LastValueForecaster().one_step(torch.zeros(1, 5, 2))
    m = LastValueForecaster().fit(torch.randn(1, 50, 2))
    with pytest.raises(DataError, match="channels"):
        m.one_step(torch.zeros(1, 5, 3))
    with pytest.raises(DataError, match="shape"):
        m.one_step(torch.zeros(5, 2))
    with pytest.raises(DataError, match="state"):
        m.one_step(torch.zeros(2, 5, 2), m.one_step(torch.zeros(1, 5, 2))[1])
    with pytest.raises(DataError, match="channels \\[1\\]"):
        EWMAForecaster().fit(torch.tensor([[[0.0, 1.0], [1.0, float("nan")]]]))
    with pytest.raises(DataError, match="infinite"):
        EWMAForecaster().fit(torch.tensor([[[0.0], [float("inf")]]]))
