"""Plotly figure builders and the self-contained HTML writer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tsssm.errors import DataError
from tsssm.plots import anomaly_figure, comparison_figure, forecast_figure, save_html


def _times(n):
    return np.datetime64("2020-03-09T10:14:33") + np.arange(n).astype("timedelta64[s]")


def test_forecast_figure_downsamples_and_caps_channels():
    T, C = 10_000, 10
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(T, C))
    actual[100:120, 0] = np.nan
    fig = forecast_figure(_times(T), actual, actual * 0.9, np.full((T, C), 0.5),
                          [f"sensor{c}" for c in range(C)], max_points=500, max_channels=3)
    assert len(fig.data) == 3 * 4  # band upper, band lower, predicted, actual per channel
    assert {tr.name for tr in fig.data} == {"+2σ", "±2σ", "predicted", "actual"}
    assert all(len(tr.x) <= 500 for tr in fig.data)
    assert "first 3 of 10 channels" in fig.layout.title.text
    lower = fig.data[1]
    np.testing.assert_allclose(lower.y, (actual * 0.9)[:: T // 500, 0] - 1.0)
    # integer time axis and one-dimensional inputs work too
    small = forecast_figure(None, np.arange(5.0), np.arange(5.0), np.ones(5), ["x"])
    assert list(small.data[3].x) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="channel names"):
        forecast_figure(None, actual[:10], actual[:10], actual[:10], ["a"])


def test_anomaly_figure_keeps_spikes_and_marks_labels_and_flags():
    T = 50_000
    rng = np.random.default_rng(1)
    score = rng.exponential(size=T)
    score[31_337] = 100.0
    labels = np.zeros(T, bool)
    labels[30_000:32_000] = True
    labels[40_000:40_010] = True
    flags = score > 8.0
    fig = anomaly_figure(_times(T), score, 8.0, labels, flags, log_y=True, max_points=1000)
    by_name = {tr.name: tr for tr in fig.data}
    assert {"score", "threshold (8)", "flagged", "labelled anomaly"} <= set(by_name)
    assert len(by_name["score"].y) <= 1000 and max(by_name["score"].y) == 100.0
    assert 100.0 in list(by_name["flagged"].y)
    assert len(fig.layout.shapes) == 2  # two labelled runs, shaded
    assert fig.layout.yaxis.type == "log"
    plain = anomaly_figure(np.arange(10), np.arange(10.0), None)
    assert [tr.name for tr in plain.data] == ["score"]


def test_comparison_figure_skips_missing_values():
    rows = [
        {"method": "kalman", "f1": 0.61, "auc_pr": 0.7, "mae": 0.3},
        {"method": "ewma", "f1": 0.4, "auc_pr": float("nan"), "mae": 0.5},
        {"method": "isolation_forest", "f1": 0.5, "auc_pr": 0.55},
    ]
    fig = comparison_figure(rows)
    assert [tr.name for tr in fig.data] == ["f1", "auc_pr", "mae"]
    assert list(fig.data[1].y) == [0.7, None, 0.55]
    assert list(fig.data[2].y) == [0.3, 0.5, None]
    assert list(fig.data[0].x) == ["kalman", "ewma", "isolation_forest"]


def test_save_html_is_self_contained(tmp_path):
    fig = anomaly_figure(_times(500), np.abs(np.random.default_rng(2).normal(size=500)), 2.5,
                         flags=np.zeros(500, bool), title="valve1 file 0 score")
    path = save_html(fig, tmp_path / "nested" / "score.html")
    html = path.read_text(encoding="utf-8")
    assert re.search(r"plotly\.js v\d+\.\d+\.\d+", html)  # the bundle's own banner
    assert len(html) > 1_000_000  # the inlined bundle is several MB
    assert not re.search(r"<script[^>]+src=\"https?://", html)  # nothing fetched from a CDN
    for name in ("score", "threshold (2.5)", "flagged", "valve1 file 0 score"):
        assert name in html


def test_anomaly_figure_shows_each_channels_contribution():
    T, C = 3000, 7
    rng = np.random.default_rng(5)
    contrib = rng.random((T, C)) * 0.1
    contrib[1000:1200, 4] += 5.0  # the channel that raised the flags
    score = contrib.sum(1)
    names = [f"sensor{j}" for j in range(C)]
    fig = anomaly_figure(_times(T), score, 2.0, None, score > 2.0, contributions=contrib,
                         channel_names=names, max_channels=3, max_points=1000)
    stacked = [t for t in fig.data if getattr(t, "stackgroup", None) == "contrib"]
    assert [t.name for t in stacked][0] == "sensor4" and len(stacked) == 4  # top 3 + "other"
    assert stacked[-1].name == "other"
    assert all(len(t.x) <= 1000 for t in fig.data if t.x is not None)
    with pytest.raises(DataError):
        anomaly_figure(_times(T), score, 2.0, contributions=contrib, channel_names=names[:2])
