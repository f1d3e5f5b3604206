"""Choosing a detector's settings without the labels of the streams it is judged on.

A benchmark with no labelled validation split (SKAB: every labelled row is a test row) can still
choose a setting (a score window, a threshold's risk) honestly by grouped cross-validation: for
each group of streams (SKAB: its experiment folders valve1, valve2, other), the setting is chosen
on the labels of the *other* groups only, and the group's own streams are then flagged with it.
Every stream is scored under a setting that never saw its labels, so the pooled metrics of all
streams are an out-of-sample estimate (the leave-one-group-out protocol).

- ``stream_counts(labels, flags)``: (S, 4) confusion counts tp, fp, tn, fn of each stream.
- ``pooled_rates(counts)``: F1, FAR, MAR of summed counts.
- ``choose_by_group(counts, groups, max_far)``: for each group, the setting with the best pooled
  F1 on the other groups' streams (among the settings whose FAR there is at most ``max_far``).
- ``choose_by_group_with(n_settings, groups, objective)``: the same for any objective of a
  setting on a set of streams (e.g. SKAB's NAB score).

And a rule that reads no label at all, for a detector's default setting:

- ``risk_for_rows(n)``: the POT risk ``1 / n`` of ``n`` fitting rows (one expected false alarm
  among the rows the threshold is fitted on: the rarest rate those rows can still witness).
- ``smallest_detectable_shift(thresholds)``: the score window whose threshold (fitted on normal
  rows) lets the smallest persistent shift through. A shift of ``delta`` (whitened units) that
  lasts the whole window adds about ``window * delta**2`` to the ``"shift"`` score
  (tsssm.anomaly.scores), so the smallest one flagged is ``sqrt(threshold / window)``; a longer
  window helps only while the normal rows' threshold grows more slowly than the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tsssm.errors import DataError


def stream_counts(labels: Sequence[np.ndarray], flags: Sequence[np.ndarray]) -> np.ndarray:
    """(S, 4) int64: tp, fp, tn, fn of each stream's binary labels and flags (one array each)."""
    if len(labels) != len(flags):
        raise DataError(f"{len(labels)} label arrays for {len(flags)} flag arrays")
    out = np.zeros((len(labels), 4), np.int64)
    for i, (y, f) in enumerate(zip(labels, flags)):
        y, f = np.asarray(y).astype(bool).reshape(-1), np.asarray(f).astype(bool).reshape(-1)
        if y.shape != f.shape:
            raise DataError(f"stream {i}: {y.size} labels but {f.size} flags")
        out[i] = [(y & f).sum(), (~y & f).sum(), (~y & ~f).sum(), (y & ~f).sum()]
    return out


def pooled_rates(counts: np.ndarray) -> tuple[float, float, float]:
    """F1, FAR, MAR of counts (..., 4) summed over every axis but the last (0 where undefined)."""
    tp, fp, tn, fn = np.asarray(counts).reshape(-1, 4).sum(axis=0).astype(np.float64)

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else 0.0

    return ratio(2 * tp, 2 * tp + fp + fn), ratio(fp, fp + tn), ratio(fn, fn + tp)


def _group_names(groups: Sequence[str], n_streams: int) -> list[str]:
    if len(groups) != n_streams:
        raise DataError(f"{len(groups)} groups for {n_streams} streams")
    names = list(dict.fromkeys(groups))
    if len(names) < 2:
        raise DataError("choosing by group needs at least two groups of streams")
    return names


def choose_by_group_with(n_settings: int, groups: Sequence[str],
                         objective: Callable[[int, np.ndarray], float]) -> dict[str, int]:
    """For each group: the setting k maximising ``objective(k, others)``, ``others`` the (S,)
    mask of the streams outside the group (ties go to the lower index)."""
    groups = list(groups)
    chosen: dict[str, int] = {}
    for g in _group_names(groups, len(groups)):
        others = np.array([h != g for h in groups])
        values = [objective(k, others) for k in range(n_settings)]
        chosen[g] = max(range(n_settings), key=lambda k: (values[k], -k))
    return chosen


def choose_by_group(counts: np.ndarray, groups: Sequence[str],
                    max_far: float | None = None) -> dict[str, int]:
    """For each group: the index of the setting chosen on the other groups' streams.

    counts: (K settings, S streams, 4) confusion counts (``stream_counts`` of each setting's
    flags); groups: the group of each stream (S,). The chosen setting has the best F1 of the
    other groups' pooled counts, among the settings whose pooled FAR there is at most
    ``max_far`` (all settings when ``max_far`` is None or none qualifies); ties go to the lower
    index. Only the other groups' counts are read: a group's own labels never choose its setting.
    """
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[2] != 4:
        raise DataError(f"counts must be (settings, streams, 4); got shape {counts.shape}")
    groups = list(groups)
    chosen: dict[str, int] = {}
    for g in _group_names(groups, counts.shape[1]):
        others = np.array([h != g for h in groups])
        rates = [pooled_rates(counts[k, others]) for k in range(counts.shape[0])]
        allowed = [k for k, (_, far, _) in enumerate(rates) if max_far is None or far <= max_far]
        allowed = allowed or list(range(counts.shape[0]))
        chosen[g] = max(allowed, key=lambda k: (rates[k][0], -k))
    return chosen


def risk_for_rows(n_rows: int) -> float:
    """POT risk ``1 / n_rows``: one expected exceedance among the ``n_rows`` normal rows a
    threshold is fitted on (a smaller risk is extrapolated past what those rows can show)."""
    if int(n_rows) != n_rows or n_rows < 1:
        raise DataError(f"the number of fitting rows must be a positive integer; got {n_rows!r}")
    return 1.0 / int(n_rows)


def smallest_detectable_shift(thresholds: dict[int, float]) -> tuple[int, dict[int, float]]:
    """The window whose threshold flags the smallest persistent shift, and that shift for each.

    thresholds: {window (rows): threshold of the ``"shift"`` score with that window, fitted on
    normal rows}. A persistent shift of ``delta`` whitened units per observed channel scores
    about ``window * delta**2``, so the smallest shift flagged is ``sqrt(threshold / window)``.
    Returns (the window with the smallest one (ties: the shorter window), {window: shift}).
    No label enters: only the thresholds of normal rows' scores."""
    if not thresholds:
        raise DataError("no windows to choose from")
    shift = {}
    for w, thr in thresholds.items():
        if int(w) != w or w < 1 or not np.isfinite(thr) or thr <= 0:
            raise DataError(f"window {w!r}: threshold {thr!r}; need a positive window and a "
                            "positive finite threshold")
        shift[int(w)] = float(np.sqrt(thr / w))
    best = min(shift, key=lambda w: (shift[w], w))
    return best, shift
