"""Many streams through one model on one GPU: files scored ``group`` at a time, their rows
stacked into one (B, T, C) batch per model call, each stream with its own state in the batch.

A GPU does little with one stream of a few thousand rows per call; stacking B streams makes one
call do B times the work for the same launch overhead. Every stream is read, validated, scaled
(its own scaler where the model scales each stream by its first rows) and written exactly as
``score_file`` does; only the model call is shared. Correctness: every unfinished stream gives
the same number of rows to a round (``rows`` per round, read ahead as needed), so a stream is
padded with missing rows (NaN) only after its end, where nothing depends on its state any more;
the scores equal scoring each file alone (tests/scoring/test_batched.py). A file that fails is
padded from then on and reported; the others go on. Windowed and joint scores, contributions and
per-stream or streaming thresholds are computed per stream from the batch's step terms
(tsssm.scoring.stream_scores), as the single-file Scorer does.
"""

from __future__ import annotations

import time as clock
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from tsssm.anomaly.scores import ScoreSpec, anomaly_scores, step_terms
from tsssm.bundle import Bundle
from tsssm.data.scaling import StandardScaler
from tsssm.errors import DataError, TsssmError
from tsssm.models.base import Gaussian
from tsssm.scoring.files import FileResult, ScoresSink
from tsssm.scoring.reader import Batch, StreamReader
from tsssm.scoring.stream_scores import ScoredRows, StreamScores


class _Lane:
    """One stream of the batch: its reader, scaling, rows waiting and output."""

    def __init__(self, task, bundle: Bundle, calibration_rows: int, spec: ScoreSpec) -> None:
        self.task = task
        self.result = FileResult(task.path, task.output, task.name)
        self.started = clock.perf_counter()
        self.calibration_rows = calibration_rows
        self.scaler: StandardScaler | None = None if calibration_rows else bundle.scaler
        self.bundle = bundle
        self.held: list[np.ndarray] = []  # raw rows before the per-stream scaler exists
        self.ready: deque[np.ndarray] = deque()  # scaled rows not yet scored
        self.n_ready = 0
        self.rows_scaled = 0
        self.exhausted = False
        self.failed = False
        self.reader: StreamReader | None = None
        self.sink: ScoresSink | None = None
        contributions = getattr(task, "contributions", True)
        rows = int(bundle.data_config.get("train_rows", 0))
        self.post = StreamScores(spec, bundle.threshold, len(bundle.channels),
                                 threshold_rows=rows if bundle.threshold_scope == "per_stream"
                                 else 0, contributions=contributions)
        self.post.reset(task.path)
        self._batches: Iterator[Batch] | None = None
        try:
            self.reader = StreamReader(task.path, task.spec, gaps=task.gaps,
                                       gap_factor=task.gap_factor, fill=task.fill,
                                       batch_rows=task.batch_rows, name=task.name)
            if len(self.reader.channels) != len(bundle.channels):
                raise DataError(f"{task.path}: {len(self.reader.channels)} channel columns, "
                                f"the model has {len(bundle.channels)}")
            self.sink = ScoresSink(self.reader.name, task.output, list(bundle.channels))
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
        if self.sink is not None:
            self.sink.abort()
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
            self.sink.add(batch)
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
            row = self.rows_scaled + i + 1
            self.fail(f"{self.task.path}: column '{self.bundle.channels[col]}' row {row} holds "
                      f"{raw[i, col]:g}, which overflows float32 once scaled by the training "
                      f"rows (mean {self.scaler.mean[col]:g}, std {self.scaler.std[col]:g}); "
                      "blank or fix the reading, or leave the column out of data.channels")
            return
        self.ready.append(y)
        self.n_ready += len(y)
        self.rows_scaled += len(y)

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

    def emit_scores(self, score: np.ndarray, threshold: float) -> None:
        """One-step scores of the next rows, flagged by the pooled constant threshold."""
        self.emit(ScoredRows(self.sink.rows, score, score > threshold))

    def emit_terms(self, terms: tuple) -> None:
        """Step terms (contrib, whitened, observed) (n, C) of the next rows."""
        try:
            out = self.post.push(terms)
        except TsssmError as err:
            self.fail(f"{self.task.path}: {err}")
            return
        self.emit(out)

    def emit(self, out: ScoredRows) -> None:
        """Write the scores of the next rows."""
        try:
            self.sink.write(out)
        except TsssmError as err:
            self.fail(str(err))
            return
        self.result.flagged, self.result.rows = self.sink.flagged, self.sink.rows

    def finish(self) -> FileResult:
        if not self.failed and self.sink is not None:
            try:
                self.emit(self.post.finish())
                if not self.failed:
                    self.sink.close()
            except TsssmError as err:
                self.fail(str(err))
        if not self.failed:
            sink = self.sink
            self.result.rows_read = self.reader.rows_read
            if self.reader.has_labels:
                self.result.counts = dict(zip(("tp", "fp", "tn", "fn"), sink.counts.tolist()))
            self.result.intervals, self.result.longest = sink.n_intervals, sink.longest_rows()
            self.result.intervals_output = str(sink.interval_path)
            self.result.threshold_note = self.post.threshold_note
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
    spec = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
    lanes = [_Lane(t, bundle, calibration, spec) for t in tasks]
    threshold = float(bundle.threshold.value)
    # one-step scores with one constant threshold and no contributions: (B, T) scores only
    fast = (spec.window == 1 and spec.kind in ("nis", "nll") and spec.reanchor is None
            and not bundle.threshold.follows_stream
            and bundle.threshold_scope != "per_stream"
            and not any(lane.post.contributions for lane in lanes))
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
        if fast:
            pred = Gaussian(pred.mean.float(), pred.var.float())
            scores = anomaly_scores(yt, pred, kind=bundle.score_kind).cpu().numpy()  # (B, T)
            for i, t in enumerate(takes):
                if t is not None and len(t):
                    lanes[i].emit_scores(scores[i, : len(t)], threshold)
            continue
        st = step_terms(yt, pred, spec.kind)  # each (B, T, C)
        contrib, whitened = st.contrib.double().cpu().numpy(), st.whitened.double().cpu().numpy()
        observed = st.observed.cpu().numpy()
        for i, t in enumerate(takes):
            if t is not None and len(t):
                n = len(t)
                lanes[i].emit_terms((contrib[i, :n], whitened[i, :n], observed[i, :n]))
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
