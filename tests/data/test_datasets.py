"""Dataset protocols: splits, scaling fitted on training rows only, windows and streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from tsssm.config import DataConfig
from tsssm.data.datamodule import SeriesDataModule
from tsssm.data.datasets import build_dataset

ROOT = Path(__file__).resolve().parents[2]
ETT = ROOT.parent / "shared" / "datasets" / "ett"


def data_config(name: str, **overrides):
    raw = yaml.safe_load((ROOT / "conf" / "data" / f"{name}.yaml").read_text())
    raw.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(DataConfig), raw, overrides)


def test_skab_sample_protocol():
    data = build_dataset(data_config("skab_sample")).load()
    assert len(data.channels) == 8 and data.has_labels
    faults = [p for p in data.parts if p.split is not None]
    assert len(faults) == 3
    for p in faults:
        assert p.split.train == (0, 320) and p.split.val == (320, 400)
        assert p.split.test == (400, len(p.stream))
        # per-stream scaling, SKAB's protocol: each file is standardised by its first 400 rows
        # (training + validation, the rows before the test split), as `tsssm score` does
        first = p.stream.values[:400].astype(np.float64)
        assert np.allclose(np.nanmean(first, axis=0), 0, atol=1e-4)
        assert np.allclose(np.nanstd(first, axis=0), 1, atol=1e-3)
        assert not np.allclose(np.nanmean(p.stream.values[:320], axis=0), 0, atol=1e-3)
    extra = [p for p in data.parts if p.split is None]
    assert [p.stream.name for p in extra] == ["anomaly-free/anomaly-free"]
    assert extra[0].rows("train") == (0, 9405) and extra[0].rows("test") == (0, 0)
    # the extra normal file (nothing of it is tested) is scaled by all its rows
    assert np.allclose(np.nanmean(extra[0].stream.values.astype(np.float64), axis=0), 0,
                       atol=1e-4)


@pytest.mark.parametrize("inputs", [[], ["Voltage"]])
def test_training_scales_each_tested_file_as_tsssm_score_does(inputs):
    """Per-stream scaling: every tested SKAB file, and its inputs, scaled in training exactly
    as `tsssm score` scales the same file (its first data.train_rows rows, not the 320 rows of
    its training split)."""
    from tsssm.bundle import Bundle
    from tsssm.commands.score import load_file

    channels = [] if not inputs else ["Accelerometer1RMS", "Current", "Pressure"]
    cfg = data_config("skab_sample", channels=channels, inputs=inputs)
    data = build_dataset(cfg).load()
    raw = build_dataset(data_config("skab_sample", channels=channels, inputs=inputs,
                                    scaler="pooled")).load()
    data_cfg = OmegaConf.to_container(cfg, resolve=True)
    bundle = Bundle(model=None, net_config={}, model_name="none", channels=data.channels,
                    scaler=data.scaler, per_stream_scaling=True, threshold=None,
                    score_kind="nis", data_config=data_cfg, inputs=data.inputs,
                    input_scaler=data.input_scaler)
    tested = [(p, q) for p, q in zip(data.parts, raw.parts) if p.split is not None]
    assert len(tested) == 3
    for part, pooled in tested:
        path = Path(part.stream.path)
        assert part.scaling_rows(cfg.train_rows) == 400
        scored = load_file(OmegaConf.create({**data_cfg, "path": str(path), "channels": []}),
                           bundle).parts[0]
        assert np.array_equal(scored.stream.values, part.stream.values, equal_nan=True), path
        assert np.array_equal(scored.scaler.mean, part.scaler.mean), path
        if inputs:
            assert np.array_equal(scored.stream.inputs, part.stream.inputs), path
            first = pooled.input_scaler.inverse_transform(pooled.stream.inputs)[:400]
            np.testing.assert_allclose(part.input_scaler.mean, first.mean(0), rtol=1e-5)
        # and those rows are the file's first 400, not its 320 training rows
        first = pooled.scaler.inverse_transform(pooled.stream.values)[:400]
        np.testing.assert_allclose(part.scaler.mean, np.nanmean(first, 0), rtol=1e-5, atol=1e-6)


def test_per_stream_scaling_never_reaches_the_test_split():
    data = build_dataset(data_config("skab_sample")).load()
    for p in data.parts:
        if p.split is None:  # the extra normal recording: all of it
            assert p.scaling_rows(400) == len(p.stream) == 9405
        else:
            assert p.scaling_rows(400) == 400 and p.scaling_rows(10_000) == p.pre_test_rows()


def test_pooled_scaler_uses_training_rows_only():
    data = build_dataset(data_config("skab_sample", scaler="pooled")).load()
    train = np.concatenate(data.split_arrays("train")).astype(np.float64)
    assert np.allclose(train.mean(axis=0), 0, atol=1e-3)
    assert np.allclose(train.std(axis=0), 1, atol=1e-3)
    test = np.concatenate([p.stream.values[slice(*p.rows("test"))] for p in data.parts
                           if p.split is not None])
    assert not np.allclose(test.mean(axis=0), 0, atol=1e-2)  # test rows did not shape it


def test_windows_and_streams():
    data = build_dataset(data_config("skab_sample")).load()
    dm = SeriesDataModule(data, "windows", input_len=56, horizon=8, stride=4, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["y"].shape == (16, 64, 8) and batch["mask"].all()
    dm = SeriesDataModule(data, "streams", input_len=56, horizon=8, stride=4, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    # whole streams, unpadded: NaN padding would read as missing data
    # (streams of equal length share one batch)
    assert [tuple(y.shape) for y in batch["y"]] == [(3, 320, 8), (1, 9405, 8)]
    assert all(m.all() for m in batch["mask"])
    val = next(iter(dm.val_dataloader()))
    # validation keeps the history before its rows, counting only the val rows
    assert val["y"][0].shape == (3, 400, 8) and val["mask"][0].sum() == 3 * 80


@pytest.mark.skipif(not (ETT / "ETTh1.csv").exists(), reason="ETT data not present")
def test_ett_standard_split():
    data = build_dataset(data_config("ett_h1", root=str(ETT))).load()
    (part,) = data.parts
    assert part.split.train == (0, 8640)
    assert part.split.val == (8640, 11520) and part.split.test == (11520, 14400)
    train = part.stream.values[:8640].astype(np.float64)
    assert np.allclose(train.mean(axis=0), 0, atol=1e-4)
    assert data.channels == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


@pytest.mark.parametrize(("horizon", "rows_per_hour"), [(96, 1), (720, 1), (336, 4)])
def test_ett_window_counts_equal_time_series_library(tmp_path, horizon, rows_per_hour):
    """Every split holds exactly Time-Series-Library's windows (its Dataset_ETT_hour/_minute,
    seq_len 96, stride 1, drop_last=False): len = border2 - border1 - seq_len - pred_len + 1,
    with val/test border1 moved seq_len rows back into the previous split."""
    import polars as pl

    from tsssm.tasks.evaluate import forecast_origin_rows

    month = 30 * 24 * rows_per_hour
    n_rows = 20 * month + 50  # the split ignores the rows after 20 months
    start = np.datetime64("2016-07-01T00:00:00")
    step = np.timedelta64(60 // rows_per_hour, "m")
    dates = (start + step * np.arange(n_rows)).astype("datetime64[s]").astype(str)
    frame = pl.DataFrame({"date": [d.replace("T", " ") for d in dates],
                          **{f"c{i}": np.sin(np.arange(n_rows) * (i + 1) / 50.0)
                             for i in range(7)}})
    frame.write_csv(tmp_path / "ETT.csv")
    data = build_dataset(data_config("ett_m1" if rows_per_hour == 4 else "ett_h1",
                                     root=str(tmp_path), files=["ETT.csv"], horizon=horizon,
                                     input_len=96)).load()
    dm = SeriesDataModule(data, "windows", input_len=96, horizon=horizon, stride=1,
                          batch_size=32)
    seq_len = 96
    tslib = {  # border1, border2 as in TSLib's data_loader.py
        "train": (0, 12 * month),
        "val": (12 * month - seq_len, 16 * month),
        "test": (16 * month - seq_len, 20 * month),
    }
    expected = {k: b - a - seq_len - horizon + 1 for k, (a, b) in tslib.items()}
    assert len(dm._windows("train")) == expected["train"]
    assert len(dm._windows("val")) == expected["val"]
    (part,) = data.parts
    for split in ("val", "test"):
        origins = forecast_origin_rows(part.rows(split), seq_len, horizon, stride=1)
        assert len(origins) == expected[split]
        assert origins[0] == tslib[split][0] + seq_len  # the first window's forecast origin
