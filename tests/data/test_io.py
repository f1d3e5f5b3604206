"""Reading and validating streams: each bad input gets one message naming file and column."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tsssm.data.io import ReadSpec, read_stream, regularise
from tsssm.errors import DataError

SPEC = ReadSpec(time_column="ts", label_column="label")


def write(tmp_path, text: str, name: str = "s.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_channels_labels_and_missing_values(tmp_path):
    path = write(tmp_path, "ts,a,b,label\n2020-01-01 00:00:00,1,2,0\n"
                           "2020-01-01 00:00:01,,3,1\n2020-01-01 00:00:02,4,5,0\n")
    s = read_stream(path, SPEC)
    assert s.channels == ["a", "b"]
    assert np.isnan(s.values[1, 0]) and s.values[2, 1] == 5
    assert s.labels.tolist() == [0, 1, 0]
    assert s.time.dtype == np.dtype("datetime64[ns]")


def test_parquet_round_trip(tmp_path):
    frame = pl.DataFrame({"ts": [1, 2, 3], "a": [1.0, None, 3.0], "label": [0, 0, 1]})
    frame.write_parquet(tmp_path / "s.parquet")
    s = read_stream(tmp_path / "s.parquet", SPEC)
    assert s.values.shape == (3, 1) and np.isnan(s.values[1, 0])


@pytest.mark.parametrize(
    ("text", "spec", "expected"),
    [
        ("", SPEC, "is empty"),
        ("ts,a,label\n", SPEC, "no rows"),
        ("ts;a;label\n1;2;0\n2;3;0\n", SPEC, """'data.separator=";"'"""),
        ("ts,a,label\n1,2,0\n2,3,0\n", ReadSpec("time", label_column="label"), "'time' not found"),
        ("ts,a,label\n1,2,0\n2,3,0\n", ReadSpec("ts", channels=("z",)), "'z' not found"),
        ("ts,a,label\n1,2,0\n2,oops,0\n", SPEC, "column 'a' is not numeric (row 2"),
        ("ts,a,label\n1,2,0\n1,3,0\n", SPEC, "duplicate timestamp"),
        ("ts,a,label\n2,2,0\n1,3,0\n", SPEC, "not sorted"),
        ("ts,a,label\n1,inf,0\n2,3,0\n", SPEC, "infinite value at row 1"),
        ("ts,a,label\nyesterday,1,0\n", SPEC, "does not parse as timestamps"),
        ("ts,a,label\n1,1,0\n2,1,7\n", SPEC, "must hold 0/1"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, spec, expected):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        read_stream(path, spec)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_stream(tmp_path / "nope.csv", SPEC)


def test_gaps_are_masked_or_filled(tmp_path):
    rows = [0, 1, 2, 3, 10, 11, 12]
    text = "ts,a\n" + "".join(f"{t},{t}\n" for t in rows)
    s = read_stream(write(tmp_path, text), ReadSpec("ts"))
    kept, report = regularise(s, "keep", 3.0)
    assert report.n_gaps == 1 and len(kept) == 7
    masked, report = regularise(s, "mask", 3.0)
    assert report.rows_inserted == 6 and len(masked) == 13
    assert np.isnan(masked.values[4:10, 0]).all()
    filled, _ = regularise(s, "fill", 3.0)
    assert (filled.values[4:10, 0] == 3).all()
