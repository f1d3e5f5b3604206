"""The dashboard in Chromium, over a store made by the real commands (see trained_store): the
runs table, a run's figures, the threshold slider's live metrics, zoom re-querying the data,
attribution, failed and running runs, comparisons, benchmark tables, an empty store."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from dashboards import create_app
from tsssm.tracking import RunStore

FAILED_RED = "rgba(185, 28, 28, 1)"


@pytest.fixture(scope="module")
def site(trained_store, serve):
    store = RunStore(trained_store["uri"])
    yield serve(create_app(store, trained_store["benchmarks"])), trained_store, store
    store.close()


def _cells(driver, column: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.text for c in driver.find_elements(
        By.CSS_SELECTOR, f"#runs-table td[data-dash-column='{column}']")]


def test_runs_table_lists_every_run_and_shows_failed_as_failed(site, probe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, runs, _ = site
    probe.open(url + "/", "#runs-table td[data-dash-column='status']")
    statuses = _cells(probe.driver, "status")
    assert sorted(statuses) == ["FAILED", "FINISHED", "FINISHED", "FINISHED", "FINISHED",
                                "RUNNING"]
    assert "Runs (6: 4 finished, 1 failed, 1 running)" in probe.text("h2")
    failed = next(c for c in probe.driver.find_elements(
        By.CSS_SELECTOR, "#runs-table td[data-dash-column='status']") if c.text == "FAILED")
    assert failed.value_of_css_property("color") == FAILED_RED
    assert set(_cells(probe.driver, "model")) >= {"kalman"}
    # filter by status, as a person types it into the header's box
    box = probe.driver.find_element(
        By.CSS_SELECTOR, "#runs-table th.dash-filter[data-dash-column='status'] input")
    box.send_keys("FAILED", Keys.ENTER)
    probe.wait(lambda d: _cells(d, "status") == ["FAILED"], 60, "the filtered table")
    assert _cells(probe.driver, "run") == ["train-kalman-csv"]


def _live(probe) -> dict[str, str]:
    return {k: probe.text(f"#metric-{k}") for k in ("precision", "recall", "f1", "far", "mar")}


def test_run_page_draws_its_figures_and_the_slider_moves_the_metrics(site, probe, reads_dates):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, runs, store = site
    run = store.run(runs["train"])
    probe.open(f"{url}/run/{runs['train']}", "#metric-f1")
    assert probe.text("#run-status") == "FINISHED"
    anomaly = probe.graph("anomaly-graph", lines=2, markers=1, shapes=1)
    assert reads_dates(anomaly["xticks"]), anomaly["xticks"]
    forecast = probe.graph("forecast-graph", lines=8, fills=4)  # 4 channels shown by default
    assert reads_dates(forecast["xticks"]), forecast["xticks"]
    # at the fitted threshold the live metrics are the run's logged test metrics
    shown = _live(probe)
    assert shown["f1"] == f"{run.metrics['test/f1']:.4f}"
    assert shown["far"] == f"{run.metrics['test/far']:.4f}"

    # the lowest threshold: the oracle is scikit-learn on the run's own scores
    frame = pl.read_parquet(store.fetch(runs["train"], "scores/scores.parquet"))
    test = frame.filter(pl.col("split") == "test")
    y, s = test["label"].to_numpy(), test["score"].to_numpy()
    lowest = float(np.quantile(s, 0.0))
    flags = s > lowest
    probe.idle()
    handle = probe.driver.find_element(By.CSS_SELECTOR, "#threshold-slider [role=slider]")
    handle.send_keys(Keys.HOME)
    probe.wait(lambda d: probe.text("#metric-f1") != shown["f1"], 60, "F1 to change")
    moved = _live(probe)
    assert moved["f1"] == f"{f1_score(y, flags):.4f}"
    assert moved["precision"] == f"{precision_score(y, flags):.4f}"
    assert moved["recall"] == f"{recall_score(y, flags):.4f}"
    probe.wait(lambda d: f"threshold ({lowest:.4g})" in probe.graphs()["anomaly-graph"]["legend"],
               60, "the figure's threshold to follow the slider")
    # the highest: nothing flagged
    handle.send_keys(Keys.END)
    probe.wait(lambda d: probe.text("#metric-recall") == "0.0000", 60, "recall 0 at the top")
    assert probe.text("#metric-f1") == "0.0000"


def test_zooming_re_queries_the_data(site, probe):
    url, runs, _ = site
    probe.open(f"{url}/run/{runs['train']}", "#metric-f1")
    full = probe.graph("anomaly-graph", lines=2)["points"][0]
    probe.idle()
    probe.driver.execute_script("""
        const gd = document.querySelector('#anomaly-graph .js-plotly-plot');
        const [a, b] = gd.layout.xaxis.range;
        const t0 = new Date(a.replace(' ', 'T') + 'Z').getTime();
        const t1 = new Date(b.replace(' ', 'T') + 'Z').getTime();
        const iso = ms => new Date(ms).toISOString().replace('Z', '');
        Plotly.relayout(gd, {'xaxis.range[0]': iso(t0 + (t1 - t0) / 3),
                             'xaxis.range[1]': iso(t0 + (t1 - t0) / 2)});
    """)
    zoomed = probe.wait(lambda d: (lambda n: n if n < full / 3 else None)(
        probe.graphs()["anomaly-graph"]["points"][0]), 60, "the zoomed window's rows")
    assert 0.1 * full < zoomed < full / 3  # the window's rows, from the server


def test_failed_and_running_runs_say_so(site, probe):
    url, runs, _ = site
    probe.open(f"{url}/run/{runs['failed']}", "#run-status")
    assert probe.text("#run-status") == "FAILED"
    assert "data file not found" in probe.text("#run-error")
    probe.open(f"{url}/run/{runs['running']}", "#run-status")
    assert probe.text("#run-status") == "RUNNING"
    assert "still RUNNING" in probe.text("#run-running")
    probe.open(f"{url}/run/0123456789abcdef0123456789abcdef", "#run-missing")
    assert "no run 0123456789abcdef0123456789abcdef" in probe.text("#run-missing")


def test_score_run_uses_its_models_threshold(site, probe):
    url, runs, store = site
    run = store.run(runs["score"])
    probe.open(f"{url}/run/{runs['score']}", "#metric-f1")
    probe.graph("anomaly-graph", lines=2, markers=1)
    assert probe.text("#metric-f1") == f"{run.metrics['test/f1']:.4f}"


def test_attribution_of_a_flagged_interval(site, probe):
    url, runs, _ = site
    probe.open(f"{url}/run/{runs['attribution']}", "#attribution-graph")
    g = probe.graph("attribution-graph", bars=8)
    assert g["bars"] == len(runs["channels"])
    assert g["yticks"][-1] == "Pressure"  # the channel that carries the flagged rows' scores


def test_compare_page_overlays_the_runs(site, probe):
    from selenium.webdriver.common.by import By

    url, runs, _ = site
    ids = ",".join(runs[k] for k in ("train", "score", "attribution"))
    probe.open(f"{url}/compare?runs={ids}", "#compare-table td")
    rows = probe.driver.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")
    assert len(rows) == 1 + 3  # the header row and one per run
    bars = probe.graph("compare-bars", bars=3)
    assert bars["bars"] >= 3
    scores = probe.graph("compare-scores", lines=3)
    assert scores["lines"] == 3
    assert probe.graph("compare-forecasts", lines=2)["lines"] == 2  # actual + the train run


def test_a_compare_run_shows_its_table_and_bars(site, probe):
    from selenium.webdriver.common.by import By

    url, runs, _ = site
    probe.open(f"{url}/run/{runs['compare']}", "#run-compare-table td")
    methods = [c.text for c in probe.driver.find_elements(
        By.CSS_SELECTOR, "#run-compare-table td[data-dash-column='method']")]
    assert [m.split(" ")[0] for m in methods] == ["kalman", "last_value", "ewma"]
    assert probe.graph("run-compare-bars", bars=9)["bars"] >= 9


def test_benchmarks_page_shows_the_result_tables(site, probe):
    url, _, _ = site
    probe.open(url + "/benchmarks", "#bench-0 td")
    text = probe.text("#benchmarks")
    assert "accuracy.json" in text and "LSTM-AE" in text and "SKAB leaderboard" in text


def test_an_empty_store_says_how_to_make_a_run(tmp_path, serve, probe):
    store = RunStore(f"sqlite:///{tmp_path}/none/mlflow.db")
    url = serve(create_app(store, tmp_path / "no-benchmarks"))
    probe.open(url + "/", "#empty-store")
    assert "tsssm run" in probe.text("#empty-store")
    assert not (tmp_path / "none").exists()  # looking created nothing
    probe.open(url + "/benchmarks", "#no-benchmarks")
    assert "No benchmark results" in probe.text("#no-benchmarks")
