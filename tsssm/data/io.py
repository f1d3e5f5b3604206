"""Read one sensor stream from CSV or Parquet with polars, and validate it.

Every problem a user can cause raises :class:`tsssm.errors.DataError` with one message that names
the file, the column (and row, where it helps) and what to do about it.
"""

from __future__ import annotations

import logging
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


def read_stream(path: str | Path, spec: ReadSpec, name: str | None = None) -> Stream:
    """Read and validate one stream. Rows must be sorted by time with no duplicate timestamps."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (check data.root / data.path)")
    if path.is_dir():
        raise DataError(f"{path} is a directory; data.path must name a .csv or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    try:
        frame = _scan(path, spec.separator).collect()
    except DataError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # polars' parse errors (and panics on corrupt files)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot be read ({first}); is it a valid "
                        f"{path.suffix.lstrip('.').upper() or 'data'} file?") from err
    if path.suffix.lower() in (".parquet", ".pq"):
        _check_parquet_integrity(path, frame)

    columns = frame.columns
    if path.suffix.lower() not in (".parquet", ".pq") and len(columns) == 1:
        guess = _guess_separator(columns[0])
        if guess is not None and guess != spec.separator:
            raise DataError(
                f"{path}: the header has one column with {guess!r} in it; the file looks "
                f"{guess!r}-separated, set {shell_override('data.separator', guess)}"
            )
    if frame.height == 0:
        raise DataError(f"{path} has a header but no rows")

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

    time = _parse_time(frame, path, spec)
    values = np.empty((frame.height, len(channels)), dtype=np.float32)
    for j, column in enumerate(channels):
        values[:, j] = _numeric(frame, column, path)
    labels = _label(frame, spec.label_column, path)
    changepoints = _label(frame, spec.changepoint_column, path)
    # the label columns travel with their rows when rows are sorted or merged
    marks = [m for m in (labels, changepoints) if m is not None]
    stacked = np.stack(marks, axis=1) if marks else None  # (T, n_marks)
    # inputs ride along as extra columns while rows are sorted or duplicates merged, then
    # are held (zero-order hold) in the final row order
    raw = np.stack([_numeric(frame, c, path) for c in spec.inputs], 1).astype(np.float32) \
        if spec.inputs else np.empty((frame.height, 0), np.float32)
    k = values.shape[1]
    time, both, stacked = _order_rows(path, spec, time, np.concatenate([values, raw], 1), stacked)
    values, raw = np.ascontiguousarray(both[:, :k]), both[:, k:]
    if labels is not None:
        labels = stacked[:, 0]
    if changepoints is not None:
        changepoints = stacked[:, -1]
    inputs = None
    if spec.inputs:
        inputs = np.stack([_held_input(raw[:, j].astype(np.float64), c, path)
                           for j, c in enumerate(spec.inputs)], 1).astype(np.float32)
    return Stream(name or path.stem, str(path), time, values, channels, labels, inputs,
                  list(spec.inputs), changepoints)


def _label(frame: pl.DataFrame, column: str | None, path: Path) -> np.ndarray | None:
    """A 0/1 label column as int8, or None when it is not configured or not in the file."""
    if column is None or column not in frame.columns:
        return None
    raw = _numeric(frame, column, path)
    if np.isnan(raw).any():
        row = int(np.flatnonzero(np.isnan(raw))[0])
        raise DataError(f"{path}: label column '{column}' is empty at row {row + 1}")
    if not np.isin(raw, (0.0, 1.0)).all():
        row = int(np.flatnonzero(~np.isin(raw, (0.0, 1.0)))[0])
        raise DataError(f"{path}: label column '{column}' must hold 0/1 values "
                        f"(row {row + 1} holds {raw[row]:g})")
    return raw.astype(np.int8)


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


def _check_parquet_integrity(path: Path, frame: pl.DataFrame) -> None:
    """Compare what was read with the row counts, null counts and min/max the file's footer
    records, so a byte-corrupted file is refused instead of read as garbage. (A flipped byte
    that keeps a value inside its column's recorded range cannot be seen without page
    checksums.)"""
    import pyarrow.parquet as pq

    corrupt = (f"{path} is corrupt: {{}} differs from what the file's own metadata records; "
               "restore the file from its source")
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:
        raise DataError(f"{path}: cannot be read ({str(err).splitlines()[0]}); is it a valid "
                        "Parquet file?") from err
    if meta.num_rows != frame.height:
        raise DataError(corrupt.format(f"the row count ({frame.height} read)"))
    try:
        _compare_with_footer(meta, frame, corrupt)
    except DataError:
        raise
    except Exception as err:  # the footer itself is damaged (undecodable names, statistics)
        raise DataError(f"{path} is corrupt: its metadata cannot be decoded "
                        f"({type(err).__name__}); restore the file from its source") from err


def _compare_with_footer(meta, frame: pl.DataFrame, corrupt: str) -> None:
    offset = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        n = group.num_rows
        for j in range(group.num_columns):
            chunk = group.column(j)
            name = chunk.path_in_schema
            stats = chunk.statistics
            if stats is None or name not in frame.columns:
                continue
            col = frame.get_column(name).slice(offset, n)
            if stats.null_count is not None and col.null_count() != stats.null_count:
                raise DataError(corrupt.format(f"column '{name}' (missing values)"))
            if not (stats.has_min_max and col.dtype.is_numeric()):
                continue
            seen = col.drop_nulls()
            if col.dtype.is_float():
                seen = seen.drop_nans()
            if seen.len() and (seen.min() != stats.min or seen.max() != stats.max):
                raise DataError(corrupt.format(
                    f"column '{name}' (range {seen.min()}..{seen.max()} read, "
                    f"{stats.min}..{stats.max} recorded)"))
        offset += n


def _order_rows(path: Path, spec: ReadSpec, time: np.ndarray, values: np.ndarray,
                labels: np.ndarray | None):
    """Refuse unsorted rows and duplicate timestamps, or (data.sort / data.duplicates) sort
    and merge them, reporting how many rows were touched.  values (T, C)."""
    ordinal = time.astype("int64")
    step = np.diff(ordinal)
    if spec.sort and (step < 0).any():
        order = np.argsort(ordinal, kind="stable")
        moved = int((order != np.arange(len(order))).sum())
        time, values, ordinal = time[order], values[order], ordinal[order]
        labels = None if labels is None else labels[order]
        log.info("%s: data.sort=true put %d of %d rows into time order", path, moved, len(order))
        step = np.diff(ordinal)
    if (step == 0).any():
        row = int(np.flatnonzero(step == 0)[0]) + 1
        if spec.duplicates == "error":
            where = "" if spec.sort else f" at rows {row} and {row + 1}"
            raise DataError(
                f"{path}: duplicate timestamp {time[row]}{where} in column '{spec.time_column}'; "
                "remove or aggregate the duplicates, or set data.duplicates=first|last|mean"
            )
        time, values, labels, merged = _merge_duplicates(ordinal, time, values, labels,
                                                         spec.duplicates)
        log.info("%s: data.duplicates=%s merged %d rows sharing a timestamp into %d",
                 path, spec.duplicates, merged[0], merged[1])
    elif (step < 0).any():
        row = int(np.flatnonzero(step < 0)[0]) + 1
        raise DataError(
            f"{path}: timestamps in column '{spec.time_column}' are not sorted (row {row + 1}, "
            f"{time[row]}, comes before row {row}); sort the file by time, or set data.sort=true"
        )
    return time, values, labels


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


def _numeric(frame: pl.DataFrame, column: str, path: Path) -> np.ndarray:
    series = frame.get_column(column)
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
                f"{path}: column '{column}' is not numeric (row {row + 1} holds "
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
            f"{path}: column '{column}' holds an infinite value at row {row + 1}; "
            "replace it by an empty cell (missing) or a real reading"
        )
    # Channels are float32: a finite float64 beyond its range would become inf in the cast.
    with np.errstate(over="ignore"):
        too_big = np.isinf(out.astype(np.float32))
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise DataError(
            f"{path}: column '{column}' holds {out[row]:g} at row {row + 1}, beyond the float32 "
            f"range (|x| <= {_FLOAT32_MAX:.3g}) tsssm computes in; replace it by an empty cell "
            "(missing) or a real reading, or rescale the column"
        )
    return out


def _parse_time(frame: pl.DataFrame, path: Path, spec: ReadSpec) -> np.ndarray:
    series = frame.get_column(spec.time_column)
    column = spec.time_column
    if series.dtype == pl.String and spec.time_format is None:
        # Integer time stamps (sample numbers, epoch seconds) read as text from CSV.
        as_int = series.str.strip_chars().cast(pl.Int64, strict=False)
        if as_int.null_count() == series.null_count():
            series = as_int
    if series.dtype == pl.String:
        series = _parse_text_time(series, path, spec)
    if series.null_count():
        row = int(series.is_null().arg_max())  # type: ignore[arg-type]
        raise DataError(f"{path}: time column '{column}' is empty at row {row + 1}")
    if series.dtype.is_temporal():
        time = series.cast(pl.Datetime("ns")).to_numpy()
    elif series.dtype.is_integer():
        time = series.to_numpy().astype(np.int64)
    else:
        raise DataError(
            f"{path}: time column '{column}' has type {series.dtype}; use timestamps or integers"
        )
    return time


def _parse_text_time(series: pl.Series, path: Path, spec: ReadSpec) -> pl.Series:
    """Timestamps from text, in ``data.time_format`` or the format of the first row; the first
    row that does not parse is named (with the format it broke, never one it matches)."""
    column = spec.time_column
    text = series.str.strip_chars()
    try:
        parsed = text.str.to_datetime(format=spec.time_format, strict=False, time_unit="ns")
    except Exception:  # an invalid format string, or nothing that looks like a date at all
        parsed = pl.Series(column, [None] * len(text), dtype=pl.Datetime("ns"))
    bad = parsed.is_null() & text.is_not_null()
    if not bad.any():
        return parsed
    row = int(bad.arg_max())  # type: ignore[arg-type]
    held = text[row]
    if spec.time_format is not None:
        raise DataError(
            f"{path}: time column '{column}' row {row + 1} holds {held!r}, which does not match "
            f"data.time_format='{spec.time_format}'; fix the row or the format"
        )
    if row == 0 or bool(bad.all()):
        raise DataError(
            f"{path}: time column '{column}' does not parse as timestamps (row {row + 1} holds "
            f"{held!r}); set data.time_format, e.g. '%Y-%m-%d %H:%M:%S'"
        )
    raise DataError(
        f"{path}: time column '{column}' row {row + 1} holds {held!r}, in another format than "
        f"row 1 ({text[0]!r}); write every timestamp in one format (data.time_format names it)"
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
