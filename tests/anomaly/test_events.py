"""Range metrics on hand-worked cases: events with delay, VUS-PR, SKAB's NAB score; AUC-PR
against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from tsssm.anomaly.events import (
    event_metrics,
    nab_score,
    predicted_changepoints,
    soft_labels,
    vus_pr,
)
from tsssm.anomaly.metrics import anomaly_metrics
from tsssm.errors import DataError


def test_event_metrics_by_hand():
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    flags = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1])
    m = event_metrics(labels, flags)
    # events [1, 4) and [6, 8): the first found at row 2 (delay 1), the second missed;
    # flagged runs [2, 3) (inside an event) and [8, 9) (not)
    assert m["event_recall"] == 0.5 and m["event_precision"] == 0.5 and m["event_f1"] == 0.5
    assert m["delay_mean"] == 1.0 and m["n_events"] == 2 and m["n_flagged_runs"] == 2
    # per stream: an event does not continue into the next stream
    two = event_metrics([np.array([0, 1]), np.array([1, 0])], [np.array([0, 1]), np.array([0, 0])])
    assert two["n_events"] == 2 and two["event_recall"] == 0.5
    none = event_metrics(np.zeros(5), np.zeros(5))
    assert none["event_recall"] == 0.0 and none["event_precision"] == 0.0


def test_soft_labels_by_hand():
    lab = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(soft_labels(lab, 1), lab)
    s = soft_labels(lab, 4)  # two rows of slope each side: sqrt(1 - d/4), d = 1, 2
    a, b = math.sqrt(0.75), math.sqrt(0.5)
    np.testing.assert_allclose(s, [0, b, a, 1, 1, a, b, 0])


def test_vus_pr_by_hand():
    labels = np.array([0, 0, 1, 1, 0, 0])
    perfect = labels.astype(float)
    assert vus_pr(labels, perfect, max_buffer=0) == pytest.approx(1.0)
    # buffer 2: one soft row each side, sqrt(1/2); a score that rises into the event.
    # thresholds 1, 0.5, 0: at 1 precision 1, recall 2 / P with P = (2 + 2 + 2 sqrt(1/2)) / 2;
    # at 0.5 recall 1, precision (2 + 2 sqrt(1/2)) / 4; at 0 nothing new
    score = np.array([0, 0.5, 1, 1, 0.5, 0])
    r = math.sqrt(0.5)
    P = (2 + 2 + 2 * r) / 2
    r1, p2 = 2 / P, (2 + 2 * r) / 4
    auc_b2 = r1 * 1.0 + (1 - r1) * (1 + p2) / 2
    # buffers 0 and 1 leave the labels binary: the ranking is perfect there
    assert vus_pr(labels, score, max_buffer=2) == pytest.approx((1 + 1 + auc_b2) / 3)
    # a ranking with no information sits near the fraction of (soft) positives
    rng = np.random.default_rng(0)
    lab = np.zeros(20_000, dtype=int)
    for start in range(100, 20_000, 1000):
        lab[start:start + 100] = 1
    assert vus_pr(lab, rng.random(lab.size), max_buffer=10) == pytest.approx(0.1, abs=0.03)
    assert vus_pr(np.zeros(10), np.arange(10.0)) == 0.0  # no event: undefined, 0
    with pytest.raises(DataError):
        vus_pr(labels, np.array([0, np.nan, 1, 1, 0, 0]))


def test_auc_pr_matches_an_independent_step_integral():
    rng = np.random.default_rng(4)
    labels = rng.random(3000) < 0.3
    scores = rng.normal(size=3000) + 1.2 * labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    # average precision: sum over thresholds of (R_n - R_{n-1}) P_n
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))
    assert anomaly_metrics(labels, scores > 1, scores)["auc_pr"] == pytest.approx(ap)


def test_predicted_changepoints_follow_skab():
    f = np.array([1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(predicted_changepoints(f), [1, 0, 1, 0, 1, 1])


def _stream(n=200, cps=(50, 150)):
    t = np.arange(n).astype("datetime64[s]").astype("datetime64[ns]")
    cp = np.zeros(n, dtype=int)
    cp[list(cps)] = 1
    return t, cp


def test_nab_by_hand():
    t, cp = _stream()  # windows [50 s, 110 s] and [150 s, 210 s]
    flags = np.zeros(200, dtype=int)
    flags[50:81] = 1  # predicted change points at 50 (window start: A_tp) and 81 (same window)
    m = nab_score(cp, flags, t)
    # standard: 1 (hit at the start) - 1 (second window missed) = 0; null -2, perfect 2
    assert m["nab_standard"] == pytest.approx(50.0)
    assert m["nab_low_fn"] == pytest.approx(100 * (1 - 2 + 4) / 6)
    assert (m["nab_fp"], m["nab_missed"], m["nab_windows"]) == (0, 1, 2)
    flags[10:13] = 1  # two false positives (10 and 13)
    m = nab_score(cp, flags, t)
    assert m["nab_standard"] == pytest.approx(100 * (0 - 0.22 + 2) / 4)
    assert m["nab_low_fp"] == pytest.approx(100 * (0 - 0.44 + 2) / 4)
    # a detection half way through the window scores the scaled sigmoid there
    flags = np.zeros(200, dtype=int)
    flags[80:] = 1  # rises at 80 s (window 1, position 0.5), stays up: window 2 missed
    x = np.linspace(-math.pi / 2, math.pi / 2, 1000)[500]
    hit = -0.11 + 1.11 / 2 * (1 - math.tanh(x) / math.tanh(math.pi / 2))
    assert nab_score(cp, flags, t)["nab_standard"] == pytest.approx(100 * (hit - 1 + 2) / 4)
    # a perfect detector: a change predicted at every change point
    flags = np.zeros(200, dtype=int)
    flags[50:150] = 1
    assert nab_score(cp, flags, t)["nab_standard"] == pytest.approx(100.0)
    assert nab_score(cp, np.zeros(200), t)["nab_standard"] == pytest.approx(0.0)


def test_nab_overlapping_windows_and_streams():
    t, cp = _stream(cps=(50, 70))  # windows [50, 110] and, cut, [110, 130]
    flags = np.zeros(200, dtype=int)
    flags[115:] = 1  # a change at 115 s: inside the second window only
    m = nab_score(cp, flags, t)
    assert (m["nab_missed"], m["nab_fp"]) == (1, 0)
    # summed over streams before normalising, as SKAB's evaluator does
    both = nab_score([cp, cp], [flags, flags], [t, t])
    assert both["nab_standard"] == pytest.approx(m["nab_standard"])
    assert both["nab_windows"] == 4
    with pytest.raises(DataError):
        nab_score([cp], [flags[:-1]], [t])
