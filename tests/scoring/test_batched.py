"""Streams stacked into one model call (the GPU path for many files, run here on the CPU):
each file's scores equal scoring it alone, whatever the lengths; a bad file is reported and
the others are written."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tsssm.data.io import ReadSpec
from tsssm.scoring.batched import score_group
from tsssm.scoring.files import score_file
from tsssm.scoring.many import FileTask
from tsssm.scoring.scorer import Scorer

from .conftest import ANOMALY, make_bundle, stream

SPEC = ReadSpec(time_column="ts", channels=("a", "b", "c"), label_column="label")


def write(path, rows, seed):
    raw = stream(rows, nan_frac=0.02, seed=seed)
    pl.DataFrame({"ts": np.arange(rows), "a": raw[:, 0], "b": raw[:, 1], "c": raw[:, 2],
                  "label": (np.arange(rows) % 50 == 0).astype(np.int64)}).write_parquet(path)
    return path


@pytest.mark.parametrize("per_stream", [False, True])
@pytest.mark.parametrize("anomaly", [False, True])
def test_a_group_equals_each_file_alone(tmp_path, family, per_stream, anomaly):
    """anomaly: the default anomaly task (Mahalanobis, 30-row shift window) with per-stream
    thresholds, computed per lane from the batch's step terms."""
    score = {"score": ANOMALY, "scope": "per_stream"} if anomaly else {}
    bundle = make_bundle(family, per_stream=per_stream, train_rows=60, **score)
    lengths = [500, 37, 260, 1, 500]  # shorter than a round, than the calibration, one row
    paths = [write(tmp_path / f"s{i}.parquet", n, seed=i) for i, n in enumerate(lengths)]
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,a,b,c,label\n" + "".join(f"{i},1,{'x' if i == 150 else 2},3,0\n"
                                                 for i in range(300)))
    tasks = [FileTask(str(p), str(tmp_path / "out" / f"{p.stem}.parquet"), p.stem, SPEC,
                      batch_rows=64) for p in [*paths, bad]]
    results = score_group(tasks, bundle, rows=97)
    assert "row 151" in results[-1].error and results[-1].output is None
    assert not (tmp_path / "out" / "bad.parquet").exists()
    tol = 1e-5 if family == "kalman" else 1e-4
    for path, result, n in zip(paths, results, lengths):
        assert result.error is None and result.rows == n
        got = pl.read_parquet(result.output)
        alone = score_file(path, Scorer(bundle, engine="torch"), SPEC, tmp_path / "a.parquet",
                           progress=False)
        want = pl.read_parquet(alone.output)
        assert got["time"].to_list() == want["time"].to_list()
        assert got.columns == want.columns
        for column in [c for c in got.columns if c.startswith(("score", "contrib:"))]:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(),
                                       rtol=tol, atol=tol)
        assert result.counts == alone.counts
        assert result.intervals == alone.intervals
        assert result.threshold_note == alone.threshold_note


def test_sharded_over_two_processes_equals_one(tmp_path):
    """score.device=cuda with several GPUs: one process per device, each a contiguous share
    of the files; run here with two CPU processes in place of two GPUs."""
    from tsssm.scoring.many import run_sharded

    bundle = make_bundle("kalman")
    paths = [write(tmp_path / f"s{i}.parquet", 120 + 40 * i, seed=i) for i in range(5)]
    tasks = [FileTask(str(p), str(tmp_path / d / f"{p.stem}.parquet"), p.stem, SPEC,
                      batch_rows=64) for d in ("one", "two") for p in paths]
    done = []
    one = run_sharded(tasks[:5], bundle, ["cpu"])
    two = run_sharded(tasks[5:], bundle, ["cpu", "cpu"], on_done=done.append)
    assert sorted(r.name for r in done) == sorted(p.stem for p in paths)
    for a, b in zip(one, two):
        assert a.error is None and b.error is None and a.rows == b.rows and a.name == b.name
        np.testing.assert_array_equal(pl.read_parquet(a.output)["score"].to_numpy(),
                                      pl.read_parquet(b.output)["score"].to_numpy())


def test_gpu_devices_without_a_gpu(monkeypatch):
    import torch

    from tsssm.errors import ConfigError
    from tsssm.scoring.many import gpu_devices

    assert gpu_devices("cuda:1") == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        gpu_devices("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_devices("cuda") == ["cuda:0", "cuda:1"]
    assert gpu_devices("cuda", 1) == ["cuda:0"]
    with pytest.raises(ConfigError, match="score.workers=4 GPUs"):
        gpu_devices("cuda", 4)
