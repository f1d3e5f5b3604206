"""The CLI as a user meets it: help, config errors and data errors give one line and a
non-zero exit, and a failing command leaves its MLflow run marked FAILED."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tsssm.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "skab"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["train", "score", "compare", "run"])
def test_help_lists_groups(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "data" in out and "skab_sample*" in out and "kalman*" in out


@pytest.mark.parametrize(("command", "keys"), [
    ("score", ["score.output=", "score.chunk_size=", "model.run_id=", "model.checkpoint="]),
    ("compare", ["compare.runs="]),
    ("run", ["run.models="]),
    ("train", ["trainer.resume=", "model.epochs=", "data.input_len="]),
])
def test_help_lists_the_commands_keys(capsys, command, keys):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "=" in line]
    for key in keys:
        assert any(entry.startswith(key) for entry in listed), (key, out)
    # the keys a command does not read are not listed
    if command == "score":
        assert not any(entry.startswith("trainer.") for entry in listed)


def test_help_follows_overrides_and_wraps(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "72")
    code, out, _ = run_cli(capsys, "train", "--help", "model=mamba")
    assert code == 0
    assert "model.net.d_model=" in out
    # meanings come from the schema's comments, wrapped to the terminal
    assert any(line.startswith("  data.input_len=") and "context length" in line
               for line in out.splitlines()), out
    keys_section = out.split("keys of `tsssm train`")[1].split("\nexamples:")[0]
    wrapped = [line for line in keys_section.splitlines() if " " in line.strip()]
    assert all(len(line) <= 72 for line in wrapped), [ln for ln in wrapped if len(ln) > 72]


def test_help_with_a_bad_override_still_helps(capsys):
    code, out, _ = run_cli(capsys, "train", "--help", "model=lstm")
    assert code == 0
    assert "cannot be listed" in out and "unknown option 'lstm'" in out


def test_unknown_command(capsys):
    code, _, err = run_cli(capsys, "fly")
    assert code == 2 and "unknown command 'fly'" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=lstm", "unknown option 'lstm' for config group 'model'"),
        ("data.colour=red", "unknown config key 'data.colour'"),
        ("data.input_len=many", "bad value in 'data.input_len=many'"),
        ("data.input_len=0", "'data.input_len' must be a positive integer"),
        ("data.gaps=sometimes", "expected one of [keep, mask, fill, time]"),
        ("task.threshold.q=1.5", "'task.threshold.q' must lie in (0, 1)"),
        ("model.optimizer.name=sgd", "'model.optimizer.name' is 'sgd'"),
    ],
)
def test_config_errors_are_one_line(capsys, tracking_overrides, override, expected):
    code, _, err = run_cli(capsys, "train", *tracking_overrides, override)
    assert code == 2
    assert expected in error_line(err)


def test_cfg_prints_the_composed_config(capsys):
    code, out, _ = run_cli(capsys, "train", "--cfg", "model=mamba", "data.input_len=128")
    assert code == 0 and "input_len: 128" in out and "MambaForecaster" in out


def _runs(mlflow_db, experiment):
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def _csv_overrides(path: Path) -> list[str]:
    return ["data=csv", f"data.path={path}", "data.time_column=ts", "data.input_len=6",
            "data.horizon=2"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("ts;a;b\n1;2;3\n2;3;4\n", """set 'data.separator=";"'"""),
        ("time,a,b\n1,2,3\n2,3,4\n", "column 'ts' not found"),
        ("ts,a,b\n1,2,x\n2,3,4\n", "column 'b' is not numeric"),
        ("ts,a,b\n1,2,3\n1,3,4\n", "duplicate timestamp"),
        ("ts,a,b\n2,2,3\n1,3,4\n", "not sorted"),
        ("", "is empty"),
        ("ts,a,b\n" + "".join(f"{i},{i},{i}\n" for i in range(10)),
         "data.input_len + data.horizon = 6 + 2"),
    ],
)
def test_data_errors_fail_the_run(capsys, tmp_path, tracking_overrides, mlflow_db, experiment,
                                  content, expected):
    path = tmp_path / "stream.csv"
    path.write_text(content)
    code, _, err = run_cli(capsys, "train", *tracking_overrides, *_csv_overrides(path))
    assert code == 2
    line = error_line(err)
    assert expected in line and str(path) in line
    runs = _runs(mlflow_db, experiment)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert expected in runs[0].data.tags["tsssm.error"]
    # nothing half-written is left where results are expected
    out = tmp_path / "out"
    assert not (out / "models").exists() or not any((out / "models").iterdir())


def test_missing_path_and_missing_root(capsys, tmp_path, tracking_overrides, monkeypatch):
    code, _, err = run_cli(capsys, "train", *tracking_overrides, "data=csv",
                           f"data.path={tmp_path}/nope.csv")
    assert code == 2 and "not found" in error_line(err)
    monkeypatch.setenv("TSSSM_DATA", str(tmp_path / "empty-cache"))
    code, _, err = run_cli(capsys, "train", *tracking_overrides, "data=skab")
    assert code == 2 and "`tsssm data fetch skab`" in error_line(err)
    code, _, err = run_cli(capsys, "train", *tracking_overrides, "data=skab",
                           f"data.root={tmp_path}/elsewhere")
    assert code == 2 and "matches no file under" in error_line(err)


def test_score_without_a_trained_model(capsys, tracking_overrides):
    code, _, err = run_cli(capsys, "score", *tracking_overrides)
    assert code == 2 and "run `tsssm train` first" in error_line(err)


def test_score_with_a_bad_checkpoint(capsys, tmp_path, tracking_overrides):
    code, _, err = run_cli(capsys, "score", *tracking_overrides,
                           f"model.checkpoint={tmp_path}")
    assert code == 2 and "not a tsssm model bundle" in error_line(err)


def test_wrong_separator_on_copied_sample(capsys, tmp_path, tracking_overrides):
    root = tmp_path / "skab"
    shutil.copytree(SAMPLE, root)
    code, _, err = run_cli(capsys, "train", *tracking_overrides, f"data.root={root}",
                           "data.separator=','")
    assert code == 2 and """set 'data.separator=";"'""" in error_line(err)


def test_a_batch_limit_that_leaves_no_batch_is_a_config_error(capsys, tracking_overrides,
                                                              mlflow_db, experiment):
    """A whole-stream model has one training batch an epoch: a fraction of it is nothing to
    train on. One line naming the key (not Lightning's internal error), the run FAILED."""
    code, _, err = run_cli(capsys, "train", *tracking_overrides, "model=var_kalman",
                           "task=anomaly", "trainer.max_epochs=1",
                           "trainer.limit_train_batches=0.2")
    assert code == 2
    line = error_line(err)
    assert "trainer.limit_train_batches=0.2 leaves no training batch" in line
    assert "internal error" not in err
    assert [r.info.status for r in _runs(mlflow_db, experiment)] == ["FAILED"]
