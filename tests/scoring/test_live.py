"""Live scoring: CSV rows from standard input or a growing file, one `time,score,flag` line per
row, equal to scoring the same rows as a file."""

from __future__ import annotations

import io
import sys
import threading
import time

import numpy as np
import polars as pl
import pytest

from tsssm.anomaly.scores import ScoreSpec
from tsssm.bundle import save_bundle
from tsssm.cli import main
from tsssm.data.io import ReadSpec
from tsssm.errors import DataError
from tsssm.scoring.files import score_file
from tsssm.scoring.live import follow_lines, score_lines
from tsssm.scoring.scorer import Scorer

from .conftest import ANOMALY, make_bundle, stream

SPEC = ReadSpec(time_column="ts", channels=("a", "b", "c"))


def csv_text(rows=400, seed=0) -> str:
    raw = stream(rows, nan_frac=0.02, seed=seed)
    lines = ["ts,c,b,a,extra"]  # other column order and an extra column: picked by name
    for i, (a, b, c) in enumerate(raw):
        cells = ["" if np.isnan(v) else repr(float(v)) for v in (c, b, a)]
        lines.append(",".join([str(i), *cells, "x"]))
    return "\n".join(lines) + "\n"


SCORES = {
    "one-step": {},
    # the default anomaly task: Mahalanobis, 30-row trailing shift window
    "anomaly": {"score": ANOMALY},
    "anomaly-per-stream-threshold": {"score": ANOMALY, "scope": "per_stream"},
    "centered": {"score": ScoreSpec("nis", 9, "mean", "centered")},
}


@pytest.mark.parametrize("per_stream", [False, True])
@pytest.mark.parametrize("score", SCORES)
def test_lines_equal_the_file_scored_in_batches(tmp_path, family, per_stream, score):
    bundle = make_bundle(family, per_stream=per_stream, train_rows=50, **SCORES[score])
    text = csv_text()
    path = tmp_path / "s.csv"
    path.write_text(text)
    score_file(path, Scorer(bundle), SPEC, tmp_path / "s.parquet", progress=False)
    want = pl.read_parquet(tmp_path / "s.parquet")
    out = io.StringIO()
    summary = score_lines(io.StringIO(text), Scorer(bundle), SPEC, "standard input", out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "time,score,flag" and summary.rows == 400 == len(lines) - 1
    got = np.array([[float(x) for x in ln.split(",")] for ln in lines[1:]])
    np.testing.assert_array_equal(got[:, 0], want["time"].to_numpy())
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(got[:, 1], want["score"].to_numpy(), rtol=tol, atol=tol)
    assert summary.flagged == int(got[:, 2].sum())
    assert (got[:, 2] != want["flag"].to_numpy()).sum() <= 2  # at most rounding ties


def test_bad_lines_name_the_row():
    bundle = make_bundle("kalman")
    with pytest.raises(DataError, match="row 2 has 4 fields, the header 5"):
        score_lines(io.StringIO("ts,a,b,c,d\n0,1,2,3,4\n1,1,2,3\n"), Scorer(bundle), SPEC,
                    "standard input", io.StringIO())
    with pytest.raises(DataError, match="column 'a' not found"):
        score_lines(io.StringIO("ts,x,b,c\n"), Scorer(bundle), SPEC, "standard input",
                    io.StringIO())
    with pytest.raises(DataError, match="column 'b' holds an infinite value at row 1"):
        score_lines(io.StringIO("ts,a,b,c\n0,1,inf,3\n"), Scorer(bundle), SPEC, "x",
                    io.StringIO())


def test_following_a_growing_file(tmp_path):
    path = tmp_path / "grow.csv"
    text = csv_text(60).splitlines(keepends=True)
    path.write_text("".join(text[:11]))

    def append():
        for i in range(11, len(text)):
            time.sleep(0.002)
            with open(path, "a") as f:
                f.write(text[i][:5])  # a line written in two pieces
                f.flush()
                f.write(text[i][5:])

    writer = threading.Thread(target=append)
    writer.start()
    got = []
    for line in follow_lines(path, interval=0.01):
        got.append(line)
        if len(got) == len(text):
            break
    writer.join()
    assert got == text


def test_cli_reads_standard_input(tmp_path, tracking_overrides, monkeypatch, capsys):
    folder = save_bundle(make_bundle("kalman"), tmp_path / "bundle")
    monkeypatch.setattr(sys, "stdin", io.StringIO(csv_text(30)))
    code = main(["score", "data.path=-", f"model.checkpoint={folder}",
                 "data.time_column=ts", *tracking_overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "time,score,flag" and len(lines) == 31
    assert lines[1].startswith("0,") and "scored 30 rows from standard input" in err
