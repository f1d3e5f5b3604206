"""The fitted horizon-variance calibration: fitted on validation windows only, per lead time,
to the 95% band (coverage) or the maximum-likelihood factor (nll)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tsssm.models.base import Gaussian
from tsssm.models.heads import HorizonVarianceScale
from tsssm.tasks.calibrate import calibrate_horizon_variance, window_origins

H = 6


class Toy(nn.Module):
    """Forecasts 0 with variance c_k at lead k (the truth below is N(0, 1): c_k is wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.linspace(0.1, 4.0, H), requires_grad=False)
        self.var_calibration = HorizonVarianceScale(H)

    def forecast(self, context, horizon):
        b, _, ch = context.shape
        var = self.c[:horizon].view(1, -1, 1).expand(b, horizon, ch)
        return Gaussian(torch.zeros_like(var), self.var_calibration(var))


def _data(seed=0, test_scale=1.0):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(3000, 2))
    values[2000:] *= test_scale
    part = SimpleNamespace(stream=SimpleNamespace(values=values),
                           rows=lambda s: {"train": (0, 1000), "val": (1000, 2000),
                                           "test": (2000, 3000)}[s])
    return SimpleNamespace(parts=[part])


def _coverage(model, data, split):
    part = data.parts[0]
    fc, target = window_origins(model, part.stream.values, part.rows(split), 8, H)
    z = np.abs(target - fc.mean.numpy()) / np.sqrt(fc.var.numpy())
    return (z <= 1.959964).mean(axis=(0, 2))  # per lead


def test_coverage_calibration_brings_every_lead_to_95_percent():
    model, data = Toy(), _data()
    before = _coverage(model, data, "val")
    assert before[0] < 0.6 and before[-1] > 0.99  # over- and under-confident leads
    scale = calibrate_horizon_variance(model, data, context=8, horizon=H)
    assert scale.shape == (H,)
    np.testing.assert_allclose(_coverage(model, data, "val"), 0.95, atol=0.005)
    np.testing.assert_allclose(_coverage(model, data, "test"), 0.95, atol=0.02)


def test_nll_calibration_is_the_mean_squared_standardised_error():
    model, data = Toy(), _data()
    scale = calibrate_horizon_variance(model, data, context=8, horizon=H, method="nll")
    np.testing.assert_allclose(scale, 1.0 / model.c.detach().numpy(), rtol=0.06)


def test_test_rows_never_enter_the_fit_and_refitting_starts_from_one():
    a, b = Toy(), Toy()
    sa = calibrate_horizon_variance(a, _data(test_scale=1.0), 8, H)
    sb = calibrate_horizon_variance(b, _data(test_scale=10.0), 8, H)
    np.testing.assert_array_equal(sa, sb)
    again = calibrate_horizon_variance(a, _data(), 8, H)  # refit: not compounded
    np.testing.assert_allclose(again, sa)


def test_models_without_calibration_and_data_without_val_are_left_alone():
    class Plain(nn.Module):
        def forecast(self, context, horizon):  # pragma: no cover - never called
            raise AssertionError

    assert calibrate_horizon_variance(Plain(), _data(), 8, H) is None
    data = _data()
    data.parts[0].rows = lambda s: (0, 0) if s == "val" else (0, 3000)
    model = Toy()
    assert calibrate_horizon_variance(model, data, 8, H) is None
    assert torch.equal(model.var_calibration.scale, torch.ones(H))
    with pytest.raises(ValueError, match="method"):
        calibrate_horizon_variance(Toy(), _data(), 8, H, method="median")


def test_variance_scale_rejects_bad_factors():
    m = HorizonVarianceScale(3)
    with pytest.raises(ValueError, match="positive"):
        m.set(torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="positive"):
        m.set(torch.ones(4))
