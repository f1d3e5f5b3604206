"""KalmanForecaster.fit_em: EM for the variance-only structural models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tsssm.errors import ConfigError
from tsssm.models.kalman import KalmanForecaster

LEVEL_VAR = torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64)
TREND_VAR = torch.tensor([1e-2, 5e-3, 1e-2], dtype=torch.float64)
OBS_VAR = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)


def _local_linear_trend(T: int, g: torch.Generator) -> torch.Tensor:
    """One stream (1, T, 3) from a local linear trend with per-channel variances."""
    C = LEVEL_VAR.numel()

    def noise(var: torch.Tensor) -> torch.Tensor:
        return var.sqrt() * torch.randn(1, T, C, generator=g, dtype=torch.float64)

    slope = 0.05 * torch.randn(1, 1, C, generator=g, dtype=torch.float64) + torch.cumsum(
        noise(TREND_VAR), 1)
    level = 3.0 + torch.cumsum(slope + noise(LEVEL_VAR), 1)
    return level + noise(OBS_VAR)


def _streams() -> list[torch.Tensor]:
    """Two streams of different lengths with a gap, scattered missing entries, a missing step."""
    g = torch.Generator().manual_seed(7)
    long, short = _local_linear_trend(500, g), _local_linear_trend(300, g)
    long[0, 40:55, 1] = float("nan")
    long[0, 200:260:6, 0] = float("nan")
    short[0, 120, :] = float("nan")
    short[0, 250:258, 2] = float("nan")
    return [long, short]


def _initialized(ys: list[torch.Tensor]) -> KalmanForecaster:
    model = KalmanForecaster(n_channels=3, components=["level", "trend"])
    T = max(y.shape[1] for y in ys)
    padded = [torch.cat([y, y.new_full((y.shape[0], T - y.shape[1], 3), float("nan"))], 1)
              for y in ys]
    model.initialize(torch.cat(padded))
    return model


def _total_loglik(model: KalmanForecaster, ys: list[torch.Tensor]) -> torch.Tensor:
    return sum(model.log_likelihood(y).sum() for y in ys)


def test_em_never_decreases_the_likelihood():
    ys = _streams()
    model = _initialized(ys)
    history = model.fit_em(ys, n_iter=30, tol=0.0)
    assert len(history) == 31 and all(np.isfinite(history))
    gains = np.diff(history)
    assert (gains >= -1e-9 * np.abs(history[1:])).all(), gains.min()
    assert history[-1] > history[0] + 10.0  # the start is data-based, EM still improves it
    with torch.no_grad():  # the returned value is the likelihood at the parameters left behind
        assert float(_total_loglik(model, ys)) == pytest.approx(history[-1], rel=1e-12)


def test_em_reaches_the_maximum_likelihood():
    ys = _streams()
    em = _initialized(ys)
    mle = copy.deepcopy(em)
    history = em.fit_em(ys, n_iter=60, tol=1e-10)

    opt = torch.optim.LBFGS([mle.theta], max_iter=25, tolerance_change=1e-12,
                            tolerance_grad=1e-7, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -_total_loglik(mle, ys)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ll_mle = float(_total_loglik(mle, ys))
    ll_em = history[-1]
    assert ll_em <= ll_mle + 1e-6 * abs(ll_mle)  # EM cannot beat the maximum
    assert ll_mle - ll_em < 3.0, (ll_em, ll_mle)  # nats, of about 4000
    obs_var = em.theta.detach()[:, em.param_names.index("log_var_obs")].exp()
    rel = (obs_var / OBS_VAR - 1).abs()
    assert (rel < 0.2).all(), obs_var


def test_em_fits_ar_components_and_refuses_what_it_cannot_fit():
    """AR coefficients have a closed-form M-step (a regression) since the companion form; a
    fitting mode EM does not handle still names model.fit in its error."""
    from tsssm.models.kalman import fit_forecaster

    g = torch.Generator().manual_seed(11)
    e = torch.randn(1, 400, 2, generator=g, dtype=torch.float64)
    ar = torch.zeros_like(e)
    for t in range(1, 400):
        ar[:, t] = 0.7 * ar[:, t - 1] + e[:, t]
    y = ar + torch.cumsum(0.1 * torch.randn(1, 400, 2, generator=g, dtype=torch.float64), 1)
    model = KalmanForecaster(n_channels=2, components=["level", "ar"])
    model.initialize(y)
    history = model.fit_em([y], n_iter=40, tol=0.0, segment=100, fit_prior=True)
    gains = np.diff(history)
    assert (gains >= -1e-9 * np.abs(history[1:])).all(), gains.min()
    phi = torch.tanh(model.theta.detach()[:, model.param_names.index("pacf_ar1")])
    assert ((phi - 0.7).abs() < 0.2).all(), phi
    before = model.theta.detach().clone()
    with pytest.raises(ConfigError, match="model.fit") as err:
        fit_forecaster(model, [y], fit="mle")
    assert "em" in str(err.value)
    assert torch.equal(model.theta.detach(), before)


@pytest.mark.parametrize("kw", [dict(components=["level", "seasonal"], seasonal_period=4,
                                     seasonal_kind="dummy"),
                                dict(components=["level", "trend", "seasonal"],
                                     seasonal_period=6, seasonal_kind="trig")])
def test_em_is_monotone_with_seasonal_components(kw):
    """Dummy seasonals (one noisy state of several) and tied trig harmonics: still exact EM."""
    g = torch.Generator().manual_seed(3)
    T, C = 160, 2
    t = torch.arange(T, dtype=torch.float64)
    season = torch.sin(2 * torch.pi * t / kw["seasonal_period"])[None, :, None]
    y = (torch.cumsum(0.2 * torch.randn(2, T, C, generator=g, dtype=torch.float64), 1)
         + 2 * season + 0.5 * torch.randn(2, T, C, generator=g, dtype=torch.float64))
    y[1, 100:] = float("nan")
    y[0, 20:30, 1] = float("nan")
    model = KalmanForecaster(n_channels=C, **kw)
    model.initialize(y)
    history = model.fit_em([y[:1], y[1:, :100]], n_iter=10, tol=0.0)
    assert len(history) == 11
    gains = np.diff(history)
    assert (gains >= -1e-9 * np.abs(history[1:])).all(), gains.min()
    assert history[-1] > history[0]
