"""The main job end to end on the bundled sample (kept small): train, score and compare each
leave a FINISHED MLflow run with their metrics and artifacts, and the outputs load back."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from mlflow.tracking import MlflowClient

from tsssm.cli import main

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "model.optimizer.max_iter=3",
        "data.eval_stride=64"]


def artifacts(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, folder))


def test_run_end_to_end(capsys, tmp_path, tracking_overrides, mlflow_db, experiment):
    code = main(["run", *tracking_overrides, *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kalman" in out and "mamba" in out and "isolation_forest" in out

    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    by_command: dict[str, list] = {}
    for r in runs:
        assert r.info.status == "FINISHED"
        by_command.setdefault(r.data.tags["tsssm.command"], []).append(r)
    assert {k: len(v) for k, v in by_command.items()} == {"train": 2, "score": 2, "compare": 1}

    for r in by_command["train"]:
        m = r.data.metrics
        for key in ("train/loss", "val/mae", "test/mse", "test/h8_mse", "test/f1", "test/auc_pr"):
            assert key in m and m[key] == m[key], key
        assert r.data.params["data.name"] == "skab_sample"
        assert artifacts(client, r.info.run_id, "model") == ["meta.json", "model.safetensors"]
        assert "scores.parquet" in artifacts(client, r.info.run_id, "scores")
        assert artifacts(client, r.info.run_id, "figures") == ["report.html"]  # one plotly.js

    for r in by_command["score"]:
        assert r.data.metrics["test/rows"] == 747 + 745 + 725
        assert artifacts(client, r.info.run_id, "figures") == []  # train logged them already
        local = client.download_artifacts(r.info.run_id, "scores/scores.parquet", str(tmp_path))
        frame = pl.read_parquet(local)
        assert {"stream", "time", "score", "flag", "label"} <= set(frame.columns)
        assert frame["score"].is_finite().all()

    (cmp,) = by_command["compare"]
    assert artifacts(client, cmp.info.run_id, "tables") == ["compare.md", "compare.parquet"]
    assert artifacts(client, cmp.info.run_id, "figures") == ["report.html"]
    # the last line is the one command that opens the dashboard over this store
    assert out.strip().splitlines()[-1].strip() == \
        f"tsssm dashboard tracking.uri={mlflow_db}"
    table = (Path(client.download_artifacts(cmp.info.run_id, "tables/compare.md",
                                            str(tmp_path)))).read_text()
    for method in ("kalman", "mamba", "last_value", "ewma", "isolation_forest"):
        assert method in table

    # scoring a new file with a saved bundle, by path
    bundle = next((tmp_path / "out" / "models").iterdir())
    sample = Path(__file__).resolve().parents[1] / "data" / "skab" / "valve1" / "1.csv"
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                 f"data.path={sample}", f"score.output={tmp_path}/s.parquet"])
    assert code == 0, capsys.readouterr().err
    scored = pl.read_parquet(tmp_path / "s.parquet")
    assert scored.height == 1145 and scored["flag"].dtype == pl.Boolean
    newest = client.search_runs([exp.experiment_id], "tags.`tsssm.command` = 'score'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert artifacts(client, newest.info.run_id, "figures") == ["report.html"]  # a new stream


def test_interrupted_training_resumes(capsys, tmp_path, tracking_overrides, mlflow_db,
                                      experiment):
    first = ["train", *tracking_overrides, "trainer.max_epochs=1", "model.optimizer.max_iter=2"]
    assert main(first) == 0, capsys.readouterr().err
    (ckpt,) = (tmp_path / "out" / "checkpoints").glob("*/last.ckpt")
    resumed = ["train", *tracking_overrides, "trainer.max_epochs=2", "model.optimizer.max_iter=2",
               "trainer.resume=last"]
    assert main(resumed) == 0, capsys.readouterr().err
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    # the resumed run trained only the remaining epoch (epoch index 1); epoch 0's metrics are
    # copied from the run it resumed, which it names
    assert runs[1].data.tags["tsssm.resumed_from"] == runs[0].info.run_id == ckpt.parent.name
    assert runs[1].data.tags["tsssm.resumed_after_epoch"] == "0"
    history = client.get_metric_history(runs[1].info.run_id, "train/loss")
    first_history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1]
    assert history[0].value == first_history[0].value
    bad = ["train", *tracking_overrides, f"trainer.resume={tmp_path}/missing.ckpt"]
    assert main(bad) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_kalman_fitted_by_em(capsys, tracking_overrides, mlflow_db, experiment):
    assert main(["train", *tracking_overrides, "model.fit=em", "model.em_iters=5"]) == 0, \
        capsys.readouterr().err
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/loglik")]
    assert len(history) == 6
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(history, history[1:]))
    assert "test/f1" in run.data.metrics


def test_kalman_ett_config_trains_by_the_multistep_criterion(capsys, tmp_path, tracking_overrides,
                                                             mlflow_db, experiment):
    """model=kalman_ett on the bundled sample (a seasonal period given by hand): EM with the
    prior, the multi-step criterion, the calibration; the bundle (with its calibration for
    data.horizon leads) scores a new file."""
    small = ["model=kalman_ett", "model.net.seasonal_period=16", "model.net.seasonal_harmonics=2",
             "model.em_iters=3", "model.multistep_iters=5",
             "data.eval_stride=64"]
    assert main(["train", *tracking_overrides, *small]) == 0, capsys.readouterr().err
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    crit = [m.value for m in client.get_metric_history(run.info.run_id, "train/multistep_mse")]
    assert len(crit) >= 2 and crit[-1] <= crit[0]
    m = run.data.metrics
    assert m["train/fit_s"] > 0 and m["test/h8_mse"] == m["test/h8_mse"]
    bundle = next((tmp_path / "out" / "models").iterdir())
    sample = Path(__file__).resolve().parents[1] / "data" / "skab" / "valve1" / "1.csv"
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                 f"data.path={sample}", f"score.output={tmp_path}/s.parquet"])
    assert code == 0, capsys.readouterr().err
    assert pl.read_parquet(tmp_path / "s.parquet")["score"].is_finite().all()
