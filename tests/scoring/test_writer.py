"""ParquetStreamWriter: row groups appended, the file appears only when complete."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from tsssm.errors import DataError
from tsssm.scoring.writer import ParquetStreamWriter


@pytest.mark.parametrize("threaded", [True, False])
def test_row_groups_then_rename(tmp_path, threaded):
    path = tmp_path / "out.parquet"
    with ParquetStreamWriter(path, row_group_rows=10, threaded=threaded) as w:
        for i in range(7):
            w.write(pa.table({"x": list(range(i * 4, i * 4 + 4))}))
            assert not path.exists()  # nothing presented before the end
    assert pl.read_parquet(path)["x"].to_list() == list(range(28))
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


@pytest.mark.parametrize("threaded", [True, False])
def test_an_error_leaves_nothing(tmp_path, threaded):
    path = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), ParquetStreamWriter(path, 2, threaded=threaded) as w:
        w.write(pa.table({"x": [1, 2, 3]}))
        raise RuntimeError("scoring failed")
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_on_the_thread_reaches_the_caller(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(DataError, match="cannot write"), ParquetStreamWriter(path, 1) as w:
        w.write(pa.table({"x": [1, 2]}))
        for _ in range(5):  # a table that cannot be cast to the file's schema
            w.write(pa.table({"x": ["not", "an int"]}))
    assert list(tmp_path.iterdir()) == []
