"""Plotly figure builders for forecasts, anomaly scores, attributions and method comparisons.

Pure functions from arrays to ``plotly.graph_objects.Figure``; the only I/O is in ``save_html``
(one self-contained figure) and ``save_report`` (every figure of a run in one HTML file with a
single embedded copy of plotly.js, gzipped: 2.0 MB instead of 4.8), both of which open offline,
e.g. as MLflow artifacts, downloaded or in place. The dashboard (``dashboards/``) draws the same
figures.

What a browser draws depends on how a figure serialises, so every figure here:
- converts time to ISO strings itself (``datetime64`` of any unit, ms or finer kept) and sets
  every x axis' ``type`` explicitly. plotly.js otherwise guesses the axis type from the first
  trace that has data: a legend-only trace with ``x=[None]`` made it "linear", after which no
  date string could be placed; and numpy ``datetime64[ns]`` scalars (shape corners) serialise as
  integer nanoseconds, which read as 1.58e18 on a linear axis and as the year 50 million on a
  date axis;
- sends values as float64 arrays (plotly encodes them as typed arrays, which plotly.js >= 2.28
  decodes; NaN draws as a gap), never int64 (plotly.js has no 64-bit integer arrays); a report
  re-encodes them as float32 where no value moves by more than a millionth of its array's range.

Long series are decimated for display: each trace keeps the minimum and maximum sample of each
of ~``max_points / 2`` buckets (and one missing sample of a bucket that has any, so gaps stay
visible), which draws the same envelope as every sample would at screen resolution. A decimated
figure says so in its subtitle; ``window`` restricts a figure to a time range first, so a viewer
can re-query the full data at any zoom. ``time`` may be numpy datetime64 or numbers; None means
0, 1, 2, ...
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from tsssm.errors import DataError

ACTUAL_COLOR = "#1f2937"
PRED_COLOR = "#2563eb"
BAND_COLOR = "rgba(37, 99, 235, 0.18)"
SCORE_COLOR = "#2563eb"
THRESHOLD_COLOR = "#dc2626"
LABEL_COLOR = "rgba(245, 158, 11, 0.25)"
FLAG_COLOR = "#dc2626"
#: colours of overlaid runs (plotly's default qualitative palette)
SERIES_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692",
                 "#b6e880", "#ff97ff", "#fecb52")
#: labelled intervals drawn as shaded rectangles at most; closer ones are merged beyond that
MAX_SHAPES = 300


# -- inputs ------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _time_axis(time: Any, n: int) -> np.ndarray:
    """The time of each of ``n`` steps: datetime64 kept, anything else as float64."""
    if time is None:
        return np.arange(n, dtype=np.float64)
    t = _np(time).reshape(-1)
    if t.size != n:
        raise DataError(f"time axis has {t.size} entries but the series has {n} steps")
    if np.issubdtype(t.dtype, np.datetime64):
        return t
    if t.dtype == object and t.size and isinstance(t[0], np.datetime64 | str):
        try:
            return t.astype("datetime64[ns]")
        except ValueError as err:
            raise DataError(f"time axis: cannot read {t[0]!r} as a date ({err})") from err
    try:
        return t.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"time axis must be datetime64 or numeric, got {t.dtype}") from err


def _axis_type(t: np.ndarray) -> str:
    return "date" if np.issubdtype(t.dtype, np.datetime64) else "linear"


def _date_unit(t: np.ndarray) -> str:
    """The coarsest of s / ms / us that shows every timestamp in ``t`` exactly."""
    ns = t.astype("datetime64[ns]").astype(np.int64)
    for unit, step in (("s", 10**9), ("ms", 10**6)):
        if not (ns % step).any():
            return unit
    return "us"  # plotly.js resolves 0.1 ms; finer digits would be noise


def _x(t: np.ndarray) -> np.ndarray | list:
    """What a trace's x (or a shape's x0/x1) should hold: ISO strings for dates (NaT as None),
    float64 otherwise."""
    if not np.issubdtype(t.dtype, np.datetime64):
        return np.asarray(t, dtype=np.float64)
    out = np.datetime_as_string(t, unit=_date_unit(t)).astype(object)
    out[np.isnat(t)] = None
    return out


def _x1(t: np.ndarray, i: int) -> Any:
    """One time value of ``t`` as a shape coordinate (a string or a float)."""
    v = _x(t[i : i + 1])[0]
    return v if isinstance(v, str) or v is None else float(v)


def _as_2d(x: Any, what: str, n: int | None = None) -> np.ndarray:
    arr = _np(x).astype(np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{what} must be (T, C) or (T,); got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{what} has {arr.shape[0]} steps, expected {n}")
    return arr


def _window_slice(t: np.ndarray, window: tuple[Any, Any] | None) -> slice:
    """Rows of the (sorted) time axis inside ``window`` = (start, end), with one row either
    side so lines reach the edges of the view; the whole axis when window is None."""
    if window is None:
        return slice(0, t.size)
    lo, hi = window
    if np.issubdtype(t.dtype, np.datetime64):
        lo, hi = np.datetime64(lo, "ns"), np.datetime64(hi, "ns")
        key = t.astype("datetime64[ns]")
    else:
        lo, hi, key = float(lo), float(hi), t
    if lo > hi:
        lo, hi = hi, lo
    a = int(np.searchsorted(key, lo, side="left"))
    b = int(np.searchsorted(key, hi, side="right"))
    return slice(max(0, a - 1), min(t.size, b + 1))


# -- decimation --------------------------------------------------------------------------------
def bucket_size(n: int, max_points: int) -> int:
    """Samples per bucket so that a min/max decimation of ``n`` samples keeps <= max_points."""
    return max(1, math.ceil(n / max(1, max_points // 2)))


def minmax_index(y: Any, max_points: int) -> np.ndarray:
    """Sorted indices of the samples of ``y`` (T,) to draw: per bucket its minimum and maximum
    sample, and its first missing one if it has any (so a gap stays a gap). At most
    ``max_points`` (+ one per bucket with a gap); every index when T fits already."""
    v = _np(y).astype(np.float64, copy=False).reshape(-1)
    n = v.size
    size = bucket_size(n, max_points)
    if size == 1:
        return np.arange(n)
    has_nan = bool(np.isnan(v).any())
    full = n // size
    picks = []
    # the full buckets as a (full, size) view, then the short last one: no padded copy
    for first, block in ((0, v[: full * size].reshape(full, size)),
                         (full * size, v[full * size :].reshape(1, -1))):
        if block.size == 0:
            continue
        base = first + np.arange(block.shape[0]) * size
        if has_nan:  # copies only when there is something to mask
            gaps = np.isnan(block)
            picks += [base + np.where(gaps, np.inf, block).argmin(axis=1),
                      base + np.where(gaps, -np.inf, block).argmax(axis=1)]
            with_gap = gaps.any(axis=1)
            picks.append((base + gaps.argmax(axis=1))[with_gap])
        else:
            picks += [base + block.argmin(axis=1), base + block.argmax(axis=1)]
    return np.unique(np.concatenate(picks))


def _decimation_note(n: int, max_points: int, where: str) -> str:
    size = bucket_size(n, max_points)
    if size == 1:
        return ""
    return (f"display: min/max of each {size:,} samples ({n:,} in all); {where}")


def runs_of(mask: Any) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in a 1-D boolean array."""
    m = _np(mask).reshape(-1).astype(bool)
    if not m.any():
        return []
    edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(),
                    (np.flatnonzero(edges == -1) - 1).tolist()))


def _merge_runs(runs: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """At most ``limit`` runs: runs separated by the shortest gaps are merged first."""
    if len(runs) <= limit:
        return runs
    gaps = np.array([b[0] - a[1] for a, b in zip(runs[:-1], runs[1:])])
    # keep the limit - 1 widest gaps as boundaries
    keep = np.sort(np.argsort(gaps, kind="stable")[len(gaps) - (limit - 1):])
    out, start = [], runs[0][0]
    for g in keep:
        out.append((start, runs[g][1]))
        start = runs[g + 1][0]
    out.append((start, runs[-1][1]))
    return out


def _set_x_axes(fig: go.Figure, t: np.ndarray, window: tuple[Any, Any] | None = None) -> None:
    """Every x axis typed explicitly (and ranged to the window, if any)."""
    fig.update_xaxes(type=_axis_type(t))
    if window is not None:
        lo, hi = sorted(window)
        if np.issubdtype(t.dtype, np.datetime64):
            pair = np.array([np.datetime64(lo, "ns"), np.datetime64(hi, "ns")])
            fig.update_xaxes(range=list(_x(pair)))
        else:
            fig.update_xaxes(range=[float(lo), float(hi)])


def _title(text: str, note: str) -> dict:
    out: dict[str, Any] = {"text": html.escape(text, quote=False)}
    if note:
        out["subtitle"] = {"text": html.escape(note, quote=False)}
    return out


# -- figures -----------------------------------------------------------------------------------
def forecast_figure(
    time: Any,
    actual: Any,
    mean: Any,
    std: Any,
    channel_names: Sequence[str] | None = None,
    title: str = "Forecast vs actual",
    max_points: int = 4000,
    max_channels: int = 8,
    window: tuple[Any, Any] | None = None,
) -> go.Figure:
    """Actual vs predicted mean with a ±2σ band, one subplot per channel.

    actual, mean, std: (T, C) (or (T,) for one channel); NaN in ``actual`` shows as a gap.
    Only the first ``max_channels`` channels are drawn (the title says how many were left out);
    each trace holds at most ~``max_points`` points (min/max decimation).
    """
    actual2 = _as_2d(actual, "actual")
    T, C = actual2.shape
    mean2 = _as_2d(mean, "predicted mean", T)
    std2 = _as_2d(std, "predicted std", T)
    if mean2.shape != actual2.shape or std2.shape != actual2.shape:
        raise DataError(
            f"forecast shapes differ: actual {actual2.shape}, mean {mean2.shape}, std {std2.shape}"
        )
    names = list(channel_names) if channel_names is not None else [f"ch{c}" for c in range(C)]
    if len(names) != C:
        raise DataError(f"{len(names)} channel names for {C} channels")
    t_all = _time_axis(time, T)
    rows = _window_slice(t_all, window)
    t = t_all[rows]
    shown = min(C, max(1, max_channels))
    if shown < C:
        title = f"{title} (first {shown} of {C} channels)"
    fig = make_subplots(rows=shown, cols=1, shared_xaxes=True,
                        subplot_titles=[html.escape(n, quote=False) for n in names[:shown]],
                        vertical_spacing=min(0.08, 0.3 / shown))
    for c in range(shown):
        row = c + 1
        a, m, s = actual2[rows, c], mean2[rows, c], std2[rows, c]
        upper, lower = m + 2 * s, m - 2 * s
        first = c == 0  # one legend entry per kind; the subplot title names the channel
        for y, kw in (
            (upper, dict(line={"width": 0}, hoverinfo="skip", showlegend=False,
                         legendgroup="band", name="+2σ")),
            (lower, dict(line={"width": 0}, fill="tonexty", fillcolor=BAND_COLOR,
                         legendgroup="band", name="±2σ", showlegend=first)),
            (m, dict(line={"color": PRED_COLOR, "width": 1}, name="predicted",
                     legendgroup="predicted", showlegend=first)),
            (a, dict(line={"color": ACTUAL_COLOR, "width": 1}, name="actual",
                     legendgroup="actual", showlegend=first)),
        ):
            idx = minmax_index(y, max_points)
            fig.add_trace(go.Scatter(x=_x(t[idx]), y=y[idx], mode="lines", **kw),
                          row=row, col=1)
    note = _decimation_note(t.size, max_points, "the forecasts Parquet holds every step")
    fig.update_layout(title=_title(title, note), height=max(320, 220 * shown),
                      template="plotly_white", hovermode="x unified",
                      margin={"l": 60, "r": 20, "t": 90 if note else 70, "b": 40},
                      uirevision="forecast")
    _set_x_axes(fig, t, window)
    return fig


def anomaly_figure(
    time: Any,
    score: Any,
    threshold: float | None,
    labels: Any = None,
    flags: Any = None,
    title: str = "Anomaly score",
    log_y: bool = False,
    max_points: int = 4000,
    window: tuple[Any, Any] | None = None,
    contributions: Any = None,
    channel_names: Sequence[str] | None = None,
    max_channels: int = 5,
) -> go.Figure:
    """The anomaly score with its threshold, labelled anomalies shaded, flagged points marked.

    score: (T,); labels, flags: (T,) binary or None; threshold None or NaN draws no line. With
    ``log_y`` non-positive scores are not drawn (use it for NIS, which is >= 0 and spans orders
    of magnitude). The score line is min/max decimated to ~``max_points`` points; labelled
    intervals are exact; flagged points beyond ``max_points`` keep the highest of each bucket.
    contributions: optional (T, C) additive per-channel shares of the score: drawn below it as
    stacked areas of the ``max_channels`` channels with the largest total (the rest summed as
    "other"), so every flag shows which sensors raised it.
    """
    s_all = _np(score).astype(np.float64).reshape(-1)
    T = s_all.size
    t_all = _time_axis(time, T)
    lab_all = fl_all = None
    if labels is not None:
        lab_all = _np(labels).reshape(-1).astype(bool)
        if lab_all.size != T:
            raise DataError(f"labels have {lab_all.size} steps but the score has {T}")
    if flags is not None:
        fl_all = _np(flags).reshape(-1).astype(bool)
        if fl_all.size != T:
            raise DataError(f"flags have {fl_all.size} steps but the score has {T}")
    rows = _window_slice(t_all, window)
    t, s = t_all[rows], s_all[rows]
    n = s.size
    idx = minmax_index(s, max_points)
    if contributions is not None:
        contrib = _as_2d(contributions, "contributions", T)[rows]
        names = (list(channel_names) if channel_names is not None
                 else [f"ch{c}" for c in range(contrib.shape[1])])
        if len(names) != contrib.shape[1]:
            raise DataError(f"{len(names)} channel names for {contrib.shape[1]} contributions")
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4],
                            vertical_spacing=0.06,
                            subplot_titles=("", "contribution of each channel to the score"))
        order = np.argsort(-np.nan_to_num(contrib).sum(axis=0), kind="stable")
        shown = order[:max_channels]
        layers = [(names[j], contrib[idx, j]) for j in shown]
        if contrib.shape[1] > len(shown):
            layers.append(("other", contrib[idx][:, order[max_channels:]].sum(axis=1)))
        for name, values in layers:
            fig.add_trace(go.Scatter(x=_x(t[idx]), y=values, mode="lines", stackgroup="contrib",
                                     name=name, line={"width": 0.5}), row=2, col=1)
    else:
        fig = go.Figure()
    panel: dict[str, int] = {"row": 1, "col": 1} if contributions is not None else {}
    fig.add_trace(go.Scatter(x=_x(t[idx]), y=s[idx], mode="lines", name="score",
                             line={"color": SCORE_COLOR, "width": 1}), **panel)
    if threshold is not None and math.isfinite(threshold) and n:
        ends = t[[0, -1]]
        fig.add_trace(go.Scatter(x=_x(ends), y=np.array([threshold, threshold], np.float64),
                                 mode="lines", name=f"threshold ({threshold:.4g})",
                                 line={"color": THRESHOLD_COLOR, "dash": "dash", "width": 1.5}),
                      **panel)
    if fl_all is not None:
        fl = np.flatnonzero(fl_all[rows])
        if fl.size > max_points:
            size = bucket_size(n, max_points)
            order = np.lexsort((-s[fl], fl // size))  # per bucket, highest score first
            first = np.concatenate([[True], np.diff((fl // size)[order]) != 0])
            fl = np.sort(fl[order][first])
        fig.add_trace(go.Scatter(x=_x(t[fl]), y=s[fl], mode="markers", name="flagged",
                                 marker={"color": FLAG_COLOR, "size": 6, "symbol": "x"}),
                      **panel)
    if lab_all is not None:
        # all at once: add_vrect re-validates the whole layout per shape (quadratic); on the
        # score panel (x/y: row 1 of the subplots too)
        fig.update_layout(shapes=[
            {"type": "rect", "xref": "x", "yref": "y domain", "x0": _x1(t, first),
             "x1": _x1(t, last), "y0": 0, "y1": 1, "fillcolor": LABEL_COLOR,
             "line": {"width": 0}, "layer": "below"}
            for first, last in _merge_runs(runs_of(lab_all[rows]), MAX_SHAPES)])
        # A legend entry for the shading (shapes have none); after the data traces, and the
        # axis is typed explicitly, so this empty trace decides nothing about the axis.
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="labelled anomaly",
                                 hoverinfo="skip",
                                 marker={"symbol": "square", "size": 12, "color": LABEL_COLOR}),
                      **panel)
    note = _decimation_note(n, max_points, "the scores Parquet holds every step")
    fig.update_layout(title=_title(title, note), template="plotly_white",
                      height=400 if contributions is None else 620, hovermode="closest",
                      margin={"l": 60, "r": 20, "t": 90 if note else 60, "b": 40},
                      uirevision="anomaly")
    _set_x_axes(fig, t, window)
    if log_y:
        fig.update_yaxes(type="log", **panel)
    return fig


def overlay_figure(
    series: Sequence[tuple[str, Any, Any]],
    title: str,
    y_title: str = "",
    reference: tuple[str, Any, Any] | None = None,
    log_y: bool = False,
    max_points: int = 4000,
    window: tuple[Any, Any] | None = None,
) -> go.Figure:
    """Several runs' series on one axis: ``series`` = [(name, time, values (T,)), ...], e.g.
    the anomaly scores of kalman and mamba on one stream; ``reference`` (e.g. the actual) is
    drawn first in black."""
    fig = go.Figure()
    axis_t: np.ndarray | None = None
    notes = []
    items = ([(reference, ACTUAL_COLOR)] if reference is not None else []) + [
        (s, SERIES_COLORS[i % len(SERIES_COLORS)]) for i, s in enumerate(series)]
    if not items:
        raise DataError("an overlay figure needs at least one series")
    for (name, time, values), color in items:
        v_all = _np(values).astype(np.float64).reshape(-1)
        t_all = _time_axis(time, v_all.size)
        rows = _window_slice(t_all, window)
        t, v = t_all[rows], v_all[rows]
        if axis_t is None:
            axis_t = t
        elif _axis_type(t) != _axis_type(axis_t):
            raise DataError(f"series '{name}' has a {_axis_type(t)} time axis, the first one "
                            f"a {_axis_type(axis_t)} axis")
        idx = minmax_index(v, max_points)
        fig.add_trace(go.Scatter(x=_x(t[idx]), y=v[idx], mode="lines", name=str(name),
                                 line={"color": color, "width": 1}))
        if bucket_size(v.size, max_points) > 1:
            notes.append(v.size)
    note = (f"display: min/max per bucket of up to {max(notes):,} samples per series"
            if notes else "")
    fig.update_layout(title=_title(title, note), template="plotly_white", height=400,
                      hovermode="x unified", yaxis_title=y_title,
                      margin={"l": 60, "r": 20, "t": 90 if note else 60, "b": 40},
                      uirevision="overlay")
    _set_x_axes(fig, axis_t, window)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def attribution_figure(
    contributions: Mapping[str, float],
    title: str = "Per-channel attribution",
) -> go.Figure:
    """Each channel's share of the anomaly score over an interval, largest first (horizontal
    bars, in percent of the summed score). ``contributions``: {channel: summed contribution}."""
    items = [(str(k), float(v)) for k, v in contributions.items() if v is not None
             and math.isfinite(float(v))]
    if not items:
        raise DataError("no finite per-channel contributions to draw")
    total = sum(v for _, v in items)
    items.sort(key=lambda kv: kv[1])  # plotly draws the first bar at the bottom
    names = [k for k, _ in items]
    share = np.array([100.0 * v / total if total else 0.0 for _, v in items], np.float64)
    fig = go.Figure(go.Bar(x=share, y=names, orientation="h", marker={"color": SCORE_COLOR},
                           text=[f"{v:.1f}%" for v in share], textposition="auto",
                           name="share of score"))
    fig.update_layout(title=_title(title, ""), template="plotly_white",
                      height=max(260, 60 + 28 * len(names)), xaxis_title="share of score (%)",
                      margin={"l": 120, "r": 20, "t": 60, "b": 50})
    fig.update_xaxes(type="linear")
    fig.update_yaxes(type="category")
    return fig


def comparison_figure(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("test/f1", "test/auc_pr", "test/mae"),
    method_key: str = "method",
    title: str = "Method comparison",
) -> go.Figure:
    """Bar chart of ``metrics`` per method: one panel per metric (their scales differ).

    rows: one mapping per method, e.g. {"method": "kalman", "test/f1": 0.61, "test/mae": 0.3};
    a missing or non-finite value is left out (no bar, "n/a" above its place). A metric that
    no row has is left out; DataError if none of ``metrics`` has a value (the keys are wrong).
    """
    methods = [str(r.get(method_key, f"method {i}")) for i, r in enumerate(rows)]
    panels: list[tuple[str, list[float | None]]] = []
    for metric in metrics:
        values: list[float | None] = []
        for r in rows:
            v = r.get(metric)
            try:
                v = float(v) if v is not None else None
            except (TypeError, ValueError):
                v = None
            values.append(v if v is not None and math.isfinite(v) else None)
        if any(v is not None for v in values):
            panels.append((metric, values))
    if not panels:
        keys = sorted({k for r in rows for k in r if k != method_key})
        raise DataError(f"comparison figure: no row has any of {list(metrics)}; "
                        f"the rows have {keys}")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[m for m, _ in panels])
    for j, (metric, values) in enumerate(panels):
        fig.add_trace(go.Bar(x=methods, y=[v if v is not None else np.nan for v in values],
                             name=metric, marker={"color": SERIES_COLORS[j % 10]},
                             text=[f"{v:.3g}" if v is not None else "n/a" for v in values],
                             textposition="outside", cliponaxis=False, showlegend=False),
                      row=1, col=j + 1)
    fig.update_layout(title=_title(title, ""), template="plotly_white", height=400,
                      margin={"l": 50, "r": 20, "t": 80, "b": 90})  # width: its container's
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="linear", rangemode="tozero")
    return fig


def message_figure(text: str, height: int = 220) -> go.Figure:
    """An empty figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=html.escape(text, quote=False), x=0.5, y=0.5, xref="paper",
                       yref="paper", showarrow=False, font={"size": 14, "color": "#6b7280"})
    fig.update_layout(template="plotly_white", height=height,
                      xaxis={"visible": False}, yaxis={"visible": False})
    return fig


# -- files -------------------------------------------------------------------------------------
def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a self-contained HTML file (plotly.js inlined); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def _share_arrays(figures: list[dict], shared: dict[str, int], store: list) -> None:
    """Replace every long plain list in the traces' x/y by {"$shared": i}, ``store[i]`` holding
    it once: a run's figures repeat one time axis in dozens of traces."""
    import json

    for fig in figures:
        for trace in fig.get("data", []):
            for key in ("x", "y"):
                v = trace.get(key)
                if isinstance(v, list) and len(v) > 16:
                    text = json.dumps(v, separators=(",", ":"))
                    if text not in shared:
                        shared[text] = len(store)
                        store.append(v)
                    trace[key] = {"$shared": shared[text]}


_REPORT_JS = """
(function () {
  var shared = JSON.parse(document.getElementById("shared-arrays").textContent);
  function resolve(trace) {
    ["x", "y"].forEach(function (k) {
      var v = trace[k];
      if (v && typeof v === "object" && !Array.isArray(v) && "$shared" in v) {
        trace[k] = shared[v["$shared"]];
      }
    });
  }
  function draw() {
    document.querySelectorAll("script.figure-json").forEach(function (node) {
      var fig = JSON.parse(node.textContent);
      fig.data.forEach(resolve);
      Plotly.newPlot(node.dataset.target, fig.data, fig.layout,
                     {responsive: true, displaylogo: false});
    });
  }
  function fail(text) {
    document.querySelectorAll(".plotly-graph-div").forEach(function (div) {
      div.className = "plotly-missing";
      div.textContent = text;
    });
  }
  if (window.Plotly) { draw(); return; }
  if (typeof DecompressionStream === "undefined") {
    fail("This report's figures need a browser that can unpack its embedded plotly.js " +
         "(DecompressionStream: Chrome or Edge 80+, Firefox 113+, Safari 16.4+).");
    return;
  }
  var text = atob(document.getElementById("plotly-js-gzip").textContent.trim());
  var bytes = new Uint8Array(text.length);
  for (var i = 0; i < text.length; i++) { bytes[i] = text.charCodeAt(i); }
  var unpacked = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  new Response(unpacked).text().then(function (code) {
    var script = document.createElement("script");
    script.text = code;  // runs now, in the page's global scope: defines window.Plotly
    document.head.appendChild(script);
    draw();
  }).catch(function (err) { fail("plotly.js could not be unpacked: " + err); });
})();
"""

#: an f8 array goes to the browser as f4 when float32 moves no value by more than this share of
#: the array's range (a millionth: under a pixel on any screen, even zoomed in 250 times)
F4_TOLERANCE = 1e-6


def _as_float32(typed: dict) -> None:
    """Re-encode one of plotly's typed arrays ({"dtype": "f8", "bdata": base64, ...}) as f4 in
    place when float32 draws the same (:data:`F4_TOLERANCE`); left as f8 otherwise, e.g. epoch
    seconds on a numeric axis, whose float32 would be off by minutes."""
    import base64

    values = np.frombuffer(base64.b64decode(typed["bdata"]), dtype="<f8")
    with np.errstate(over="ignore"):  # beyond float32: inf, caught below
        single = values.astype("<f4")
    finite = np.isfinite(values)
    if not np.array_equal(np.isfinite(single), finite):  # beyond float32's range
        return
    if finite.any():
        v = values[finite]
        error = float(np.max(np.abs(single[finite].astype(np.float64) - v)))
        if error > F4_TOLERANCE * float(v.max() - v.min()):
            return
    typed["dtype"] = "f4"
    typed["bdata"] = base64.b64encode(single.tobytes()).decode("ascii")


def _float32_arrays(node: Any) -> None:
    """Every f8 typed array in a figure's JSON as f4 where that draws the same (half the
    bytes: most of a report's figure data)."""
    if isinstance(node, dict):
        if node.get("dtype") == "f8" and isinstance(node.get("bdata"), str):
            _as_float32(node)
            return
        for value in node.values():
            _float32_arrays(value)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                _float32_arrays(value)


@functools.lru_cache(maxsize=2)
def _plotly_js_gzip(version: str) -> str:
    """plotly.js (of the installed plotly, ``version``), gzipped and base64-encoded: 2.0 MB
    instead of 4.8 MB in every report; the page unpacks it with the browser's own
    DecompressionStream. Deterministic (no timestamp in the gzip header)."""
    import base64
    import gzip

    from plotly.offline import get_plotlyjs

    packed = gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def _json_script(obj: Any, **attrs: str) -> str:
    import json

    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(v)}"'
                    for k, v in attrs.items())
    return f'<script type="application/json"{extra}>{text}</script>'


def save_report(figures: Sequence[tuple[str, go.Figure]], path: str | Path,
                title: str = "tsssm report") -> Path:
    """Every figure of a run in one self-contained HTML file that opens offline, wherever it
    is copied: one embedded copy of plotly.js (gzipped, unpacked by the browser), a contents
    list, then each figure under its name; a time axis that many traces share is stored once,
    and values go as float32 where that draws the same. Written via a temporary name, so a
    crash leaves no partial report."""
    import json

    import plotly

    if not figures:
        raise DataError(f"no figures to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    specs = [json.loads(pio.to_json(fig, validate=False)) for _, fig in figures]
    for spec in specs:
        _float32_arrays(spec.get("data", []))
    store: list = []
    _share_arrays(specs, {}, store)
    toc, sections = [], []
    for i, ((name, _), spec) in enumerate(zip(figures, specs)):
        anchor = f"fig-{i}"
        label = html.escape(name, quote=False)
        height = int(spec.get("layout", {}).get("height") or 450)
        toc.append(f'<li><a href="#{anchor}">{label}</a></li>')
        sections.append(
            f'<section id="{anchor}" class="figure"><h2>{label}</h2>'
            f'<div id="{anchor}-plot" class="plotly-graph-div" '
            f'style="height:{height}px;width:100%"></div>'
            + _json_script(spec, class_="figure-json", data_target=f"{anchor}-plot")
            + "</section>")
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title, quote=False)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#1f2937}"
        "h2{font-size:16px;margin:28px 0 4px}section{max-width:1400px}"
        ".plotly-missing{padding:24px;color:#b91c1c;border:1px solid #fecaca}</style>",
        # not run as it stands (an unknown script type): the report's script unpacks it
        '<script type="application/octet-stream" id="plotly-js-gzip" '
        f'data-encoding="gzip+base64">{_plotly_js_gzip(plotly.__version__)}</script>',
        f"</head><body><h1>{html.escape(title, quote=False)}</h1>",
        f"<ol>{''.join(toc)}</ol>", *sections,
        _json_script(store, id="shared-arrays"),
        f"<script>{_REPORT_JS}</script>", "</body></html>",
    ])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
