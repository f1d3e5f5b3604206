"""Window scores and flagged intervals of a stream that arrives in pieces, as pure functions over
a small carried state.

A stream scored in batches of any size - a file read in row batches, a live sensor one sample at a
time - gets the window scores, contributions and flagged intervals of the whole stream scored at
once (:func:`tsssm.anomaly.scores.window_scores`, :func:`tsssm.anomaly.attribution.
flagged_intervals`), whatever the batch boundaries split: windows, gaps (rows with no observed
channel) or flagged runs. Memory is O(window) per stream:

- :class:`WindowState` carries the step terms of the last rows that a later row's window still
  reaches (``window - 1`` rows trailing, ``window`` rows centered) plus, for a centered window,
  the ``window // 2`` rows whose score waits for the rows after them;
- :class:`IntervalState` carries the open flagged run: where it started, its peak and the summed
  per-channel contributions so far.

Both functions use the same formulas as the whole-stream path (``window_inputs`` /
``window_values``), so they differ from it only by floating-point rounding (the window sums are
differences of cumulative sums that start at the carried tail rather than at the stream's first
row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from tsssm.anomaly.attribution import interval_shares
from tsssm.anomaly.scores import WINDOW_ALIGNS, WINDOW_KINDS, window_inputs, window_values
from tsssm.errors import ConfigError, DataError


class WindowState(NamedTuple):
    """What a stream's window scores carry from one batch to the next."""

    received: int  # step rows received so far
    emitted: int  # rows whose window score has been returned (all rows before this one)
    #: (k, K) float64: the window inputs (``window_inputs``) of rows received - k .. received - 1
    tail: np.ndarray


def window_start(n_channels: int, kind: str = "mean") -> WindowState:
    """The state before a stream's first row."""
    if kind not in WINDOW_KINDS:
        raise ConfigError(f"score window kind must be one of {WINDOW_KINDS}; got {kind!r}")
    width = n_channels + 1 if kind == "mean" else 2 * n_channels
    return WindowState(0, 0, np.zeros((0, width)))


def window_update(state: WindowState, terms: tuple, window: int, kind: str = "mean",
                  align: str = "trailing", final: bool = False, fill: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, WindowState]:
    """Window scores of the rows that became ready with this batch of step terms.

    terms: (contrib, whitened, observed), each (n, C) (StepTerms of one stream, numpy; n may be
    0). A trailing window's rows are ready at once; a centered window's row t once row
    t + window // 2 has arrived, or at the stream's end (``final=True``: every row left, with the
    window cut at the end as the whole-stream path cuts it). Returns (score (m,), contrib (m, C)
    float64, new state): the scores of rows ``state.emitted .. state.emitted + m - 1``.
    """
    if align not in WINDOW_ALIGNS:
        raise ConfigError(f"score window align must be one of {WINDOW_ALIGNS}; got {align!r}")
    contrib, whitened, observed = (np.asarray(t) for t in terms)
    k, n = len(state.tail), len(contrib)
    x = np.empty((k + n, state.tail.shape[1]))  # (k + n, K): the tail, then the new rows
    x[:k] = state.tail
    window_inputs(contrib, whitened, observed, kind, out=x[k:])
    base = state.received - k  # stream row of x[0]
    received = state.received + n
    ahead = 0 if align == "trailing" else window // 2  # rows after t in t's window
    ready = received if final else max(state.emitted, received - ahead)
    cs = np.empty((len(x) + 1, x.shape[1]))
    cs[0] = 0.0
    np.cumsum(x, axis=0, out=cs[1:])
    first, m = state.emitted, ready - state.emitted
    if first + 1 + ahead - window >= 0 and ready + ahead <= received:
        # every window whole: sums of consecutive rows, by slices
        lo = first + 1 + ahead - window - base
        sums = cs[lo + window : lo + window + m] - cs[lo : lo + m]
    else:  # windows cut at the stream's start or end
        t = np.arange(first, ready)
        stop = np.minimum(t + 1 + ahead, received)
        start = np.maximum(0, stop - window)
        sums = cs[stop - base] - cs[start - base]
    score, out = window_values(sums, kind, fill)
    # the rows a later row's window can still reach: from ready + 1 + ahead - window on, and
    # (centered) the last `window` rows, which the windows cut at the stream's end start from
    keep = max(0, min(ready + 1 + ahead - window, received - window if ahead else received))
    tail = x[keep - base :] if not final else x[:0]
    return score, out, WindowState(received, ready, np.ascontiguousarray(tail))


def window_step(state: WindowState, contrib: np.ndarray, whitened: np.ndarray,
                observed: np.ndarray, window: int, kind: str = "mean", fill: float = 0.0
                ) -> tuple[float, np.ndarray, WindowState]:
    """One row of a trailing window (a live sample): :func:`window_update` of a batch of one
    row, in fewer array operations. contrib, whitened, observed: (C,). Returns (score,
    contrib (C,), new state)."""
    tail = state.tail
    row = np.empty((1, tail.shape[1]))
    window_inputs(contrib[None], whitened[None], observed[None], kind, out=row)
    sums = row if not len(tail) else tail.sum(axis=0, keepdims=True) + row
    score, out = window_values(sums, kind, fill)
    keep = window - 1
    if keep <= 0:
        new_tail = tail[:0]
    elif len(tail) < keep:
        new_tail = np.concatenate([tail, row])
    else:
        new_tail = np.concatenate([tail[len(tail) - keep + 1 :], row])
    received = state.received + 1
    return float(score[0]), out[0], WindowState(received, received, new_tail)


#: a RunningWindow recomputes its sums from the rows it holds every this many samples, so the
#: rounding of adding and subtracting rows does not build up along an endless stream
RESUM_EVERY = 4096


class RunningWindow:
    """A trailing window carried sample by sample in O(1) work and no allocation: the window
    inputs of the last ``window - 1`` rows in a ring, and their running sums; a live sample's
    window sums are those plus its own row (what :func:`window_step` sums from the tail every
    time). Same formulas as :func:`window_update` / ``window_values``; the sums differ from
    theirs by rounding only (and are recomputed from the ring every RESUM_EVERY samples).
    ``from_state`` / ``to_state`` hand the window over to and from the batch path."""

    def __init__(self, window: int, kind: str, n_channels: int, fill: float = 0.0) -> None:
        if kind not in WINDOW_KINDS:
            raise ConfigError(f"score window kind must be one of {WINDOW_KINDS}; got {kind!r}")
        self.window, self.kind, self.fill, self.C = int(window), kind, float(fill), n_channels
        width = n_channels + 1 if kind == "mean" else 2 * n_channels
        self.ring = np.zeros((max(self.window - 1, 1), width))  # the last window - 1 rows
        self.count = 0  # rows in the ring
        self.pos = 0  # where the next row goes (the oldest row, once full)
        self.sums = np.zeros(width)  # of the ring's rows
        self.received = 0
        self._row = np.empty(width)
        self._cur = np.empty(width)  # this sample's window sums
        self._out = np.empty(n_channels)
        self._one = np.empty(n_channels)
        self._since = 0

    @classmethod
    def from_state(cls, state: WindowState, window: int, kind: str, n_channels: int,
                   fill: float = 0.0) -> RunningWindow:
        """Continue a batch path's trailing window (``state.emitted == state.received``)."""
        live = cls(window, kind, n_channels, fill)
        tail = state.tail[len(state.tail) - min(len(state.tail), window - 1):] \
            if window > 1 else state.tail[:0]
        live.count = len(tail)
        live.ring[: live.count] = tail
        live.pos = live.count % len(live.ring)
        live.sums[:] = tail.sum(axis=0) if len(tail) else 0.0
        live.received = state.received
        return live

    def to_state(self) -> WindowState:
        """The batch path's state of this window (its tail: the ring's rows, oldest first)."""
        if self.window <= 1:
            tail = self.ring[:0]
        elif self.count < len(self.ring):
            tail = self.ring[: self.count]
        else:
            tail = np.concatenate([self.ring[self.pos :], self.ring[: self.pos]])
        return WindowState(self.received, self.received, tail.copy())

    def step(self, contrib: np.ndarray, whitened: np.ndarray, observed: np.ndarray
             ) -> tuple[float, np.ndarray]:
        """One row's step terms (C,) -> (its window score, its contributions (C,), a copy)."""
        C, row, cur, out = self.C, self._row, self._cur, self._out
        if self.kind == "mean":
            row[:C] = contrib
            row[C] = observed.any()
        else:
            row[:C] = whitened
            row[C:] = observed
        np.add(self.sums, row, out=cur)
        if self.kind == "mean":
            count = float(cur[C])
            np.divide(cur[:C], max(count, 1.0), out=out)
            has = count > 0
        else:
            s, n = cur[:C], cur[C:]
            np.multiply(s, s, out=out)
            np.maximum(n, 1.0, out=self._one)
            out /= self._one
            n_channels = np.count_nonzero(n)  # the counts are whole numbers
            if n_channels > 1:
                out /= n_channels
            has = n_channels > 0
        score = float(np.add.reduce(out)) if has else self.fill
        if self.window > 1:  # the row joins the ring, the oldest leaves it
            ring = self.ring
            if self.count == len(ring):
                self.sums -= ring[self.pos]
            else:
                self.count += 1
            ring[self.pos] = row
            self.sums += row
            self.pos = (self.pos + 1) % len(ring)
            self._since += 1
            if self._since >= RESUM_EVERY:
                self._since = 0
                np.sum(ring[: self.count], axis=0, out=self.sums)
        self.received += 1
        return score, out.copy()


class Intervals(NamedTuple):
    """Maximal runs of flagged rows (k of them), as :class:`tsssm.anomaly.attribution.
    FlaggedInterval` with the times of their first and last rows; arrays, as a long stream can
    have many."""

    start: np.ndarray  # (k,) int64 first row (index in the stream)
    stop: np.ndarray  # (k,) int64 one past the last row
    start_time: np.ndarray  # (k,) the times of the first rows
    end_time: np.ndarray  # (k,) the times of the last rows
    peak: np.ndarray  # (k,) float64 largest score inside
    summed: np.ndarray | None  # (k, C) summed contributions, None without them

    def __len__(self) -> int:
        return len(self.start)

    def shares(self, channels: Sequence[str]) -> list[dict[str, float]]:
        """Each interval's channel shares (FlaggedInterval.shares)."""
        if self.summed is None:
            return [{} for _ in range(len(self))]
        return [interval_shares(row, channels) for row in self.summed]


class IntervalState(NamedTuple):
    """The open flagged run of a stream (``start`` < 0: none) after ``rows`` rows."""

    rows: int
    start: int
    start_time: Any
    last_time: Any  # the time of the last row seen
    peak: float
    summed: np.ndarray | None  # (C,) or None (no contributions)


def _no_intervals(time: np.ndarray, contrib: np.ndarray | None) -> Intervals:
    none = np.zeros(0, np.int64)
    times = np.asarray(time)[:0]
    return Intervals(none, none, times, times, np.zeros(0),
                     None if contrib is None else np.zeros((0, np.shape(contrib)[1])))


def _run_edges(flags: np.ndarray, is_open: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where runs of True begin in flags (n,) (a run open before the batch does not begin in
    it) and one past where each ends (n: it reaches the batch's end; 0: the open run ended
    just before the batch): the +1 and -1 steps of ``[is_open, *flags, False]``."""
    n = len(flags)
    if n < 2:
        edges = np.diff(np.concatenate([[is_open], flags, [False]]).astype(np.int8))
        return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    step = np.diff(flags.view(np.int8))  # (n - 1,) in {-1, 0, 1}
    starts = np.flatnonzero(step == 1) + 1
    stops = np.flatnonzero(step == -1) + 1
    if flags[0] and not is_open:
        starts = np.concatenate([[0], starts])
    if is_open and not flags[0]:
        stops = np.concatenate([[0], stops])
    if flags[-1]:
        stops = np.concatenate([stops, [n]])
    return starts, stops


#: below this fraction of flagged rows the segments are reduced over the flagged rows gathered
#: (a few), above it where they lie (no gather of most of the batch)
SPARSE_FLAGS = 0.1


def _segment_reductions(flags: np.ndarray, score: np.ndarray, contrib: np.ndarray | None,
                        first: np.ndarray, stop: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """The peak score (float64) and the contributions' sums (float64, each summed in row order
    in float64) of rows first[k] .. stop[k] - 1 of the disjoint, increasing segments k, which
    together are the flagged rows."""
    n = len(score)
    if int((stop - first).sum()) < SPARSE_FLAGS * n:
        rows = np.flatnonzero(flags)
        at = np.searchsorted(rows, first)  # where each segment starts among them
        peaks = np.maximum.reduceat(score[rows].astype(np.float64), at)
        sums = None if contrib is None else np.add.reduceat(
            np.asarray(contrib)[rows].astype(np.float64), at, axis=0)
        return peaks, sums
    # one reduceat over the batch: the gaps between the segments are reduced too, and dropped
    bounds = np.empty(2 * len(first), np.int64)
    bounds[0::2], bounds[1::2] = first, stop
    if bounds[-1] == n:  # reduceat takes indices below n; the last segment runs to the end
        bounds = bounds[:-1]
    peaks = np.maximum.reduceat(score, bounds)[0::2].astype(np.float64)
    sums = None
    if contrib is not None:  # channel by channel: a column is contiguous in a (C, n) layout
        contrib = np.asarray(contrib)
        sums = np.empty((len(first), contrib.shape[1]))
        for j in range(contrib.shape[1]):
            sums[:, j] = np.add.reduceat(contrib[:, j], bounds, dtype=np.float64)[0::2]
    return peaks, sums


def intervals_start() -> IntervalState:
    return IntervalState(0, -1, None, None, -np.inf, None)


def intervals_update(state: IntervalState, flags: np.ndarray, score: np.ndarray,
                     contrib: np.ndarray | None, time: np.ndarray, final: bool = False
                     ) -> tuple[Intervals, IntervalState]:
    """The flagged intervals that ended within this batch of consecutive rows (and, with
    ``final``, the one still open at the stream's end).

    flags (n,) bool, score (n,), contrib (n, C) or None, time (n,). A run that reaches the
    batch's end stays open in the returned state and continues into the next batch.
    """
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    score = np.asarray(score).reshape(-1)
    n = len(flags)
    if score.shape != (n,) or len(time) != n or (contrib is not None and len(contrib) != n):
        raise DataError(f"{n} flags for {score.size} scores, {len(time)} times and "
                        f"{'no' if contrib is None else len(contrib)} contributions")
    if n == 0 and not final:
        return _no_intervals(time, contrib), state
    is_open = state.start >= 0
    starts, stops = _run_edges(flags, is_open)
    # segment k of the flagged rows of this batch: rows first[k] .. stops[k] - 1
    first = np.concatenate([[0], starts]) if is_open else starts
    if is_open and (n == 0 or not flags[0]):  # the open run ended before this batch
        seg_first, seg_stops = first[1:], stops[1:]
        ended_before = True
    else:
        seg_first, seg_stops = first, stops
        ended_before = False
    if len(seg_first):  # each segment reduced where it lies (no gather of the flagged rows)
        peaks, sums = _segment_reductions(flags, score, contrib, seg_first, seg_stops)
    row0 = state.rows
    time_dtype = np.asarray(time).dtype if n else np.asarray(state.last_time).dtype
    begin = row0 + seg_first.astype(np.int64)
    stop = row0 + seg_stops.astype(np.int64)
    begin_time = np.asarray(time)[seg_first].astype(time_dtype)
    end_time = np.asarray(time)[seg_stops - 1].astype(time_dtype)
    if not len(seg_first):
        peaks = np.zeros(0)
        sums = None if contrib is None else np.zeros((0, np.shape(contrib)[1]))
    if is_open and not ended_before and len(begin):  # the open run goes on in segment 0
        begin[0], begin_time[0] = state.start, state.start_time
        peaks[0] = max(peaks[0], state.peak)
        if sums is not None and state.summed is not None:
            sums[0] += state.summed
    open_state = IntervalState(row0 + n, -1, None, time[n - 1] if n else state.last_time,
                               -np.inf, None)
    if len(begin) and stop[-1] == row0 + n and not final:  # still open at the batch's end
        open_state = IntervalState(row0 + n, int(begin[-1]), begin_time[-1], time[n - 1],
                                   float(peaks[-1]), None if sums is None else sums[-1].copy())
        begin, stop, begin_time, end_time = begin[:-1], stop[:-1], begin_time[:-1], end_time[:-1]
        peaks = peaks[:-1]
        sums = None if sums is None else sums[:-1]
    if ended_before:  # the run open before this batch, first
        begin = np.concatenate([[state.start], begin]).astype(np.int64)
        stop = np.concatenate([[row0], stop]).astype(np.int64)
        begin_time = np.concatenate([np.array([state.start_time], time_dtype), begin_time])
        end_time = np.concatenate([np.array([state.last_time], time_dtype), end_time])
        peaks = np.concatenate([[state.peak], peaks])
        if sums is not None or state.summed is not None:
            width = len(state.summed) if state.summed is not None else sums.shape[1]
            head = state.summed if state.summed is not None else np.zeros(width)
            sums = np.concatenate([head[None], sums if sums is not None
                                   else np.zeros((0, width))])
    return Intervals(begin, stop, begin_time, end_time, peaks, sums), open_state
