"""StreamReader: batches of a file equal the whole file read by tsssm.data (prepare_stream), for
any batch size, and every bad row fails with read_stream's own message (the row's number in the
whole file)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from tsssm.data.datasets import prepare_stream
from tsssm.data.io import ReadSpec, read_stream
from tsssm.errors import DataError
from tsssm.scoring.reader import StreamReader


def cfg(**kw):
    base = dict(time_column="ts", channels=[], label_column="label", ignore_columns=[],
                separator=",", time_format=None, gaps="keep", gap_factor=3.0, fill="none")
    base.update(kw)
    return SimpleNamespace(**base)


def spec_of(c) -> ReadSpec:
    return ReadSpec(time_column=c.time_column, channels=tuple(c.channels),
                    label_column=c.label_column, ignore_columns=tuple(c.ignore_columns),
                    separator=c.separator, time_format=c.time_format)


def table(rows: int = 400, seed: int = 0, datetime: bool = True) -> pl.DataFrame:
    """A stream with missing cells, two time gaps (one of them long) and labels."""
    rng = np.random.default_rng(seed)
    step = np.ones(rows, np.int64)
    step[100] = 5  # a gap of 4 missing rows
    step[250] = 40
    ticks = np.cumsum(step)
    a = rng.standard_normal(rows)
    b = rng.standard_normal(rows)
    a[rng.random(rows) < 0.1] = np.nan
    b[:3] = np.nan  # leading missing values (forward fill leaves them)
    ts = (np.datetime64("2024-01-01T00:00:00", "ns") + ticks * np.timedelta64(1, "s")
          if datetime else ticks)
    return pl.DataFrame({"ts": ts, "a": a, "b": b,
                         "label": (rng.random(rows) < 0.05).astype(np.int64)})


def write(frame: pl.DataFrame, tmp_path, suffix: str):
    path = tmp_path / f"s{suffix}"
    if suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return path


def read_all(reader: StreamReader):
    batches = list(reader)
    assert [b.first_row for b in batches] == list(np.cumsum([0] + [len(b.time)
                                                                  for b in batches[:-1]]))
    labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
    return (np.concatenate([b.time for b in batches]),
            np.concatenate([b.values for b in batches]), labels)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("gaps,fill", [("keep", "none"), ("mask", "none"), ("fill", "none"),
                                       ("mask", "forward"), ("keep", "zero")])
@pytest.mark.parametrize("batch_rows", [1, 7, 101, 10_000])
def test_batches_equal_the_whole_file(tmp_path, suffix, gaps, fill, batch_rows):
    path = write(table(datetime=suffix == ".csv"), tmp_path, suffix)
    c = cfg(gaps=gaps, fill=fill)
    whole, _ = prepare_stream(path, c)
    reader = StreamReader(path, spec_of(c), gaps=gaps, fill=fill, batch_rows=batch_rows)
    assert reader.channels == whole.channels and reader.has_labels
    time, values, labels = read_all(reader)
    np.testing.assert_array_equal(time, whole.time)
    np.testing.assert_array_equal(values, whole.values)
    np.testing.assert_array_equal(labels, whole.labels)
    assert reader.rows_read == 400
    assert reader.gap_report.n_gaps == 2
    assert reader.gap_report.rows_inserted == (0 if gaps == "keep" else 4 + 39)


def test_row_count_known_for_parquet_estimated_for_csv(tmp_path):
    frame = table(2000)
    assert StreamReader(write(frame, tmp_path, ".parquet"), spec_of(cfg())).total_rows == 2000
    estimate = StreamReader(write(frame, tmp_path, ".csv"), spec_of(cfg())).total_rows
    assert 1500 < estimate < 2500


def bad_rows(kind: str) -> str:
    """A CSV of 1000 rows with one defect in row 700 (or rows 699/700)."""
    lines = ["ts,a,b,label"] + [f"{i},{i * 0.5},{-i},0" for i in range(1, 1001)]
    row = 700  # line index = row number (the header is line 0)
    t, a, b, label = lines[row].split(",")
    if kind == "text":
        a = "oops"
    elif kind == "inf":
        b = "inf"
    elif kind == "duplicate":
        t = lines[row - 1].split(",")[0]
    elif kind == "unsorted":
        t = "5"
    elif kind == "empty-time":
        t = ""
    elif kind == "label":
        label = "3"
    elif kind == "time-text":
        t = "2020-01-01"
    lines[row] = ",".join([t, a, b, label])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["text", "inf", "duplicate", "unsorted", "empty-time", "label",
                                  "time-text"])
@pytest.mark.parametrize("batch_rows", [64, 699, 700])
def test_a_bad_row_fails_with_its_number_in_the_file(tmp_path, kind, batch_rows):
    path = tmp_path / "bad.csv"
    path.write_text(bad_rows(kind))
    spec = ReadSpec(time_column="ts", label_column="label")
    with pytest.raises(DataError) as whole:
        read_stream(path, spec)
    with pytest.raises(DataError) as batched:
        list(StreamReader(path, spec, batch_rows=batch_rows))
    message = str(batched.value)
    assert str(path) in message and "\n" not in message
    if kind == "time-text" and batch_rows < 700:  # read as the file's first rows were
        assert "row 700 holds '2020-01-01', not an integer" in message
    elif kind == "label":
        assert message == str(whole.value)
    else:
        assert message == str(whole.value)
        assert "700" in message or kind == "time-text"


def test_header_problems_are_found_before_reading_rows(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("time,a\n1,2\n")
    with pytest.raises(DataError, match="column 'ts' not found"):
        StreamReader(path, ReadSpec(time_column="ts"))
    (tmp_path / "e.csv").write_text("ts,a\n")
    with pytest.raises(DataError, match="has a header but no rows"):
        list(StreamReader(tmp_path / "e.csv", ReadSpec(time_column="ts")))
