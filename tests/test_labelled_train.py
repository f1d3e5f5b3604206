"""Training rows with labelled faults: a warning says how many; task.exclude_labelled_train
fits the threshold on the normal training rows and the model with the faults as missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from tsssm.cli import compose, main
from tsssm.commands import train as train_command
from tsssm.commands.train import fit_model
from tsssm.data.datasets import build_dataset

DATA = ["data=csv", "data.time_column=ts", "data.label_column=label", "data.input_len=16",
        "data.horizon=4", "data.eval_stride=16", "data.train_fraction=0.6",
        "data.val_fraction=0.1"]
FAST = ["trainer.max_epochs=1", "model.optimizer.max_iter=3", "task.threshold.fit_on=train",
        "task.window.size=1"]  # one-step scores: a window would carry the fault past its rows


def faulty_csv(path: Path, n: int = 300) -> Path:
    """Two channels; rows 40-59 (training rows) are a labelled fault, a large offset."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    a = np.sin(t / 10) + 0.1 * rng.standard_normal(n)
    b = np.cos(t / 7) + 0.1 * rng.standard_normal(n)
    fault = (t >= 40) & (t < 60)
    a[fault] += 4.0
    lines = ["ts,a,b,label"]
    for i, x, y, k in zip(t, a, b, fault.astype(int)):
        lines.append(f"{i},{x:.5f},{y:.5f},{k}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_without_labelled_hides_exactly_the_labelled_fit_rows(tmp_path):
    cfg = compose([*DATA, f"data.path={faulty_csv(tmp_path / 's.csv')}"])
    data = build_dataset(cfg.data).load()
    assert data.labelled_rows("train") == 20 and data.labelled_rows("val") == 0
    hidden = data.without_labelled()
    (p,), (q,) = data.parts, hidden.parts
    missing = np.isnan(q.stream.values).all(1)
    assert missing.sum() == 20 and missing[40:60].all()
    assert np.array_equal(q.stream.values[~missing], p.stream.values[~missing])
    assert np.array_equal(q.stream.labels, p.stream.labels)
    assert not np.isnan(p.stream.values).any()  # the original is untouched


def _train(overrides: list[str], capsys) -> tuple[dict, str]:
    capsys.readouterr()
    code = main(["train", *overrides])
    err = capsys.readouterr().err
    assert code == 0, err
    client = MlflowClient(next(o for o in overrides if o.startswith("tracking.uri="))
                          .split("=", 1)[1])
    exp = client.get_experiment_by_name(
        next(o for o in overrides if o.startswith("tracking.experiment=")).split("=", 1)[1])
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    return run.data.metrics, err


def test_labelled_training_rows_warn_and_can_be_left_out(tmp_path, tracking_overrides,
                                                         capsys, monkeypatch):
    faulty = faulty_csv(tmp_path / "faulty.csv")
    seen = []  # the data each training's model is fitted on

    def spy(cfg, data, *args, **kwargs):
        seen.append(data)
        return fit_model(cfg, data, *args, **kwargs)

    monkeypatch.setattr(train_command, "fit_model", spy)
    base = [*tracking_overrides, *DATA, *FAST]

    kept, text = _train([*base, f"data.path={faulty}"], capsys)
    (warning,) = [line for line in text.splitlines() if "labelled as anomalies" in line]
    assert "20 training rows" in warning and "task.exclude_labelled_train=true" in warning

    excluded, text = _train([*base, f"data.path={faulty}", "task.exclude_labelled_train=true"],
                            capsys)
    assert "left out of the threshold and model fits" in text
    # the model was fitted on the data with the fault rows missing (the rest untouched)
    (fitted,) = seen[1].parts
    missing = np.isnan(fitted.stream.values).all(1)
    assert missing.sum() == 20 and missing[40:60].all()
    assert not np.isnan(seen[0].parts[0].stream.values).any()  # without the flag: all rows
    assert abs(kept["test/h4_mse"] - excluded["test/h4_mse"]) > 1e-6  # the fault mattered
    # the threshold is fitted on the normal rows: lower than one that saw the fault's scores
    assert excluded["train/threshold"] < kept["train/threshold"]
