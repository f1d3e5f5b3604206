"""Every figure type of tsssm/plots.py, as Chromium draws it from a saved report: traces drawn
(SVG paths with points), time axes that read as dates, and the report of a real `tsssm train`
opened from its MLflow artifacts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tsssm import plots

T = 3000
MILLION = 1_000_000


@pytest.fixture(scope="module")
def report(tmp_path_factory, browser):
    """One report holding every figure type, opened once."""
    rng = np.random.default_rng(0)
    t = (np.datetime64("2020-03-09T10:14:33") + np.arange(T).astype("timedelta64[s]")
         ).astype("datetime64[ns]")
    actual = np.cumsum(rng.normal(size=(T, 3)), axis=0)
    mean = actual + rng.normal(scale=0.3, size=(T, 3))
    score = rng.exponential(size=T)
    labels = np.zeros(T, bool)
    labels[1000:1200] = labels[2500:2550] = True
    score[labels] *= 4
    threshold = 6.0
    flags = score > threshold
    big_t = (np.datetime64("2021-01-01") + np.arange(MILLION).astype("timedelta64[ms]")
             ).astype("datetime64[ns]")
    big = rng.exponential(size=MILLION)
    figures = [
        ("forecast", plots.forecast_figure(t, actual, mean, np.full((T, 3), 0.5),
                                           ["flow", "pressure", "vibration"])),
        ("anomaly", plots.anomaly_figure(t, score, threshold, labels, flags, log_y=True)),
        ("decimated", plots.anomaly_figure(big_t, big, 8.0, None, big > 8.0,
                                           title="a million scores")),
        ("comparison", plots.comparison_figure(
            [{"method": "kalman", "test/f1": 0.6, "test/auc_pr": 0.7, "test/mae": 0.3},
             {"method": "mamba", "test/f1": 0.5, "test/auc_pr": 0.65, "test/mae": 0.25},
             {"method": "isolation_forest", "test/f1": 0.4, "test/auc_pr": 0.5}])),
        ("attribution", plots.attribution_figure(
            {"flow": 1.0, "pressure": 5.0, "vibration": 2.0, "temp": 0.5})),
        ("overlay", plots.overlay_figure([("kalman", t, score), ("mamba", t, score * 0.8)],
                                         "scores", reference=("actual", t, actual[:, 0]))),
        ("message", plots.message_figure("nothing to draw")),
    ]
    path = plots.save_report(figures, tmp_path_factory.mktemp("report") / "report.html")
    expected = {"flags": int(flags.sum()), "label_runs": 2,
                # what Python sent as the first forecast's "actual" line (float64, decimated)
                "actual": np.asarray(next(t for t in figures[0][1].data
                                          if t.name == "actual").y, dtype=np.float64)}
    return path, expected


@pytest.fixture()
def drawn(report, probe):
    path, expected = report
    probe.open(path.as_uri())
    probe.graph("fig-6-plot", drawn=0)  # the last figure is up: all earlier ones are too
    return probe.graphs(), expected


def test_forecast_draws_lines_band_and_dates(drawn, reads_dates):
    graphs, _ = drawn
    g = graphs["fig-0-plot"]
    assert g["lines"] >= 2 * 3  # predicted and actual of each channel
    assert g["fills"] == 3  # one ±2σ band per channel
    assert reads_dates(g["xticks"]), g["xticks"]
    assert {"±2σ", "predicted", "actual"} <= set(g["legend"])


def test_anomaly_draws_score_threshold_flags_and_labels(drawn, reads_dates):
    graphs, expected = drawn
    g = graphs["fig-1-plot"]
    assert g["lines"] == 2  # the score and the threshold
    assert g["markers"] == expected["flags"]  # every flagged point
    assert g["shapes"] == expected["label_runs"]  # each labelled interval shaded
    assert reads_dates(g["xticks"]), g["xticks"]
    assert not any(re.search(r"×10|e\+", t) for t in g["xticks"])
    assert {"score", "threshold (6)", "flagged", "labelled anomaly"} <= set(g["legend"])


def test_a_million_points_are_decimated_and_say_so(drawn, reads_dates):
    graphs, _ = drawn
    g = graphs["fig-2-plot"]
    assert g["lines"] == 2 and g["markers"] > 0
    assert g["points"][0] <= 4000  # the score trace as sent to the browser
    assert "display: min/max of each 500 samples (1,000,000 in all)" in g["subtitle"]
    assert reads_dates(g["xticks"]), g["xticks"]


def test_comparison_draws_a_bar_per_value(drawn):
    graphs, _ = drawn
    g = graphs["fig-3-plot"]
    assert g["bars"] == 3 + 3 + 2  # isolation_forest has no MAE
    assert {"kalman", "mamba", "isolation_forest"} <= set(g["xticks"])


def test_attribution_draws_a_bar_per_channel(drawn):
    graphs, _ = drawn
    g = graphs["fig-4-plot"]
    assert g["bars"] == 4
    assert g["yticks"][-1] == "pressure"  # the largest share on top


def test_overlay_draws_every_series(drawn, reads_dates):
    graphs, _ = drawn
    g = graphs["fig-5-plot"]
    assert g["lines"] == 3
    assert set(g["legend"]) == {"actual", "kalman", "mamba"}
    assert reads_dates(g["xticks"]), g["xticks"]


def test_the_report_of_a_real_train_run_shows_its_data(trained_store, probe, reads_dates):
    """What `tsssm train` logged to MLflow, opened offline from the artifact store."""
    from tsssm.tracking import RunStore

    store = RunStore(trained_store["uri"])
    assert store.artifacts(trained_store["train"], "figures") == ["figures/report.html"]
    path = store.fetch(trained_store["train"], "figures/report.html")
    probe.open(path.as_uri())
    probe.graph("fig-5-plot")
    graphs = probe.graphs()
    assert len(graphs) == 6  # forecast and anomaly score of three streams
    for i in (0, 2, 4):  # forecasts: 8 channels, each with its band
        g = graphs[f"fig-{i}-plot"]
        assert g["lines"] >= 16 and g["fills"] == 8, g
        assert reads_dates(g["xticks"]), g["xticks"]
    for i in (1, 3, 5):  # anomaly scores, with each sensor's share of the score below them
        g = graphs[f"fig-{i}-plot"]
        # score, threshold, and stacked areas of the 5 largest shares and "other" (8 channels)
        assert g["lines"] == 2 + 6 and g["fills"] == 6, g
        assert g["markers"] > 0 and g["shapes"] >= 1 and "other" in g["legend"], g
        assert reads_dates(g["xticks"]), g["xticks"]
    store.close()


def test_the_comparison_chart_of_a_real_compare_run_draws_its_bars(trained_store, probe):
    from tsssm.tracking import RunStore

    store = RunStore(trained_store["uri"])
    path = store.fetch(trained_store["compare"], "figures/report.html")
    probe.open(path.as_uri())
    g = probe.graph("fig-0-plot", bars=1)
    # f1, auc_pr, mae and h_mae of kalman, last_value and ewma
    assert g["bars"] == 4 * 3, g
    assert {"kalman", "last_value", "ewma"} <= set(g["xticks"])
    store.close()


def test_the_embedded_plotly_js_is_unpacked_and_values_arrive_as_sent(report, drawn, probe):
    """plotly.js travels gzipped inside the report (2.0 of its 4.8 MB); the page unpacks it
    with the browser's DecompressionStream. Values go as float32 where that draws the same:
    what plotly.js decoded (_fullData) is the data to a millionth of its range."""
    version = probe.driver.execute_script("return window.Plotly && window.Plotly.version")
    assert version and re.fullmatch(r"\d+\.\d+\.\d+", version)
    path, _ = report
    assert path.stat().st_size < 4_000_000  # one plain plotly.js alone is 4.8 MB
    sent = probe.driver.execute_script(
        "return document.getElementById('fig-0-plot')._fullData"
        ".filter(tr => tr.name === 'actual').map(tr => Array.from(tr.y));")
    expected = report[1]["actual"]
    assert len(sent) == 3 and len(sent[0]) == expected.size
    span = expected.max() - expected.min()
    assert 0 < np.max(np.abs(np.array(sent[0]) - expected)) <= plots.F4_TOLERANCE * span


def test_a_browser_that_cannot_unpack_plotly_js_says_so(report, probe):
    """Without DecompressionStream (browsers before 2023) every figure says what it needs,
    instead of an empty page."""
    driver = probe.driver
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": "delete window.DecompressionStream;"})
    try:
        path, _ = report
        probe.open(path.as_uri(), wait_for=".plotly-missing")
        messages = [e.text for e in driver.find_elements("css selector", ".plotly-missing")]
        assert len(messages) == 7 and all("DecompressionStream" in m for m in messages)
        assert not probe.graphs()
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                               {"identifier": script["identifier"]})
