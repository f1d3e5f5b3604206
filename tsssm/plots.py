"""Plotly figure builders for forecasts, anomaly scores and method comparisons.

Pure functions from arrays to ``plotly.graph_objects.Figure``; the only I/O is ``save_html``, which
writes a self-contained file (plotly.js inlined) so the plots render offline, e.g. as MLflow
artifacts. Long series are downsampled to at most ``max_points`` points per trace so the HTML
stays small: forecasts by even striding, anomaly scores by keeping the maximum of each bucket
(so spikes and threshold crossings survive). ``time`` may be numpy datetime64 or integers; None
means 0, 1, 2, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tsssm.errors import DataError

ACTUAL_COLOR = "#1f2937"
PRED_COLOR = "#2563eb"
BAND_COLOR = "rgba(37, 99, 235, 0.18)"
SCORE_COLOR = "#2563eb"
THRESHOLD_COLOR = "#dc2626"
LABEL_COLOR = "rgba(245, 158, 11, 0.25)"
FLAG_COLOR = "#dc2626"


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _time_axis(time: Any, n: int) -> np.ndarray:
    if time is None:
        return np.arange(n)
    t = _np(time).reshape(-1)
    if t.size != n:
        raise DataError(f"time axis has {t.size} entries but the series has {n} steps")
    return t


def _as_2d(x: Any, what: str, n: int | None = None) -> np.ndarray:
    arr = _np(x).astype(np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{what} must be (T, C) or (T,); got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{what} has {arr.shape[0]} steps, expected {n}")
    return arr


def _stride_index(n: int, max_points: int) -> np.ndarray:
    stride = max(1, math.ceil(n / max(1, max_points)))
    return np.arange(0, n, stride)


def forecast_figure(
    time: Any,
    actual: Any,
    mean: Any,
    std: Any,
    channel_names: Sequence[str] | None = None,
    title: str = "Forecast vs actual",
    max_points: int = 2000,
    max_channels: int = 8,
) -> go.Figure:
    """Actual vs predicted mean with a ±2σ band, one subplot per channel.

    actual, mean, std: (T, C) (or (T,) for one channel); NaN in ``actual`` shows as a gap.
    Only the first ``max_channels`` channels are drawn (the title says how many were left out).
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
    t = _time_axis(time, T)
    idx = _stride_index(T, max_points)
    shown = min(C, max(1, max_channels))
    if shown < C:
        title = f"{title} (first {shown} of {C} channels)"
    fig = make_subplots(rows=shown, cols=1, shared_xaxes=True, subplot_titles=names[:shown],
                        vertical_spacing=min(0.08, 0.3 / shown))
    x = t[idx]
    for c in range(shown):
        row = c + 1
        m, s, a = mean2[idx, c], std2[idx, c], actual2[idx, c]
        first = c == 0  # one legend entry per kind; the subplot title names the channel
        fig.add_trace(go.Scatter(x=x, y=m + 2 * s, mode="lines", line={"width": 0},
                                 hoverinfo="skip", showlegend=False, legendgroup="band",
                                 name="+2σ"), row=row, col=1)
        fig.add_trace(go.Scatter(x=x, y=m - 2 * s, mode="lines", line={"width": 0},
                                 fill="tonexty", fillcolor=BAND_COLOR, legendgroup="band",
                                 name="±2σ",
                                 showlegend=first), row=row, col=1)
        fig.add_trace(go.Scatter(x=x, y=m, mode="lines", line={"color": PRED_COLOR, "width": 1},
                                 name="predicted",
                                 legendgroup="predicted", showlegend=first), row=row, col=1)
        fig.add_trace(go.Scatter(x=x, y=a, mode="lines",
                                 line={"color": ACTUAL_COLOR, "width": 1},
                                 name="actual",
                                 legendgroup="actual", showlegend=first), row=row, col=1)
    fig.update_layout(title=title, height=max(300, 220 * shown), template="plotly_white",
                      hovermode="x unified", margin={"l": 60, "r": 20, "t": 70, "b": 40})
    return fig


def _bucket_max(score: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the max score in each of ~max_points consecutive buckets, and bucket starts."""
    n = score.size
    size = max(1, math.ceil(n / max(1, max_points)))
    starts = np.arange(0, n, size)
    if size == 1:
        return starts, starts
    padded = np.full(starts.size * size, -np.inf)
    padded[:n] = np.where(np.isnan(score), -np.inf, score)
    arg = padded.reshape(-1, size).argmax(axis=1)
    return np.minimum(starts + arg, n - 1), starts


def _bucket_any(mask: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.logical_or.reduceat(mask, starts) if mask.size else mask


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True in a 1-D boolean array."""
    if not mask.any():
        return []
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def anomaly_figure(
    time: Any,
    score: Any,
    threshold: float | None,
    labels: Any = None,
    flags: Any = None,
    title: str = "Anomaly score",
    log_y: bool = False,
    max_points: int = 4000,
    contributions: Any = None,
    channel_names: Sequence[str] | None = None,
    max_channels: int = 5,
) -> go.Figure:
    """The anomaly score with its threshold, labelled anomalies shaded, flagged points marked.

    score: (T,); labels, flags: (T,) binary or None. With ``log_y`` non-positive scores are not
    drawn (use it for NIS, which is >= 0 and spans orders of magnitude).
    contributions: optional (T, C) additive per-channel shares of the score: drawn below it as
    stacked areas of the ``max_channels`` channels with the largest total (the rest summed as
    "other"), so every flag shows which sensors raised it.
    """
    s = _np(score).astype(np.float64).reshape(-1)
    T = s.size
    t = _time_axis(time, T)
    keep, starts = _bucket_max(s, max_points)
    x = t[keep]
    if contributions is not None:
        contrib = _as_2d(contributions, "contributions", T)
        names = (list(channel_names) if channel_names is not None
                 else [f"ch{c}" for c in range(contrib.shape[1])])
        if len(names) != contrib.shape[1]:
            raise DataError(f"{len(names)} channel names for {contrib.shape[1]} contributions")
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4],
                            vertical_spacing=0.06,
                            subplot_titles=("", "contribution of each channel to the score"))
        order = np.argsort(-np.nan_to_num(contrib).sum(axis=0), kind="stable")
        shown = order[:max_channels]
        layers = [(names[j], contrib[keep, j]) for j in shown]
        if contrib.shape[1] > len(shown):
            layers.append(("other", contrib[keep][:, order[max_channels:]].sum(axis=1)))
        for name, values in layers:
            fig.add_trace(go.Scatter(x=x, y=values, mode="lines", stackgroup="contrib",
                                     name=name, line={"width": 0.5}), row=2, col=1)
    else:
        fig = go.Figure()
    panel: dict[str, int] = {"row": 1, "col": 1} if contributions is not None else {}
    if labels is not None:
        lab = _np(labels).reshape(-1).astype(bool)
        if lab.size != T:
            raise DataError(f"labels have {lab.size} steps but the score has {T}")
        lab_b = _bucket_any(lab, starts)
        bucket_end = np.append(starts[1:] - 1, T - 1) if starts.size else starts
        for first, last in _runs(lab_b):
            fig.add_vrect(x0=t[starts[first]], x1=t[bucket_end[last]], fillcolor=LABEL_COLOR,
                          line_width=0, layer="below", **panel)
        # A legend entry for the shading (shapes have none).
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="labelled anomaly",
                                 marker={"symbol": "square", "size": 12, "color": LABEL_COLOR}),
                      **panel)
    fig.add_trace(go.Scatter(x=x, y=s[keep], mode="lines", name="score",
                             line={"color": SCORE_COLOR, "width": 1}), **panel)
    if threshold is not None and T:
        fig.add_trace(go.Scatter(x=[t[0], t[-1]], y=[threshold, threshold], mode="lines",
                                 name=f"threshold ({threshold:.4g})",
                                 line={"color": THRESHOLD_COLOR, "dash": "dash", "width": 1.5}),
                      **panel)
    if flags is not None:
        fl = _np(flags).reshape(-1).astype(bool)
        if fl.size != T:
            raise DataError(f"flags have {fl.size} steps but the score has {T}")
        fl_b = _bucket_any(fl, starts)
        fig.add_trace(go.Scatter(x=x[fl_b], y=s[keep][fl_b], mode="markers", name="flagged",
                                 marker={"color": FLAG_COLOR, "size": 5, "symbol": "x"}),
                      **panel)
    fig.update_layout(title=title, template="plotly_white",
                      height=380 if contributions is None else 600, hovermode="x",
                      margin={"l": 60, "r": 20, "t": 60, "b": 40})
    if log_y:
        fig.update_yaxes(type="log", **panel)
    return fig


def comparison_figure(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = ("f1", "auc_pr", "mae"),
    method_key: str = "method",
    title: str = "Method comparison",
) -> go.Figure:
    """Bar chart of ``metrics`` per method: one panel per metric (their scales differ).

    rows: one mapping per method, e.g. {"method": "kalman", "f1": 0.61, "auc_pr": 0.7, "mae": 0.3};
    a missing or non-finite value is left out (no bar).
    """
    methods = [str(r.get(method_key, f"method {i}")) for i, r in enumerate(rows)]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(metrics))
    for j, metric in enumerate(metrics):
        values = []
        for r in rows:
            v = r.get(metric)
            try:
                v = float(v) if v is not None else None
            except (TypeError, ValueError):
                v = None
            values.append(v if v is not None and math.isfinite(v) else None)
        fig.add_trace(go.Bar(x=methods, y=values, name=metric,
                             text=[f"{v:.3g}" if v is not None else "" for v in values],
                             textposition="outside", showlegend=False), row=1, col=j + 1)
    fig.update_layout(title=title, template="plotly_white", height=380,
                      width=max(500, 300 * len(metrics)),
                      margin={"l": 50, "r": 20, "t": 70, "b": 80})
    return fig


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a self-contained HTML file (plotly.js inlined); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
