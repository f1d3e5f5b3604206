"""Fuzzing the readers: whatever bytes a file holds, ``read_stream`` either raises a
``tsssm.errors`` error naming the file, or returns a stream whose every value is finite or NaN
(float32), whose time axis strictly increases and whose labels are 0/1. Nothing else: no inf
slipping through a cast, no polars exception or panic, no garbage from a corrupt Parquet file."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tsssm.data.io import ReadSpec, read_stream
from tsssm.errors import TsssmError

SPEC = ReadSpec(time_column="ts", label_column="label")
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: cells a sensor export may hold, including the ones that overflow float32 or float64
CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(width=32).map(lambda x: f"{x:.9g}"),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "1e308", "-3e38", "3.5e38", "1e39",
                     "1e-320", "x", " 1 ", "1,5", "null", "NA", "0x10", "1_000", "∞"]),
)
TIMES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.sampled_from(["2020-01-01 00:00:00", "2020-01-01T00:00:01", "01/02/2020 00:00",
                     "2020-13-01 00:00:00", "", "yesterday", "2020-03-29 02:30:00+01:00"]),
)


def check(path, spec: ReadSpec = SPEC) -> None:
    try:
        stream = read_stream(path, spec)
    except TsssmError as err:
        assert str(path) in str(err), str(err)
        return
    v = stream.values
    assert v.dtype == np.float32
    assert (np.isfinite(v) | np.isnan(v)).all(), "an infinite value was read"
    ordinal = stream.time.astype("int64")
    assert (np.diff(ordinal) > 0).all()
    if stream.labels is not None:
        assert np.isin(stream.labels, (0, 1)).all()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(table=st.lists(st.tuples(TIMES, CELLS, CELLS, st.sampled_from(["0", "1", "", "2", "0.5"])),
                      min_size=1, max_size=30),
       sorted_times=st.booleans())
def test_csv_cells(folder, table, sorted_times):
    if sorted_times:
        table = [(str(i), a, b, lab) for i, (_, a, b, lab) in enumerate(table)]
    path = folder / "cells.csv"
    path.write_text("ts,a,b,label\n" + "\n".join(",".join(r) for r in table) + "\n")
    check(path)


def _valid_csv() -> bytes:
    rows = [f"{i},{np.sin(i / 5):.6f},{np.cos(i / 3):.6f},{int(i % 17 == 0)}" for i in range(60)]
    return ("ts,a,b,label\n" + "\n".join(rows) + "\n").encode()


def _valid_parquet(folder, compression: str) -> bytes:
    frame = pl.read_csv(_valid_csv())
    path = folder / f"valid-{compression}.parquet"
    frame.write_parquet(path, compression=compression)
    return path.read_bytes()


MUTATIONS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                     min_size=1, max_size=4)


@FUZZ
@given(mutations=MUTATIONS, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_csv_bytes(folder, mutations, cut):
    raw = bytearray(_valid_csv())
    for where, value in mutations:
        raw[int(where * len(raw))] = value
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = folder / "bytes.csv"
    path.write_bytes(bytes(raw))
    check(path)


@FUZZ
@given(mutations=MUTATIONS, compression=st.sampled_from(["uncompressed", "zstd", "snappy"]),
       cut=st.one_of(st.none(), st.floats(0, 1)))
# a byte in the footer's column path that is not UTF-8 (found by CI, 2026-11-30)
@example(mutations=[(0.8109864696654924, 128)], compression="uncompressed", cut=None)
def test_parquet_bytes(folder, mutations, compression, cut):
    raw = bytearray(_valid_parquet(folder, compression))
    for where, value in mutations:
        raw[int(where * len(raw))] = value
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = folder / "bytes.parquet"
    path.write_bytes(bytes(raw))
    check(path)
