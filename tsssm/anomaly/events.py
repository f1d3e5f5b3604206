"""Metrics over time ranges, not points: event recall/precision with detection delay, the
threshold-free range-based VUS-PR, and the NAB score of SKAB's change-point task.

None of these inflate a detector the way point-adjusted F1 does (one flagged point crediting a
whole event); they are reported beside the point metrics of ``tsssm.anomaly.metrics``.

Every function takes one array per stream (a list), or one array for a single stream, so ranges
never run across the end of one file into the next.

- ``event_metrics(labels, flags)``: a labelled event (maximal run of 1s) is detected when at
  least one of its rows is flagged; event recall = detected / labelled events, event precision =
  flagged runs that overlap a labelled event / flagged runs, and the detection delay of a detected
  event = rows from its start to its first flagged row.
- ``vus_pr(labels, scores, max_buffer)``: the volume under the range-based precision-recall
  surface (Paparrizos et al., PVLDB 15(11) 2022, "Volume Under the Surface"): for every buffer
  length ``l = 0..max_buffer`` the labels get soft edges of ``l // 2`` rows, ``sqrt(1 - d / l)``
  at distance ``d`` outside an event; at 250 thresholds sampled uniformly from the sorted scores
  the range precision is ``sum(soft label * flag) / flagged``, the range recall is
  ``min(1, sum(soft label * flag) / P) * (fraction of soft events with a flagged row)`` with
  ``P`` the mean of the binary and the soft positive counts; the area under each curve (trapezoids
  over recall, precision 1 at recall 0) is averaged over the buffer lengths.
- ``nab_score(changepoints, flags, time, window)``: SKAB's change-point task scored as SKAB's
  evaluator does (waico/SKAB ``core/metrics.py``, ``chp_score(metric="nab",
  window_width="60s", anomaly_window_destination="righter")``): the predicted change points are
  the rows where the flags change (and the first row if it is flagged); every true change point
  opens a detection window ``[t_cp, t_cp + window]`` (inclusive; where two overlap, the later
  one starts at the end of the earlier); the first prediction inside a window scores
  ``A_fp + (A_tp - A_fp) / 2 * (1 - tanh(x) / tanh(pi / 2))`` with ``x`` running from ``-pi/2``
  at the window's start to ``pi/2`` at its end (on a grid of 1000 steps), further predictions in
  a window are ignored, a prediction outside every window costs ``A_fp`` and a window without a
  prediction ``A_fn``. The sum over streams is normalised to ``100 (S - S_null) / (S_perfect -
  S_null)`` with ``S_perfect = n_windows A_tp`` and ``S_null = n_windows A_fn``, per profile
  (standard: A_tp 1, A_fp -0.11, A_fn -1; low FP: A_fp -0.22; low FN: A_fn -2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tsssm.errors import DataError

NAB_PROFILES: dict[str, tuple[float, float, float]] = {
    # name: (A_tp, A_fp, A_fn)
    "standard": (1.0, -0.11, -1.0),
    "low_fp": (1.0, -0.22, -1.0),
    "low_fn": (1.0, -0.11, -2.0),
}
#: grid of SKAB's scaled sigmoid over a detection window
_NAB_GRID = 1000
#: thresholds sampled per range-PR curve (as the VUS reference implementation)
VUS_THRESHOLDS = 250


def _streams(x: Any, what: str) -> list[np.ndarray]:
    if isinstance(x, (list, tuple)):
        return [np.asarray(a).reshape(-1) for a in x]
    return [np.asarray(x).reshape(-1)]


def _binary(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise DataError(f"{what} must be binary 0/1; found values such as "
                        f"{a[~np.isin(a, (0, 1))][:3].tolist()}")
    return a.astype(bool)


def _pairs(a: Any, b: Any, what_a: str, what_b: str) -> list[tuple[np.ndarray, np.ndarray]]:
    xs, ys = _streams(a, what_a), _streams(b, what_b)
    if len(xs) != len(ys):
        raise DataError(f"{len(xs)} streams of {what_a} but {len(ys)} of {what_b}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape:
            raise DataError(f"stream {i}: {what_a} ({x.size} rows) and {what_b} ({y.size} rows) "
                            "differ in length")
    return list(zip(xs, ys))


def runs(mask: np.ndarray) -> np.ndarray:
    """(start, stop) row ranges (stop exclusive) of the maximal runs of True.  -> (k, 2)"""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1)


# ------------------------------------------------------------------------------ events
def event_metrics(labels: Any, flags: Any) -> dict[str, float]:
    """Event recall, precision and F1, and the detection delay in rows (see the module doc).

    Returns {"event_recall", "event_precision", "event_f1", "delay_mean", "delay_median",
    "n_events", "n_detected", "n_flagged_runs"}; delays are over the detected events (0.0 when
    none is detected; ``n_detected`` tells the cases apart).
    """
    n_events = detected = n_runs = n_true_runs = 0
    delays: list[int] = []
    for lab, flg in _pairs(labels, flags, "anomaly labels", "flags"):
        lab, flg = _binary(lab, "anomaly labels"), _binary(flg, "flags")
        for start, stop in runs(lab):
            n_events += 1
            hit = np.flatnonzero(flg[start:stop])
            if hit.size:
                detected += 1
                delays.append(int(hit[0]))
        for start, stop in runs(flg):
            n_runs += 1
            n_true_runs += bool(lab[start:stop].any())
    recall = detected / n_events if n_events else 0.0
    precision = n_true_runs / n_runs if n_runs else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "event_recall": recall,
        "event_precision": precision,
        "event_f1": f1,
        "delay_mean": float(np.mean(delays)) if delays else 0.0,
        "delay_median": float(np.median(delays)) if delays else 0.0,
        "n_events": float(n_events),
        "n_detected": float(detected),
        "n_flagged_runs": float(n_runs),
    }


# ------------------------------------------------------------------------------ VUS-PR
def soft_labels(labels: np.ndarray, buffer: int) -> np.ndarray:
    """Binary labels with soft edges of ``buffer // 2`` rows on both sides of every event:
    ``sqrt(1 - d / buffer)`` at distance d (1..buffer//2) outside it, clipped to 1 where edges of
    neighbouring events overlap. ``buffer <= 1``: the labels unchanged (as floats)."""
    y = _binary(np.asarray(labels).reshape(-1), "anomaly labels").astype(np.float64)
    if buffer <= 1:
        return y
    half, n = buffer // 2, y.size
    out = y.copy()
    for start, stop in runs(y > 0):
        d = np.arange(1, half + 1)
        after = stop - 1 + d
        keep = after < n
        out[after[keep]] += np.sqrt(1.0 - d[keep] / buffer)
        before = start - d
        keep = before >= 0
        out[before[keep]] += np.sqrt(1.0 - d[keep] / buffer)
    return np.minimum(out, 1.0)


def _range_pr_auc(streams: list[tuple[np.ndarray, np.ndarray]], buffer: int) -> float:
    """Area under the range-based PR curve of concatenated streams for one buffer length."""
    binary = np.concatenate([lab for lab, _ in streams]).astype(np.float64)
    soft = np.concatenate([soft_labels(lab, buffer) for lab, _ in streams])
    score = np.concatenate([s for _, s in streams]).astype(np.float64)
    # the soft events (runs of soft label > 0) and the largest score inside each
    event_max = []
    for lab, s in streams:
        for start, stop in runs(soft_labels(lab, buffer) > 0):
            event_max.append(float(s[start:stop].max()))
    event_max = np.sort(np.asarray(event_max))
    n = score.size
    order = np.argsort(-score, kind="stable")
    sorted_scores = score[order]
    cum_soft = np.cumsum(soft[order])
    thresholds = sorted_scores[np.linspace(0, n - 1, VUS_THRESHOLDS).astype(np.int64)]
    # rows flagged at threshold t: all with score >= t (a prefix of the descending order)
    count = np.searchsorted(-sorted_scores, -thresholds, side="right")
    tp = cum_soft[count - 1]
    positives = 0.5 * (binary.sum() + soft.sum())
    existence = (event_max.size - np.searchsorted(event_max, thresholds, side="left")) / max(
        event_max.size, 1)
    recall = np.minimum(tp / positives, 1.0) * existence
    precision = tp / count
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision])
    return float(np.sum((r[1:-1] - r[:-2]) * (p[1:] + p[:-1]) / 2))


def vus_pr(labels: Any, scores: Any, max_buffer: int = 60) -> float:
    """Volume under the range-based PR surface over buffer lengths 0..max_buffer (module doc).

    labels: binary, scores: finite, one array per stream (or one array). Returns 0.0 when there
    is no labelled event or every score is equal (no ranking: undefined).
    """
    pairs = []
    for lab, s in _pairs(labels, scores, "anomaly labels", "scores"):
        s = s.astype(np.float64)
        if not np.isfinite(s).all():
            raise DataError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite values")
        pairs.append((_binary(lab, "anomaly labels"), s))
    if not pairs or not any(lab.any() for lab, _ in pairs):
        return 0.0
    allscores = np.concatenate([s for _, s in pairs])
    if allscores.size == 0 or allscores.min() == allscores.max():
        return 0.0
    if int(max_buffer) != max_buffer or max_buffer < 0:
        raise DataError(f"max_buffer must be a non-negative integer; got {max_buffer!r}")
    return float(np.mean([_range_pr_auc(pairs, b) for b in range(int(max_buffer) + 1)]))


# ------------------------------------------------------------------------------ NAB
def predicted_changepoints(flags: np.ndarray) -> np.ndarray:
    """Rows where binary flags change (and row 0 if flagged), as SKAB derives change points
    from an outlier detector's flags: ``|diff(flags)|`` with the first entry ``flags[0]``."""
    f = _binary(np.asarray(flags).reshape(-1), "flags").astype(np.int8)
    if f.size == 0:
        return np.zeros(0, dtype=bool)
    out = np.zeros(f.size, dtype=bool)
    out[0] = bool(f[0])
    out[1:] = f[1:] != f[:-1]
    return out


def _seconds(time: np.ndarray) -> np.ndarray:
    t = np.asarray(time).reshape(-1)
    if np.issubdtype(t.dtype, np.datetime64):
        return (t.astype("datetime64[ns]").astype(np.int64)) / 1e9
    return t.astype(np.float64)


def _windows(cp_times: np.ndarray, width: float) -> list[list[float]]:
    """[start, end] detection windows to the right of each change point; an overlapping later
    window starts where the earlier one ends (SKAB's "cut right window")."""
    wins = [[float(t), float(t) + width] for t in np.sort(cp_times)]
    for i in range(len(wins) - 1):
        if wins[i][1] >= wins[i + 1][0]:
            wins[i + 1][0] = wins[i][1]
    return wins


def _scaled_sigmoid(position: float, a_tp: float, a_fp: float) -> float:
    """SKAB's "improved" NAB scoring function at a relative position in [0, 1] of a window."""
    x = np.linspace(-math.pi / 2, math.pi / 2, _NAB_GRID)
    idx = min(int(position * _NAB_GRID), _NAB_GRID - 1)
    return float((a_tp - a_fp) / 2 * (1 - math.tanh(x[idx]) / math.tanh(math.pi / 2)) + a_fp)


def nab_counts(changepoints: np.ndarray, predicted: np.ndarray, time: np.ndarray,
               window: float) -> tuple[list[float], int, int, int]:
    """One stream: (relative positions of the first prediction in each hit window, false
    positives, missed windows, windows)."""
    t = _seconds(time)
    cps = t[_binary(np.asarray(changepoints).reshape(-1), "change-point labels")]
    preds = t[_binary(np.asarray(predicted).reshape(-1), "predicted change points")]
    wins = _windows(cps, window)
    hits: list[float] = []
    missed = 0
    inside = np.zeros(preds.size, dtype=bool)
    for start, end in wins:
        found = (preds >= start) & (preds <= end)
        inside |= found
        if found.any():
            first = preds[found][0]
            hits.append((first - start) / (end - start) if end > start else 0.0)
        else:
            missed += 1
    return hits, int((~inside).sum()), missed, len(wins)


def nab_score(changepoints: Any, flags: Any, time: Any, window: float = 60.0,
              profiles: Sequence[str] = ("standard", "low_fp", "low_fn")) -> dict[str, float]:
    """SKAB's NAB scores (module doc) for binary ``flags`` against ``changepoints`` labels.

    changepoints, flags, time: one array per stream (time as datetime64 or seconds); window in
    seconds. Returns {"nab_<profile>": score in (-inf, 100]} plus "nab_missed", "nab_fp" and
    "nab_windows" (counts, as floats). With no change point at all the scores are 0.0.
    """
    cps, fls, tms = _streams(changepoints, "cp"), _streams(flags, "flags"), _streams(time, "time")
    if not len(cps) == len(fls) == len(tms):
        raise DataError("change points, flags and time must have one array per stream each")
    hits: list[float] = []
    fp = missed = n_windows = 0
    for cp, fl, tm in zip(cps, fls, tms):
        if not cp.size == fl.size == tm.size:
            raise DataError(f"a stream has {cp.size} change-point labels, {fl.size} flags and "
                            f"{tm.size} timestamps; they must have one row each")
        h, f, m, w = nab_counts(cp, predicted_changepoints(fl), tm, window)
        hits += h
        fp, missed, n_windows = fp + f, missed + m, n_windows + w
    out: dict[str, float] = {}
    for name in profiles:
        if name not in NAB_PROFILES:
            raise DataError(f"unknown NAB profile {name!r}; choose from {sorted(NAB_PROFILES)}")
        a_tp, a_fp, a_fn = NAB_PROFILES[name]
        score = a_fp * fp + a_fn * missed + sum(_scaled_sigmoid(h, a_tp, a_fp) for h in hits)
        perfect, null = n_windows * a_tp, n_windows * a_fn
        out[f"nab_{name}"] = (100.0 * (score - null) / (perfect - null)) if n_windows else 0.0
    out.update({"nab_missed": float(missed), "nab_fp": float(fp), "nab_windows": float(n_windows)})
    return out
