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
        # per-stream scaling: each file's own training rows are standardised
        train = p.stream.values[:320].astype(np.float64)
        assert np.allclose(np.nanmean(train, axis=0), 0, atol=1e-4)
    extra = [p for p in data.parts if p.split is None]
    assert [p.stream.name for p in extra] == ["anomaly-free/anomaly-free"]
    assert extra[0].rows("train") == (0, 9405) and extra[0].rows("test") == (0, 0)


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
    dm = SeriesDataModule(data, "windows", window=64, stride=4, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["y"].shape == (16, 64, 8) and batch["mask"].all()
    dm = SeriesDataModule(data, "streams", window=64, stride=4, batch_size=16)
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
