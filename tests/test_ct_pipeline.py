"""The continuous-time target end to end: a simulated damped spring driven by a setpoint and
observed at irregular times (steps of 0.5, 1 and 2 s). `model=kalman_ct` with the oscillator and
`data.inputs=[u]` recovers k/m and b/m within 3 standard errors, beats the discrete `model=kalman`
one-step test MSE by more than 30%, and scores, compares and draws like every other model."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tsssm.cli import main
from tsssm.data.synthetic import spring_frame

K_OVER_M, B_OVER_M = 0.4, 0.15


@pytest.fixture(scope="module")
def spring_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spring") / "spring.csv"
    spring_frame(1500, k_over_m=K_OVER_M, b_over_m=B_OVER_M, seed=0).write_csv(path)
    return path


def _runs(mlflow_db: str, experiment: str) -> dict[str, list]:
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id]):
        assert r.info.status == "FINISHED"
        out.setdefault(r.data.tags["tsssm.command"], []).append(r)
    return out


def test_spring_identified_and_better_than_the_discrete_kalman(
        spring_csv, capsys, tmp_path, tracking_overrides, mlflow_db, experiment):
    data = ["data=csv", f"data.path={spring_csv}", "data.channels=[x]", "data.inputs=[u]",
            "data.eval_stride=48"]
    code = main(["train", *tracking_overrides, "model=kalman_ct",
                 "model.net.components=[oscillator]", *data])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "x.oscillator.k_over_m" in out and "future inputs" in out
    code = main(["train", *tracking_overrides, "model=kalman", *data])
    assert code == 0, capsys.readouterr().err

    client = MlflowClient(mlflow_db)
    train = {r.data.tags["tsssm.model"]: r for r in _runs(mlflow_db, experiment)["train"]}
    ct, kf = train["kalman_ct"].data, train["kalman"].data
    assert ct.params["data.gaps"] == "time" and kf.params["data.gaps"] == "keep"
    for name, truth in (("k_over_m", K_OVER_M), ("b_over_m", B_OVER_M)):
        est = ct.metrics[f"fit/x.oscillator.{name}"]
        se = ct.metrics[f"fit/x.oscillator.{name}_se"]
        assert 0 < se < 0.2 * truth, (name, se)
        assert abs(est - truth) < 3 * se, (name, est, truth, se)
    assert "fit/x.gain.oscillator.u" in ct.metrics
    assert ct.metrics["test/mse"] < 0.7 * kf.metrics["test/mse"], (
        ct.metrics["test/mse"], kf.metrics["test/mse"])
    assert ct.metrics["test/h24_mse"] < kf.metrics["test/h24_mse"]
    ct_id = train["kalman_ct"].info.run_id
    tables = sorted(Path(a.path).name for a in client.list_artifacts(ct_id, "tables"))
    assert tables == ["parameters.md", "parameters.parquet"]
    figures = [Path(a.path).name for a in client.list_artifacts(ct_id, "figures")]
    assert figures == ["report.html"]  # the forecast and anomaly figures, one report

    # score the file with the bundle: the model's inputs and time steps come with it
    bundle = tmp_path / "out" / "models" / ct_id
    code = main(["score", *tracking_overrides, f"model.checkpoint={bundle}", "data=csv",
                 f"data.path={spring_csv}", f"score.output={tmp_path}/s.parquet"])
    assert code == 0, capsys.readouterr().err
    scored = pl.read_parquet(tmp_path / "s.parquet")
    assert scored.height == 1500 and scored["score"].is_finite().all()

    kf_id = train["kalman"].info.run_id
    code = main(["compare", *tracking_overrides, *data, f"compare.runs=[{ct_id},{kf_id}]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kalman_ct" in out and "last_value" in out
    # without the inputs the continuous model cannot be compared: one clear line
    code = main(["compare", *tracking_overrides, *data[:3], f"compare.runs=[{ct_id}]"])
    assert code != 0 and "data.inputs=[u]" in capsys.readouterr().err


def test_physical_model_from_config(spring_csv, capsys, tracking_overrides, mlflow_db,
                                    experiment):
    """model=spring: a mass-spring-damper written as matrices of expressions (conf/model/
    spring.yaml), all of k, m, b fitted in physical units. The simulation is m x'' = -k x - b x'
    + u with 1/m = 0.5 (its gain), k/m = 0.4, b/m = 0.15: m = 2, k = 0.8, b = 0.3."""
    code = main(["train", *tracking_overrides, "model=spring", "data=csv",
                 f"data.path={spring_csv}", "data.channels=[x]", "data.inputs=[u]",
                 "data.eval_stride=96"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (run,) = _runs(mlflow_db, experiment)["train"]
    m = run.data.metrics
    for name, truth in (("k", 0.8), ("m", 2.0), ("b", 0.3), ("k_over_m", K_OVER_M),
                        ("b_over_m", B_OVER_M)):
        est, se = m[f"fit/model.{name}"], m[f"fit/model.{name}_se"]
        assert abs(est - truth) < 3 * se, (name, est, truth, se)
    assert "model.damping_ratio" in out


def test_bad_physical_config_is_one_line(spring_csv, capsys, tracking_overrides):
    code = main(["train", *tracking_overrides, "model=kalman_ct", "data=csv",
                 f"data.path={spring_csv}", "data.channels=[x]",
                 "model.net.physical.A=[[0,1],['-k/m','__import__(1)']]",
                 "model.net.physical.C=[[1,0]]", "model.net.physical.Qc=[[0,0],[0,1]]",
                 "model.net.physical.R=[[1]]", "+model.net.physical.params.k=1",
                 "+model.net.physical.params.m=1"])
    err = capsys.readouterr().err
    assert code != 0
    assert "model.net.physical.A[1][1]" in err and "calling __import__" in err
    assert "Traceback" not in err
