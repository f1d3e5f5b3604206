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
    contrib, whitened, observed = terms
    new = window_inputs(np.asarray(contrib), np.asarray(whitened), np.asarray(observed), kind)
    x = np.concatenate([state.tail, new]) if len(state.tail) else new  # (k + n, K)
    base = state.received - len(state.tail)  # stream row of x[0]
    received = state.received + len(new)
    ahead = 0 if align == "trailing" else window // 2  # rows after t in t's window
    ready = received if final else max(state.emitted, received - ahead)
    t = np.arange(state.emitted, ready)
    stop = np.minimum(t + 1 + ahead, received)
    start = np.maximum(0, stop - window)
    cs = np.empty((len(x) + 1, x.shape[1]))
    cs[0] = 0.0
    np.cumsum(x, axis=0, out=cs[1:])
    score, out = window_values(cs[stop - base] - cs[start - base], kind, fill)
    # the rows a later row's window can still reach: from ready + 1 + ahead - window on, and
    # (centered) the last `window` rows, which the windows cut at the stream's end start from
    keep = max(0, min(ready + 1 + ahead - window, received - window if ahead else received))
    tail = x[keep - base :] if not final else x[:0]
    return score, out, WindowState(received, ready, np.ascontiguousarray(tail))


class Interval(NamedTuple):
    """One maximal run of flagged rows, as :class:`tsssm.anomaly.attribution.FlaggedInterval`
    with the times of its first and last rows."""

    start: int  # first row (index in the stream)
    stop: int  # one past the last row
    start_time: Any
    end_time: Any
    peak: float
    summed: np.ndarray | None  # (C,) summed contributions over the interval, None without them

    def shares(self, channels: Sequence[str]) -> dict[str, float]:
        return {} if self.summed is None else interval_shares(self.summed, channels)


class IntervalState(NamedTuple):
    """The open flagged run of a stream (``start`` < 0: none) after ``rows`` rows."""

    rows: int
    start: int
    start_time: Any
    last_time: Any  # the time of the last row seen
    peak: float
    summed: np.ndarray | None  # (C,) or None (no contributions)


def intervals_start() -> IntervalState:
    return IntervalState(0, -1, None, None, -np.inf, None)


def intervals_update(state: IntervalState, flags: np.ndarray, score: np.ndarray,
                     contrib: np.ndarray | None, time: np.ndarray, final: bool = False
                     ) -> tuple[list[Interval], IntervalState]:
    """The flagged intervals that ended within this batch of consecutive rows (and, with
    ``final``, the one still open at the stream's end).

    flags (n,) bool, score (n,), contrib (n, C) or None, time (n,). A run that reaches the
    batch's end stays open in the returned state and continues into the next batch.
    """
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    n = len(flags)
    if score.shape != (n,) or len(time) != n or (contrib is not None and len(contrib) != n):
        raise DataError(f"{n} flags for {score.size} scores, {len(time)} times and "
                        f"{'no' if contrib is None else len(contrib)} contributions")
    if n == 0 and not final:
        return [], state
    is_open = state.start >= 0
    edges = np.diff(np.concatenate([[is_open], flags, [False]]).astype(np.int8))
    starts = np.flatnonzero(edges == 1)  # runs that begin in this batch
    stops = np.flatnonzero(edges == -1)  # one past each run's last row (n: reaches the end)
    # segment k of the flagged rows of this batch: rows first[k] .. stops[k] - 1
    first = np.concatenate([[0], starts]) if is_open else starts
    if is_open and (n == 0 or not flags[0]):  # the open run ended before this batch
        seg_first, seg_stops = first[1:], stops[1:]
        ended_before = True
    else:
        seg_first, seg_stops = first, stops
        ended_before = False
    if len(seg_first):
        masked = np.where(flags, score, -np.inf)
        peaks = np.maximum.reduceat(masked, seg_first)
        sums = None if contrib is None else np.add.reduceat(
            np.where(flags[:, None], np.asarray(contrib, np.float64), 0.0), seg_first, axis=0)
    out: list[Interval] = []
    row0 = state.rows
    if ended_before:
        out.append(Interval(state.start, row0, state.start_time, state.last_time, state.peak,
                            state.summed))
    carried = is_open and not ended_before  # the open run goes on in segment 0
    for k in range(len(seg_first)):
        a, b = int(seg_first[k]), int(seg_stops[k])
        peak = float(peaks[k])
        summed = None if sums is None else sums[k]
        begin, begin_time = row0 + a, time[a]
        if k == 0 and carried:
            peak = max(peak, state.peak)
            if summed is not None and state.summed is not None:
                summed = summed + state.summed
            begin, begin_time = state.start, state.start_time
        if b == n and not final:  # still open at the batch's end
            last = time[n - 1] if n else state.last_time
            return out, IntervalState(row0 + n, begin, begin_time, last, peak, summed)
        out.append(Interval(begin, row0 + b, begin_time, time[b - 1], peak, summed))
    last = time[n - 1] if n else state.last_time
    return out, IntervalState(row0 + n, -1, None, last, -np.inf, None)
