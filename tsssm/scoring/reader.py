"""Read one CSV or Parquet stream lazily, in row batches, validated as tsssm.data.io validates a
whole file - the same checks and messages, naming the row's number in the whole file.

Memory is one batch (plus polars' read-ahead), whatever the file's length. Gaps in time are
handled as ``tsssm.data.io.regularise`` handles them for a whole stream: the median step it needs
comes from a first pass over the time column alone (``data.gaps=mask|fill``), or, with
``data.gaps=keep``, from counting the steps on the way (for the report only). Missing rows are
inserted across batch borders too, and forward filling carries the last observation from one
batch to the next, so the rows that come out equal the rows of ``prepare_stream`` on the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tsssm.data.io import (
    GapReport,
    ReadSpec,
    check_columns,
    check_file,
    check_order,
    convert_rows,
    forward_fill,
    scan_table,
)
from tsssm.errors import ConfigError, DataError

log = logging.getLogger("tsssm")

#: rows per batch read from the file
BATCH_ROWS = 65_536
#: distinct time steps counted for the gap report before giving up on it (irregular stamps)
MAX_STEP_VALUES = 100_000


@dataclass
class Batch:
    """Consecutive rows of the stream, after gap rows are inserted and filling."""

    first_row: int  # index of the first row in the stream (0-based; inserted rows count)
    time: np.ndarray  # (n,) datetime64[ns] or int64
    values: np.ndarray  # (n, C) float32, raw units, NaN = missing
    labels: np.ndarray | None  # (n,) int8


class StepCounts:
    """How often each time step occurs, for the exact median and the gap report."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.overflow = False

    def add(self, ordinal: np.ndarray, previous: np.ndarray | None) -> None:
        if previous is not None and len(previous):
            ordinal = np.concatenate([previous[-1:].astype("int64"), ordinal])
        if len(ordinal) < 2 or self.overflow:
            return
        step = np.diff(ordinal)
        if (step == step[0]).all():  # a regular stream: no sort needed
            self.counts[int(step[0])] = self.counts.get(int(step[0]), 0) + len(step)
        else:
            values, counts = np.unique(step, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                self.counts[v] = self.counts.get(v, 0) + c
        if len(self.counts) > MAX_STEP_VALUES:
            self.overflow = True
            self.counts.clear()

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def median(self) -> float:
        """np.median of all steps, from their counts."""
        values = np.array(sorted(self.counts), dtype=np.int64)
        cum = np.cumsum([self.counts[v] for v in values.tolist()])
        n = int(cum[-1])

        def at(k: int) -> int:  # the k-th smallest step (0-based)
            return int(values[np.searchsorted(cum, k + 1)])

        return float(at((n - 1) // 2) + at(n // 2)) / 2.0 if n % 2 == 0 else float(at(n // 2))

    def report(self, factor: float) -> GapReport:
        if self.overflow or self.n < 2:
            return GapReport(0.0, 0, 0.0, 0)
        median = self.median()
        gaps = sum(c for v, c in self.counts.items() if v > factor * median)
        return GapReport(median, int(gaps), float(max(self.counts)), 0)


class StreamReader:
    """Batches of one file's rows: ``for batch in StreamReader(path, spec): ...``.

    gaps: "keep", "mask" or "fill" and gap_factor (data.gaps / data.gap_factor); fill: "none",
    "forward" or "zero" (data.fill). ``total_rows``: the file's row count where the format
    records it (Parquet), else an estimate from its size (CSV), for progress; ``gap_report`` and
    ``rows_read`` are complete once the iteration ends.
    """

    def __init__(self, path: str | Path, spec: ReadSpec, *, gaps: str = "keep",
                 gap_factor: float = 3.0, fill: str = "none", batch_rows: int = BATCH_ROWS,
                 name: str | None = None) -> None:
        if gaps not in ("keep", "mask", "fill") or fill not in ("none", "forward", "zero"):
            raise ConfigError(f"data.gaps={gaps!r} / data.fill={fill!r} are not known modes")
        self.path = check_file(path)
        self.spec = spec
        self.gaps, self.gap_factor, self.fill = gaps, gap_factor, fill
        self.batch_rows = batch_rows
        self.name = name or self.path.stem
        self._lazy, columns = scan_table(self.path, spec)
        self.channels = check_columns(self.path, columns, spec)
        self.has_labels = spec.label_column is not None and spec.label_column in columns
        self._columns = [spec.time_column, *self.channels] + (
            [spec.label_column] if self.has_labels else [])
        self.total_rows = self._count_rows()
        self.rows_read = 0
        self.gap_report: GapReport | None = None

    def _count_rows(self) -> int | None:
        """Exact for Parquet (its footer), estimated for CSV from the first 64 KiB."""
        if self.path.suffix.lower() in (".parquet", ".pq"):
            try:
                import pyarrow.parquet as pq

                return int(pq.ParquetFile(self.path).metadata.num_rows)
            except Exception:  # a damaged footer is reported when the rows are read
                return None
        with open(self.path, "rb") as f:
            head = f.read(1 << 16)
        lines = head.count(b"\n")
        if lines < 2:
            return None
        size = self.path.stat().st_size
        return max(int(size / (len(head) / lines)) - 1, 1)

    def _frames(self, columns: list[str]) -> Iterator[pl.DataFrame]:
        """The file's rows in batches of these columns, with polars' errors as DataError."""
        batches = self._lazy.select(columns).collect_batches(chunk_size=self.batch_rows)
        it = iter(batches)
        while True:
            try:
                frame = next(it)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as err:  # polars' parse errors (a malformed row, a bad page)
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise DataError(f"{self.path}: cannot be read ({first})") from err
            if frame.height:
                yield frame

    def _median_step(self) -> tuple[StepCounts, int]:
        """First pass over the time column: the steps' counts and the number of rows."""
        counts, first_row, kind, previous = StepCounts(), 0, None, None
        time_only = ReadSpec(**{**self.spec.__dict__, "label_column": None})
        for frame in self._frames([self.spec.time_column]):
            rows, kind = convert_rows(frame, self.path, time_only, [], first_row, kind)
            check_order(self.path, self.spec.time_column, rows.time, first_row, previous)
            counts.add(rows.time.astype("int64"), previous)
            previous = rows.time[-1:]
            first_row += frame.height
        return counts, first_row

    def __iter__(self) -> Iterator[Batch]:
        spec, path = self.spec, self.path
        median = None
        counts = StepCounts()
        if self.gaps != "keep":
            counts, n_rows = self._median_step()
            # as regularise: nothing changes without a gap (not even the filling)
            if n_rows >= 3 and not counts.overflow and counts.report(self.gap_factor).n_gaps:
                median = counts.median()
            elif counts.overflow:
                log.warning("%s: more than %d distinct time steps; gaps are kept as they are",
                            path, MAX_STEP_VALUES)
        first_row, out_row, kind = 0, 0, None
        previous: np.ndarray | None = None  # the last row's time (before this batch)
        carry: np.ndarray | None = None  # the last row's values after filling (forward fill)
        inserted = 0
        for frame in self._frames(self._columns):
            rows, kind = convert_rows(frame, path, spec, self.channels, first_row, kind)
            check_order(path, spec.time_column, rows.time, first_row, previous)
            if self.gaps == "keep":
                counts.add(rows.time.astype("int64"), previous)
            time, values, labels = rows.time, rows.values, rows.labels
            if median is not None:
                time, values, labels, n_new = _insert_gaps(time, values, labels, previous,
                                                           median, self.gap_factor)
                inserted += n_new
                if self.gaps == "fill":
                    values = _forward_fill(values, carry)
            if self.fill == "forward":
                values = _forward_fill(values, carry)
            elif self.fill == "zero":
                values = np.nan_to_num(values, nan=0.0)
            previous = rows.time[-1:]
            carry = values[-1]
            first_row += frame.height
            yield Batch(out_row, time, values, labels)
            out_row += len(time)
        if first_row == 0:
            raise DataError(f"{path} has a header but no rows")
        self.rows_read = first_row
        report = counts.report(self.gap_factor)
        report.rows_inserted = inserted
        self.gap_report = report
        if report.n_gaps:
            log.info("%s: %d gaps longer than %gx the median step (longest %.0f steps); "
                     "data.gaps=%s, %d rows inserted", self.name, report.n_gaps,
                     self.gap_factor, report.longest / max(report.median_step, 1), self.gaps,
                     inserted)


def _insert_gaps(time: np.ndarray, values: np.ndarray, labels: np.ndarray | None,
                 previous: np.ndarray | None, median: float, factor: float):
    """``regularise``'s NaN rows for the gaps in this batch and before its first row."""
    ordinal = time.astype("int64")
    if previous is not None and len(previous):
        before = previous[-1:].astype("int64")
        full = np.concatenate([before, ordinal])
        offset = 1
    else:
        full, offset = ordinal, 0
    step = np.diff(full)
    gaps = np.flatnonzero(step > factor * median)
    if len(gaps) == 0:
        return time, values, labels, 0
    pieces_t, pieces_v, pieces_l = [], [], []
    start, n_new = 0, 0
    for g in gaps:  # a gap between full[g] and full[g + 1], i.e. before row g + 1 - offset
        stop = g + 1 - offset
        pieces_t.append(ordinal[start:stop])
        pieces_v.append(values[start:stop])
        if labels is not None:
            pieces_l.append(labels[start:stop])
        missing = np.arange(full[g] + median, full[g + 1] - median / 2, median).astype(np.int64)
        pieces_t.append(missing)
        pieces_v.append(np.full((len(missing), values.shape[1]), np.nan, np.float32))
        if labels is not None:
            pieces_l.append(np.zeros(len(missing), np.int8))
        n_new += len(missing)
        start = stop
    pieces_t.append(ordinal[start:])
    pieces_v.append(values[start:])
    if labels is not None:
        pieces_l.append(labels[start:])
    return (np.concatenate(pieces_t).astype(time.dtype), np.concatenate(pieces_v),
            None if labels is None else np.concatenate(pieces_l), n_new)


def _forward_fill(values: np.ndarray, carry: np.ndarray | None) -> np.ndarray:
    """io.forward_fill continued from the previous batch's last (filled) row."""
    if carry is None:
        return forward_fill(values)
    return forward_fill(np.concatenate([carry[None], values]))[1:]
