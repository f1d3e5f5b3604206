"""forecast_invariant (all lead times at once) equals the step-by-step forecast."""

from __future__ import annotations

import pytest
import torch

from tsssm.errors import ModelError
from tsssm.kalman import kalman_filter
from tsssm.kalman.forecast import forecast, forecast_invariant, transition_powers
from tsssm.kalman.models import StructuralModel


def _model(components, **kw):
    torch.manual_seed(0)
    st = StructuralModel(components=components, **kw)
    theta = 0.5 * torch.randn(3, st.n_params, dtype=torch.float64)
    return st.to_ssm(theta)


@pytest.mark.parametrize("components,kw", [
    (("level",), {}),
    (("level", "trend", "seasonal", "ar"), {"seasonal_period": 5, "ar_order": 2}),
    (("level", "seasonal"), {"seasonal_period": 7, "seasonal_kind": "dummy"}),
])
@pytest.mark.parametrize("horizon", [1, 2, 37])
def test_matches_the_step_by_step_forecast(components, kw, horizon):
    ssm = _model(components, **kw)
    n = ssm.F.shape[-1]
    m = torch.randn(4, 3, n, dtype=torch.float64)
    A = torch.randn(4, 3, n, n, dtype=torch.float64)
    P = A @ A.mT
    ref = forecast(ssm, (m, P), horizon)
    got = forecast_invariant(ssm, m, P, horizon)
    torch.testing.assert_close(got.mean, ref.obs_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.cov, ref.obs_cov, rtol=1e-10, atol=1e-9)


def test_a_shared_covariance_is_propagated_once_with_the_same_result():
    ssm = _model(("level", "trend"))
    y = torch.randn(5, 3, 40, 1, dtype=torch.float64)  # no missing: one covariance per channel
    res = kalman_filter(ssm, y, covariances="last")
    m, P = res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :]
    assert 0 in P.stride()[:2]  # the filter shares it across the 5 streams
    got = forecast_invariant(ssm, m, P, 12)
    ref = forecast(ssm, (m, P.contiguous()), 12)
    assert got.cov.shape == ref.obs_cov.shape
    torch.testing.assert_close(got.cov, ref.obs_cov, rtol=1e-10, atol=1e-10)


def test_gradients_match():
    ssm = _model(("level", "seasonal"), seasonal_period=4)
    m = torch.randn(2, 3, ssm.F.shape[-1], dtype=torch.float64, requires_grad=True)
    P = torch.eye(ssm.F.shape[-1], dtype=torch.float64).expand(2, 3, -1, -1)
    a = forecast(ssm, (m, P), 9)
    (ga,) = torch.autograd.grad((a.obs_mean ** 2).sum() + a.obs_cov.sum(), m)
    b = forecast_invariant(ssm, m, P, 9)
    (gb,) = torch.autograd.grad((b.mean ** 2).sum() + b.cov.sum(), m)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


def test_powers_and_errors():
    F = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    powers = transition_powers(F, 11)
    assert powers.shape == (11, 2, 2)
    torch.testing.assert_close(powers[-1], torch.linalg.matrix_power(F, 11))
    ssm = _model(("level",))
    with pytest.raises(ModelError, match="positive integer"):
        forecast_invariant(ssm, torch.zeros(3, 1, dtype=torch.float64),
                           torch.eye(1, dtype=torch.float64).expand(3, 1, 1), 0)
    with pytest.raises(ModelError, match="time-invariant"):
        forecast_invariant(ssm._replace(d=torch.zeros(1, dtype=torch.float64)),
                           torch.zeros(3, 1, dtype=torch.float64),
                           torch.eye(1, dtype=torch.float64).expand(3, 1, 1), 4)
