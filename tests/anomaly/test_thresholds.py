"""Fitted thresholds: values, POT tail fit, persistence and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tsssm.anomaly.thresholds import (
    DSPOTThreshold,
    MaxThreshold,
    POTThreshold,
    QuantileThreshold,
    SPOTThreshold,
    Threshold,
    build_threshold,
    threshold_from_dict,
)
from tsssm.errors import ConfigError, DataError, ModelError, NumericalError


def test_quantile_and_max_values():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    q = QuantileThreshold(0.9).fit(scores)
    assert q.value == pytest.approx(np.quantile(scores, 0.9))
    m = MaxThreshold(1.5).fit(torch.tensor(scores).view(4, 25))  # any shape, torch accepted
    assert m.value == pytest.approx(150.0)
    flags = q.flags(np.array([[90.0, 91.0], [q.value, 1000.0]]))
    assert flags.dtype == bool and flags.shape == (2, 2)
    assert flags.tolist() == [[False, True], [False, True]]  # strictly greater than the value


def test_pot_on_exponential_tail_recovers_the_true_quantile():
    # Exponential scores: the excesses over any level are exponential (GPD with shape 0), and the
    # score exceeded with probability q is -log(q) exactly.
    rng = np.random.default_rng(0)
    scores = rng.exponential(1.0, size=200_000)
    for method in ("mle", "moments"):
        pot = POTThreshold(q=1e-4, level=0.98, method=method).fit(scores)
        state = pot.to_dict()["state"]
        assert abs(state["gamma"]) < 0.05
        assert state["sigma"] == pytest.approx(1.0, rel=0.05)
        assert pot.value == pytest.approx(-math.log(1e-4), rel=0.05)
        # beyond the empirical 99.99th percentile's noisy estimate, but not absurdly far
        assert np.mean(scores > pot.value) == pytest.approx(1e-4, abs=1e-4)


def test_pot_on_heavy_tail_is_above_quantile_of_training_data():
    # Pareto(3) scores: shape 1/3; the 1e-3 level is extrapolated from a 2000-point sample.
    rng = np.random.default_rng(1)
    scores = rng.pareto(3.0, size=2000) + 1.0
    pot = POTThreshold(q=1e-3, level=0.95).fit(scores)
    true = 1e-3 ** (-1 / 3)  # survival function x^-3 = q
    assert 0.1 < pot.to_dict()["state"]["gamma"] < 0.7
    assert pot.value == pytest.approx(true, rel=0.35)
    assert pot.value > np.quantile(scores, 0.95)


def test_round_trip_through_json():
    scores = np.random.default_rng(2).gamma(2.0, size=5000)
    for thr in (QuantileThreshold(0.995), MaxThreshold(1.2), POTThreshold(1e-3, 0.97)):
        thr.fit(scores)
        d = json.loads(json.dumps(thr.to_dict()))
        back = Threshold.from_dict(d)
        assert type(back) is type(thr) and back.value == thr.value
        assert back.params() == thr.params()
        assert np.array_equal(back.flags(scores), thr.flags(scores))
    unfitted = threshold_from_dict(QuantileThreshold(0.9).to_dict())
    assert not unfitted.fitted
    with pytest.raises(ModelError, match="not fitted"):
        _ = unfitted.value


def test_factory_and_errors():
    assert isinstance(build_threshold("pot", q=1e-3, level=0.9), POTThreshold)
    with pytest.raises(ConfigError, match="unknown threshold 'kde'.*quantile"):
        build_threshold("kde")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_threshold("quantile", level=0.9)
    with pytest.raises(ConfigError):
        QuantileThreshold(1.5)
    with pytest.raises(ConfigError, match="1 - level"):
        POTThreshold(q=0.05, level=0.98)
    with pytest.raises(NumericalError, match="non-finite"):
        QuantileThreshold().fit([1.0, np.nan])
    with pytest.raises(DataError, match="no training scores"):
        MaxThreshold().fit([])
    with pytest.raises(DataError, match="at least"):
        POTThreshold(level=0.98).fit(np.arange(8.0))  # too few scores for 5 excesses
    with pytest.raises(DataError, match="at least"):
        POTThreshold(level=0.9).fit(np.ones(100))  # ties: no score above the level
    # 100 scores leave 2 excesses above the 0.98 quantile: the initial threshold moves down to
    # leave 5 (the tail needs a handful of points), and says so
    small = POTThreshold(q=1e-3, level=0.98).fit(np.arange(100.0))
    assert small.to_dict()["state"]["level_used"] == pytest.approx(0.95)
    assert small.to_dict()["state"]["n_excesses"] == 5
    with pytest.raises(NumericalError):
        QuantileThreshold().fit([1.0, 2.0]).flags([np.nan])


def test_pot_degenerate_tail_falls_back_to_max():
    scores = np.concatenate([np.zeros(90), np.full(10, 5.0)])
    pot = POTThreshold(q=1e-3, level=0.5).fit(scores)
    assert pot.value == 5.0 and pot.to_dict()["state"]["fit"] == "degenerate"


@pytest.mark.parametrize("name, sample, quantile", [
    # (distribution, sampler, the true score exceeded with probability 1e-3)
    ("exponential", lambda r, n: r.exponential(2.0, n), lambda q: -2.0 * math.log(q)),
    ("gamma(3)", lambda r, n: r.gamma(3.0, 1.0, n), None),
    ("half-normal", lambda r, n: np.abs(r.normal(size=n)), None),
    ("student-t(6) abs", lambda r, n: np.abs(r.standard_t(6, n)), None),
    ("chi2(8)/8", lambda r, n: r.chisquare(8, n) / 8, None),
])
def test_pot_recovers_the_true_quantile_of_known_distributions(name, sample, quantile):
    """POT fitted on 100,000 training scores extrapolates from the 98% quantile to the 99.9%
    one within 5% of the true value (scipy's quantile function is the oracle)."""
    from scipy import stats

    true = {
        "gamma(3)": stats.gamma(3.0).isf(1e-3),
        "half-normal": stats.halfnorm().isf(1e-3),
        "student-t(6) abs": stats.t(6).isf(0.5e-3),
        "chi2(8)/8": stats.chi2(8).isf(1e-3) / 8,
    }.get(name) if quantile is None else quantile(1e-3)
    scores = sample(np.random.default_rng(11), 100_000)
    pot = POTThreshold(q=1e-3, level=0.98).fit(scores)
    assert pot.value == pytest.approx(true, rel=0.05), name


def test_spot_tracks_the_tail_along_a_stream_and_ignores_anomalies():
    rng = np.random.default_rng(2)
    train = rng.exponential(1.0, 20_000)
    spot = SPOTThreshold(q=1e-3, level=0.98).fit(train)
    pot = POTThreshold(q=1e-3, level=0.98).fit(train)
    assert spot.value == pytest.approx(pot.value)  # the same initial fit
    stream = rng.exponential(1.0, 50_000)
    stream[30_000:30_010] = 50.0  # anomalies: flagged, never peaks
    levels = spot.levels(stream)
    flags = spot.flags(stream)
    assert flags[30_000:30_010].all()
    assert levels[30_011] == pytest.approx(levels[29_999], rel=1e-3)  # the tail did not move
    # scores above the threshold never become peaks (the paper's rule), which censors the tail
    # a little: after 50,000 scores the level is still within 15% of the true quantile
    assert levels[-1] == pytest.approx(-math.log(1e-3), rel=0.15)
    normal = np.r_[flags[:30_000], flags[30_010:]]
    assert 0.5e-3 < normal.mean() < 2.5e-3  # the risk, up to the censoring drift
    # streams are independent: the fitted state is not mutated
    assert spot.levels(stream[:10])[0] == pytest.approx(spot.value)
    again = threshold_from_dict(json.loads(json.dumps(spot.to_dict())))
    np.testing.assert_allclose(again.levels(stream[:2000]), levels[:2000])


def test_dspot_follows_a_drifting_score():
    rng = np.random.default_rng(3)
    train = rng.exponential(1.0, 5000)
    drifting = rng.exponential(1.0, 20_000) + np.linspace(0, 20, 20_000)
    static = POTThreshold(q=1e-3, level=0.98).fit(train)
    dspot = DSPOTThreshold(q=1e-3, level=0.98, depth=20).fit(train)
    assert static.flags(drifting).mean() > 0.5  # a fixed threshold drowns in the drift
    assert dspot.flags(drifting).mean() < 0.01
    bump = drifting.copy()
    bump[15_000] += 30.0
    assert dspot.flags(bump)[15_000]
    assert build_threshold("dspot", q=1e-3, depth=5).params()["depth"] == 5
    with pytest.raises(ConfigError):
        DSPOTThreshold(depth=0)
