"""StreamReader: batches of a file equal the whole file read by tsssm.data (prepare_stream), for
any batch size, and every bad row fails with read_stream's own message (the row's number in the
whole file), with the batches converted on one thread or several."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from omegaconf import OmegaConf

from tsssm.data.datasets import prepare_stream, read_spec
from tsssm.data.io import ReadSpec, read_stream
from tsssm.errors import DataError
from tsssm.scoring.reader import StreamReader


def cfg(**kw):
    base = dict(time_column="ts", channels=[], label_column="label", ignore_columns=[],
                separator=",", time_format=None, gaps="keep", gap_factor=3.0, fill="none",
                duplicates="error", sort=False)
    base.update(kw)
    return OmegaConf.create(base)


def spec_of(c) -> ReadSpec:
    return read_spec(c)


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
@pytest.mark.parametrize("threads", [0, 3])
def test_batches_equal_the_whole_file(tmp_path, suffix, gaps, fill, batch_rows, threads):
    path = write(table(datetime=suffix == ".csv"), tmp_path, suffix)
    c = cfg(gaps=gaps, fill=fill)
    whole, _ = prepare_stream(path, c)
    reader = StreamReader(path, spec_of(c), gaps=gaps, fill=fill, batch_rows=batch_rows,
                          threads=threads)
    assert reader.threads == threads
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
@pytest.mark.parametrize("threads", [0, 3])
def test_a_bad_row_fails_with_its_number_in_the_file(tmp_path, kind, batch_rows, threads):
    path = tmp_path / "bad.csv"
    path.write_text(bad_rows(kind))
    spec = ReadSpec(time_column="ts", label_column="label")
    with pytest.raises(DataError) as whole:
        read_stream(path, spec)
    with pytest.raises(DataError) as batched:
        list(StreamReader(path, spec, batch_rows=batch_rows, threads=threads))
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


def _catalogue_cases():
    """The data-file cases of the bad-input catalogue (tests/test_catalogue.py) that read one
    file with `data=csv`: every one must fail (or pass) alike read whole or in batches."""
    from ..test_catalogue import CASES

    for case in CASES:
        if not case.files or case.command != "train" or "data=csv" not in case.args:
            continue
        yield case


def _spec_from_args(args, d) -> tuple[ReadSpec, str]:
    keys = {"time_column": "ts", "label_column": "label"}
    path = None
    for arg in args:
        key, _, value = arg.partition("=")
        if not key.startswith("data."):
            continue
        key = key[5:]
        value = value.replace("{d}", str(d)).strip("'")
        if key == "path":
            path = value
        elif key in ("channels", "ignore_columns"):
            keys[key] = tuple(v for v in value.strip("[]").split(",") if v)
        elif key == "sort":
            keys[key] = value == "true"
        elif key in ("time_column", "label_column", "duplicates", "time_format", "separator"):
            keys[key] = value
    return ReadSpec(**keys), path


@pytest.mark.parametrize("case", list(_catalogue_cases()), ids=lambda c: c.id)
@pytest.mark.parametrize("threads", [0, 3])
def test_the_catalogue_reads_alike_whole_and_in_batches(tmp_path, case, threads):
    for name, content in case.files:
        data = content(tmp_path) if callable(content) else content
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    spec, path = _spec_from_args(case.args, tmp_path)
    try:
        whole = read_stream(path, spec)
    except DataError as err:
        whole = err
    for batch_rows in (7, 64):
        try:
            reader = StreamReader(path, spec, batch_rows=batch_rows, threads=threads)
            batches = list(reader)
        except DataError as err:
            assert isinstance(whole, DataError), f"only the batched read failed: {err}"
            if case.id == "parquet-corrupt":  # found on the first damaged batch, not group
                assert "is corrupt" in str(err) and "column 'a'" in str(err)
            else:
                assert str(err) == str(whole)
            continue
        assert not isinstance(whole, DataError), f"only the whole read failed: {whole}"
        np.testing.assert_array_equal(np.concatenate([b.time for b in batches]), whole.time)
        np.testing.assert_array_equal(np.concatenate([b.values for b in batches]),
                                      whole.values)


@pytest.mark.parametrize("how", ["first", "last", "mean"])
@pytest.mark.parametrize("batch_rows", [1, 2, 5, 6, 1000])
@pytest.mark.parametrize("threads", [0, 3])
def test_duplicates_merged_across_batch_borders(tmp_path, how, batch_rows, threads):
    # time stamps 0,1,1,2,2,2,3,4,4,...: groups of equal stamps straddle every batch size
    ticks = np.repeat(np.arange(40), np.tile([1, 2, 3], 14)[:40])
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({"ts": ticks, "a": rng.standard_normal(len(ticks)),
                          "label": (rng.random(len(ticks)) < 0.2).astype(np.int64)})
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) % 4 == 0).then(None)
                               .otherwise(pl.col("a")).alias("a"))
    path = tmp_path / "d.csv"
    frame.write_csv(path)
    spec = ReadSpec(time_column="ts", label_column="label", duplicates=how)
    whole = read_stream(path, spec)
    time, values, labels = read_all(StreamReader(path, spec, batch_rows=batch_rows,
                                                 threads=threads))
    np.testing.assert_array_equal(time, whole.time)
    np.testing.assert_array_equal(values, whole.values)
    np.testing.assert_array_equal(labels, whole.labels)
    assert len(np.unique(time)) == len(time) == 40


def test_sort_reads_the_file_whole(tmp_path):
    frame = table(datetime=False).sample(fraction=1.0, shuffle=True, seed=1)
    path = write(frame, tmp_path, ".parquet")
    spec = ReadSpec(time_column="ts", label_column="label", sort=True)
    whole = read_stream(path, spec)
    time, values, labels = read_all(StreamReader(path, spec, batch_rows=33, gaps="mask"))
    assert (np.diff(time) > 0).all()
    c = cfg(gaps="mask", sort=True)
    want, _ = prepare_stream(path, c)
    np.testing.assert_array_equal(time, want.time)
    np.testing.assert_array_equal(values, want.values)
    assert len(want.time) > len(whole.time)  # the gaps were filled with rows


def _grouped_parquet(frame: pl.DataFrame, path, group_rows: int):
    import pyarrow.parquet as pq

    pq.write_table(frame.to_arrow(), path, row_group_size=group_rows, compression="none")
    return path


@pytest.mark.parametrize("group_rows", [13, 37, 400])
@pytest.mark.parametrize("batch_rows", [1, 10, 50, 10_000])
@pytest.mark.parametrize("threads", [0, 3])
def test_row_groups_read_several_at_once_equal_the_whole_file(tmp_path, group_rows, batch_rows,
                                                              threads):
    """Row groups of up to GROUP_READ_BATCHES batches are decoded whole on the reader's threads,
    in runs of about a batch; longer ones (and one-group files) page by page: the same rows."""
    from tsssm.scoring.reader import GROUP_READ_BATCHES

    path = _grouped_parquet(table(), tmp_path / "g.parquet", group_rows)
    c = cfg(gaps="mask", fill="forward")
    whole, _ = prepare_stream(path, c)
    reader = StreamReader(path, spec_of(c), gaps="mask", fill="forward", batch_rows=batch_rows,
                          threads=threads)
    runs = reader._group_reads()
    assert (runs is not None) == (group_rows < 400 and group_rows <= GROUP_READ_BATCHES
                                  * batch_rows)
    if runs is not None:  # consecutive groups, each run about a batch long
        assert [g for run in runs for g in run] == list(range(-(-400 // group_rows)))
        assert all(group_rows * (len(run) - 1) < batch_rows for run in runs)
    time, values, labels = read_all(reader)
    np.testing.assert_array_equal(time, whole.time)
    np.testing.assert_array_equal(values, whole.values)
    np.testing.assert_array_equal(labels, whole.labels)
    assert reader.rows_read == 400 and reader.gap_report.rows_inserted == 4 + 39


@pytest.mark.parametrize("kind", ["duplicate", "unsorted", "corrupt"])
def test_row_groups_read_at_once_fail_as_the_whole_file(tmp_path, kind):
    """A defect in a later row group read on a worker thread fails with the one-thread
    message (the row's number in the file, or the damaged column)."""
    frame = pl.DataFrame({"ts": np.arange(1, 1001), "a": np.arange(1000) * 0.5,
                          "label": np.zeros(1000, np.int64)})
    if kind == "duplicate":
        frame = frame.with_columns(pl.when(pl.col("ts") == 700).then(699)
                                   .otherwise(pl.col("ts")).alias("ts"))
    elif kind == "unsorted":
        frame = frame.with_columns(pl.when(pl.col("ts") == 700).then(5)
                                   .otherwise(pl.col("ts")).alias("ts"))
    path = _grouped_parquet(frame, tmp_path / "g.parquet", 100)
    if kind == "corrupt":  # a value of group 7 beyond the range its footer records
        raw = bytearray(path.read_bytes())
        at = bytes(raw).find(np.float64(700 * 0.5).tobytes())
        raw[at + 7] = 0x7F
        path.write_bytes(bytes(raw))
    spec = ReadSpec(time_column="ts", label_column="label")
    with pytest.raises(DataError) as one:
        list(StreamReader(path, spec, batch_rows=64, threads=0))
    with pytest.raises(DataError) as several:
        reader = StreamReader(path, spec, batch_rows=64, threads=3)
        assert reader._group_reads() is not None
        list(reader)
    assert str(several.value) == str(one.value)
    assert ("is corrupt" in str(one.value) and "column 'a'" in str(one.value)
            if kind == "corrupt" else "700" in str(one.value))
