"""The Python API (tsssm.api): the same config, run, bundle and results as the CLI; the
README's Python example runs verbatim; bad arguments are one-line tsssm errors."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import tsssm
from tsssm.cli import main
from tsssm.errors import ConfigError, DataError, ModelError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "skab" / "valve1" / "1.csv"
#: a fit of seconds on the bundled sample: closed-form EM, a few iterations
FAST = {"model__fit": "em", "model__em_iters": 3, "data__eval_stride": 64}
FAST_CLI = ["model.fit=em", "model.em_iters=3", "data.eval_stride=64"]


def _tracking(overrides: list[str]) -> dict[str, str]:
    """The conftest's tracking overrides as API keywords."""
    keys = dict(o.split("=", 1) for o in overrides)
    return {k.replace(".", "__"): v for k, v in keys.items() if k.startswith("tracking.")}


def _frame() -> pl.DataFrame:
    return pl.read_csv(SAMPLE, separator=";")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_db):
    """One model trained through the API and one through the CLI, same config, same store."""
    out = tmp_path_factory.mktemp("api")
    tracking = {"tracking__uri": mlflow_db, "tracking__experiment": "api-vs-cli",
                "tracking__artifact_root": f"{out}/artifacts", "tracking__output_dir": f"{out}/out"}
    model = tsssm.train(data="skab_sample", model="kalman", **FAST, **tracking)
    cli = ["train", *[f"{k.replace('__', '.')}={v}" for k, v in tracking.items()], *FAST_CLI]
    assert main(cli) == 0
    runs = sorted((out / "out" / "models").iterdir(), key=lambda p: p.stat().st_mtime)
    (cli_bundle,) = [p for p in runs if p.name != model.run_id]
    return model, cli_bundle, out, tracking


def test_train_is_the_cli_command(trained, mlflow_db):
    model, cli_bundle, out, _ = trained
    client = MlflowClient(mlflow_db)
    api_run = client.get_run(model.run_id)
    cli_run = client.get_run(cli_bundle.name)
    assert api_run.info.status == cli_run.info.status == "FINISHED"
    assert api_run.data.tags["tsssm.command"] == "train"
    # the same resolved config (minus nothing) and the same metrics, to the last digit
    assert api_run.data.params == cli_run.data.params
    # (the throughput metrics are wall-clock timings: the only ones that may differ)
    timing = {"train/samples_per_s", "train/rows_per_s", "train/epoch_seconds", "train/fit_s",
              "test/rows_per_s"}

    def results(run) -> dict:
        return {k: v for k, v in run.data.metrics.items() if k not in timing}

    assert results(api_run) == results(cli_run)
    assert {f.path for f in client.list_artifacts(model.run_id)} == \
        {f.path for f in client.list_artifacts(cli_bundle.name)}
    # the same weights, bit for bit
    ours = load_file(str(out / "out" / "models" / model.run_id / "model.safetensors"))
    theirs = load_file(str(cli_bundle / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours)


def test_forecast_and_score_equal_the_cli(trained, tmp_path, capsys):
    model, cli_bundle, out, tracking = trained
    cli_model = tsssm.load(cli_bundle)
    frame = _frame()
    fc = model.forecast(frame, horizon=8)
    assert fc.equals(cli_model.forecast(frame, horizon=8))
    assert fc.columns[0] == "datetime" and fc.height == 8
    assert fc.columns[1:3] == [model.channels[0], f"std:{model.channels[0]}"]
    # the future times follow the data's step
    step = frame["datetime"].str.to_datetime().diff().median()
    assert (fc["datetime"].diff().drop_nulls() == step).all()

    # scores: exactly what `tsssm score` writes for the same file and bundle
    scores_path = tmp_path / "cli_scores.parquet"
    args = [f"{k.replace('__', '.')}={v}" for k, v in tracking.items()]
    assert main(["score", *args, f"model.checkpoint={cli_bundle}", f"data.path={SAMPLE}",
                 f"score.output={scores_path}", "score.figures=false"]) == 0, \
        capsys.readouterr().err
    cli_scores = pl.read_parquet(scores_path)
    ours = model.score(SAMPLE)
    # `tsssm score` streams the file (float32 scores and shares, to rounding of the in-memory
    # path the API takes); the rest is equal
    # (the streamed file has the threshold column only where the threshold is not one value)
    assert [c for c in cli_scores.columns if c != "threshold"] == [
        c for c in ours.columns if c != "threshold"]
    numeric = [c for c in cli_scores.columns if c in ("score", "threshold")
               or c.startswith("contrib:")]
    assert ours.drop(["threshold", *numeric], strict=False).equals(cli_scores.drop(numeric))
    np.testing.assert_allclose(cli_scores.select(numeric).to_numpy(),
                               ours.select(numeric).to_numpy(), rtol=1e-5, atol=1e-6)
    assert ours["stream"][0] == "1" and model.score(frame)["stream"][0] == "frame"
    assert model.score(frame).drop("stream").equals(ours.drop("stream"))  # frame = its file
    contrib = ours.select([f"contrib:{c}" for c in model.channels]).to_numpy().sum(axis=1)
    np.testing.assert_allclose(contrib, ours["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert ours["label"].sum() > 0 and ours["flag"].dtype == pl.Boolean

    # one-step forecasts: exactly the CLI's long-form forecast table (forecast_frame, what
    # `tsssm train` logs as forecasts/test_one_step.parquet) of the data read as `tsssm score`
    # reads it
    from omegaconf import OmegaConf

    from tsssm.commands.common import forecast_frame
    from tsssm.commands.score import load_file
    from tsssm.tasks.evaluate import predict_stream

    cfg = OmegaConf.create(dict(cli_model.bundle.data_config, path=str(SAMPLE), channels=[]))
    part = load_file(cfg, cli_model.bundle).parts[0]
    pred = predict_stream(cli_model.bundle.model, part.stream.values, "nis")
    long = forecast_frame(part, pred, (0, len(part.stream)))
    one = model.one_step(SAMPLE)
    for ch in model.channels:
        rows = long.filter(pl.col("channel") == ch)
        assert one[ch].equals(rows["mean"].rename(ch))
        assert one[f"std:{ch}"].equals(rows["std"].rename(f"std:{ch}"))
    # and, to float rounding, the train run's logged test forecasts: `tsssm train` and
    # `tsssm score` both scale a SKAB file by its first data.train_rows (400) rows
    logged = pl.read_parquet(next((out / "artifacts").rglob(
        f"{model.run_id}/artifacts/forecasts/test_one_step.parquet")))
    logged = logged.filter(pl.col("stream") == "valve1/1")
    for ch in model.channels:
        mine = one.join(logged.filter(pl.col("channel") == ch), left_on="datetime",
                        right_on="time")
        assert mine.height == logged.height // len(model.channels) > 0
        scale = float(np.abs(mine["mean"].to_numpy()).max())
        np.testing.assert_allclose(mine[ch].to_numpy(), mine["mean"].to_numpy(), rtol=1e-5,
                                   atol=1e-6 * scale)


def test_load_save_and_quantiles(trained, tmp_path):
    model, _, out, tracking = trained
    by_id = tsssm.load(model.run_id, tracking__output_dir=tracking["tracking__output_dir"])
    assert by_id.run_id == model.run_id and "run_id" in repr(by_id)
    saved = model.save(tmp_path / "copy")
    again = tsssm.load(saved)
    frame = _frame().head(300)
    assert again.score(frame).equals(model.score(frame))
    q = again.forecast(frame, 4, quantiles=[0.05, 0.5, 0.95])
    ch = model.channels[0]
    np.testing.assert_allclose(q[f"q0.5:{ch}"].to_numpy(), q[ch].to_numpy(), rtol=1e-6)
    assert (q[f"q0.05:{ch}"] < q[ch]).all() and (q[f"q0.95:{ch}"] > q[ch]).all()
    # the scaler round-trips
    raw = frame.select(model.channels).to_numpy().astype(np.float32)
    np.testing.assert_allclose(model.scaler.inverse_transform(model.scaler.transform(raw)), raw,
                               rtol=1e-5, atol=1e-4)
    # a frame with other column names maps onto the model's channels in order
    renamed = frame.rename({c: f"x{i}" for i, c in enumerate(model.channels)})
    mapped = model.score(renamed, channels=[f"x{i}" for i in range(len(model.channels))])
    assert mapped.equals(model.score(frame))


def test_forecast_with_the_adaptive_band(trained):
    """forecast(adapt=N) replays the last N forecasts of the data through the adaptive band
    (tsssm.tasks.adaptive_calibration) and scales the band by the factors it ends with: the
    mean is the fitted forecast's, the std that times the square root of the factors a direct
    replay gives."""
    import torch

    from tsssm.models.base import call_forecast
    from tsssm.tasks.adaptive_calibration import AdaptiveCalibration

    model, _, _, _ = trained
    frame = _frame()
    plain = model.forecast(frame, horizon=8)
    adapted = model.forecast(frame, horizon=8, adapt=400)
    ch = model.channels
    np.testing.assert_array_equal(adapted.select(ch).to_numpy(), plain.select(ch).to_numpy())
    ratio = (adapted.select([f"std:{c}" for c in ch]).to_numpy()
             / plain.select([f"std:{c}" for c in ch]).to_numpy())  # (8, C)
    # the replay, by hand: every origin of the last 400 whose 8 targets are in the frame
    part = model._read(frame, None, None)
    values, L, n = part.stream.values, model.input_len, len(part.stream)
    origins = np.arange(max(L, n - 8 + 1 - 400), n - 8 + 1)
    ctx = torch.stack([torch.from_numpy(values[o - L : o]).float() for o in origins])
    with torch.no_grad():
        pred = call_forecast(model.bundle.model, ctx, 8, None, None)
    cal = AdaptiveCalibration(8, 0.005)
    cal.adapt(origins, np.stack([values[o : o + 8] for o in origins]), pred.mean.numpy(),
              pred.var.numpy())
    factor = cal.factors_at(n)
    assert not np.allclose(factor, 1.0)  # the band moved
    np.testing.assert_allclose(ratio, np.sqrt(factor)[:, None].repeat(len(ch), 1), rtol=1e-5)


def test_bad_arguments_are_one_line_errors(trained, tmp_path):
    model, _, _, tracking = trained
    cases = [
        (lambda: tsssm.train(data="nope", **tracking), ConfigError, "neither a data config"),
        (lambda: tsssm.train(model="lstm", **tracking), ConfigError, "unknown option 'lstm'"),
        (lambda: tsssm.train(model__no_such_key=1, **tracking), ConfigError, "no_such_key"),
        (lambda: tsssm.train(data=3, **tracking), ConfigError, "DataFrame"),
        (lambda: tsssm.load(tmp_path / "missing"), ModelError, "no such bundle folder"),
        (lambda: model.forecast(_frame(), horizon=0), ConfigError, "horizon"),
        (lambda: model.forecast(_frame(), quantiles=[1.5]), ConfigError, "quantiles"),
        (lambda: model.forecast(_frame(), adapt=-1), ConfigError, "adapt must be"),
        (lambda: model.forecast(_frame(), adapt=5, adapt_rate=0), ConfigError, "adapt_rate"),
        (lambda: model.forecast(_frame().head(20), adapt=5), DataError, "too few"),
        (lambda: model.score(_frame().drop("Pressure")), DataError,
         "the DataFrame: column 'Pressure' not found"),
        (lambda: model.score(tmp_path / "none.csv"), DataError, "none.csv"),
        (lambda: model.save(ROOT / "tsssm"), ModelError, "not a tsssm bundle"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_dataframe_training_is_kept_by_content(tmp_path, tracking_overrides, mlflow_db):
    """A DataFrame trains as `tsssm train data=csv data.path=<its Parquet file>`."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pl.DataFrame({
        "ts": pl.datetime_range(datetime(2026, 1, 1), datetime(2026, 1, 1) + timedelta(
            minutes=n - 1), "1m", eager=True),
        "a": np.sin(np.arange(n) / 9) + 0.1 * rng.standard_normal(n),
        "b": np.cos(np.arange(n) / 5) + 0.1 * rng.standard_normal(n),
    })
    model = tsssm.train(frame, "kalman", **FAST, data__input_len=16, data__horizon=4,
                        **_tracking(tracking_overrides))
    assert model.channels == ["a", "b"] and model.time_column == "ts"  # the one temporal column
    params = MlflowClient(mlflow_db).get_run(model.run_id).data.params
    kept = Path(params["data.path"])
    assert kept.parent == tmp_path / "out" / "frames" and pl.read_parquet(kept).equals(frame)
    fc = model.forecast(frame, 4)
    assert fc["ts"][0] == frame["ts"][-1] + (frame["ts"][1] - frame["ts"][0])
    assert fc.select(pl.all().exclude("ts")).to_numpy().std() > 0  # not a constant


def test_override_values_keep_their_types():
    from tsssm.api import override_value

    assert override_value("1") == "'1'" and override_value(True) == "true"
    assert override_value([";", "it's"]) == "[';','it\\'s']"
    assert override_value(None) == "null" and override_value(0.5) == "0.5"
    cfg = tsssm.compose(data=SAMPLE, data__separator=";", data__time_column="datetime",
                        data__label_column="anomaly", data__ignore_columns=["changepoint"])
    assert cfg.data.path == str(SAMPLE) and cfg.data.separator == ";"
    with pytest.raises(ConfigError, match="finite"):
        override_value(float("nan"))


def test_import_is_light():
    """`import tsssm` loads none of torch, polars, Lightning, Hydra or MLflow."""
    code = ("import sys, tsssm; heavy = [m for m in ('torch', 'polars', 'lightning', 'hydra', "
            "'mlflow') if m in sys.modules]; print(heavy); assert callable(tsssm.train)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def readme_python_example() -> str:
    """The README's "Python API" example, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """Executed as written, from a fresh folder holding only a link to data/ (its runs go to
    that folder's tsssm_runs/)."""
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    assert isinstance(namespace["m"], tsssm.Model)
    assert (tmp_path / "tsssm_runs" / "mlflow.db").exists()
    assert (tmp_path / "my_model" / "meta.json").exists()
    shown = capsys.readouterr().out
    assert shown.count("shape: (") == 2  # the two printed frames


def test_a_clone_named_tsssm_does_not_shadow_the_package(tmp_path):
    """A script run from the folder that holds a clone named `tsssm` imports the installed
    package, not the clone's root folder as a namespace package (issue 12)."""
    (tmp_path / "tsssm").symlink_to(ROOT, target_is_directory=True)
    script = tmp_path / "script.py"
    script.write_text("import tsssm.data.scaling, tsssm\nprint(tsssm.__file__)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]
    assert out.stdout.strip().endswith(str(Path("tsssm") / "__init__.py"))
