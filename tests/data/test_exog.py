"""Inputs and time steps through the data layer: reading, gaps, scaling, batches."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from omegaconf import OmegaConf

from tsssm.config import DataConfig
from tsssm.data.datamodule import SeriesDataModule
from tsssm.data.datasets import TableDataset
from tsssm.data.io import ReadSpec, read_stream, regularise, time_steps
from tsssm.errors import DataError


def _write(tmp_path, rows: dict) -> str:
    path = tmp_path / "s.csv"
    pl.DataFrame(rows).write_csv(path)
    return str(path)


def test_inputs_are_read_held_and_not_channels(tmp_path):
    path = _write(tmp_path, {"t": [0, 1, 2, 4, 5], "y": [1.0, 2.0, None, 4.0, 5.0],
                             "u": [None, 3.0, None, None, 7.0], "z": [0.0] * 5})
    s = read_stream(path, ReadSpec("t", inputs=("u",)))
    assert s.channels == ["y", "z"] and s.input_names == ["u"]
    assert s.inputs[:, 0].tolist() == [3.0, 3.0, 3.0, 3.0, 7.0]  # leading: first; then held
    assert np.isnan(s.values[2, 0])  # outputs stay missing
    part = s.slice(1, 3, "a")
    assert part.inputs[:, 0].tolist() == [3.0, 3.0] and part.input_names == ["u"]


def test_input_mistakes_name_file_and_column(tmp_path):
    path = _write(tmp_path, {"t": [0, 1, 2], "y": [1.0, 2.0, 3.0], "u": [None, None, None]})
    with pytest.raises(DataError, match=r"s\.csv: input column 'u' \(data\.inputs\) is empty"):
        read_stream(path, ReadSpec("t", inputs=("u",)))
    with pytest.raises(DataError, match=r"column 'v' not found \(set data\.inputs\)"):
        read_stream(path, ReadSpec("t", inputs=("v",)))
    with pytest.raises(DataError, match="named as a channel and as an input"):
        read_stream(path, ReadSpec("t", channels=("y",), inputs=("y",)))


def test_time_steps_real_and_even():
    stamps = np.array(["2024-01-01T00:00:00", "2024-01-01T00:00:01",
                       "2024-01-01T00:00:03", "2024-01-01T00:00:03.500",
                       "2024-01-01T00:00:04.500"], dtype="datetime64[ns]")
    assert time_steps(stamps, real=True).tolist() == [1.0, 1.0, 2.0, 0.5, 1.0]
    assert time_steps(stamps, real=False).tolist() == [1.0] * 5
    assert time_steps(np.array([0, 10, 20, 50]), real=True).tolist() == [10.0, 10, 10, 30]


def test_gaps_time_keeps_rows_and_mask_holds_inputs(tmp_path):
    path = _write(tmp_path, {"t": [0, 1, 2, 3, 10, 11], "y": [1.0, 2, 3, 4, 5, 6],
                             "u": [0.0, 0, 1, 1, 2, 2]})
    s = read_stream(path, ReadSpec("t", inputs=("u",)))
    kept, report = regularise(s, "time", 3.0)
    assert kept is s and report.n_gaps == 1
    masked, report = regularise(s, "mask", 3.0)
    assert report.rows_inserted == 6 and len(masked) == 12
    assert masked.inputs[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]


def _cfg(path: str, **kw) -> OmegaConf:
    base = OmegaConf.structured(DataConfig)
    return OmegaConf.merge(base, {"_target_": "tsssm.data.datasets.TableDataset", "name": "csv",
                                  "path": path, "time_column": "t", "input_len": 4,
                                  "horizon": 2, **kw})


def test_dataset_scales_inputs_and_passes_steps(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    t = np.cumsum(rng.choice([1, 2], size=n))
    path = _write(tmp_path, {"t": t, "y": rng.normal(size=n), "u": 5 + 2 * rng.normal(size=n)})
    data = TableDataset(_cfg(path, inputs=["u"], gaps="time")).load()
    part = data.parts[0]
    assert data.channels == ["y"] and data.inputs == ["u"]
    train = part.stream.inputs[slice(*part.rows("train"))]
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 1e-4
    u, dt = part.exog()
    assert dt[1:].tolist() == np.diff(t).astype(float).tolist()
    keep = TableDataset(_cfg(path, inputs=["u"], gaps="keep")).load()
    assert set(keep.parts[0].dt.tolist()) == {float(np.median(np.diff(t)))}
    assert np.array_equal(data.with_time_steps(False).parts[0].dt, keep.parts[0].dt)

    dm = SeriesDataModule(data, "windows", 4, 2, 3, 8, exog=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["u"].shape == (8, 6, 1) and batch["dt"].shape == (8, 6)
    dm = SeriesDataModule(data, "streams", 4, 2, 3, 8, exog=True)
    batch = next(iter(dm.train_dataloader()))
    (y,), (u,), (dt,) = batch["y"], batch["u"], batch["dt"]
    assert y.shape[:2] == dt.shape
    start, stop = part.rows("train")
    assert np.array_equal(u[0].numpy(), part.stream.inputs[start:stop])
    assert np.array_equal(dt[0].numpy(), part.dt[start:stop])
    plain = next(iter(SeriesDataModule(data, "streams", 4, 2, 3, 8).train_dataloader()))
    assert set(plain) == {"y", "mask"}  # models that do not use exog get the batches as before
