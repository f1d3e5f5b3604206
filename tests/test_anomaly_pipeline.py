"""The anomaly task end to end on the bundled sample: the multivariate Kalman detector trained
with the joint windowed score, streaming and per-stream thresholds, and `tsssm score` telling a
user which sensors caused every flagged interval (printed and in Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tsssm.cli import main

FAST = ["model=var_kalman", "trainer.max_epochs=1", "model.optimizer.max_iter=3",
        "data.extra_train_files=[]",
        "data.eval_stride=64"]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "skab" / "valve1" / "1.csv"


def test_var_kalman_train_and_score_with_attribution(capsys, tmp_path, tracking_overrides,
                                                     mlflow_db, experiment):
    code = main(["train", *tracking_overrides, *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    m = run.data.metrics
    for key in ("test/f1", "test/far", "test/mar", "test/auc_pr", "test/vus_pr",
                "test/event_f1", "test/delay_mean", "test/nab_standard", "train/threshold"):
        assert key in m and np.isfinite(m[key]), key
    bundle = next((tmp_path / "out" / "models").iterdir())
    meta = json.loads((bundle / "meta.json").read_text())
    # the task's defaults (conf/task/anomaly.yaml: the label-free rule's choice on SKAB)
    assert meta["score"] == {"kind": "mahalanobis", "window": 60, "window_kind": "shift",
                             "align": "trailing"}
    assert meta["threshold"]["name"] == "pot" and meta["threshold_scope"] == "pooled"
    assert meta["threshold"]["params"]["q"] == pytest.approx(1 / 2720)
    scores = pl.read_parquet(client.download_artifacts(run.info.run_id, "scores/scores.parquet",
                                                       str(tmp_path)))
    contrib = [c for c in scores.columns if c.startswith("contrib:")]
    assert len(contrib) == 8 and "contrib:Volume Flow RateRMS" in contrib
    total = scores.select(pl.sum_horizontal(contrib)).to_series().to_numpy()
    np.testing.assert_allclose(total, scores["score"].to_numpy(), rtol=1e-6, atol=1e-9)
    assert {"stream", "time", "score", "flag", "label", "split", "threshold"} <= set(
        scores.columns)

    # a user scores their own file: every flagged interval with the sensors that caused it
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                 f"data.path={SAMPLE}", f"score.output={tmp_path}/s.parquet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    intervals = pl.read_parquet(tmp_path / "s.intervals.parquet")
    assert intervals.height >= 1
    assert "flagged intervals" in out and "%" in out
    for row in intervals.iter_rows(named=True):
        assert row["top"] and row["top"].split(" ")[0] in out
        shares = [row[c] for c in intervals.columns if c.startswith("share:")]
        assert abs(sum(shares) - 1.0) < 1e-6
    scored = pl.read_parquet(tmp_path / "s.parquet")
    assert scored.height == 1145 and any(c.startswith("contrib:") for c in scored.columns)


def test_streaming_and_per_stream_thresholds(capsys, tmp_path, tracking_overrides, mlflow_db,
                                             experiment):
    code = main(["train", *tracking_overrides, *FAST, "task.threshold.name=dspot",
                 "task.threshold.scope=per_stream", "task.threshold.fit_on=train_val",
                 "task.window.size=10"])
    assert code == 0, capsys.readouterr().err
    bundle = next((tmp_path / "out" / "models").iterdir())
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["threshold"]["name"] == "dspot" and meta["threshold_scope"] == "per_stream"
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                 f"data.path={SAMPLE}", f"score.output={tmp_path}/s.parquet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "per stream" in out
    scored = pl.read_parquet(tmp_path / "s.parquet")
    # DSPOT: the threshold in force moves along the stream
    assert scored["threshold"].n_unique() > 1
    bad = main(["train", *tracking_overrides, *FAST, "task.threshold.risk=0.5"])
    assert bad == 2 and "task.threshold.risk" in capsys.readouterr().err
