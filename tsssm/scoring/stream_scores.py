"""From a model's step terms to a stream's scores, contributions and flags, in pieces.

What the whole-stream path (tsssm.tasks.evaluate.predict_stream, then the threshold) computes
from the step terms of every row, :class:`StreamScores` computes from consecutive batches of them
with a small carried state, so the batch boundaries change nothing:

- the window score (``task.window``: trailing or centered, mean or shift) and each channel's
  additive share of it, by :func:`tsssm.anomaly.streaming.window_update` (O(window) rows
  carried; a centered window's scores come out ``window // 2`` rows late);
- the flags: the bundle's threshold (a streaming rule such as SPOT carries its recursion), or,
  with per-stream thresholds (``task.threshold.scope=per_stream``), the same rule refitted on the
  stream's own first ``threshold_rows`` scores, exactly as ``tsssm score`` does for a file read
  whole: those scores are held until the stream has more rows than that, then flagged together;
  a stream that ends first is flagged by the pooled training threshold, with a warning;
- other row-aligned arrays (the scaled rows and forecasts kept for figures) are delayed with the
  scores so that every output row carries its own;
- with ``task.window.reanchor`` (the bundle's ``spec.reanchor``), the rows' whitened innovations
  travel with them too, and once the threshold in force is known the score and contributions are
  those of the re-anchored shift score (tsssm.anomaly.reanchor.ReanchoredShift, its reference
  and alarm state carried from piece to piece), as ``tsssm train`` computes them for the whole
  stream; the threshold (fitted on the plain score) flags them.

:class:`ScoredRows` is what comes out: rows ``start .. start + n - 1`` of the stream, in order.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from tsssm.anomaly.reanchor import ReanchoredShift, require_fixed_threshold
from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.streaming import RunningWindow, WindowState, window_start, window_update
from tsssm.anomaly.thresholds import Threshold, threshold_from_dict

log = logging.getLogger("tsssm")

#: fields of ScoredRows that travel with the scores (row-aligned, (n, C))
EXTRAS = ("scaled", "mean", "var")


class ScoredRows(NamedTuple):
    """Scores of consecutive rows of a stream: rows ``start .. start + len(score) - 1``."""

    start: int  # index of the first row in the stream (0-based, after any inserted gap rows)
    score: np.ndarray  # (n,) float32 anomaly score
    flag: np.ndarray  # (n,) bool: score above the threshold in force
    #: with Scorer(moments=True): the scaled rows and their one-step predictive mean and
    #: variance (n, C), float32, in the scaler's units (None otherwise)
    scaled: np.ndarray | None = None
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    #: with Scorer(contributions=True): each channel's additive share of the score (n, C)
    #: float32 (the ``contrib:<channel>`` columns; a row's shares sum to its score)
    contrib: np.ndarray | None = None
    #: the threshold in force at each row (n,) float32, when it is not the bundle's one value
    #: (a streaming rule such as SPOT, or a per-stream threshold): the ``threshold`` column
    level: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.score)


def empty_rows(start: int, n_channels: int, contrib: bool = False) -> ScoredRows:
    return ScoredRows(start, np.empty(0, np.float32), np.empty(0, bool),
                      contrib=np.empty((0, n_channels), np.float32) if contrib else None)



def concat_rows(parts: list[ScoredRows], start: int, n_channels: int,
                contrib: bool = False) -> ScoredRows:
    """One ScoredRows of consecutive pieces (the first's start, or ``start`` when empty)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_rows(start, n_channels, contrib)
    if len(parts) == 1:
        return parts[0]

    def cat(field: str):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return ScoredRows(parts[0].start, *(cat(f) for f in ScoredRows._fields[1:]))


class _Fifo:
    """Row-aligned arrays waiting for their scores: push n rows, pop the oldest m."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def push(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays and len(next(iter(arrays.values()))):
            self.parts.append(arrays)

    def pop(self, n: int) -> dict[str, np.ndarray]:
        taken: list[dict[str, np.ndarray]] = []
        while n > 0 and self.parts:
            head = self.parts[0]
            size = len(next(iter(head.values())))
            if size <= n:
                taken.append(self.parts.pop(0))
                n -= size
            else:
                taken.append({k: v[:n] for k, v in head.items()})
                self.parts[0] = {k: v[n:] for k, v in head.items()}
                n = 0
        if not taken:
            return {}
        return {k: np.concatenate([t[k] for t in taken]) for k in taken[0]}


class StreamScores:
    """Window scores, contributions and flags of one stream fed step terms in pieces.

    spec: the bundle's ScoreSpec; threshold: the bundle's fitted threshold; threshold_rows > 0:
    per-stream thresholds (the rule refitted on the stream's first ``threshold_rows`` scores);
    contributions: also return each channel's share of the score.
    """

    def __init__(self, spec: ScoreSpec, threshold: Threshold, n_channels: int, *,
                 threshold_rows: int = 0, contributions: bool = False) -> None:
        self.spec = spec
        self.pooled = threshold
        self.n_channels = n_channels
        self.threshold_rows = int(threshold_rows)
        self.contributions = contributions
        if spec.reanchor is not None:
            require_fixed_threshold(threshold, "the bundle's ")
        self.reset()

    def reset(self, source: str = "the stream") -> None:
        self.source = source
        self._window_state = window_start(self.n_channels, self.spec.window_kind)
        #: the window while samples come one by one (push_one); the batch path's state then
        #: lives in it, handed back by the ``_window`` property
        self._live: RunningWindow | None = None
        self._extras = _Fifo()
        #: the threshold flagging this stream (None while the per-stream one waits for rows)
        self.threshold: Threshold | None = None if self.threshold_rows else self.pooled
        self._carry = None  # a streaming threshold's recursion
        self._held: list[tuple[np.ndarray, np.ndarray, dict]] = []  # scores before the fit
        self._n_held = 0
        self._out = 0  # rows returned
        #: the re-anchored score's state (spec.reanchor), made once the threshold is known
        self._reanchor: ReanchoredShift | None = None

    @property
    def _window(self) -> WindowState:
        """The batch path's window state (taken back from the live window, if one runs)."""
        if self._live is not None:
            self._window_state, self._live = self._live.to_state(), None
        return self._window_state

    @_window.setter
    def _window(self, state: WindowState) -> None:
        self._live = None
        self._window_state = state

    @property
    def pending(self) -> int:
        """Rows pushed whose scores have not come out yet (window lookahead, threshold fit)."""
        received = self._live.received if self._live is not None else \
            self._window_state.received
        return received - self._out

    @property
    def threshold_note(self) -> str:
        """Which threshold flags this stream, in words."""
        moving = " (initially; it follows the stream)" if self.pooled.follows_stream else ""
        if not self.threshold_rows:
            return f"threshold {self.pooled.value:.3g}{moving}"
        if self.threshold is None or self.threshold is self.pooled:
            return (f"threshold per stream: the pooled training threshold "
                    f"{self.pooled.value:.3g}{moving} (the stream is not longer than the "
                    f"{self.threshold_rows} rows its own is fitted on)")
        return (f"threshold per stream {self.threshold.value:.3g}{moving}: the model's "
                f"{self.pooled.name} rule refitted on this stream's first "
                f"{self.threshold_rows} scores (the bundle stores no threshold for a new stream)")

    def push(self, terms: tuple, extras: dict[str, np.ndarray] | None = None) -> ScoredRows:
        """Step terms (contrib, whitened, observed) (n, C) of the next rows, and row-aligned
        arrays to return with their scores. Returns the rows that became ready."""
        return self._advance(terms, extras, final=False)

    def can_push_one(self) -> bool:
        """Whether :meth:`push_one` takes the next row (its score comes out with it)."""
        if self._live is not None:
            return True
        spec, state = self.spec, self._window_state
        return not (self.threshold is None or state.emitted != state.received
                    or (spec.window > 1 and spec.align != "trailing") or self._extras.parts)

    def push_one(self, contrib: np.ndarray, whitened: np.ndarray, observed: np.ndarray
                 ) -> tuple[float, bool, np.ndarray] | None:
        """One row's step terms (C,) -> (score, flag, contrib (C,)), when its score comes out
        at once (a trailing window, a threshold in force, no extras to delay); else None and
        nothing changes (use :meth:`push`)."""
        spec = self.spec
        if not self.can_push_one():
            return None
        live = self._live
        if live is None:  # the batch path's window continues sample by sample
            live = self._live = RunningWindow.from_state(self._window, spec.window,
                                                         spec.window_kind, self.n_channels)
        score, contrib = live.step(contrib, whitened, observed)
        if spec.reanchor is not None:
            s, c = self._reanchored(np.asarray(whitened, np.float64)[None],
                                    np.asarray(observed, bool)[None], True)
            score, contrib = float(s[0]), c[0]
        if self.threshold.follows_stream:
            levels, self._carry = self.threshold.levels_update(np.array([score]), self._carry)
            flag = score > float(levels[0])
        else:
            flag = score > self.threshold.value
        self._out += 1
        return score, bool(flag), contrib

    def finish(self) -> ScoredRows:
        """The stream's end: every row still waiting."""
        C = self.n_channels
        none = (np.zeros((0, C)), np.zeros((0, C)), np.zeros((0, C), bool))
        out = self._advance(none, None, final=True)
        if not self._held:
            return out
        log.warning("%s has %d rows, not more than the %d its own threshold is fitted on; using "
                    "the pooled training threshold", self.source, self._n_held,
                    self.threshold_rows)
        self.threshold = self.pooled
        return concat_rows([out, self._release()], self._out, C, self.contributions)

    # ------------------------------------------------------------------ internals
    def push_scores(self, score: np.ndarray, contrib: np.ndarray | None) -> ScoredRows:
        """The trailing window scores (n,) and contributions (n, C) (None without
        contributions) of the next rows, computed elsewhere (tsssm.scoring.device_window: on
        the model's device); only the threshold is applied here. Not to be mixed with
        :meth:`push` within a stream (each carries its own window)."""
        if self.spec.window > 1 and self.spec.align != "trailing":
            raise ValueError("push_scores takes trailing windows only")
        if self.spec.reanchor is not None:
            raise ValueError("push_scores takes plain scores only (no task.window.reanchor)")
        w = self._window
        n = len(score)
        self._window = w._replace(received=w.received + n, emitted=w.emitted + n)
        if contrib is None:
            contrib = np.zeros((n, 0), np.float32)
        return self._threshold_rows(score, contrib, {})

    def _advance(self, terms: tuple, extras: dict | None, final: bool) -> ScoredRows:
        spec = self.spec
        extras = extras or {}
        if spec.reanchor is not None:  # the re-anchored score needs them once flagged
            extras = {**extras, "_u": np.asarray(terms[1], np.float64),
                      "_o": np.asarray(terms[2], bool)}
        self._extras.push(extras)
        score, contrib, self._window = window_update(self._window, terms, spec.window,
                                                     spec.window_kind, spec.align, final)
        ext = self._extras.pop(len(score))
        return self._threshold_rows(score, contrib, ext)

    def _threshold_rows(self, score: np.ndarray, contrib: np.ndarray, ext: dict) -> ScoredRows:
        if self.threshold is None:
            if len(score):
                self._held.append((score, contrib, ext))
            self._n_held += len(score)
            if self._n_held <= self.threshold_rows:
                return empty_rows(self._out, self.n_channels, self.contributions)
            scores = np.concatenate([h[0] for h in self._held])
            rule = self.pooled.to_dict()
            self.threshold = threshold_from_dict(
                {"name": rule["name"], "params": rule["params"]}).fit(
                scores[: self.threshold_rows])
            return self._release()
        return self._flag(score, contrib, ext)

    def _release(self) -> ScoredRows:
        held, self._held, self._n_held = self._held, [], 0
        if not held:
            return empty_rows(self._out, self.n_channels, self.contributions)
        score = np.concatenate([h[0] for h in held])
        contrib = np.concatenate([h[1] for h in held])
        ext = {k: np.concatenate([h[2][k] for h in held]) for k in held[0][2]}
        return self._flag(score, contrib, ext)

    def _flag(self, score: np.ndarray, contrib: np.ndarray, ext: dict) -> ScoredRows:
        start = self._out
        if len(score) == 0:
            return empty_rows(start, self.n_channels, self.contributions)
        if self.spec.reanchor is not None:
            score, re_contrib = self._reanchored(ext.pop("_u"), ext.pop("_o"),
                                                 self.contributions)
            contrib = re_contrib if re_contrib is not None else contrib
        level = None
        if self.threshold.follows_stream:
            levels, self._carry = self.threshold.levels_update(score, self._carry)
            flag = score > levels
            level = levels.astype(np.float32)
        else:
            flag = score > self.threshold.value
            if self.threshold_rows:
                level = np.full(len(score), self.threshold.value, np.float32)
        self._out += len(score)
        return ScoredRows(start, score.astype(np.float32), flag,
                          *(ext.get(k) for k in EXTRAS),
                          contrib=contrib.astype(np.float32, copy=False)
                          if self.contributions else None,
                          level=level)

    def _reanchored(self, whitened: np.ndarray, observed: np.ndarray, contributions: bool
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The re-anchored shift scores (n,) (and contributions (n, C)) of the next rows'
        whitened innovations and observed masks (n, C), around the threshold in force."""
        if self._reanchor is None:
            self._reanchor = ReanchoredShift(self.n_channels, float(self.threshold.value),
                                             self.spec.window, self.spec.reanchor)
        score, contrib = self._reanchor.update(whitened[None], observed[None], contributions)
        return score[0], None if contrib is None else contrib[0]
