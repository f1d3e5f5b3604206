"""Many streams through one model on one GPU: files scored ``group`` at a time, their rows
stacked into one (B, T, C) batch per model call, each stream with its own state in the batch.

A GPU does little with one stream of a few thousand rows per call; stacking B streams makes one
call do B times the work for the same launch overhead. Every stream is read, validated, scaled
(its own scaler where the model scales each stream by its first rows) and written exactly as
``score_file`` does; only the model call is shared. Correctness: every unfinished stream gives
the same number of rows to a round (``rows`` per round, read ahead as needed), so a stream is
padded with missing rows (NaN) only after its end, where nothing depends on its state any more;
the scores equal scoring each file alone (tests/scoring/test_batched.py). A file that fails is
padded from then on and reported; the others go on.
"""

from __future__ import annotations

import time as clock
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from tsssm.anomaly.scores import anomaly_scores
from tsssm.bundle import Bundle
from tsssm.data.scaling import StandardScaler
from tsssm.errors import DataError, TsssmError
from tsssm.models.base import Gaussian
from tsssm.scoring.files import WRITE_OPTIONS, FileResult, scores_table
from tsssm.scoring.reader import Batch, StreamReader
from tsssm.scoring.scorer import ScoredRows
from tsssm.scoring.writer import ParquetStreamWriter


class _Lane:
    """One stream of the batch: its reader, scaling, rows waiting and output."""

    def __init__(self, task, bundle: Bundle, calibration_rows: int) -> None:
        self.task = task
        self.result = FileResult(task.path, task.output, task.name)
        self.started = clock.perf_counter()
        self.calibration_rows = calibration_rows
        self.scaler: StandardScaler | None = None if calibration_rows else bundle.scaler
        self.bundle = bundle
        self.held: list[np.ndarray] = []  # raw rows before the per-stream scaler exists
        self.ready: deque[np.ndarray] = deque()  # scaled rows not yet scored
        self.n_ready = 0
        self.waiting: deque[Batch] = deque()  # read rows (time, labels) not yet written
        self.written = 0  # rows written
        self.counts = np.zeros(4, np.int64)
        self.exhausted = False
        self.failed = False
        self.reader: StreamReader | None = None
        self.writer: ParquetStreamWriter | None = None
        self._batches: Iterator[Batch] | None = None
        try:
            self.reader = StreamReader(task.path, task.spec, gaps=task.gaps,
                                       gap_factor=task.gap_factor, fill=task.fill,
                                       batch_rows=task.batch_rows, name=task.name)
            if len(self.reader.channels) != len(bundle.channels):
                raise DataError(f"{task.path}: {len(self.reader.channels)} channel columns, "
                                f"the model has {len(bundle.channels)}")
            self.writer = ParquetStreamWriter(task.output, options=WRITE_OPTIONS)
            self._batches = iter(self.reader)
        except TsssmError as err:
            self.fail(str(err))

    @property
    def active(self) -> bool:
        return not self.failed and not (self.exhausted and self.n_ready == 0)

    def fail(self, message: str) -> None:
        self.failed = True
        self.result.error = message
        self.result.output = None
        if self.writer is not None:
            self.writer.abort()
        self.ready.clear()
        self.n_ready = 0

    def fill(self, rows: int) -> None:
        """Read until ``rows`` scaled rows are ready or the file ends."""
        while not self.failed and not self.exhausted and self.n_ready < rows:
            try:
                batch = next(self._batches)
            except StopIteration:
                self.exhausted = True
                if self.scaler is None and self.held:  # not longer than the calibration
                    self.scaler = self.bundle.scaler
                    self._scale(np.concatenate(self.held))
                    self.held = []
                break
            except TsssmError as err:
                self.fail(str(err))
                return
            self.waiting.append(batch)
            if self.scaler is None:
                self.held.append(batch.values)
                if sum(len(h) for h in self.held) > self.calibration_rows:
                    held = np.concatenate(self.held)
                    self.held = []
                    try:
                        self.scaler = StandardScaler.fit([held[: self.calibration_rows]],
                                                         self.bundle.channels)
                    except TsssmError as err:
                        self.fail(f"{self.task.path}: {err}")
                        return
                    self._scale(held)
            else:
                self._scale(batch.values)

    def _scale(self, raw: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            y = self.scaler.transform(raw)
        if np.isinf(y).any():
            i, col = (int(k[0]) for k in np.nonzero(np.isinf(y)))
            row = self.written + self.n_ready + i + 1
            self.fail(f"{self.task.path}: column '{self.bundle.channels[col]}' row {row} holds "
                      f"{raw[i, col]:g}, which overflows float32 once scaled by the training "
                      f"rows (mean {self.scaler.mean[col]:g}, std {self.scaler.std[col]:g}); "
                      "blank or fix the reading, or leave the column out of data.channels")
            return
        self.ready.append(y)
        self.n_ready += len(y)

    def take(self, rows: int) -> np.ndarray:
        """Up to ``rows`` ready scaled rows (n, C)."""
        parts, n = [], 0
        while self.ready and n < rows:
            y = self.ready.popleft()
            if n + len(y) > rows:
                self.ready.appendleft(y[rows - n :])
                y = y[: rows - n]
            parts.append(y)
            n += len(y)
        self.n_ready -= n
        return np.concatenate(parts) if parts else np.empty((0, len(self.bundle.channels)),
                                                            np.float32)

    def emit(self, score: np.ndarray, threshold: float) -> None:
        """Write the scores of the next ``len(score)`` rows."""
        flag = score > threshold
        done = 0
        try:
            while done < len(score):
                batch = self.waiting[0]
                offset = self.written + done - batch.first_row
                take = min(len(batch.time) - offset, len(score) - done)
                part = ScoredRows(self.written + done, score[done : done + take],
                                  flag[done : done + take])
                labels = None if batch.labels is None else batch.labels[offset : offset + take]
                self.writer.write(scores_table(self.reader.name, batch.time[offset:offset + take],
                                               part, labels))
                if labels is not None:
                    lab = labels.astype(bool)
                    self.counts += [np.count_nonzero(lab & part.flag),
                                    np.count_nonzero(~lab & part.flag),
                                    np.count_nonzero(~lab & ~part.flag),
                                    np.count_nonzero(lab & ~part.flag)]
                done += take
                if offset + take == len(batch.time):
                    self.waiting.popleft()
        except TsssmError as err:
            self.fail(str(err))
            return
        self.written += len(score)
        self.result.flagged += int(flag.sum())
        self.result.rows = self.written

    def finish(self) -> FileResult:
        if not self.failed and self.writer is not None:
            try:
                self.writer.close()
            except TsssmError as err:
                self.fail(str(err))
        if not self.failed:
            self.result.rows_read = self.reader.rows_read
            if self.reader.has_labels:
                self.result.counts = dict(zip(("tp", "fp", "tn", "fn"), self.counts.tolist()))
            report = self.reader.gap_report
            if report is not None and report.n_gaps:
                self.result.gap_note = (f"{self.reader.name}: {report.n_gaps} gaps; data.gaps="
                                        f"{self.task.gaps}, {report.rows_inserted} rows inserted")
        self.result.seconds = clock.perf_counter() - self.started
        return self.result


@torch.no_grad()
def score_group(tasks: list, bundle: Bundle, device: str | torch.device | None = None,
                rows: int = 65_536) -> list[FileResult]:
    """Score ``tasks`` (tsssm.scoring.many.FileTask) together: one model call of
    (len(tasks), rows, C) per round."""
    device = torch.device(device or "cpu")
    model = bundle.model.to(device).eval()
    calibration = int(bundle.data_config.get("train_rows", 0)) if bundle.per_stream_scaling \
        else 0
    lanes = [_Lane(t, bundle, calibration) for t in tasks]
    threshold = float(bundle.threshold.value)
    C = len(bundle.channels)
    state = None
    while any(lane.active for lane in lanes):
        for lane in lanes:
            lane.fill(rows)
        takes = [lane.take(rows) if lane.active else None for lane in lanes]
        length = max((len(t) for t in takes if t is not None), default=0)
        if length == 0:
            continue
        y = np.full((len(lanes), length, C), np.nan, np.float32)  # padding after a stream ends
        for i, t in enumerate(takes):
            if t is not None:
                y[i, : len(t)] = t
        yt = torch.from_numpy(y).to(device)
        pred, state = model.one_step(yt, state)
        pred = Gaussian(pred.mean.float(), pred.var.float())
        scores = anomaly_scores(yt, pred, kind=bundle.score_kind).cpu().numpy()  # (B, T)
        for i, t in enumerate(takes):
            if t is not None and len(t):
                lanes[i].emit(scores[i, : len(t)], threshold)
    return [lane.finish() for lane in lanes]


def run_batched(tasks: list, bundle: Bundle, device: str | None = None, group: int = 64,
                rows: int = 65_536, on_done=None) -> list[FileResult]:
    """Every task, ``group`` files at a time through :func:`score_group`."""
    results: list[FileResult] = []
    for start in range(0, len(tasks), group):
        for result in score_group(tasks[start : start + group], bundle, device, rows):
            results.append(result)
            if on_done is not None:
                on_done(result)
    return results
