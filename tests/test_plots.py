"""Plotly figure builders, their serialisation (what plotly.js receives) and the report writer.
What a browser draws from them is tested in tests/browser/."""

from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from tsssm.errors import DataError
from tsssm.plots import (
    F4_TOLERANCE,
    _float32_arrays,
    anomaly_figure,
    attribution_figure,
    comparison_figure,
    forecast_figure,
    message_figure,
    minmax_index,
    overlay_figure,
    runs_of,
    save_html,
    save_report,
)


def _times(n, unit="s"):
    return (np.datetime64("2020-03-09T10:14:33") + np.arange(n).astype(f"timedelta64[{unit}]")
            ).astype("datetime64[ns]")


def _spec(fig) -> dict:
    return json.loads(fig.to_json())


def _is_iso(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", v)


@pytest.mark.parametrize("seed", range(5))
def test_minmax_index_keeps_every_bucket_extreme_and_a_gap(seed):
    rng = np.random.default_rng(seed)
    n, max_points = int(rng.integers(1, 20_000)), int(rng.integers(2, 600))
    y = rng.normal(size=n)
    y[rng.random(n) < 0.01] = np.nan
    idx = minmax_index(y, max_points)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    size = max(1, -(-n // max(1, max_points // 2)))
    if size == 1:
        np.testing.assert_array_equal(idx, np.arange(n))
        return
    kept = set(idx.tolist())
    buckets = 0
    for start in range(0, n, size):  # the oracle: every bucket, brute force
        b = y[start : start + size]
        buckets += 1
        finite = np.flatnonzero(~np.isnan(b))
        if finite.size:
            assert start + finite[np.argmin(b[finite])] in kept
            assert start + finite[np.argmax(b[finite])] in kept
        if np.isnan(b).any():
            assert any(np.isnan(y[i]) for i in range(start, start + b.size) if i in kept)
    assert len(idx) <= 3 * buckets and buckets <= max(1, max_points // 2) + 1


def test_forecast_figure_decimates_caps_channels_and_sends_dates_as_strings():
    T, C = 10_000, 10
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(T, C))
    actual[100:120, 0] = np.nan
    actual[7777, 0] = 50.0  # a spike must survive decimation
    fig = forecast_figure(_times(T), actual, actual * 0.9, np.full((T, C), 0.5),
                          [f"sensor{c}" for c in range(C)], max_points=500, max_channels=3)
    assert len(fig.data) == 3 * 4  # band upper, band lower, predicted, actual per channel
    assert {tr.name for tr in fig.data} == {"+2σ", "±2σ", "predicted", "actual"}
    assert all(len(tr.x) <= 500 + 250 for tr in fig.data)
    assert "first 3 of 10 channels" in fig.layout.title.text
    assert "min/max of each 40 samples (10,000 in all)" in fig.layout.title.subtitle.text
    actual_0 = fig.data[3]
    assert np.nanmax(actual_0.y) == 50.0 and np.isnan(actual_0.y).any()  # spike and gap kept
    spec = _spec(fig)
    assert {spec["layout"][k]["type"] for k in spec["layout"] if k.startswith("xaxis")} == \
        {"date"}
    assert all(_is_iso(x) for tr in spec["data"] for x in tr["x"])
    # integer time axis and one-dimensional inputs work too; no decimation note then
    small = forecast_figure(None, np.arange(5.0), np.arange(5.0), np.ones(5), ["x"])
    assert list(small.data[3].x) == [0, 1, 2, 3, 4] and small.layout.xaxis.type == "linear"
    assert small.layout.title.subtitle.text is None
    with pytest.raises(DataError, match="channel names"):
        forecast_figure(None, actual[:10], actual[:10], actual[:10], ["a"])


def test_anomaly_figure_serialises_for_a_date_axis():
    """The bugs a browser showed: a first legend-only trace (x=[None]) made plotly.js type the
    axis linear, and datetime64[ns] shape corners became integer nanoseconds."""
    T = 50_000
    rng = np.random.default_rng(1)
    score = rng.exponential(size=T)
    score[31_337] = 100.0
    labels = np.zeros(T, bool)
    labels[30_000:32_000] = True
    labels[40_000:40_010] = True
    flags = score > 8.0
    t = _times(T)
    fig = anomaly_figure(t, score, 8.0, labels, flags, log_y=True, max_points=1000)
    by_name = {tr.name: tr for tr in fig.data}
    assert {"score", "threshold (8)", "flagged", "labelled anomaly"} <= set(by_name)
    assert fig.data[0].name == "score"  # data first: nothing empty decides the axis
    assert len(by_name["score"].y) <= 1000 and max(by_name["score"].y) == 100.0
    assert 100.0 in list(by_name["flagged"].y)
    assert fig.layout.yaxis.type == "log"
    spec = _spec(fig)
    assert spec["layout"]["xaxis"]["type"] == "date"
    shapes = spec["layout"]["shapes"]
    assert [(s["x0"], s["x1"]) for s in shapes] == [
        ("2020-03-09T18:34:33", "2020-03-09T19:07:52"),  # rows 30000 and 31999, exactly
        ("2020-03-09T21:21:13", "2020-03-09T21:21:22"),
    ]
    text = fig.to_json()
    assert not re.search(r"1[5-6]\d{17}", text)  # no integer nanoseconds anywhere
    for tr in spec["data"]:
        if tr["name"] != "labelled anomaly":
            assert all(_is_iso(x) for x in tr["x"]), tr["name"]
    plain = anomaly_figure(np.arange(10), np.arange(10.0), None)
    assert [tr.name for tr in plain.data] == ["score"] and plain.layout.xaxis.type == "linear"
    assert [tr.name for tr in anomaly_figure(None, np.ones(3), float("nan")).data] == ["score"]


def test_anomaly_figure_caps_flags_and_shapes():
    T = 200_000
    score = np.random.default_rng(2).exponential(size=T)
    labels = np.zeros(T, bool)
    labels[::100] = True  # 2000 one-row intervals
    fig = anomaly_figure(None, score, 0.5, labels, score > 0.5, max_points=2000)
    flagged = next(tr for tr in fig.data if tr.name == "flagged")
    assert len(flagged.x) <= 2000
    assert max(flagged.y) == score.max()
    assert len(fig.layout.shapes) == 300  # merged down to MAX_SHAPES, spanning them all
    assert fig.layout.shapes[0].x0 == 0 and fig.layout.shapes[-1].x1 == T - 100


def test_window_restricts_the_figure_and_sub_second_times_keep_their_digits():
    t = _times(100_000, "ms")
    score = np.sin(np.arange(100_000) / 500.0) + 2
    fig = anomaly_figure(t, score, 2.5, window=(t[1000], t[1999]), max_points=4000)
    x = fig.data[0].x
    assert len(x) == 1002  # the window's 1000 rows and one either side, all of them
    assert x[0] == "2020-03-09T10:14:33.999" and x[-1] == "2020-03-09T10:14:35.000"
    assert fig.layout.xaxis.range == ("2020-03-09T10:14:34.000", "2020-03-09T10:14:34.999")
    assert fig.layout.title.subtitle.text is None  # the window fits: not decimated
    numeric = forecast_figure(np.arange(50.0), np.ones(50), np.ones(50), np.ones(50),
                              window=(10, 20))
    assert list(numeric.data[3].x) == list(range(9, 22))


def test_runs_of():
    assert runs_of(np.array([0, 1, 1, 0, 1], bool)) == [(1, 2), (4, 4)]
    assert runs_of(np.zeros(3, bool)) == []


def test_comparison_figure_uses_the_metric_keys_and_skips_missing_values():
    rows = [
        {"method": "kalman", "test/f1": 0.61, "test/auc_pr": 0.7, "test/mae": 0.3},
        {"method": "ewma", "test/f1": 0.4, "test/auc_pr": float("nan"), "test/mae": 0.5},
        {"method": "isolation_forest", "test/f1": 0.5, "test/auc_pr": 0.55},
    ]
    fig = comparison_figure(rows, metrics=("test/f1", "test/auc_pr", "test/mae", "h_mae"))
    assert [tr.name for tr in fig.data] == ["test/f1", "test/auc_pr", "test/mae"]  # no h_mae
    assert np.isnan(fig.data[1].y[1]) and list(fig.data[1].text) == ["0.7", "n/a", "0.55"]
    assert list(fig.data[0].x) == ["kalman", "ewma", "isolation_forest"]
    assert fig.layout.xaxis.type == "category"
    with pytest.raises(DataError, match=r"no row has any of \['f1'\].*test/f1"):
        comparison_figure(rows, metrics=("f1",))  # the old default keys: say so, not draw axes


def test_attribution_and_overlay_figures():
    fig = attribution_figure({"flow": 6.0, "vibration": 3.0, "temp": 1.0}, title="interval")
    (bar,) = fig.data
    assert list(bar.y) == ["temp", "vibration", "flow"]  # largest on top
    np.testing.assert_allclose(bar.x, [10.0, 30.0, 60.0])
    with pytest.raises(DataError):
        attribution_figure({"a": float("nan")})
    t = _times(300)
    fig = overlay_figure([("kalman", t, np.ones(300)), ("mamba", t, np.arange(300.0))],
                         "scores", reference=("actual", t, np.zeros(300)))
    assert [tr.name for tr in fig.data] == ["actual", "kalman", "mamba"]
    assert fig.layout.xaxis.type == "date"
    with pytest.raises(DataError, match="time axis"):
        overlay_figure([("a", t, np.ones(300)), ("b", np.arange(300), np.ones(300))], "x")
    assert message_figure("nothing").layout.annotations[0].text == "nothing"


def test_report_holds_one_plotly_js_and_every_figure(tmp_path):
    t = _times(500)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 3))
    figs = [
        ("forecast valve1/0", forecast_figure(t, a, a, np.ones_like(a), ["x", "y", "z"])),
        ("anomaly <score>", anomaly_figure(t, np.abs(a[:, 0]), 2.5, a[:, 1] > 1, a[:, 0] > 2)),
        ("comparison", comparison_figure([{"method": "m", "test/f1": 0.5}])),
    ]
    path = save_report(figs, tmp_path / "nested" / "report.html", title="run 123")
    text = path.read_text(encoding="utf-8")
    # one bundle, embedded gzipped (the page unpacks it): the installed plotly.js, byte for byte
    (packed,) = re.findall(r'<script type="application/octet-stream" id="plotly-js-gzip" '
                           r'data-encoding="gzip\+base64">([A-Za-z0-9+/=]+)</script>', text)
    assert gzip.decompress(base64.b64decode(packed)).decode() == get_plotlyjs()
    assert not re.search(r"plotly\.js v\d+\.\d+\.\d+", text)  # and no plain copy besides
    assert path.stat().st_size < len(get_plotlyjs()) / 2  # 2.0 of plotly.js's 4.8 MB
    assert not re.search(r"<script[^>]+src=", text)  # nothing fetched
    assert text.count('class="figure-json"') == 3
    for name in ("forecast valve1/0", "anomaly &lt;score&gt;", "comparison", "run 123"):
        assert name in text
    shared = json.loads(re.search(r'<script type="application/json" id="shared-arrays">(.*?)'
                                  r"</script>", text, re.S).group(1))
    assert shared.count([str(x) for x in np.datetime_as_string(t, unit="s")]) == 1
    assert not list(tmp_path.glob("nested/.*.tmp"))
    with pytest.raises(DataError):
        save_report([], tmp_path / "empty.html")


def _typed(values) -> dict:
    return {"dtype": "f8", "bdata": base64.b64encode(np.asarray(values, "<f8").tobytes()).decode()}


def _decoded(typed: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(typed["bdata"]), dtype="<" + typed["dtype"])


@pytest.mark.parametrize("seed", range(5))
def test_report_values_go_as_float32_only_where_that_draws_the_same(seed):
    rng = np.random.default_rng(seed)
    scaled = rng.normal(size=500) * 10.0 ** rng.uniform(-3, 3)  # any scale: ratio is what counts
    scaled[rng.integers(0, 500, 20)] = np.nan
    epoch_seconds = 1.7e9 + np.arange(500.0)  # a numeric time axis: float32 is off by ~100 s
    offset = 101_325.0 + rng.normal(scale=0.01, size=500)  # a tiny wobble on a large level
    constant = np.full(10, 0.1)  # a threshold line: no range, so float32 must be exact
    huge = np.array([1.0, 1e300])  # beyond float32
    spec = {"data": [{"x": _typed(epoch_seconds), "y": _typed(scaled)},
                     {"y": _typed(offset), "z": {"dtype": "i4", "bdata": "AAAAAA=="}},
                     {"y": _typed(constant), "text": ["a", "b"]}, {"y": _typed(huge)},
                     {"y": _typed([0.5, 0.25, np.nan])}]}
    _float32_arrays(spec["data"])
    x, y = spec["data"][0]["x"], spec["data"][0]["y"]
    assert x["dtype"] == "f8" and np.array_equal(_decoded(x), epoch_seconds)
    assert y["dtype"] == "f4"
    got, finite = _decoded(y).astype(float), np.isfinite(scaled)
    assert np.array_equal(np.isnan(got), ~finite)  # gaps stay gaps
    span = np.nanmax(scaled) - np.nanmin(scaled)
    assert np.max(np.abs(got[finite] - scaled[finite])) <= F4_TOLERANCE * span
    assert spec["data"][1]["y"]["dtype"] == "f8"  # its float32 would flatten the wobble
    assert spec["data"][1]["z"] == {"dtype": "i4", "bdata": "AAAAAA=="}  # not a float array
    assert spec["data"][2]["y"]["dtype"] == "f8"  # 0.1 is not a float32
    assert spec["data"][3]["y"]["dtype"] == "f8"
    tail = spec["data"][4]["y"]
    assert tail["dtype"] == "f4" and np.array_equal(_decoded(tail)[:2], [0.5, 0.25])


def test_save_html_is_self_contained(tmp_path):
    fig = anomaly_figure(_times(500), np.abs(np.random.default_rng(2).normal(size=500)), 2.5,
                         flags=np.zeros(500, bool), title="valve1 file 0 score")
    path = save_html(fig, tmp_path / "nested" / "score.html")
    html = path.read_text(encoding="utf-8")
    assert re.search(r"plotly\.js v\d+\.\d+\.\d+", html)  # the bundle's own banner
    assert not re.search(r"<script[^>]+src=\"https?://", html)  # nothing fetched from a CDN
    for name in ("score", "threshold (2.5)", "valve1 file 0 score"):
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
