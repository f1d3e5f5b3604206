"""The hybrids through the commands on the bundled sample: `tsssm run` trains, scores and
compares both; the train runs log the fitted variance calibration; a bundle scores a new file."""

from __future__ import annotations

import polars as pl

from tsssm.cli import main

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.eval_stride=64",
        "model.net.d_model=8", "model.net.n_layers=1", "model.net.d_state=4",
        "model.net.input_len=32", "model.net.patch_len=8"]


def test_hybrids_run_end_to_end(capsys, tmp_path, tracking_overrides, finished_runs,
                                sample_csv):
    # the model= here only makes the hybrid keys of TINY known to the first composition
    code = main(["run", *tracking_overrides, "model=hybrid_residual", *TINY,
                 "run.models=[hybrid_residual,hybrid_dssm]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "hybrid_residual" in out and "hybrid_dssm" in out

    _, runs = finished_runs()
    trains = [r for r in runs if r.data.tags["tsssm.command"] == "train"]
    assert sorted(r.data.tags["tsssm.model"] for r in trains) == ["hybrid_dssm",
                                                                  "hybrid_residual"]
    for r in trains:
        m = r.data.metrics
        for key in ("train/loss", "test/mse", "test/h8_mse", "test/f1",
                    "val/variance_scale_first"):
            assert key in m and m[key] == m[key], key
        assert m["val/variance_scale_first"] > 0

    bundles = sorted((tmp_path / "out" / "models").iterdir())
    for i, bundle in enumerate(bundles):
        code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}",
                     f"data.path={sample_csv}", f"score.output={tmp_path}/s{i}.parquet"])
        assert code == 0, capsys.readouterr().err
        scored = pl.read_parquet(tmp_path / f"s{i}.parquet")
        assert scored.height == 1145 and scored["score"].is_finite().all()


def test_max_time_stops_training_and_still_evaluates(capsys, tracking_overrides, finished_runs):
    """trainer.max_time: a training that would run 500 epochs stops once its time is up, then
    restores, calibrates and evaluates as after its last epoch (a FINISHED run with every test
    metric). With restore_best the starting weights (the hybrid at its fitted Kalman part) are
    validated before training and are a candidate: their score and the restored epoch are
    logged. The adaptive band (task.adaptive_calibration) logs the unadapted metrics beside."""
    code = main(["train", *tracking_overrides, "model=hybrid_residual", *TINY[1:],
                 "trainer.max_epochs=500", "trainer.max_time=0.5", "task.restore_best=true",
                 "task.monitor=val/mse_horizon", "task.adaptive_calibration=0.005"])
    assert code == 0, capsys.readouterr().err
    client, (run,) = finished_runs()
    epochs = client.get_metric_history(run.info.run_id, "train/epoch_seconds")
    assert 1 <= len(epochs) < 500
    for key in ("test/h8_mse", "test/h8_coverage95", "val/variance_scale_first",
                "val/start_mse_horizon", "val/start_loss", "test/h8_coverage95_static",
                "test/h8_crps_static"):
        assert run.data.metrics[key] == run.data.metrics[key], key
    # the adaptive band moved (the unadapted figures are logged beside it)
    assert run.data.metrics["test/h8_crps"] != run.data.metrics["test/h8_crps_static"]
    best = run.data.metrics["val/best_epoch"]
    assert best == int(best) and -1 <= best < len(epochs)
    if best == -1:  # the start was kept: its score is the best of every epoch's
        history = client.get_metric_history(run.info.run_id, "val/mse_horizon")
        assert run.data.metrics["val/start_mse_horizon"] <= min(m.value for m in history)
