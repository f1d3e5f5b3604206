"""Anomaly and forecast metrics against scikit-learn and hand-computed oracles."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    recall_score,
)

from tsssm.anomaly.metrics import anomaly_metrics, confusion_counts, forecast_metrics
from tsssm.errors import DataError, NumericalError

binary_pairs = st.integers(min_value=1, max_value=300).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(binary_pairs)
def test_metrics_match_sklearn(pair):
    labels, flags = (np.array(x, dtype=bool) for x in pair)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our metrics must never warn
        m = anomaly_metrics(labels, flags)
    tn, fp, fn, tp = confusion_matrix(labels, flags, labels=[False, True]).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["precision"] == pytest.approx(precision_score(labels, flags, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(labels, flags, zero_division=0))
    assert m["f1"] == pytest.approx(f1_score(labels, flags, zero_division=0))
    assert m["far"] == pytest.approx(fp / (fp + tn) if fp + tn else 0.0)
    assert m["mar"] == pytest.approx(fn / (fn + tp) if fn + tp else 0.0)
    assert all(np.isfinite(v) for v in m.values())


def test_auc_pr_matches_sklearn_and_skab_f1_formula():
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.2
    scores = rng.normal(size=2000) + 1.5 * labels
    flags = scores > 1.0
    m = anomaly_metrics(labels, flags, scores)
    assert m["auc_pr"] == pytest.approx(average_precision_score(labels, scores))
    # SKAB's chp_score(metric="binary") form of F1: TP / (TP + (FN + FP) / 2).
    assert m["f1"] == pytest.approx(m["tp"] / (m["tp"] + (m["fn"] + m["fp"]) / 2))
    assert m["n"] == 2000 and m["n_positive"] == labels.sum() and m["n_flagged"] == flags.sum()


def test_torch_and_float_inputs_and_summing_over_files():
    labels = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    flags = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    m = anomaly_metrics(labels, flags)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 4, 1)
    # SKAB aggregates files by summing counts: same as one call on the concatenation.
    per_file = [confusion_counts(labels[i], flags[i]) for i in range(2)]
    assert sum(c["tp"] for c in per_file) == m["tp"]


def test_degenerate_cases_are_finite_and_documented():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none_flagged = anomaly_metrics([0, 1, 1], [0, 0, 0], [0.1, 0.2, 0.3])
        no_positive = anomaly_metrics([0, 0, 0], [0, 1, 0], [0.1, 0.9, 0.3])
        all_positive = anomaly_metrics([1, 1], [1, 0], [0.5, 0.1])
    assert none_flagged["precision"] == 0.0 and none_flagged["recall"] == 0.0
    assert none_flagged["mar"] == 1.0 and none_flagged["far"] == 0.0
    assert no_positive["recall"] == 0.0 and no_positive["mar"] == 0.0
    assert no_positive["auc_pr"] == 0.0 and no_positive["far"] == pytest.approx(1 / 3)
    assert all_positive["far"] == 0.0 and all_positive["auc_pr"] == 1.0
    empty = anomaly_metrics([], [], [])
    assert empty["f1"] == 0.0 and empty["n"] == 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match="binary"):
        anomaly_metrics([0, 2], [0, 1])
    with pytest.raises(DataError, match="binary"):
        anomaly_metrics([0, np.nan], [0, 1])
    with pytest.raises(DataError, match="length"):
        anomaly_metrics([0, 1, 0], [0, 1])
    with pytest.raises(NumericalError):
        anomaly_metrics([0, 1], [0, 1], [0.0, np.nan])


def test_forecast_metrics_skip_missing_and_masked():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(3, 50, 4))
    p = y + rng.normal(size=y.shape)
    y_missing = y.copy()
    y_missing[0, :10, 1] = np.nan
    mask = np.ones_like(y, dtype=bool)
    mask[2] = False
    m = forecast_metrics(torch.from_numpy(y_missing), torch.from_numpy(p), mask)
    valid = ~np.isnan(y_missing) & mask
    assert m["n"] == valid.sum()
    assert m["mae"] == pytest.approx(mean_absolute_error(y[valid], p[valid]))
    assert m["mse"] == pytest.approx(mean_squared_error(y[valid], p[valid]))
    assert forecast_metrics(np.full((2, 3), np.nan), np.zeros((2, 3))) == {
        "mae": 0.0, "mse": 0.0, "n": 0.0
    }


def test_forecast_metrics_reject_nan_forecast_and_shape_mismatch():
    with pytest.raises(NumericalError):
        forecast_metrics(np.zeros(3), np.array([0.0, np.nan, 0.0]))
    # A NaN forecast where the actual value is missing is irrelevant and allowed.
    assert forecast_metrics(np.array([0.0, np.nan]), np.array([1.0, np.nan]))["mae"] == 1.0
    with pytest.raises(DataError, match="shape"):
        forecast_metrics(np.zeros((2, 3)), np.zeros((3, 2)))
