"""The continuous-time Kalman forecaster: the Forecaster contract with exogenous data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tsssm.bundle import Bundle, load_bundle, save_bundle
from tsssm.data.scaling import StandardScaler
from tsssm.errors import DataError
from tsssm.kalman.ct import ct_filter, ct_forecast
from tsssm.models.base import Exog, call_forecast, call_one_step, uses_exog
from tsssm.models.kalman import KalmanForecaster
from tsssm.models.kalman_ct import KalmanCTForecaster
from tsssm.tasks.forecast import ForecastTask

SPRING = {"A": [[0, 1], ["-k/m", "-b/m"]], "B": [[0], ["g"]], "C": [[1, 0], [0, 1]],
          "Qc": [[0, 0], [0, "q"]], "R": [["r", 0], [0, "r"]], "d": ["y0", 0],
          "params": {"k": {"init": 0.8, "positive": True}, "m": 2.0,
                     "b": {"init": 0.3, "positive": True}, "g": {"init": 0.5},
                     "q": {"init": 0.05, "positive": True}, "r": {"init": 0.01, "positive": True},
                     "y0": {"init": 1.0}}}


def _data(B=2, T=40, C=2, K=1, seed=0):
    rng = np.random.default_rng(seed)
    y = torch.tensor(rng.normal(size=(B, T, C)), dtype=torch.float32)
    y[0, 5, 0] = float("nan")
    u = torch.tensor(rng.normal(size=(B, T, K)), dtype=torch.float32)
    dt = torch.tensor(rng.choice([0.5, 1.0, 2.0], size=(B, T)), dtype=torch.float64)
    return y, Exog(u, dt)


def _models():
    structural = KalmanCTForecaster(2, components=("level", "oscillator"), n_inputs=1,
                                    feedthrough=True)
    with torch.no_grad():
        structural.theta.add_(0.1 * torch.randn_like(structural.theta))
    physical = KalmanCTForecaster(2, physical=SPRING, n_inputs=1)
    physical.set_units([1.0, -0.5], [2.0, 0.5], [0.3], [1.5])
    return {"structural": structural, "physical": physical}


@pytest.mark.parametrize("kind", ["structural", "physical"])
def test_chunked_one_step_equals_one_call(kind):
    model = _models()[kind]
    y, exog = _data()
    whole, _ = model.one_step(y, exog=exog)
    first, state = model.one_step(y[:, :17], exog=exog.slice(0, 17))
    second, _ = model.one_step(y[:, 17:], state, exog=exog.slice(17, 40))
    for a, b in ((whole.mean, torch.cat([first.mean, second.mean], 1)),
                 (whole.var, torch.cat([first.var, second.var], 1))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(whole.mean).all() and (whole.var > 0).all()


def test_forecast_matches_the_library_forecast():
    """The forecaster's horizon (context + known future inputs at irregular times) equals
    ct_forecast from the filtered state, with the held input of the last context row."""
    model = _models()["physical"]
    y, exog = _data(T=30)
    L, H = 24, 6
    got = model.forecast(y[:, :L], H, exog=exog)
    ct = model.ct_model()
    yk = y[:, :L].double()
    res = ct_filter(ct, yk, exog.dt[:, :L], exog.u[:, :L].double())
    fc = ct_forecast(ct, res, exog.dt[:, L:], exog.u[:, L - 1:].double())
    assert torch.allclose(got.mean.double(), fc.obs_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.var.double(), torch.diagonal(fc.obs_cov, dim1=-2, dim2=-1),
                          rtol=1e-5, atol=1e-6)


def test_unknown_future_inputs_are_held_and_said(caplog):
    model = _models()["structural"]
    y, exog = _data(T=30)
    L, H = 24, 6
    held = Exog(torch.cat([exog.u[:, :L], exog.u[:, L - 1 : L].expand(-1, H, -1)], 1), exog.dt)
    with caplog.at_level(logging.WARNING):
        unknown = model.forecast(y[:, :L], H, exog=Exog(exog.u[:, :L], exog.dt))
    assert "inputs of the forecast horizon are unknown" in caplog.text
    known = model.forecast(y[:, :L], H, exog=held)
    assert torch.allclose(unknown.mean, known.mean) and torch.allclose(unknown.var, known.var)
    # without dt for the horizon: the default (training median) step
    model.default_step.fill_(2.0)
    nominal = model.forecast(y[:, :L], H, exog=Exog(held.u, exog.dt[:, :L]))
    two = Exog(held.u, torch.cat([exog.dt[:, :L], torch.full((2, H), 2.0).double()], 1))
    assert torch.allclose(nominal.mean, model.forecast(y[:, :L], H, exog=two).mean)


def test_missing_inputs_are_a_clear_error():
    model = _models()["structural"]
    y, exog = _data()
    with pytest.raises(DataError, match="takes 1 inputs"):
        model.one_step(y, exog=Exog(None, exog.dt))
    with pytest.raises(DataError, match=r"inputs u have shape"):
        model.one_step(y, exog=Exog(exog.u[:, :5], exog.dt))


def test_models_without_exog_are_called_as_before():
    y, exog = _data()
    discrete = KalmanForecaster(2)
    assert not uses_exog(discrete) and uses_exog(_models()["structural"])
    a, _ = call_one_step(discrete, y, None, exog)
    b, _ = discrete.one_step(y)
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(call_forecast(discrete, y, 3, None, exog).mean,
                       discrete.forecast(y, 3).mean)


def test_training_loss_is_the_exact_likelihood_of_the_streams():
    """Through the Lightning task, a stream batch with inputs and steps gives the negative
    log-likelihood per observation of the continuous-time model."""
    model = _models()["structural"]
    y, exog = _data()
    task = ForecastTask(model, {"name": "lbfgs", "lr": 1, "max_iter": 1}, horizon=2)
    batch = {"y": [y], "mask": [torch.ones(2, 40, dtype=torch.bool)], "u": [exog.u],
             "dt": [exog.dt]}
    loss = task.losses(batch)["loss"]
    ll = ct_filter(model.ct_model(), *model._layout(y, exog)).loglik.sum()
    n = int((~torch.isnan(y)).sum())
    assert torch.allclose(loss.double(), -ll / n, rtol=1e-5)
    loss.backward()
    assert model.theta.grad is not None and torch.isfinite(model.theta.grad).all()


def test_bundle_round_trip_keeps_units_and_prior(tmp_path):
    models = _models()
    y, exog = _data()
    for name, model in models.items():
        scaler = StandardScaler(np.zeros(2, np.float32), np.ones(2, np.float32), ["a", "b"])
        net_config = {"_target_": "tsssm.models.kalman_ct.KalmanCTForecaster", "n_inputs": 1,
                      **({"physical": SPRING} if name == "physical" else
                         {"components": ["level", "oscillator"], "feedthrough": True})}
        bundle = Bundle(model, net_config, "kalman_ct", ["a", "b"], scaler, False, None, "nis",
                        {"gaps": "time"}, inputs=["u"], input_scaler=StandardScaler(
                            np.zeros(1, np.float32), np.ones(1, np.float32), ["u"]))
        loaded = load_bundle(save_bundle(bundle, tmp_path / name))
        assert loaded.inputs == ["u"] and loaded.input_scaler.channels == ["u"]
        a, _ = model.one_step(y, exog=exog)
        b, _ = loaded.model.one_step(y, exog=exog)
        assert torch.allclose(a.mean, b.mean) and torch.allclose(a.var, b.var)
