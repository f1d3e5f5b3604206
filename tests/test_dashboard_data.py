"""The dashboard's data layer (dashboards/data.py), the read API of tsssm/tracking.py and the
`tsssm dashboard` command line, without a browser (tests/browser/ has the pages)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from dashboards import data as D
from dashboards.app import _parse_window
from tsssm.cli import main
from tsssm.errors import ModelError
from tsssm.tracking import RunRecord, RunStore, Tracker


def _scores(n=400, seed=0, split=True) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.exponential(size=n)
    label = (rng.random(n) < 0.2).astype(np.int8)
    score[label == 1] *= 3
    cols = {"stream": ["a"] * (n // 2) + ["b"] * (n - n // 2),
            "time": (np.datetime64("2020-01-01") + np.arange(n).astype("timedelta64[s]")
                     ).astype("datetime64[ms]"),
            "score": score, "flag": score > 2.0, "label": label}
    if split:
        cols["split"] = ["train"] * (n // 4) + ["test"] * (n - n // 4)
    return pl.DataFrame(cols)


def _record(**kw) -> RunRecord:
    base = dict(run_id="r" * 32, name="run", experiment="e", status="FINISHED",
                start_time=0, end_time=61_000, tags={}, metrics={}, params={})
    return RunRecord(**{**base, **kw})


@pytest.mark.parametrize("threshold", [0.1, 1.0, 2.0, 5.0])
def test_live_metrics_match_scikit_learn_on_the_test_rows(threshold):
    frame = _scores()
    m = D.metrics_at(frame, threshold)
    test = frame.filter(pl.col("split") == "test")
    y, p = test["label"].to_numpy(), test["score"].to_numpy() > threshold
    assert m["f1"] == pytest.approx(f1_score(y, p, zero_division=0))
    assert m["precision"] == pytest.approx(precision_score(y, p, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, p, zero_division=0))
    assert m["far"] == pytest.approx(((y == 0) & p).sum() / (y == 0).sum())
    assert m["mar"] == pytest.approx(((y == 1) & ~p).sum() / (y == 1).sum())
    assert D.metrics_at(frame.drop("label"), threshold) is None


def test_fitted_threshold_reproduces_the_flags():
    frame = _scores(split=False)
    logged = _record(metrics={"train/threshold": 2.0})
    assert D.fitted_threshold(logged, frame) == 2.0
    source = _record(metrics={"train/threshold": 1.5})
    assert D.fitted_threshold(_record(), frame, source) == 1.5
    implied = D.fitted_threshold(_record(), frame)  # from the flags alone
    np.testing.assert_array_equal(frame["score"].to_numpy() > implied, frame["flag"].to_numpy())
    assert D.fitted_threshold(_record(), frame.drop("flag")) is None
    grid = D.threshold_grid(frame["score"].to_numpy(), 2.0, steps=50)
    assert 2.0 in grid and grid == sorted(grid) and grid[-1] == frame["score"].max()


def test_flagged_intervals_and_attribution():
    score = np.array([0, 5, 6, 0, 0, 0, 0, 0, 0, 0, 9, 0, 7, 0], np.float64)
    contrib = np.column_stack([score * 0.25, score * 0.75])
    s = D.Stream(np.arange(score.size, dtype=np.float64), score, None, contrib, ["x", "y"])
    found = D.flagged_intervals(s, 1.0, merge_gap=2)
    assert [(iv.first, iv.last, iv.peak) for iv in found] == [(10, 12, 9.0), (1, 2, 6.0)]
    share = D.attribution(s, found[0])
    assert share == pytest.approx({"x": 4.0, "y": 12.0})
    assert sum(share.values()) == pytest.approx(score[10:13].sum())  # contributions sum up


def test_score_stream_and_contrib_columns():
    frame = _scores().with_columns((pl.col("score") * 0.5).alias("contrib:flow"),
                                   (pl.col("score") * 0.5).alias("contrib:vibration"))
    assert D.contrib_channels(frame) == ["flow", "vibration"]
    s = D.score_stream(frame, "b", "test")
    assert s.contrib.shape == (200, 2) and s.channels == ["flow", "vibration"]
    assert np.all(np.diff(s.time.astype(np.int64)) > 0)
    assert D.score_stream(frame, "a", "all").score.size == 200
    assert D.score_stream(frame, "a", "test").score.size == 100


def test_forecast_stream_pivots_the_long_frame():
    n, ch = 5, ["u", "v", "w"]
    frame = pl.DataFrame({"stream": ["s"] * (n * 3), "time": np.repeat(np.arange(n), 3),
                          "channel": np.tile(ch, n), "actual": np.arange(n * 3.0),
                          "mean": np.arange(n * 3.0) + 0.5, "std": np.ones(n * 3)})
    fs = D.forecast_stream(frame, "s", ["w", "u"])
    assert fs.channels == ["u", "w"]  # the frame's order
    np.testing.assert_array_equal(fs.actual, np.arange(n * 3.0).reshape(n, 3)[:, [0, 2]])
    assert D.forecast_channels(frame) == ch


def test_comparison_rows_and_runs_rows():
    train = _record(run_id="a" * 32,
                    tags={"tsssm.command": "train", "tsssm.model": "kalman", "tsssm.data": "skab"},
                    metrics={"test/f1": 0.5, "test/f1.kalman": 0.1, "val/mae": 0.3},
                    params={"task.name": "anomaly"})
    rows = D.comparison_rows([train], cache=None)
    assert rows == [{"method": "kalman (aaaaaaaa)", "kind": "train", "run": "a" * 32,
                     "status": "FINISHED", "test/f1": 0.5, "val/mae": 0.3}]
    assert D.metric_columns(rows) == ["test/f1", "val/mae"]
    (row,) = D.runs_rows([train])
    assert row["run"] == f"[run](/run/{'a' * 32})" and row["dataset"] == "skab"
    assert row["task"] == "anomaly" and row["test/f1"] == 0.5 and row["test/auc_pr"] is None
    assert row["duration"] == "1m 01s"
    assert D.duration(_record(end_time=None)) == "running"


def test_benchmark_tables(tmp_path):
    (tmp_path / "accuracy.json").write_text(json.dumps(
        [{"dataset": "skab", "model": "kalman", "metrics": {"f1": 0.3}}]))
    (tmp_path / "speed.json").write_text(json.dumps({"records": [{"L": 1024, "ms": 1.5}]}))
    (tmp_path / "broken.json").write_text("{")
    tables = {t.name: t for t in D.benchmark_tables(tmp_path)}
    assert tables["accuracy.json"].columns == ["dataset", "model", "metrics.f1"]
    assert tables["speed.json"].rows == [{"L": 1024, "ms": 1.5}]
    assert "cannot read" in tables["broken.json"].rows[0]["error"]
    assert D.benchmark_tables(tmp_path / "none") == []


def test_parse_window():
    assert _parse_window({"xaxis.range[0]": "2020-01-01 00:00:01.5",
                          "xaxis.range[1]": "2020-01-01 00:00:09"}, True) == \
        ["2020-01-01T00:00:01.5", "2020-01-01T00:00:09"]
    assert _parse_window({"xaxis3.range": [1, 2]}, False) == [1.0, 2.0]
    assert _parse_window({"xaxis.autorange": True}, True) is None
    assert _parse_window({"dragmode": "pan"}, True) is _parse_window(None, True)  # no_update


def test_run_store_reads_runs_and_artifacts(tmp_path, mlflow_db, experiment):
    missing = RunStore(f"sqlite:///{tmp_path}/nothing/mlflow.db")
    assert missing.missing and missing.runs() == []
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(ModelError, match="does not exist yet"):
        missing.run("x")
    tracker = Tracker(mlflow_db, experiment, str(tmp_path / "artifacts"))
    (tmp_path / "stage" / "scores").mkdir(parents=True)
    _scores().write_parquet(tmp_path / "stage" / "scores" / "scores.parquet")
    with tracker.start("one", "train", {"task.name": "anomaly"}, {"tsssm.model": "m"}) as run:
        tracker.log_metrics({"test/f1": 0.25})
        tracker.log_dir(tmp_path / "stage" / "scores", "scores")
    store = RunStore(mlflow_db)
    found = {r.run_id: r for r in store.runs()}
    rec = found[run.run_id]
    assert rec.status == "FINISHED" and rec.command == "train" and rec.experiment == experiment
    assert rec.metrics == {"test/f1": 0.25} and rec.params == {"task.name": "anomaly"}
    assert store.artifacts(run.run_id) == ["scores/scores.parquet"]
    local = store.fetch(run.run_id, "scores/scores.parquet")
    assert pl.read_parquet(local).height == 400
    with pytest.raises(ModelError, match="no artifact 'nope.parquet'"):
        store.fetch(run.run_id, "nope.parquet")
    with pytest.raises(ModelError, match="no run"):
        store.run("f" * 32)
    store.close()
    assert not local.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["dashboard", "--port", "abc"], "--port needs a value"),
    (["dashboard", "--port"], "--port needs a value"),
    (["train", "--port", "8050"], "--port is an option of `tsssm dashboard`"),
])
def test_dashboard_options_are_checked(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_dashboard_on_a_busy_port_says_so(capsys, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", f"tracking.uri=sqlite:///{tmp_path}/x.db", "--port", str(port)])
    assert code == 2
    assert f"--port {port}: cannot listen" in capsys.readouterr().err


def test_help_lists_the_dashboard(capsys):
    assert main(["--help"]) == 0
    assert "dashboard" in capsys.readouterr().out
    assert main(["dashboard", "--help"]) == 0
    assert "[--port ...]" in capsys.readouterr().out
