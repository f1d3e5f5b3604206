"""Score a file of any length to a scores Parquet: read in batches, score with the state carried,
write row groups as they come, rename into place at the end.

``score_file`` is what ``tsssm score data.path=...`` runs for one file, and what every worker runs
for one file of many (tsssm.scoring.engines). Memory is a few batches whatever the file's length;
the output equals scoring the whole stream in memory, row for row. A bad row anywhere fails with
its row number in the file and leaves no output file (nor a temporary one).

Output columns (the scores Parquet of the project's conventions): ``stream``, ``time``, ``score``,
``flag``, ``label`` where the file has the label column, and with ``contributions`` one
``contrib:<channel>`` column per channel (its additive share of the score). The flagged intervals
(maximal runs of flagged rows, which may cross batch boundaries) go to ``<output
stem>.intervals.parquet`` as they close, with the columns of the in-memory path's intervals
(``stream``, ``start``, ``end``, ``rows``, ``peak_score``, ``top``, ``share:<channel>``).
"""

from __future__ import annotations

import functools
import heapq
import logging
import time as clock
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tsssm.anomaly.streaming import Intervals, intervals_start, intervals_update
from tsssm.data.io import ReadSpec
from tsssm.scoring.pipeline import OrderedWorker, prefetch
from tsssm.scoring.reader import BATCH_ROWS, Batch, StreamReader
from tsssm.scoring.scorer import ScoredRows, Scorer
from tsssm.scoring.writer import ParquetStreamWriter

log = logging.getLogger("tsssm")

#: a progress bar is shown for streams of at least this many rows
PROGRESS_MIN_ROWS = 10_000
#: labelled rows read back for AUC-PR (5 bytes a row); beyond, the threshold-free metric is skipped
METRIC_MAX_ROWS = 20_000_000
#: streams up to this many rows keep what their figures need (values, forecasts, scores)
FIGURE_MAX_ROWS = 200_000
#: Parquet encodings of the scores columns: the stream name as a dictionary (one entry), time
#: delta-encoded (monotone), the rest plain; dictionary-encoding float scores costs ~4x the time
#: for nothing. No stored Arrow schema, so readers see ``stream`` as a plain string column.
#: Min/max statistics for ``time`` only (a reader's time-range filter uses them); those of the
#: other columns cost a third of their encoding and prune nothing.
WRITE_OPTIONS = {"use_dictionary": ["stream"], "column_encoding": {"time": "DELTA_BINARY_PACKED"},
                 "store_schema": False, "write_statistics": ["time"]}
#: columns compressed (snappy); the float columns (score, threshold, contributions) are written
#: uncompressed: snappy finds nothing in them (measured 36.1 against 36.2 bytes a row with 8
#: contribution columns) and costs a third of the writer's time
COMPRESSED = ("stream", "time", "flag", "label")


def write_options(channels: list[str]) -> dict:
    """WRITE_OPTIONS with the compression of every column the scores Parquet may hold."""
    floats = ["score", "threshold", *(f"contrib:{c}" for c in channels)]
    return {**WRITE_OPTIONS, "compression": {**{c: "snappy" for c in COMPRESSED},
                                             **{c: "none" for c in floats}}}
#: flagged intervals a FileResult keeps for printing (the longest; all are in the Parquet)
LONGEST_INTERVALS = 20


@dataclass
class FileResult:
    """What scoring one file produced (or why it failed: ``error``)."""

    path: str
    output: str | None = None
    name: str = ""
    rows: int = 0  # rows scored (inserted gap rows included)
    rows_read: int = 0  # rows of the file
    flagged: int = 0
    seconds: float = 0.0
    #: labelled files: point-wise tp, fp, tn, fn of flags against labels
    counts: dict[str, int] | None = None
    gap_note: str | None = None
    error: str | None = None
    intervals: int = 0  # flagged intervals
    intervals_output: str | None = None
    #: the LONGEST_INTERVALS longest flagged intervals (rows of the intervals Parquet)
    longest: list[dict] = field(default_factory=list, repr=False)
    threshold_note: str = ""  # which threshold flagged the stream
    #: small streams with figures=True: what tsssm.plots needs (time, scaled values, mean, var,
    #: score, flag, label), else None
    figure: dict | None = field(default=None, repr=False)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


class _Progress:
    """rows/s and ETA on stderr, for streams of PROGRESS_MIN_ROWS rows or more (tqdm)."""

    def __init__(self, total: int | None, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = 0
        self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is None:
            if max(self.total or 0, self.done) < PROGRESS_MIN_ROWS:
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="rows", unit_scale=True,
                            dynamic_ncols=True, leave=False)
            n = self.done
        if self.total is not None and self.done > self.total:  # a CSV's estimate was short
            self.bar.total = self.total = int(self.done * 1.05)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def intervals_output(output: str | Path) -> Path:
    """Where the flagged intervals of the scores ``output`` go: ``<stem>.intervals.parquet``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.intervals.parquet")


def scores_table(name: str, time: np.ndarray, rows: ScoredRows,
                 labels: np.ndarray | None, channels: list[str] | None = None) -> pa.Table:
    """One batch of the scores Parquet (columns as tsssm.commands.common.stream_frame);
    ``channels``: with ``rows.contrib``, their ``contrib:<channel>`` columns."""
    n = len(rows)
    stream = pa.DictionaryArray.from_arrays(_zeros(n), pa.array([name]), safe=False)
    if time.dtype.kind == "M":  # datetime64[ns]: its int64 as arrow timestamps, no copy
        stamps = pa.array(time.view(np.int64)).view(pa.timestamp("ns"))
    else:
        stamps = pa.array(time)
    columns = {"stream": stream, "time": stamps,
               "score": pa.array(rows.score, pa.float32()), "flag": pa.array(rows.flag)}
    if rows.level is not None:  # the threshold in force, when it is not the bundle's one value
        columns["threshold"] = pa.array(rows.level, pa.float32())
    if labels is not None:
        columns["label"] = pa.array(labels.astype(np.int8, copy=False))
    if channels is not None and rows.contrib is not None:
        for j, channel in enumerate(channels):
            columns[f"contrib:{channel}"] = pa.array(rows.contrib[:, j])
    # no column holds nulls (a missing score is NaN): required columns are written without
    # definition levels, which measured 2x faster to encode than nullable ones
    schema = pa.schema([pa.field(k, v.type, nullable=False) for k, v in columns.items()])
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def _arrow_time(time: np.ndarray) -> pa.Array:
    if time.dtype.kind == "M":
        return pa.array(time.astype("datetime64[ns]").view(np.int64)).view(pa.timestamp("ns"))
    return pa.array(time)


def _tops(shares: np.ndarray, channels: list[str], k: int = 3,
          min_share: float = 0.05) -> pa.Array:
    """FlaggedInterval.describe(k) of every row of shares (n, C) (NaN rows: no attribution,
    ""), as one string array built column-wise (a long stream has many intervals; one Python
    describe() an interval cost ~30 us)."""
    n = len(shares)
    if n == 0:
        return pa.array([], pa.string())
    import pyarrow.compute as pc

    order = np.argsort(-np.nan_to_num(shares, nan=-1.0), axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(shares, order, 1)  # (n, k) largest first
    # describe() keeps the shares >= min_share, and always the largest
    keep = top >= min_share
    keep[:, 0] = True
    # f"{100 * s:.0f}" rounds half to even, as rint
    percent = np.rint(100.0 * np.nan_to_num(top)).astype(np.int64)
    names = pa.array(channels, pa.string())
    parts = []
    for j in range(top.shape[1]):
        text = pc.binary_join_element_wise(names.take(pa.array(order[:, j])),
                                           pc.cast(pa.array(percent[:, j]), pa.string()), " ")
        text = pc.binary_join_element_wise(text, pa.scalar("%"), "")
        parts.append(pc.if_else(pa.array(keep[:, j]), text, pa.scalar(None, pa.string())))
    joined = pc.binary_join_element_wise(*parts, ", ", null_handling="skip")
    return pc.if_else(pa.array(np.isnan(shares[:, 0])), "", joined)


class ScoresSink:
    """Where one stream's scores go, in order: the scores Parquet (rows matched to the read
    batches for their times and labels), the flagged intervals as they close (their own
    Parquet, and the longest kept for printing), and the label counts."""

    def __init__(self, name: str, output: str | Path, channels: list[str],
                 intervals: bool = True) -> None:
        self.name, self.channels = name, list(channels)
        self.writer = ParquetStreamWriter(output, options=write_options(self.channels))
        self.interval_path = intervals_output(output) if intervals else None
        self.interval_writer: ParquetStreamWriter | None = None
        self.waiting: deque[Batch] = deque()  # rows read whose scores have not come out yet
        self.counts = np.zeros(4, np.int64)  # tp, fp, tn, fn
        self.rows = self.flagged = self.n_intervals = 0
        self.state = intervals_start()
        self.longest: list[tuple[int, int, dict]] = []  # heap of (rows, -start, row)
        self.time_type: pa.DataType | None = None

    def add(self, batch: Batch) -> None:
        self.waiting.append(batch)
        if self.time_type is None:
            self.time_type = _arrow_time(batch.time[:1]).type

    def write(self, out: ScoredRows, on_piece: Callable | None = None) -> None:
        """The scores of the oldest waiting rows (``on_piece(part, time, labels, offset)``:
        called for each piece written, ``offset`` its first row within ``out``)."""
        done = 0
        while done < len(out):  # the scores cover the oldest waiting rows, in order
            batch = self.waiting[0]
            offset = out.start + done - batch.first_row  # first unscored row of the batch
            take = min(len(batch.time) - offset, len(out) - done)
            sl = slice(done, done + take)
            part = ScoredRows(out.start + done, out.score[sl], out.flag[sl],
                              contrib=None if out.contrib is None else out.contrib[sl],
                              level=None if out.level is None else out.level[sl])
            time = batch.time[offset : offset + take]
            labels = None if batch.labels is None else batch.labels[offset : offset + take]
            self.writer.write(scores_table(self.name, time, part, labels, self.channels))
            if labels is not None:
                lab = labels.astype(bool)
                self.counts[:] += [np.count_nonzero(lab & part.flag),
                                   np.count_nonzero(~lab & part.flag),
                                   np.count_nonzero(~lab & ~part.flag),
                                   np.count_nonzero(lab & ~part.flag)]
            if self.interval_path is not None:
                found, self.state = intervals_update(self.state, part.flag, part.score,
                                                     part.contrib, time)
                self._intervals(found)
            if on_piece is not None:
                on_piece(part, time, labels, done)
            done += take
            if offset + take == len(batch.time):
                self.waiting.popleft()
        self.flagged += int(out.flag.sum())
        self.rows += len(out)

    def _intervals(self, found: Intervals) -> None:
        """Closed intervals to the intervals Parquet (columns built at once: a long stream
        can have many), the longest kept for printing."""
        k, C = len(found), len(self.channels)
        if not k:
            return
        lengths = found.stop - found.start
        if found.summed is None:
            shares = np.full((k, C), np.nan)
        else:
            part = np.clip(found.summed, 0.0, None)  # (k, C)
            total = part.sum(1, keepdims=True)
            shares = np.where(total > 0, part / np.where(total > 0, total, 1.0), np.nan)
        columns = {"stream": pa.array([self.name] * k, pa.string()),
                   "start": _arrow_time(found.start_time), "end": _arrow_time(found.end_time),
                   "rows": pa.array(lengths), "peak_score": pa.array(found.peak),
                   "top": _tops(shares, self.channels),
                   **{f"share:{c}": pa.array(shares[:, j]) for j, c in enumerate(self.channels)}}
        table = pa.table(columns).cast(self._interval_schema())
        # only the longest few can enter the heap: rank them in numpy, not every interval in
        # Python (a long stream closes ~10^5 intervals per 10^7 rows); the key is the heap's,
        # (rows, -start), largest first
        best = np.lexsort((-found.start, lengths))[::-1][:LONGEST_INTERVALS]
        for i in best.tolist():
            item = (int(lengths[i]), -int(found.start[i]))
            if len(self.longest) < LONGEST_INTERVALS or item > self.longest[0][:2]:
                row = {name: table.column(name)[i].as_py() for name in table.column_names}
                if len(self.longest) < LONGEST_INTERVALS:
                    heapq.heappush(self.longest, (*item, row))
                else:
                    heapq.heapreplace(self.longest, (*item, row))
        self.n_intervals += k
        if self.interval_writer is None:
            self.interval_writer = ParquetStreamWriter(self.interval_path, threaded=False)
        self.interval_writer.write(table)

    def _interval_schema(self) -> pa.Schema:
        time_type = self.time_type or pa.int64()
        return pa.schema([("stream", pa.string()), ("start", time_type), ("end", time_type),
                          ("rows", pa.int64()), ("peak_score", pa.float64()),
                          ("top", pa.string()),
                          *[(f"share:{c}", pa.float64()) for c in self.channels]])

    def close(self) -> None:
        """The stream's end: the interval still open closes; both files move into place."""
        if self.interval_path is not None:
            found, self.state = intervals_update(self.state, np.zeros(0, bool), np.zeros(0),
                                                 None, np.zeros(0), final=True)
            self._intervals(found)
        self.writer.close(schema=None)
        if self.interval_path is not None:
            if self.interval_writer is None:
                self.interval_writer = ParquetStreamWriter(self.interval_path, threaded=False)
            self.interval_writer.close(schema=self._interval_schema())

    def abort(self) -> None:
        self.writer.abort()
        if self.interval_writer is not None:
            self.interval_writer.abort()

    def longest_rows(self) -> list[dict]:
        return [item[2] for item in sorted(self.longest, reverse=True)]


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> pa.Array:
    """Dictionary indices of a batch (every row: entry 0), made once per batch length."""
    return pa.array(np.zeros(n, np.int32))


def score_file(path: str | Path, scorer: Scorer, spec: ReadSpec, output: str | Path, *,
               name: str | None = None, gaps: str = "keep", gap_factor: float = 3.0,
               fill: str = "none", batch_rows: int = BATCH_ROWS, progress: bool = True,
               figures: bool = False, contributions: bool = True, intervals: bool = True,
               on_batch: Callable[[int], None] | None = None,
               pipelined: bool = True, read_threads: int | None = None) -> FileResult:
    """Score one CSV/Parquet file with ``scorer`` (reset first) into ``output`` (Parquet).

    spec: how to read it (the model's channels in the model's order); gaps/gap_factor/fill as
    data.gaps/data.gap_factor/data.fill. ``contributions``: write the ``contrib:<channel>``
    columns; ``intervals``: write the flagged intervals beside the scores
    (:func:`intervals_output`); ``pipelined``: read ahead and write on threads beside the
    scoring (the same output; False: one thread); ``read_threads``: threads converting the
    read batches (StreamReader's ``threads``; None: by the cores). Raises DataError on bad
    input (nothing is written).
    """
    started = clock.perf_counter()
    reader = StreamReader(path, spec, gaps=gaps, gap_factor=gap_factor, fill=fill,
                          batch_rows=batch_rows, name=name, threads=read_threads)
    if len(reader.channels) != len(scorer.channels):  # read in order as the model's channels
        from tsssm.errors import DataError

        raise DataError(f"{reader.path}: {len(reader.channels)} channel columns "
                        f"{reader.channels}, the model has {len(scorer.channels)} "
                        f"{scorer.channels}; name them with data.channels=[...]")
    scorer.reset(source=str(reader.path))
    # figures need every row's forecast: only for streams short enough to draw
    figures = figures and (reader.total_rows or 0) <= FIGURE_MAX_ROWS
    scorer.moments = figures
    scorer.contributions = contributions
    result = FileResult(str(reader.path), str(output), reader.name)
    labelled = reader.has_labels
    figure: dict[str, list] | None = {k: [] for k in (
        "time", "scaled", "mean", "var", "score", "flag", "label")} if figures else None
    bar = _Progress(reader.total_rows, f"scoring {reader.name}", progress)
    sink = ScoresSink(reader.name, output, scorer.channels, intervals)

    def keep_figure(part: ScoredRows, time, labels, offset: int, out: ScoredRows) -> None:
        nonlocal figure
        if figure is None:
            return
        if part.start + len(part) > FIGURE_MAX_ROWS:  # longer than its estimate
            figure = None
            scorer.moments = False
            return
        sl = slice(offset, offset + len(part))
        for key, value in (("time", time), ("scaled", out.scaled[sl]),
                           ("mean", out.mean[sl]), ("var", out.var[sl]),
                           ("score", part.score), ("flag", part.flag), ("label", labels)):
            figure[key].append(value)

    def emit(out: ScoredRows) -> None:
        hook = None
        if figure is not None and out.scaled is not None:
            def hook(part, time, labels, offset):
                keep_figure(part, time, labels, offset, out)
        sink.write(out, hook)

    # the next batch is read and validated on one thread, the last one's scores written on
    # another, while this one scores (tsssm.scoring.pipeline); the figures' hook changes the
    # scorer as it goes, so a stream drawn is scored in this thread alone
    worker = OrderedWorker(name="scores-sink") if pipelined and figure is None else None
    batches = prefetch(iter(reader), name="batch-reader") if worker is not None else reader
    # on a GPU the next batch is queued before the last one's scores are collected, so the
    # device works while this thread prepares one batch and collects the other
    ahead = 1 if worker is not None and scorer.defers else 0
    queued: deque = deque()

    def collect() -> None:
        out = queued.popleft().result()
        if worker is None:
            emit(out)
        else:
            worker.submit(emit, out)

    try:
        for batch in batches:
            queued.append(scorer.submit(batch.values))
            if worker is None:  # the batch's rows before the scores that cover them
                sink.add(batch)
            else:
                worker.submit(sink.add, batch)
            while len(queued) > ahead:
                collect()
            bar.update(len(batch.time))
            if on_batch is not None:
                on_batch(len(batch.time))
        while queued:
            collect()
        if worker is None:
            emit(scorer.finish())
        else:
            worker.submit(emit, scorer.finish())
            worker.join()
        sink.close()
    except BaseException:
        if worker is not None:
            worker.cancel()
        if batches is not reader:
            batches.close()  # stops the reading thread
        sink.abort()
        raise
    finally:
        bar.close()
    result.rows, result.flagged = sink.rows, sink.flagged
    result.intervals, result.longest = sink.n_intervals, sink.longest_rows()
    result.intervals_output = None if sink.interval_path is None else str(sink.interval_path)
    result.threshold_note = scorer.threshold_note
    counts = sink.counts
    result.rows_read = reader.rows_read
    result.seconds = clock.perf_counter() - started
    if labelled:
        result.counts = dict(zip(("tp", "fp", "tn", "fn"), counts.tolist()))
    report = reader.gap_report
    if report is not None and report.n_gaps:
        result.gap_note = (f"{reader.name}: {report.n_gaps} gaps longer than {gap_factor:g}x the "
                           f"median step (longest {report.longest / max(report.median_step, 1):.0f}"
                           f" steps); data.gaps={gaps}, {report.rows_inserted} rows inserted")
    if figure is not None and figure["time"]:
        result.figure = {k: (None if v[0] is None else np.concatenate(v))
                         for k, v in figure.items()}
        result.figure["scaler"] = scorer.scaler
        result.figure["channels"] = scorer.channels
    return result


def detection_summary(results: list[FileResult]) -> dict[str, float]:
    """Detection metrics pooled over the labelled files (SKAB's protocol: counts summed), with
    AUC-PR from the written scores when they are not too many to read back."""
    labelled = [r for r in results if r.counts is not None and r.error is None]
    if not labelled:
        return {}
    from tsssm.anomaly.metrics import anomaly_metrics

    tp, fp, tn, fn = (sum(r.counts[k] for r in labelled) for k in ("tp", "fp", "tn", "fn"))
    out = {"precision": tp / (tp + fp) if tp + fp else 0.0,
           "recall": tp / (tp + fn) if tp + fn else 0.0,
           "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
           "far": fp / (fp + tn) if fp + tn else 0.0,
           "mar": fn / (fn + tp) if fn + tp else 0.0,
           "tp": float(tp), "fp": float(fp), "tn": float(tn), "fn": float(fn),
           "n": float(tp + fp + tn + fn), "n_positive": float(tp + fn),
           "n_flagged": float(tp + fp)}
    if out["n"] <= METRIC_MAX_ROWS:
        import polars as pl

        frame = pl.concat([pl.read_parquet(r.output, columns=["score", "label"])
                           for r in labelled])
        scores, labels = frame["score"].to_numpy(), frame["label"].to_numpy()
        out["auc_pr"] = anomaly_metrics(labels, np.zeros(len(scores), bool), scores)["auc_pr"]
    else:
        log.warning("%d labelled rows: auc_pr is not computed (more than %d)", int(out["n"]),
                    METRIC_MAX_ROWS)
    return out
