"""KalmanForecaster: the pipeline-facing per-channel structural model."""

from __future__ import annotations

import pytest
import torch

from tsssm.errors import ConfigError, DataError
from tsssm.kalman import forecast, kalman_filter
from tsssm.models.base import Forecaster, Gaussian
from tsssm.models.kalman import KalmanForecaster


def _streams(B=3, T=240, C=4, seed=50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)
    y = torch.cumsum(0.1 * torch.randn(B, T, C, generator=g), 1)
    y = y + torch.sin(2 * torch.pi * t / 12)[None, :, None] + 0.5 * torch.randn(B, T, C,
                                                                                generator=g)
    y[1, 200:] = float("nan")  # a shorter stream, NaN-padded
    y[0, 30:40, 2] = float("nan")  # a gap in one channel
    y[2, :, 3] = float("nan")  # a channel never observed in one stream
    return y


def _gaussian_nll(y: torch.Tensor, pred: Gaussian) -> torch.Tensor:
    ok = ~torch.isnan(y)
    v = pred.var.double()[ok]
    return 0.5 * (torch.log(2 * torch.pi * v) + (y.double()[ok] - pred.mean.double()[ok]) ** 2
                  / v).sum()


@pytest.fixture(params=[dict(components=["level", "trend"]),
                        dict(components=["level", "seasonal", "ar"], seasonal_period=12,
                             seasonal_kind="trig", seasonal_harmonics=2, ar_order=2),
                        dict(components=["level", "seasonal"], seasonal_period=4,
                             seasonal_kind="dummy")])
def model(request) -> KalmanForecaster:
    m = KalmanForecaster(n_channels=4, **request.param)
    m.initialize(_streams())
    return m


def test_protocol_and_outputs(model):
    assert isinstance(model, Forecaster) and model.training_input == "streams"
    y = _streams()
    pred, state = model.one_step(y)
    assert pred.mean.shape == y.shape and pred.mean.dtype == torch.float32
    assert torch.isfinite(pred.mean).all() and (pred.var > 0).all()
    assert torch.isfinite(state.mean).all()
    fc = model.forecast(y[:, :100], horizon=12)
    assert fc.mean.shape == (3, 12, 4) and (fc.var > 0).all() and torch.isfinite(fc.mean).all()
    empty = model.forecast(y[:, :0], horizon=5)
    assert empty.mean.shape == (3, 5, 4) and (empty.var > 0).all()
    sm = model.smooth(y)
    assert sm.mean.shape == y.shape and torch.isfinite(sm.mean).all() and (sm.var >= 0).all()


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_chunked_calls_equal_one_call(model, method):
    model.method = method
    y = _streams()
    whole, _ = model.one_step(y)
    state, means, variances = None, [], []
    for a, b in [(0, 1), (1, 97), (97, 98), (98, 240)]:
        pred, state = model.one_step(y[:, a:b], state)
        means.append(pred.mean)
        variances.append(pred.var)
    assert torch.allclose(torch.cat(means, 1), whole.mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.cat(variances, 1), whole.var, rtol=1e-5, atol=1e-6)
    # forecasting from the carried state equals forecasting from the whole context
    fc_state = model.forecast(y[:, :0], 6, state)
    fc_whole = model.forecast(y, 6)
    assert torch.allclose(fc_state.mean, fc_whole.mean, atol=1e-5)


def test_one_step_nll_is_the_exact_negative_loglikelihood(model):
    y = _streams().double()
    pred, _ = model.one_step(y)
    nll = _gaussian_nll(y, pred)
    ll = model.log_likelihood(y).sum()
    assert torch.allclose(nll, -ll, rtol=1e-10)
    (g_nll,) = torch.autograd.grad(nll, model.theta)
    (g_ll,) = torch.autograd.grad(-model.log_likelihood(y).sum(), model.theta)
    assert torch.allclose(g_nll, g_ll, rtol=1e-8, atol=1e-10)


def test_channels_are_independent_models():
    y = _streams()
    m = KalmanForecaster(n_channels=4)
    m.initialize(y)
    pred, _ = m.one_step(y)
    single = KalmanForecaster(n_channels=1)
    with torch.no_grad():
        single.theta.copy_(m.theta[2:3])
        single.prior_mean.copy_(m.prior_mean[2:3])
        single.prior_var.copy_(m.prior_var[2:3])
    pred1, _ = single.one_step(y[..., 2:3])
    assert torch.allclose(pred1.mean, pred.mean[..., 2:3]) and torch.allclose(pred1.var,
                                                                               pred.var[..., 2:3])


def test_forecast_matches_the_library():
    y = _streams().double()
    m = KalmanForecaster(n_channels=4)
    m.initialize(y)
    fc = m.forecast(y, horizon=4)
    ssm = m.ssm()
    res = kalman_filter(ssm, y.transpose(1, 2).unsqueeze(-1))
    ref = forecast(ssm, res, 4)
    assert torch.allclose(fc.mean, ref.obs_mean[..., 0].transpose(1, 2))
    assert torch.allclose(fc.var, ref.obs_cov[..., 0, 0].transpose(1, 2))


def test_lbfgs_training_increases_the_likelihood():
    y = _streams()
    m = KalmanForecaster(n_channels=4, components=["level"])
    m.initialize(y)
    before = float(m.log_likelihood(y).sum().detach())
    opt = torch.optim.LBFGS(m.parameters(), max_iter=30, line_search_fn="strong_wolfe")
    ok = ~torch.isnan(y)

    def closure():
        opt.zero_grad()
        pred, _ = m.one_step(y)
        loss = _gaussian_nll(y, pred) / ok.sum()
        loss.backward()
        return loss

    opt.step(closure)
    after = float(m.log_likelihood(y).sum().detach())
    assert after > before
    pred, _ = m.one_step(y)
    assert torch.isfinite(pred.mean).all() and (pred.var > 0).all()


def test_float32_compute_and_errors():
    y = _streams()
    m = KalmanForecaster(n_channels=4, dtype="float32")
    m.initialize(y)
    pred, _ = m.one_step(y)
    m64 = KalmanForecaster(n_channels=4)
    m64.initialize(y)
    pred64, _ = m64.one_step(y)
    assert torch.allclose(pred.mean, pred64.mean, atol=1e-3)
    with pytest.raises(ConfigError, match="components"):
        KalmanForecaster(n_channels=2, components=["level", "cycle"])
    with pytest.raises(ConfigError, match="seasonal_period"):
        KalmanForecaster(n_channels=2, components=["level", "seasonal"])
    with pytest.raises(ConfigError, match="method"):
        KalmanForecaster(n_channels=2, method="magic")
    with pytest.raises(DataError, match="C=4"):
        m.one_step(y[..., :3])
