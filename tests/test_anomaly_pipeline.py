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


REANCHOR = ["task.window.reanchor.alpha=0.003", "task.window.reanchor.rho=0.2",
            "task.window.reanchor.hold=10"]


def test_reanchored_score_trained_saved_and_scored_alike(capsys, tmp_path, tracking_overrides,
                                                         mlflow_db, experiment):
    """task.window.reanchor through `tsssm train` (its val/test metrics), the bundle, and
    `tsssm score` of a file in chunks that split the windows: the file's scores and flags are
    the ones training logged for it."""
    code = main(["train", *tracking_overrides, *FAST, *REANCHOR])
    assert code == 0, capsys.readouterr().err
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert np.isfinite(run.data.metrics["test/f1"])
    bundle = next((tmp_path / "out" / "models").iterdir())
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["score"]["reanchor"] == {"alpha": 0.003, "gamma": 0.5, "rho": 0.2, "hold": 10}
    trained = pl.read_parquet(client.download_artifacts(run.info.run_id,
                                                        "scores/scores.parquet", str(tmp_path)))
    mine = trained.filter(pl.col("stream").str.contains("valve1/1"))
    assert mine.height == 1145
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                 f"data.path={SAMPLE}", f"score.output={tmp_path}/s.parquet",
                 "score.chunk_size=97"])
    assert code == 0, capsys.readouterr().err
    scored = pl.read_parquet(tmp_path / "s.parquet")
    np.testing.assert_allclose(scored["score"].to_numpy(), mine["score"].to_numpy(),
                               rtol=1e-4, atol=1e-4)
    assert (scored["flag"].to_numpy() == mine["flag"].to_numpy()).mean() > 0.999
    # the same training with the plain score (same seed: the same model) scores the file
    # differently: the reference did move
    code = main(["train", *tracking_overrides, *FAST])
    assert code == 0, capsys.readouterr().err
    other = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               order_by=["attributes.start_time DESC"])[0]  # the newest
    assert other.info.run_id != run.info.run_id
    plain = pl.read_parquet(client.download_artifacts(
        other.info.run_id, "scores/scores.parquet", str(tmp_path / "plain"))).filter(
        pl.col("stream").str.contains("valve1/1"))
    differ = ~np.isclose(plain["score"].to_numpy(), mine["score"].to_numpy(), rtol=1e-3)
    assert differ.mean() > 0.05


@pytest.mark.parametrize("override, key", [
    ("task.window.reanchor.alpha=1.5", "task.window.reanchor.alpha"),
    ("task.window.reanchor.rho=-0.1", "task.window.reanchor.rho"),
    ("task.window.reanchor.hold=0", "task.window.reanchor.hold"),
    ("task.window.reanchor.gamma=0", "task.window.reanchor.gamma"),
    ("task.window.kind=mean", "task.window.reanchor"),
    ("task.threshold.name=spot", "task.window.reanchor"),
])
def test_a_bad_reanchor_setting_is_one_clear_config_error(capsys, tracking_overrides, override,
                                                          key):
    code = main(["train", *tracking_overrides, *FAST, "task.window.reanchor.rho=0.2", override])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err
