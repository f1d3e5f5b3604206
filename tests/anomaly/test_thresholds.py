"""Fitted thresholds: values, POT tail fit, persistence and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tsssm.anomaly.thresholds import (
    MaxThreshold,
    POTThreshold,
    QuantileThreshold,
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
