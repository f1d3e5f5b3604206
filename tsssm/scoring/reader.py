"""Read one CSV or Parquet stream lazily, in row batches, validated as tsssm.data.io validates a
whole file - the same checks and messages, naming the row's number in the whole file.

Memory is one batch (plus polars' read-ahead), whatever the file's length. Parquet files are
checked against their footer's statistics row group by row group (tsssm.data.io.ParquetIntegrity);
rows sharing a time stamp are merged across batch borders (``data.duplicates``); only
``data.sort=true`` needs the whole file, so with it the file is read whole. Gaps in time are
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
    ParquetIntegrity,
    ReadSpec,
    Rows,
    TimeState,
    check_columns,
    check_file,
    convert_rows,
    forward_fill,
    is_parquet,
    order_rows,
    read_errors,
    read_stream,
    scan_table,
    time_ordinal,
    unreadable,
)
from tsssm.errors import ConfigError, DataError
from tsssm.scoring.pipeline import ordered_map

log = logging.getLogger("tsssm")

#: rows per batch read from the file
BATCH_ROWS = 65_536
#: row groups up to this many batches long are read whole, several at once (longer ones page by
#: page on one thread, so memory stays a few batches whatever the file)
GROUP_READ_BATCHES = 4
#: distinct time steps counted for the gap report before giving up on it (irregular stamps)
MAX_STEP_VALUES = 100_000


def conversion_threads() -> int:
    """How many threads convert batches by default: none on a machine of up to 4 cores (the
    scoring and the writer need them; measured on 2 cores, the reading is not the bound there),
    else a quarter of the cores, at most 4 (a GPU run's host: the reading is its bound)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) <= 4 else min(4, (cores or 1) // 4)


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
        if self.overflow:
            return
        border = None  # the step from the batch before to this one's first row
        if previous is not None and len(previous) and len(ordinal):
            border = int(ordinal[0]) - int(time_ordinal(previous[-1:])[0])
        if len(ordinal) < 2:
            if border is not None:
                self.counts[border] = self.counts.get(border, 0) + 1
            return
        step = np.diff(ordinal)
        lo, hi = int(step.min()), int(step.max())
        if lo == hi and border in (None, lo):  # a regular stream: no sort needed
            self.counts[lo] = self.counts.get(lo, 0) + len(step) + (border is not None)
        else:
            if border is not None:
                step = np.concatenate([[border], step])
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
    ``rows_read`` are complete once the iteration ends. ``threads``: threads that convert and
    check the batches after the first (None: :func:`conversion_threads`; 0: the reading thread
    alone); the rows and the errors are the same whatever the count.
    """

    def __init__(self, path: str | Path, spec: ReadSpec, *, gaps: str = "keep",
                 gap_factor: float = 3.0, fill: str = "none", batch_rows: int = BATCH_ROWS,
                 name: str | None = None, threads: int | None = None) -> None:
        if gaps not in ("keep", "mask", "fill") or fill not in ("none", "forward", "zero"):
            raise ConfigError(f"data.gaps={gaps!r} / data.fill={fill!r} are not known modes")
        self.path = check_file(path)
        self.spec = spec
        self.gaps, self.gap_factor, self.fill = gaps, gap_factor, fill
        self.batch_rows = batch_rows
        self.name = name or self.path.stem
        #: threads converting and checking batches beside the one reading them (0: none)
        self.threads = conversion_threads() if threads is None else max(int(threads), 0)
        self._lazy, columns = scan_table(self.path, spec)
        if not is_parquet(self.path):  # a file that is not text at all fails as read whole
            with read_errors(self.path):
                self._lazy.head(64).collect()
        self.channels = check_columns(self.path, columns, spec)
        self.has_labels = spec.label_column is not None and spec.label_column in columns
        self._columns = [spec.time_column, *self.channels] + (
            [spec.label_column] if self.has_labels else [])
        #: Parquet: the rows of each row group, from the footer (None: CSV, or a damaged footer)
        self._group_rows: list[int] | None = None
        self.total_rows = self._count_rows()
        self.rows_read = 0
        self.gap_report: GapReport | None = None
        self._whole = None  # data.sort=true: the file, read whole once

    def _count_rows(self) -> int | None:
        """Exact for Parquet (its footer; the row groups' sizes kept too), estimated for CSV
        from the first 64 KiB."""
        if is_parquet(self.path):
            try:
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(self.path).metadata
                self._group_rows = [meta.row_group(g).num_rows
                                    for g in range(meta.num_row_groups)]
                return int(meta.num_rows)
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
        """The file's rows in batches of these columns, with the readers' errors as DataError.

        Parquet: pyarrow reads page by page (no row group buffered whole) on a thread one
        batch ahead, so memory is a couple of batches whatever the file and its row groups
        (polars' streaming scan reads further ahead the longer the file: measured +230 MB at
        10^7 rows). CSV: polars' batched scan, the parser io.read_stream uses."""
        if is_parquet(self.path):
            yield from self._parquet_frames(columns)
            return
        it = self._csv_batches(columns)
        while True:
            with read_errors(self.path):  # polars' parse errors (a malformed row, a bad page)
                frame = next(it, None)
            if frame is None:
                return
            if frame.height:
                yield frame

    def _csv_batches(self, columns: list[str]) -> Iterator[pl.DataFrame]:
        """Frames of every column as text, as io's scan reads them (polars before
        ``LazyFrame.collect_batches``: its batched reader with the same options)."""
        lazy = self._lazy.select(columns)
        if hasattr(lazy, "collect_batches"):
            yield from lazy.collect_batches(chunk_size=self.batch_rows)
            return
        reader = pl.read_csv_batched(self.path, separator=self.spec.separator,
                                     infer_schema_length=0, try_parse_dates=False,
                                     batch_size=self.batch_rows)
        while True:
            frames = reader.next_batches(1)
            if not frames:
                return
            yield frames[0].select(columns)

    def _parquet_frames(self, columns: list[str]) -> Iterator[pl.DataFrame]:
        groups = self._group_reads() if self.threads > 0 else None
        if groups:
            yield from self._parquet_groups(columns, groups)
        else:
            yield from self._parquet_pages(columns)

    def _group_reads(self) -> list[list[int]] | None:
        """The file's row groups in runs of about ``batch_rows`` rows, each run read whole by one
        thread of several (:meth:`_parquet_groups`); None where a row group is too long to hold
        (more than GROUP_READ_BATCHES batches: read page by page) or the footer could not be read
        (the page reader reports it)."""
        sizes = self._group_rows
        if sizes is None or len(sizes) < 2 or max(sizes) > GROUP_READ_BATCHES * self.batch_rows:
            return None
        runs: list[list[int]] = [[]]
        rows = 0
        for g, n in enumerate(sizes):
            if rows >= self.batch_rows:
                runs.append([])
                rows = 0
            runs[-1].append(g)
            rows += n
        return runs

    def _parquet_groups(self, columns: list[str], runs: list[list[int]]
                        ) -> Iterator[pl.DataFrame]:
        """Runs of row groups decoded on ``self.threads`` threads at once, in the file's order,
        cut into frames of at most ``batch_rows`` rows. One thread decodes a Parquet file at
        ~2·10^7 rows/s of 8 float32 columns on a GPU machine's cores (measured on the H200
        host, 2026-12-03), below what the GPU scores; row groups decode independently."""
        import threading

        import pyarrow.parquet as pq

        local = threading.local()  # one open file per reading thread

        def read(run: list[int]):
            try:
                if getattr(local, "file", None) is None:
                    local.file = pq.ParquetFile(self.path, pre_buffer=False,
                                                buffer_size=1 << 20)
                return local.file.read_row_groups(run, columns=columns, use_threads=False)
            except Exception as err:  # raised in the file's order by the consumer
                return err

        for table in ordered_map(read, iter(runs), self.threads, name="parquet-groups"):
            if isinstance(table, BaseException):
                raise unreadable(self.path, table) from table
            frame = pl.from_arrow(table)
            for a in range(0, frame.height, self.batch_rows):
                yield frame.slice(a, self.batch_rows)

    def _parquet_pages(self, columns: list[str]) -> Iterator[pl.DataFrame]:
        import os
        import queue
        import threading

        import pyarrow.parquet as pq

        done = object()
        ahead: queue.Queue = queue.Queue(maxsize=1)  # one batch ahead: bounded memory
        stop = threading.Event()
        # decode the columns in parallel only where a core is left after the scoring's
        threads = (os.cpu_count() or 1) > 2

        def produce() -> None:
            try:
                f = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 20)
                for batch in f.iter_batches(batch_size=self.batch_rows, columns=columns,
                                            use_threads=threads):
                    while not stop.is_set():
                        try:
                            ahead.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                item = done
            except BaseException as err:  # handed to the reading thread
                item = err
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=produce, name="parquet-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = ahead.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise unreadable(self.path, item) from item
                frame = pl.from_arrow(item)
                if frame.height:
                    yield frame
        finally:
            stop.set()
            thread.join()

    def _rows(self, columns: list[str]) -> Iterator[Rows]:
        """Validated rows in file order (duplicates merged, as data.duplicates says), in
        batches; ``self.rows_read`` counts the file's rows."""
        spec, path = self.spec, self.path
        channels = [c for c in columns[1:] if c != spec.label_column]
        if spec.sort:  # sorting needs every row at once: read the file whole
            if self._whole is None:
                log.info("%s: data.sort=true reads the whole file into memory", path)
                self._whole = read_stream(path, ReadSpec(**{**spec.__dict__,
                                                            "channels": tuple(self.channels)}))
            whole = self._whole
            self.rows_read = len(whole.time)
            keep = [self.channels.index(c) for c in channels]
            for a in range(0, len(whole.time), self.batch_rows):
                b = a + self.batch_rows
                labels = None if whole.labels is None or spec.label_column not in columns \
                    else whole.labels[a:b]
                yield Rows(whole.time[a:b], whole.values[a:b][:, keep], labels)
            return
        integrity = ParquetIntegrity(path) if is_parquet(path) else None
        state = TimeState()
        first_row = 0  # 0-based file row of the next frame's first row
        held: Rows | None = None  # the last time stamp's rows, merged with the next batch's
        held_from = 0
        previous: np.ndarray | None = None  # time of the last row handed out
        merging = spec.duplicates != "error"
        for part, rows, frame_rows in self._converted(columns, channels, integrity, state):
            if integrity is not None:  # a damaged page first, before its values are judged
                integrity.merge(part)
            if isinstance(rows, DataError):
                raise rows
            start = first_row
            first_row += frame_rows
            if held is not None:
                rows = _concat(held, rows)
                start = held_from
                held = None
            if merging:  # rows of the last time stamp may continue in the next batch
                cut = _after_last_change(time_ordinal(rows.time))
                held, held_from = _take(rows, slice(cut, None)), start + cut
                rows = _take(rows, slice(0, cut))
                if len(rows.time) == 0:
                    continue
            ordered = order_rows(path, spec, rows, start, previous)
            previous = rows.time[-1:]
            yield ordered
        if held is not None:
            yield order_rows(path, spec, held, held_from, previous)
        if integrity is not None:
            integrity.finish(first_row)
        self.rows_read = first_row

    def _converted(self, columns: list[str], channels: list[str],
                   integrity: ParquetIntegrity | None, state: TimeState) -> Iterator[tuple]:
        """(footer partial, Rows or the DataError converting them raised, frame rows) of each
        frame in file order. The first frame is converted here (it fixes how the time column
        reads: ``state``); the rest on ``self.threads`` threads (numpy, polars and pyarrow
        release the GIL in their bulk work), each with a copy of that state. A conversion's
        DataError is returned, not raised, so the caller judges the frame's footer check
        first, as one thread does."""
        spec, path = self.spec, self.path
        first = [0]  # 0-based file row of the next frame

        def numbered() -> Iterator[tuple[pl.DataFrame, int]]:
            for frame in self._frames(columns):
                yield frame, first[0]
                first[0] += frame.height

        def convert(item: tuple[pl.DataFrame, int], time_state: TimeState | None = None
                    ) -> tuple:
            frame, row = item
            part = integrity.partial(frame, row) if integrity is not None else None
            try:
                rows = convert_rows(frame, path, spec, channels, row,
                                    time_state or TimeState(state.kind, state.first_text))
            except DataError as err:
                rows = err
            return part, rows, frame.height

        frames = numbered()
        head = next(frames, None)
        if head is None:
            return
        converted = convert(head, state)
        yield converted
        if isinstance(converted[1], DataError):
            return
        yield from ordered_map(convert, frames, self.threads, name="convert-rows")

    def _median_step(self) -> tuple[StepCounts, int]:
        """First pass over the time column: the steps' counts and the number of rows."""
        counts, previous, n = StepCounts(), None, 0
        for rows in self._rows([self.spec.time_column]):
            counts.add(time_ordinal(rows.time), previous)
            previous = rows.time[-1:]
            n += len(rows.time)
        return counts, n

    def __iter__(self) -> Iterator[Batch]:
        path = self.path
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
        out_row = 0
        previous: np.ndarray | None = None  # the last row's time (before this batch)
        carry: np.ndarray | None = None  # the last row's values after filling (forward fill)
        inserted = 0
        for rows in self._rows(self._columns):
            if self.gaps == "keep":
                counts.add(time_ordinal(rows.time), previous)
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
            yield Batch(out_row, time, values, labels)
            out_row += len(time)
        if self.rows_read == 0:
            raise DataError(f"{path} has a header but no rows")
        report = counts.report(self.gap_factor)
        report.rows_inserted = inserted
        self.gap_report = report
        if report.n_gaps:
            log.info("%s: %d gaps longer than %gx the median step (longest %.0f steps); "
                     "data.gaps=%s, %d rows inserted", self.name, report.n_gaps,
                     self.gap_factor, report.longest / max(report.median_step, 1), self.gaps,
                     inserted)


def _after_last_change(ordinal: np.ndarray) -> int:
    """One past the last row whose time differs from the last row's (0: all share it): where
    the rows of the last time stamp begin. Looked for from the end, in growing tails (the last
    stamp is usually the last row's alone)."""
    last, n, k = ordinal[-1], len(ordinal), 16
    while True:
        tail = ordinal[-k:] if k < n else ordinal
        change = np.flatnonzero(tail != last)
        if len(change):
            return n - len(tail) + int(change[-1]) + 1
        if k >= n:
            return 0
        k *= 16


def _take(rows: Rows, sl: slice) -> Rows:
    return Rows(rows.time[sl], rows.values[sl], None if rows.labels is None else rows.labels[sl])


def _concat(a: Rows, b: Rows) -> Rows:
    labels = None if a.labels is None else np.concatenate([a.labels, b.labels])
    return Rows(np.concatenate([a.time, b.time]), np.concatenate([a.values, b.values]), labels)


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
