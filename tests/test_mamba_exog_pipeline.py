"""Mamba and the hybrids with inputs and real time steps through the commands: `tsssm train
model=mamba data=csv data.inputs=[u] data.gaps=time` trains on the forced spring (irregular
steps), logs the number of inputs and the nominal step with the bundle, says how the horizon
treats the future inputs; `score` with the bundle and `compare` with and without the inputs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tsssm.bundle import load_bundle
from tsssm.cli import main
from tsssm.data.synthetic import spring_frame

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.eval_stride=48",
        "data.input_len=32", "data.horizon=8", "model.net.d_model=8", "model.net.n_layers=1",
        "model.net.d_state=4"]


@pytest.fixture(scope="module")
def spring_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spring") / "spring.csv"
    spring_frame(600, seed=1).write_csv(path)
    return path


def _train_runs(mlflow_db: str, experiment: str) -> dict:
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["tsssm.model"]: r for r in runs if r.data.tags["tsssm.command"] == "train"}


def test_mamba_with_inputs_and_time_steps_end_to_end(spring_csv, capsys, tmp_path,
                                                     tracking_overrides, mlflow_db, experiment):
    data = ["data=csv", f"data.path={spring_csv}", "data.channels=[x]", "data.inputs=[u]",
            "data.gaps=time"]
    code = main(["train", *tracking_overrides, "model=mamba", *TINY, *data])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "inputs ['u']: horizon forecasts use the known future inputs" in out
    code = main(["train", *tracking_overrides, "model=hybrid_residual", *TINY,
                 "model.net.patch_len=8", *data, "data.future_inputs=unknown"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "hold the last input: future inputs unknown" in out

    train = _train_runs(mlflow_db, experiment)
    for name in ("mamba", "hybrid_residual"):
        run = train[name].data
        assert run.params["data.inputs"] == "['u']" and run.params["data.gaps"] == "time"
        for key in ("train/loss", "test/mse", "test/h8_mse", "test/h8_crps"):
            assert run.metrics[key] == run.metrics[key], (name, key)

    mamba_id = train["mamba"].info.run_id
    bundle = tmp_path / "out" / "models" / mamba_id
    net = load_bundle(bundle).model
    assert net.n_inputs == 1
    steps = spring_frame(600, seed=1)["timestamp"].diff().dt.total_seconds()[1:].median()
    assert float(net.nominal_step) == pytest.approx(steps)  # the median training step

    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}", "data=csv",
                 f"data.path={spring_csv}", f"score.output={tmp_path}/s.parquet"])
    assert code == 0, capsys.readouterr().err
    scored = pl.read_parquet(tmp_path / "s.parquet")
    assert scored.height == 600 and scored["score"].is_finite().all()

    ids = ",".join(r.info.run_id for r in train.values())
    code = main(["compare", *tracking_overrides, *data, *TINY[2:5], f"compare.runs=[{ids}]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mamba" in out and "hybrid_residual" in out and "last_value" in out
    # without the inputs a model trained with them cannot be compared: one clear line
    code = main(["compare", *tracking_overrides, *data[:3], *TINY[2:5],
                 f"compare.runs=[{mamba_id}]"])
    err = capsys.readouterr().err
    assert code != 0 and "data.inputs=[u]" in err and "Traceback" not in err
