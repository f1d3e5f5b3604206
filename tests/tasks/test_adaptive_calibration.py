"""The adaptive (online) horizon band: causal (no target is read before it is observed), the
same in any batching, equal to a direct O(N^2) reference, and back at 95% after a shift that
a factor fitted beforehand cannot see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tsssm.models.base import Gaussian
from tsssm.tasks.adaptive_calibration import (
    ALPHA,
    COVERAGE_SLOPE,
    LOG_FACTOR_BOUND,
    AdaptiveCalibration,
)
from tsssm.tasks.evaluate import horizon_metrics
from tsssm.tasks.forecast_metrics import Z95, HorizonAccumulator


def _reference(origins, target, mean, var, rate):
    """Direct definition, event by event: before each origin o, every forecast lead h whose
    target row o' + h - 1 lies before o and that has not moved the factor yet moves it, in the
    order of the origins o', by step x (miss - alpha), the miss judged against the factor in
    force then; origin o's variances get the factors in force after that."""
    n, horizon, channels = target.shape
    step = rate / COVERAGE_SLOPE
    z2 = (target - mean) ** 2 / var
    logc = np.zeros(horizon)
    done = np.zeros((n, horizon), dtype=bool)
    out = np.empty((n, horizon, channels))
    for i in range(n):
        for h in range(horizon):
            for j in range(i):
                if not done[j, h] and origins[j] + h < origins[i]:
                    obs = ~np.isnan(z2[j, h])
                    with np.errstate(invalid="ignore"):
                        miss = obs & (z2[j, h] > Z95**2 * np.exp(logc[h]))
                    logc[h] = np.clip(logc[h] + step * (miss.sum() - ALPHA * obs.sum())
                                      / channels, -LOG_FACTOR_BOUND, LOG_FACTOR_BOUND)
                    done[j, h] = True
        out[i] = var[i] * np.exp(logc)[:, None]
    return out


def _case(n=120, horizon=5, channels=3, stride=1, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    origins = 200 + stride * np.arange(n)
    mean = rng.normal(size=(n, horizon, channels))
    var = rng.uniform(0.5, 2.0, size=(n, horizon, channels))
    target = mean + scale * np.sqrt(var) * rng.standard_t(4, size=var.shape) * 0.8
    return origins, target, mean, var


@pytest.mark.parametrize("stride", [1, 2, 7, "gap"])
def test_equals_the_direct_definition(stride):
    origins, target, mean, var = _case(stride=1 if stride == "gap" else stride)
    if stride == "gap":  # validation origins, then test origins after a gap of 3 horizons
        origins[60:] += 15
    target[5, 2, 1] = np.nan  # a missing target counts neither way
    target[17, :, :] = np.nan
    got = AdaptiveCalibration(5, rate=0.05).adapt(origins, target, mean, var)
    want = _reference(origins, target, mean, var, 0.05)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.allclose(got, var)  # it did adapt


def test_batching_and_the_memory_bound_do_not_change_the_result():
    """Long enough to compact the kept origins many times (capacity 2 (H + 2)); batches of
    random sizes, including single origins, give the one-call result exactly."""
    origins, target, mean, var = _case(n=700, horizon=4, seed=1)
    whole = AdaptiveCalibration(4, rate=0.02).adapt(origins, target, mean, var)
    rng = np.random.default_rng(2)
    cuts = np.sort(rng.choice(np.arange(1, 700), size=60, replace=False))
    online = AdaptiveCalibration(4, rate=0.02)
    parts = [online.adapt(origins[a:b], target[a:b], mean[a:b], var[a:b])
             for a, b in zip([0, *cuts], [*cuts, 700])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_allclose(whole[:200], _reference(origins[:200], target[:200],
                                                       mean[:200], var[:200], 0.02),
                               rtol=1e-12)


def test_no_target_is_read_before_it_is_observed():
    origins, target, mean, var = _case(n=60, horizon=6, seed=3)
    base = AdaptiveCalibration(6).adapt(origins, target, mean, var)
    i = 40
    # the forecast from origin i-1 at lead 3 targets row origins[i] + 1: not yet observed at
    # origin i, so changing it changes nothing that origin i (or i-1) uses
    changed = target.copy()
    changed[i - 1, 2] += 100.0
    got = AdaptiveCalibration(6).adapt(origins, changed, mean, var)
    np.testing.assert_array_equal(got[: i + 1], base[: i + 1])
    assert not np.array_equal(got[i + 2], base[i + 2])  # observed at origin i + 2: it counts
    # lead 1 of origin i - 1 (row origins[i] - 1) is observed at origin i and moves lead 1
    changed = target.copy()
    changed[i - 1, 0] += 100.0
    got = AdaptiveCalibration(6).adapt(origins, changed, mean, var)
    assert not np.array_equal(got[i, 0], base[i, 0])
    np.testing.assert_array_equal(got[i, 1:], base[i, 1:])


def test_the_band_comes_back_to_95_percent_after_a_shift():
    """Errors 2x smaller than the variances say from origin 4000 on (the test months calmer
    than the validation months): the static band covers ~99.99% there, the adaptive one about
    95% once it has moved (and 95% before the shift, where the factor was right)."""
    rng = np.random.default_rng(4)
    n, horizon, channels = 8000, 8, 4
    origins = np.arange(n) + 100
    var = np.ones((n, horizon, channels))
    sd = np.where(np.arange(n) < 4000, 1.0, 0.5)[:, None, None]
    target = sd * rng.normal(size=(n, horizon, channels))
    mean = np.zeros_like(target)
    adapted = AdaptiveCalibration(horizon).adapt(origins, target, mean, var)
    covered = np.abs(target) <= Z95 * np.sqrt(adapted)
    assert abs(covered[:4000].mean() - 0.95) < 0.01
    assert abs(covered[5000:].mean() - 0.95) < 0.01
    assert (np.abs(target[5000:]) <= Z95).mean() > 0.999  # the static band


def test_origins_must_increase_and_rate_is_checked():
    origins, target, mean, var = _case(n=10)
    cal = AdaptiveCalibration(5)
    cal.adapt(origins, target, mean, var)
    with pytest.raises(ValueError, match="must increase"):
        cal.adapt(origins[-1:], target[-1:], mean[-1:], var[-1:])
    with pytest.raises(ValueError, match="rate must be > 0"):
        AdaptiveCalibration(5, rate=0.0)


class _Zero(nn.Module):
    """Forecasts 0 with variance 1 at every lead (the truth below gets calmer in test)."""

    def forecast(self, context, horizon):
        b, _, ch = context.shape
        return Gaussian(torch.zeros(b, horizon, ch), torch.ones(b, horizon, ch))


def test_horizon_metrics_carry_the_calibration_from_validation_into_test():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(6000, 2))
    values[3000:] *= 0.5
    model, adapter = _Zero(), AdaptiveCalibration(4)
    val = horizon_metrics(model, [(values, (1000, 3000))], 8, 4, 1, adaptive=[adapter])
    static = HorizonAccumulator(4)
    test = horizon_metrics(model, [(values, (3000, 6000))], 8, 4, 1, adaptive=[adapter],
                           static=static)
    plain = horizon_metrics(model, [(values, (3000, 6000))], 8, 4, 1).result()
    assert static.result() == plain  # the unadapted metrics, as without adaptation
    assert abs(val.result()["coverage95"] - 0.95) < 0.01
    assert plain["coverage95"] > 0.999 and abs(test.result()["coverage95"] - 0.95) < 0.015
    assert test.result()["crps"] < plain["crps"] and test.result()["mse"] == plain["mse"]


def test_the_task_key_is_validated():
    from tsssm.cli import compose
    from tsssm.config import validate
    from tsssm.errors import ConfigError

    validate(compose(["task=forecast", "task.adaptive_calibration=0.005"]))
    with pytest.raises(ConfigError, match="task.adaptive_calibration"):
        validate(compose(["task=forecast", "task.adaptive_calibration=-0.1"]))


def test_factors_at_is_the_next_origins_factor():
    """factors_at(o) gives exactly the factors adapt would give a forecast from o."""
    origins, target, mean, var = _case(n=50, horizon=5, seed=6)
    whole = AdaptiveCalibration(5, rate=0.05).adapt(origins, target, mean, var)
    cal = AdaptiveCalibration(5, rate=0.05)
    cal.adapt(origins[:40], target[:40], mean[:40], var[:40])
    np.testing.assert_array_equal(cal.factors_at(int(origins[40]))[:, None] * var[40], whole[40])
