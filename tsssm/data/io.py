"""Read one sensor stream from CSV or Parquet with polars, and validate it.

Every problem a user can cause raises :class:`tsssm.errors.DataError` with one message that names
the file, the column (and row, where it helps) and what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from tsssm.errors import DataError

log = logging.getLogger(__name__)

_SEPARATORS = (",", ";", "\t", "|")


@dataclass
class Stream:
    """One validated stream: a regular or irregular time axis and its channels."""

    name: str
    path: str
    time: np.ndarray  # (T,) datetime64[ns] or int64 row numbers
    values: np.ndarray  # (T, C) float32, NaN = missing
    channels: list[str]
    labels: np.ndarray | None = None  # (T,) int8 in {0, 1}
    #: (T, K) float32 input columns (data.inputs), held: never missing; None without inputs
    inputs: np.ndarray | None = None
    input_names: list[str] = field(default_factory=list)
    #: (T,) int8 in {0, 1}: change-point labels (SKAB's ``changepoint`` column), when read
    changepoints: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.time)

    def slice(self, start: int, stop: int, suffix: str) -> Stream:
        return Stream(
            name=f"{self.name}:{suffix}",
            path=self.path,
            time=self.time[start:stop],
            values=self.values[start:stop],
            channels=self.channels,
            labels=None if self.labels is None else self.labels[start:stop],
            inputs=None if self.inputs is None else self.inputs[start:stop],
            input_names=self.input_names,
            changepoints=None if self.changepoints is None else self.changepoints[start:stop],
        )


@dataclass(frozen=True)
class ReadSpec:
    """How to read a table: which columns play which role."""

    time_column: str
    channels: tuple[str, ...] = ()  # empty: every other numeric column
    label_column: str | None = None
    ignore_columns: tuple[str, ...] = ()
    separator: str = ","
    time_format: str | None = None
    label_required: bool = False
    #: duplicate timestamps: "error", or keep the "first"/"last" row, or the "mean" of them
    duplicates: str = "error"
    #: sort rows by time (stable) instead of refusing an unsorted file
    sort: bool = False
    #: what to tell the user when a channel column is missing
    channel_advice: str = "set data.channels"
    inputs: tuple[str, ...] = ()  # input columns (held: forward-filled), not channels
    #: an optional second 0/1 label column: change points (SKAB's ``changepoint``)
    changepoint_column: str | None = None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def shell_override(key: str, value: str) -> str:
    """``key=value`` written so that both the shell and Hydra's override parser keep ``value``
    (``;`` and ``|`` end a shell command and a Hydra value unless quoted; a tab needs bash's
    ``$'...'``)."""
    if value == "\t":
        return f"$'{key}=\"\\t\"'"
    return f"'{key}=\"{value}\"'"


def _scan(path: Path, separator: str) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    if suffix in (".csv", ".txt", ".tsv"):
        # Read everything as text first: types are checked column by column below, so a bad
        # cell is reported by column and row instead of a parser exception.
        return pl.scan_csv(path, separator=separator, infer_schema=False, try_parse_dates=False)
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .csv or .parquet")


def _guess_separator(header: str) -> str | None:
    counts = {s: header.count(s) for s in _SEPARATORS}
    best = max(counts, key=counts.get)  # type: ignore[arg-type]
    return best if counts[best] > 0 else None


def check_file(path: str | Path) -> Path:
    """The file exists, is a file and is not empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (check data.root / data.path)")
    if path.is_dir():
        raise DataError(f"{path} is a directory; data.path must name a .csv or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return path


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def unreadable(path: Path, err: BaseException) -> DataError:
    """polars' parse errors (and panics on corrupt files) as one line."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DataError(f"{path}: cannot be read ({first}); is it a valid "
                     f"{path.suffix.lstrip('.').upper() or 'data'} file?")


@contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Inside the block, any failure of a reader (polars' parse errors, panics on corrupt files)
    becomes :func:`unreadable`; a DataError and an interrupt pass as they are."""
    try:
        yield
    except DataError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise unreadable(path, err) from err


def scan_table(path: Path, spec: ReadSpec) -> tuple[pl.LazyFrame, list[str]]:
    """The table as a lazy frame (nothing read but its header or footer) and its columns."""
    with read_errors(path):
        frame = _scan(path, spec.separator)
        columns = frame.collect_schema().names()
    return frame, columns


def check_columns(path: Path, columns: list[str], spec: ReadSpec) -> list[str]:
    """The header holds the columns the spec names; returns the channel columns."""
    if not is_parquet(path) and len(columns) == 1:
        guess = _guess_separator(columns[0])
        if guess is not None and guess != spec.separator:
            raise DataError(
                f"{path}: the header has one column with {guess!r} in it; the file looks "
                f"{guess!r}-separated, set {shell_override('data.separator', guess)}"
            )

    def need(column: str, key: str) -> None:
        if column not in columns:
            raise DataError(
                f"{path}: column '{column}' not found (set {key}); "
                f"columns are: {', '.join(columns)}"
            )

    need(spec.time_column, "data.time_column")
    # A label column may be absent (SKAB's anomaly-free file has none), unless required.
    if spec.label_column is not None and spec.label_required:
        need(spec.label_column, "data.label_column")
    if spec.label_column is not None and spec.label_column in spec.channels:
        raise DataError(
            f"{path}: column '{spec.label_column}' is data.label_column and also in "
            "data.channels; a label is never an input channel: remove it from data.channels"
        )
    for column in spec.channels:
        need(column, spec.channel_advice)
    for column in spec.inputs:
        need(column, "data.inputs")
    skip = {spec.time_column, spec.label_column, spec.changepoint_column, *spec.ignore_columns,
            *spec.inputs}
    channels = list(spec.channels) or [c for c in columns if c not in skip]
    if not channels:
        raise DataError(
            f"{path}: no channel columns left after the time, label and input columns (set "
            "data.channels)"
        )
    for column in set(channels) & set(spec.inputs):
        raise DataError(f"{path}: column '{column}' is named as a channel and as an input; "
                        "a column is an output (data.channels) or an input (data.inputs)")
    return channels


@dataclass
class Rows:
    """Validated rows of a table: a whole file, or one batch of it."""

    time: np.ndarray  # (n,) datetime64[ns] or int64
    values: np.ndarray  # (n, C) float32, NaN = missing
    labels: np.ndarray | None  # (n,) int8 in {0, 1}
    changepoints: np.ndarray | None = None  # (n,) int8 in {0, 1}: change-point labels


@dataclass
class TimeState:
    """How a file's first rows read their time column, so its later batches read it alike."""

    kind: str | None = None  # "int" or "datetime"
    first_text: str | None = None  # the file's first time stamp as text (its format)


def convert_rows(frame: pl.DataFrame, path: Path, spec: ReadSpec, channels: list[str],
                 first_row: int = 0, state: TimeState | None = None) -> Rows:
    """Parse and check the rows of ``frame``: rows ``first_row + 1 ..`` of the file, the numbers
    every message names. ``state`` carries what the file's earlier batches held (updated).
    Order and duplicates are :func:`order_rows`' business."""
    state = TimeState() if state is None else state
    time = _parse_time(frame, path, spec, first_row, state)
    # float32 columns (views of the frame's buffers) are stacked at once: writing (n, C)
    # column by column touches every cache line C times (np.stack measured ~1.6x faster at
    # 2^20 x 8); other columns are converted one at a time into the float32 array
    stacked: list[np.ndarray] | None = []
    values = None
    for j, column in enumerate(channels):
        col = _numeric(frame, column, path, first_row)
        if stacked is not None and col.dtype == np.float32:
            stacked.append(col)
            continue
        if values is None:
            values = np.empty((frame.height, len(channels)), dtype=np.float32)
            for i, done in enumerate(stacked or ()):
                values[:, i] = done
            stacked = None
        values[:, j] = col
    if values is None:
        values = np.stack(stacked, axis=1) if stacked else np.empty((frame.height, 0),
                                                                    np.float32)
    labels = _label(frame, spec.label_column, path, first_row)
    changepoints = _label(frame, spec.changepoint_column, path, first_row)
    return Rows(time, values, labels, changepoints)


def _label(frame: pl.DataFrame, column: str | None, path: Path, first_row: int = 0
           ) -> np.ndarray | None:
    """A 0/1 label column as int8, or None when it is not configured or not in the file."""
    if column is None or column not in frame.columns:
        return None
    raw = _numeric(frame, column, path, first_row)
    if np.isnan(raw).any():
        row = first_row + int(np.flatnonzero(np.isnan(raw))[0])
        raise DataError(f"{path}: label column '{column}' is empty at row {row + 1}")
    if not np.isin(raw, (0.0, 1.0)).all():
        i = int(np.flatnonzero(~np.isin(raw, (0.0, 1.0)))[0])
        raise DataError(f"{path}: label column '{column}' must hold 0/1 values "
                        f"(row {first_row + i + 1} holds {raw[i]:g})")
    return raw.astype(np.int8)


def read_stream(path: str | Path, spec: ReadSpec, name: str | None = None) -> Stream:
    """Read and validate one stream. Rows must be sorted by time with no duplicate timestamps."""
    path = check_file(path)
    with read_errors(path):
        frame = _scan(path, spec.separator).collect()
    if is_parquet(path):
        _check_parquet_integrity(path, frame)
    channels = check_columns(path, frame.columns, spec)
    if frame.height == 0:
        raise DataError(f"{path} has a header but no rows")
    rows = convert_rows(frame, path, spec, channels)
    # inputs ride along as extra columns while rows are sorted or duplicates merged, then
    # are held (zero-order hold) in the final row order
    raw = np.stack([_numeric(frame, c, path) for c in spec.inputs], 1).astype(np.float32) \
        if spec.inputs else np.empty((frame.height, 0), np.float32)
    k = rows.values.shape[1]
    rows = order_rows(path, spec, Rows(rows.time, np.concatenate([rows.values, raw], 1),
                                       rows.labels, rows.changepoints))
    values, raw = np.ascontiguousarray(rows.values[:, :k]), rows.values[:, k:]
    inputs = None
    if spec.inputs:
        inputs = np.stack([_held_input(raw[:, j].astype(np.float64), c, path)
                           for j, c in enumerate(spec.inputs)], 1).astype(np.float32)
    return Stream(name or path.stem, str(path), rows.time, values, channels, rows.labels, inputs,
                  list(spec.inputs), rows.changepoints)


def _held_input(raw: np.ndarray, column: str, path: Path) -> np.ndarray:
    """An input column with its empty cells holding the last value (zero-order hold); leading
    empty cells take the first value. An input must hold at least one value."""
    ok = ~np.isnan(raw)
    if not ok.any():
        raise DataError(f"{path}: input column '{column}' (data.inputs) is empty; inputs must "
                        "be recorded (a held value may be left empty after its first reading)")
    filled = forward_fill(raw[:, None])[:, 0]
    filled[: int(np.argmax(ok))] = raw[int(np.argmax(ok))]
    return filled


class ParquetIntegrity:
    """Compare what was read with the row counts, null counts and min/max the file's footer
    records, so a byte-corrupted file is refused instead of read as garbage. (A flipped byte
    that keeps a value inside its column's recorded range cannot be seen without page
    checksums.) Rows may come in batches of any size (``update``), ``finish`` at the end."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.meta = pq.ParquetFile(path).metadata
        except Exception as err:
            raise DataError(f"{path}: cannot be read ({str(err).splitlines()[0]}); is it a "
                            "valid Parquet file?") from err
        sizes = [self.meta.row_group(g).num_rows for g in range(self.meta.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])  # row group g holds rows starts[g] .. starts[g+1]-1
        self.seen: dict[tuple[int, str], list] = {}  # (group, column) -> [nulls, min, max]

    def _corrupt(self, what: str) -> DataError:
        return DataError(f"{self.path} is corrupt: {what} differs from what the file's own "
                         "metadata records; restore the file from its source")

    def update(self, frame: pl.DataFrame, first_row: int = 0) -> None:
        """Rows ``first_row ..`` of the file (0-based), any columns of it."""
        self.merge(self.partial(frame, first_row))

    def partial(self, frame: pl.DataFrame, first_row: int = 0) -> list[tuple]:
        """What these rows hold against the footer, without judging it yet: one entry
        (group, column index, name, nulls, min, max, group complete) per row group slice and
        column. Reads nothing of this object's running state, so batches can be measured on
        several threads; :meth:`merge` them in the file's order."""
        try:
            return self._partial(frame, first_row)
        except DataError:
            raise
        except Exception as err:  # the footer itself is damaged (undecodable names, statistics)
            raise DataError(f"{self.path} is corrupt: its metadata cannot be decoded "
                            f"({type(err).__name__}); restore the file from its source") from err

    def _partial(self, frame: pl.DataFrame, first_row: int) -> list[tuple]:
        out = []
        stop = first_row + frame.height
        g = max(int(np.searchsorted(self.starts, first_row, side="right")) - 1, 0)
        while g < self.meta.num_row_groups and self.starts[g] < stop:
            a, b = max(first_row, self.starts[g]), min(stop, self.starts[g + 1])
            group = self.meta.row_group(g)
            for j in range(group.num_columns):
                chunk = group.column(j)
                name = chunk.path_in_schema
                if chunk.statistics is None or name not in frame.columns:
                    continue
                col = frame.get_column(name).slice(a - first_row, b - a)
                lo = hi = None
                if chunk.statistics.has_min_max and col.dtype.is_numeric():
                    vals = col.drop_nulls()
                    if col.dtype.is_float():
                        vals = vals.drop_nans()
                    if vals.len():
                        lo, hi = vals.min(), vals.max()
                out.append((g, j, name, col.null_count(), lo, hi, b == self.starts[g + 1]))
            g += 1
        return out

    def merge(self, partial: list[tuple]) -> None:
        """Add one batch's :meth:`partial` (batches in the file's order) and judge it."""
        try:
            for g, j, name, nulls, lo, hi, complete in partial:
                acc = self.seen.setdefault((g, name), [0, None, None])
                acc[0] += nulls
                if lo is not None:
                    acc[1] = lo if acc[1] is None else min(acc[1], lo)
                    acc[2] = hi if acc[2] is None else max(acc[2], hi)
                # a part of a group can already break its record; all of it must match it
                self._check(g, j, name, acc, complete=complete)
        except DataError:
            raise
        except Exception as err:  # statistics that cannot be compared
            raise DataError(f"{self.path} is corrupt: its metadata cannot be decoded "
                            f"({type(err).__name__}); restore the file from its source") from err

    def _check(self, g: int, j: int, name: str, acc: list, complete: bool) -> None:
        stats = self.meta.row_group(g).column(j).statistics
        if stats.null_count is not None and (acc[0] != stats.null_count if complete
                                             else acc[0] > stats.null_count):
            raise self._corrupt(f"column '{name}' (missing values)")
        # a NaN bound (written by writers that let NaN into the statistics, e.g. polars
        # 1.20) records nothing about the range
        if stats.has_min_max and acc[1] is not None and not _nan_bound(stats) and (
                (acc[1] != stats.min or acc[2] != stats.max) if complete
                else (acc[1] < stats.min or acc[2] > stats.max)):
            raise self._corrupt(f"column '{name}' (range {acc[1]}..{acc[2]} read, "
                                f"{stats.min}..{stats.max} recorded)")

    def finish(self, rows: int) -> None:
        if self.meta.num_rows != rows:
            raise self._corrupt(f"the row count ({rows} read)")


def _nan_bound(stats) -> bool:
    return any(isinstance(v, float) and v != v for v in (stats.min, stats.max))


def _check_parquet_integrity(path: Path, frame: pl.DataFrame) -> None:
    check = ParquetIntegrity(path)
    check.finish(frame.height)
    check.update(frame)


def time_ordinal(time: np.ndarray) -> np.ndarray:
    """A time column (int64 or datetime64) as int64, without a copy where it already is one."""
    if time.dtype.kind in "iM" and time.dtype.itemsize == 8:  # datetime64: counts of its unit
        return time.view(np.int64)
    return time.astype("int64")


def _strictly_increasing(time: np.ndarray, previous: np.ndarray | None) -> bool:
    """Whether every time stamp is after the one before it (and after ``previous[-1]``)."""
    if len(time) == 0:
        return True
    if previous is not None and len(previous) and previous.dtype != time.dtype:
        return False  # mixed types or units: the general path compares them
    ordinal = time_ordinal(time)
    if previous is not None and len(previous) and not time_ordinal(previous[-1:])[0] < ordinal[0]:
        return False
    return len(ordinal) < 2 or bool((ordinal[1:] > ordinal[:-1]).all())


def order_rows(path: Path, spec: ReadSpec, rows: Rows, first_row: int = 0,
               previous: np.ndarray | None = None) -> Rows:
    """Refuse unsorted rows and duplicate timestamps, or (data.sort / data.duplicates) sort
    and merge them, reporting how many rows were touched. ``rows`` are rows ``first_row + 1 ..``
    of the file; ``previous`` the time of the row before them (a batch's predecessor: the file is
    then checked across the batches' borders too; sorting needs the whole file)."""
    time, values = rows.time, rows.values
    if _strictly_increasing(time, previous):  # the usual case: one pass, nothing to change
        return rows
    # the label columns travel with their rows when rows are sorted or merged: (n, k)
    present = [m for m in (rows.labels, rows.changepoints) if m is not None]
    labels = np.stack(present, axis=1) if present else None
    ordinal = time.astype("int64")
    before = 0
    if previous is not None and len(previous):  # the border to the batch before
        ordinal = np.concatenate([previous[-1:].astype("int64"), ordinal])
        time_ref = np.concatenate([previous[-1:], time])
        before = 1
    else:
        time_ref = time
    step = np.diff(ordinal)
    if spec.sort and (step < 0).any():
        order = np.argsort(ordinal, kind="stable")
        moved = int((order != np.arange(len(order))).sum())
        time, values, ordinal = time[order], values[order], ordinal[order]
        time_ref = time
        labels = None if labels is None else labels[order]
        log.info("%s: data.sort=true put %d of %d rows into time order", path, moved, len(order))
        step = np.diff(ordinal)
    offset = first_row - before  # 0-based file row of ordinal[0]
    if (step == 0).any():
        i = int(np.flatnonzero(step == 0)[0])
        row = offset + i + 1
        if spec.duplicates == "error" or (before and i == 0):
            where = "" if spec.sort else f" at rows {row} and {row + 1}"
            raise DataError(
                f"{path}: duplicate timestamp {time_ref[i + 1]}{where} in column "
                f"'{spec.time_column}'; remove or aggregate the duplicates, or set "
                "data.duplicates=first|last|mean"
            )
        if (step < 0).any():
            _unsorted(path, spec, step, time_ref, offset)
        time, values, labels, merged = _merge_duplicates(ordinal[before:], time, values, labels,
                                                         spec.duplicates)
        log.info("%s: data.duplicates=%s merged %d rows sharing a timestamp into %d",
                 path, spec.duplicates, merged[0], merged[1])
    elif (step < 0).any():
        _unsorted(path, spec, step, time_ref, offset)
    marks = iter(() if labels is None else labels.T)
    return Rows(time, values, None if rows.labels is None else next(marks),
                None if rows.changepoints is None else next(marks))


def _unsorted(path: Path, spec: ReadSpec, step: np.ndarray, time: np.ndarray, offset: int):
    i = int(np.flatnonzero(step < 0)[0])
    row = offset + i + 1
    raise DataError(
        f"{path}: timestamps in column '{spec.time_column}' are not sorted (row {row + 1}, "
        f"{time[i + 1]}, comes before row {row}); sort the file by time, or set data.sort=true"
    )


def _merge_duplicates(ordinal, time, values, labels, how: str):
    """One row per timestamp of sorted rows: the first, the last or the mean (NaN ignored;
    a label is 1 if any merged row is labelled).  -> time, values, labels, (rows, into)"""
    starts = np.flatnonzero(np.r_[True, np.diff(ordinal) != 0])
    counts = np.diff(np.r_[starts, len(ordinal)])
    dup = counts > 1
    merged = (int(counts[dup].sum()), int(dup.sum()))
    if how == "first":
        keep = starts
    elif how == "last":
        keep = starts + counts - 1
    else:
        keep = starts
        observed = ~np.isnan(values)
        sums = np.add.reduceat(np.where(observed, values, 0.0).astype(np.float64), starts)
        n = np.add.reduceat(observed.astype(np.int64), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (sums / n).astype(np.float32)  # NaN where no row of the group was observed
        out_labels = None if labels is None else np.maximum.reduceat(labels, starts)
        return time[keep], mean, out_labels, merged
    return time[keep], values[keep], None if labels is None else labels[keep], merged


def _numeric(frame: pl.DataFrame, column: str, path: Path, first_row: int = 0) -> np.ndarray:
    series = frame.get_column(column)
    if series.dtype == pl.Float32 and series.null_count() == 0:
        # float32 without nulls (Parquet written by a sensor logger): no copy, and nothing can
        # be beyond the float32 range; only inf is to be refused
        out32 = series.to_numpy()
        if np.isinf(out32).any():
            row = int(np.flatnonzero(np.isinf(out32))[0])
            raise DataError(
                f"{path}: column '{column}' holds an infinite value at row "
                f"{first_row + row + 1}; replace it by an empty cell (missing) or a real reading"
            )
        return out32
    if series.dtype == pl.String:
        stripped = series.str.strip_chars()
        empty = stripped.is_null() | (stripped == "") | stripped.str.to_lowercase().is_in(
            ["nan", "na", "null"]
        )
        parsed = stripped.cast(pl.Float64, strict=False)
        bad = parsed.is_null() & ~empty
        if bad.any():
            row = int(bad.arg_max())  # type: ignore[arg-type]
            raise DataError(
                f"{path}: column '{column}' is not numeric (row {first_row + row + 1} holds "
                f"{series[row]!r}); fix the file or leave the column out of data.channels"
            )
        out = parsed.fill_null(float("nan")).to_numpy()
    elif series.dtype.is_numeric() or series.dtype == pl.Boolean:
        out = series.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    else:
        raise DataError(
            f"{path}: column '{column}' has type {series.dtype}, not numeric; "
            "leave it out of data.channels"
        )
    out = np.asarray(out, dtype=np.float64)
    if np.isinf(out).any():
        row = int(np.flatnonzero(np.isinf(out))[0])
        raise DataError(
            f"{path}: column '{column}' holds an infinite value at row {first_row + row + 1}; "
            "replace it by an empty cell (missing) or a real reading"
        )
    # Channels are float32: a finite float64 beyond its range would become inf in the cast.
    with np.errstate(over="ignore"):
        too_big = np.isinf(out.astype(np.float32))
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise DataError(
            f"{path}: column '{column}' holds {out[row]:g} at row {first_row + row + 1}, beyond "
            f"the float32 range (|x| <= {_FLOAT32_MAX:.3g}) tsssm computes in; replace it by an "
            "empty cell "
            "(missing) or a real reading, or rescale the column"
        )
    return out


def _parse_time(frame: pl.DataFrame, path: Path, spec: ReadSpec, first_row: int = 0,
                state: TimeState | None = None) -> np.ndarray:
    state = TimeState() if state is None else state
    series = frame.get_column(spec.time_column)
    column = spec.time_column
    if series.dtype == pl.String and state.first_text is None and len(series):
        state.first_text = series.str.strip_chars()[0]
    if series.dtype == pl.String and spec.time_format is None and state.kind != "datetime":
        # Integer time stamps (sample numbers, epoch seconds) read as text from CSV.
        as_int = series.str.strip_chars().cast(pl.Int64, strict=False)
        if as_int.null_count() == series.null_count():
            series = as_int
        elif state.kind == "int":
            i = int((as_int.is_null() & series.is_not_null()).arg_max())  # type: ignore[arg-type]
            raise DataError(
                f"{path}: time column '{column}' row {first_row + i + 1} holds {series[i]!r}, "
                "not an integer like the rows before it; write every time stamp alike"
            )
    if series.dtype == pl.String:
        series = _parse_text_time(series, path, spec, first_row, state.first_text)
    if series.null_count():
        row = first_row + int(series.is_null().arg_max())  # type: ignore[arg-type]
        raise DataError(f"{path}: time column '{column}' is empty at row {row + 1}")
    if series.dtype.is_temporal():
        state.kind = "datetime"
        return series.cast(pl.Datetime("ns")).to_numpy()
    if series.dtype.is_integer():
        state.kind = "int"
        return series.to_numpy().astype(np.int64)
    raise DataError(
        f"{path}: time column '{column}' has type {series.dtype}; use timestamps or integers"
    )


def _parse_text_time(series: pl.Series, path: Path, spec: ReadSpec, first_row: int = 0,
                     first_text: str | None = None) -> pl.Series:
    """Timestamps from text, in ``data.time_format`` or the format of the file's first row
    (``first_text``, for a batch after the first); the first row that does not parse is named
    (with the format it broke, never one it matches)."""
    column = spec.time_column
    text = series.str.strip_chars()
    lead = first_row > 0 and first_text is not None  # infer the format from the file's row 1
    if lead:
        text = pl.concat([pl.Series(text.name, [first_text], dtype=pl.String), text])
    try:
        parsed = text.str.to_datetime(format=spec.time_format, strict=False, time_unit="ns")
    except Exception:  # an invalid format string, or nothing that looks like a date at all
        parsed = pl.Series(column, [None] * len(text), dtype=pl.Datetime("ns"))
    if lead:
        text, parsed = text.slice(1), parsed.slice(1)
    bad = parsed.is_null() & text.is_not_null()
    if not bad.any():
        return parsed
    i = int(bad.arg_max())  # type: ignore[arg-type]
    row = first_row + i
    held = text[i]
    if spec.time_format is not None:
        raise DataError(
            f"{path}: time column '{column}' row {row + 1} holds {held!r}, which does not match "
            f"data.time_format='{spec.time_format}'; fix the row or the format"
        )
    if row == 0 or (first_row == 0 and bool(bad.all())):
        raise DataError(
            f"{path}: time column '{column}' does not parse as timestamps (row {row + 1} holds "
            f"{held!r}); set data.time_format, e.g. '%Y-%m-%d %H:%M:%S'"
        )
    reference = first_text if lead else text[0]
    raise DataError(
        f"{path}: time column '{column}' row {row + 1} holds {held!r}, in another format than "
        f"row 1 ({reference!r}); write every timestamp in one format (data.time_format names it)"
    )


@dataclass
class GapReport:
    median_step: float
    n_gaps: int
    longest: float
    rows_inserted: int


def regularise(stream: Stream, mode: str, gap_factor: float) -> tuple[Stream, GapReport]:
    """Detect gaps longer than ``gap_factor`` median steps; keep, mask (NaN rows) or fill them."""
    ordinal = stream.time.astype("int64")
    if len(ordinal) < 3:
        return stream, GapReport(0.0, 0, 0.0, 0)
    step = np.diff(ordinal)
    median = float(np.median(step))
    is_gap = step > gap_factor * median
    report = GapReport(median, int(is_gap.sum()), float(step.max()), 0)
    if report.n_gaps == 0 or mode in ("keep", "time"):
        return stream, report
    # Insert the missing grid points of each gap as NaN rows (labels 0: nothing was observed;
    # inputs hold their last value).
    pieces_t, pieces_v, pieces_u = [], [], []
    marks = {"labels": stream.labels, "changepoints": stream.changepoints}
    pieces_m: dict[str, list[np.ndarray]] = {k: [] for k, v in marks.items() if v is not None}
    start = 0
    for i in np.flatnonzero(is_gap):
        pieces_t.append(ordinal[start : i + 1])
        pieces_v.append(stream.values[start : i + 1])
        if stream.inputs is not None:
            pieces_u.append(stream.inputs[start : i + 1])
        missing = np.arange(ordinal[i] + median, ordinal[i + 1] - median / 2, median)
        missing = missing.astype(np.int64)
        pieces_t.append(missing)
        pieces_v.append(np.full((len(missing), stream.values.shape[1]), np.nan, np.float32))
        for k in pieces_m:
            pieces_m[k] += [marks[k][start : i + 1], np.zeros(len(missing), np.int8)]
        if stream.inputs is not None:
            pieces_u.append(np.repeat(stream.inputs[i : i + 1], len(missing), axis=0))
        report.rows_inserted += len(missing)
        start = i + 1
    pieces_t.append(ordinal[start:])
    pieces_v.append(stream.values[start:])
    for k in pieces_m:
        pieces_m[k].append(marks[k][start:])
    if stream.inputs is not None:
        pieces_u.append(stream.inputs[start:])
    values = np.concatenate(pieces_v)
    if mode == "fill":
        values = forward_fill(values)
    time = np.concatenate(pieces_t).astype(stream.time.dtype)
    joined = {k: np.concatenate(v) for k, v in pieces_m.items()}
    inputs = np.concatenate(pieces_u) if stream.inputs is not None else None
    return Stream(stream.name, stream.path, time, values, stream.channels, joined.get("labels"),
                  inputs, stream.input_names, joined.get("changepoints")), report


def time_steps(time: np.ndarray, real: bool) -> np.ndarray:
    """Time since the previous row (T,) float64, in seconds for timestamps and in the column's
    own unit for integer time; the first row gets the median step. ``real=False`` (the
    evenly spaced modes keep, mask, fill): every row gets the median step."""
    ordinal = time.astype("int64")
    if len(ordinal) < 2:
        return np.ones(len(ordinal))
    unit = 1e-9 if np.issubdtype(time.dtype, np.datetime64) else 1.0
    if np.issubdtype(time.dtype, np.datetime64) and np.datetime_data(time.dtype)[0] != "ns":
        ordinal = time.astype("datetime64[ns]").astype("int64")
    step = np.diff(ordinal).astype(np.float64) * unit
    median = float(np.median(step))
    if not real:
        return np.full(len(ordinal), median)
    return np.concatenate([[median], step])


def forward_fill(values: np.ndarray) -> np.ndarray:
    """Carry the last observation forward per channel; leading NaNs stay NaN.  # (T, C)"""
    out = values.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        idx = np.where(np.isnan(col), 0, np.arange(len(col)))
        np.maximum.accumulate(idx, out=idx)
        filled = col[idx]
        filled[np.isnan(col) & (idx == 0) & np.isnan(col[0])] = np.nan
        out[:, j] = filled
    return out
