"""Horizon metrics: CRPS against its definition, coverage of calibrated and miscalibrated
forecasts, NaN targets skipped, batching does not change the result."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from tsssm.errors import NumericalError
from tsssm.tasks.forecast_metrics import Z95, HorizonAccumulator, gaussian_crps


@pytest.mark.parametrize(("y", "mu", "s"), [(0.3, 0.0, 1.0), (-2.5, 1.0, 0.5), (4.0, 4.1, 3.0)])
def test_gaussian_crps_equals_its_integral_definition(y, mu, s):
    # CRPS(F, y) = integral of (F(x) - 1{x >= y})^2 dx
    cdf = stats.norm(mu, s).cdf
    left, _ = integrate.quad(lambda x: cdf(x) ** 2, -np.inf, y)
    right, _ = integrate.quad(lambda x: (cdf(x) - 1.0) ** 2, y, np.inf)
    assert gaussian_crps(np.array(y), np.array(mu), np.array(s)) == pytest.approx(left + right,
                                                                                 rel=1e-7)


def test_coverage_of_calibrated_and_overconfident_forecasts():
    rng = np.random.default_rng(0)
    n, h, c = 4000, 6, 3
    mean = rng.normal(size=(n, h, c))
    std = rng.uniform(0.5, 2.0, size=(n, h, c))
    target = mean + std * rng.normal(size=(n, h, c))
    calibrated = HorizonAccumulator(h)
    calibrated.add(target, mean, std**2)
    overconfident = HorizonAccumulator(h)
    overconfident.add(target, mean, (std / 2) ** 2)
    cov = calibrated.result()["coverage95"]
    assert abs(cov - 0.95) < 0.005  # 72,000 draws: sd of the estimate ~0.0008
    expected = 2 * stats.norm.cdf(Z95 / 2) - 1  # a band half as wide covers ~67%
    assert overconfident.result()["coverage95"] == pytest.approx(expected, abs=0.01)
    assert calibrated.by_lead()["coverage95"].shape == (h,)
    assert calibrated.result()["mse"] == pytest.approx(np.mean((target - mean) ** 2))
    assert calibrated.result()["mae"] == pytest.approx(np.mean(np.abs(target - mean)))


def test_batches_and_missing_targets():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(50, 4, 2))
    target[3, 1, 0] = np.nan
    mean, var = rng.normal(size=target.shape), rng.uniform(0.1, 1, size=target.shape)
    whole = HorizonAccumulator(4)
    whole.add(target, mean, var)
    parts = HorizonAccumulator(4)
    for i in range(0, 50, 7):
        parts.add(target[i : i + 7], mean[i : i + 7], var[i : i + 7])
    for k, v in whole.result().items():
        assert parts.result()[k] == pytest.approx(v, rel=1e-12)
    valid = ~np.isnan(target)
    assert whole.result()["mse"] == pytest.approx(np.mean((target - mean)[valid] ** 2))
    assert whole.result()["windows"] == 50
    bad = mean.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NumericalError):
        whole.add(target, bad, var)
