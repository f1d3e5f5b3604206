"""Exponentially weighted moving average (simple exponential smoothing) forecaster.

Per channel, the level follows ``l[t] = l[t-1] + alpha * (y[t] - l[t-1])`` and predicts ``y[t+1]``.
A missing observation leaves the level unchanged. The level starts at the first observation of
each stream; before that the prediction is the training mean with the training variance.

Simple exponential smoothing is the steady state of the local-level model (ARIMA(0,1,1)), whose
``h``-step-ahead error variance is ``sigma2 * (1 + (h - 1) * alpha^2)``; a prediction made ``g``
steps after the last observation is an ``h = g + 1`` step forecast and gets that variance.

Fitting: ``alpha`` (per channel) minimises the one-step squared error on the training data over the
grid 0.01, 0.02, ..., 1.00 (unless given). ``sigma2`` is the mean of the squared one-step errors,
each divided by its ``1 + g * alpha^2`` factor. The first observation of each stream only
initialises the level and is not counted.

The recursion is sequential, so it runs as a loop over time on float64 NumPy arrays (a few
microseconds per step; deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from tsssm.baselines._common import (
    MIN_VAR,
    as_series,
    as_streams,
    channel_moments,
    concat_streams,
    require_fitted,
)
from tsssm.errors import ConfigError, DataError
from tsssm.models.base import Gaussian

ALPHA_GRID = np.round(np.linspace(0.01, 1.0, 100), 10)


class EWMAState(NamedTuple):
    level: Tensor  # (B, C) float64, meaningful where ``started``
    started: Tensor  # (B, C) bool: the stream has had an observation in this channel
    gap: Tensor  # (B, C) int64: steps since the last observation (0 if the last step was observed)


def _smooth(
    y: np.ndarray, alpha: np.ndarray, level: np.ndarray, started: np.ndarray, gap: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the EWMA recursion over y (B, T, C) for one or many alphas.

    alpha: broadcastable to (..., B, C) (e.g. (G, 1, 1) for a grid or (C,) per channel); level has
    that broadcast shape, started and gap are (B, C). Returns (pred_level (..., B, T, C) — the
    level before each step, i.e. the prediction; pred_started (B, T, C); pred_gap (B, T, C);
    final level, started, gap). ``pred_level`` is undefined where not ``pred_started``.
    """
    B, T, C = y.shape
    lead = np.broadcast_shapes(np.shape(alpha), (B, C), np.shape(level))
    level = np.broadcast_to(level, lead).copy()
    started = started.copy()
    gap = gap.copy()
    pred_level = np.empty(lead[:-2] + (B, T, C))
    pred_started = np.empty((B, T, C), dtype=bool)
    pred_gap = np.empty((B, T, C), dtype=np.int64)
    for t in range(T):
        yt = y[:, t]  # (B, C)
        pred_level[..., t, :] = level
        pred_started[:, t] = started
        pred_gap[:, t] = gap
        obs = ~np.isnan(yt)
        update = obs & started
        y0 = np.where(obs, yt, 0.0)
        level = np.where(update, level + alpha * (y0 - level), level)
        level = np.where(obs & ~started, y0, level)
        started = started | obs
        gap = np.where(obs, 0, gap + 1)
    return pred_level, pred_started, pred_gap, level, started, gap


def _grid_errors(y: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-step squared errors of the EWMA on y (B, T, C) for each alpha in a (G, 1, C|1) grid.

    Returns (sse (G, C), scaled_sse (G, C) with each error divided by ``1 + gap * alpha^2``,
    count (C,) of errors). Accumulated step by step so memory stays O(G * B * C).
    """
    B, T, C = y.shape
    G = alpha.shape[0]
    level = np.zeros((G, B, C))
    started = np.zeros((B, C), dtype=bool)
    gap = np.zeros((B, C), dtype=np.int64)
    sse = np.zeros((G, C))
    scaled_sse = np.zeros((G, C))
    count = np.zeros(C, dtype=np.int64)
    alpha2 = np.square(alpha)
    for t in range(T):
        yt = y[:, t]
        obs = ~np.isnan(yt)
        y0 = np.where(obs, yt, 0.0)
        update = obs & started
        err = np.where(update, y0 - level, 0.0)  # (G, B, C)
        err2 = np.square(err)
        sse += err2.sum(axis=1)
        scaled_sse += (err2 / (1.0 + gap * alpha2)).sum(axis=1)
        count += update.sum(axis=0)
        level = np.where(update, level + alpha * err, level)
        level = np.where(obs & ~started, y0, level)
        started |= obs
        gap = np.where(obs, 0, gap + 1)
    return sse, scaled_sse, count


class EWMAForecaster:
    """Simple exponential smoothing with Gaussian predictive variance."""

    name = "ewma"
    training_input = "streams"

    def __init__(self, alpha: float | Sequence[float] | None = None) -> None:
        if alpha is not None:
            a = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
            if a.ndim != 1 or not ((a > 0.0) & (a <= 1.0)).all():
                raise ConfigError(
                    f"ewma alpha must be in (0, 1] (one value or one per channel); got {alpha}"
                )
        self.alpha_init = alpha
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        alpha = getattr(self, "alpha", self.alpha_init)
        if alpha is not None:
            alpha = np.round(np.asarray(alpha, dtype=np.float64), 4).tolist()
        return f"{type(self).__name__}(alpha={alpha})"

    def fit(self, y_train: Tensor | Sequence) -> EWMAForecaster:
        """Fit alpha (if not given) and sigma2 per channel on ``y_train``: (B, T, C), or a list
        of streams (T_i, C) of different lengths (each smoothed on its own)."""
        streams = as_streams(y_train, "training data")
        C = streams[0].shape[-1]
        prior_mean, prior_var = channel_moments(concat_streams(streams), "training data")
        if self.alpha_init is None:
            grid = ALPHA_GRID.reshape(-1, 1, 1)  # (G, 1, 1)
        else:
            a = np.atleast_1d(np.asarray(self.alpha_init, dtype=np.float64))
            if a.size not in (1, C):
                raise ConfigError(f"ewma alpha has {a.size} values but the data has {C} channels")
            grid = np.broadcast_to(a, (C,)).reshape(1, 1, C)  # (1, 1, C)
        sse, scaled_sse, count = (sum(x) for x in zip(*(
            _grid_errors(st.numpy(), grid) for st in streams)))
        empty = np.flatnonzero(count == 0).tolist()
        if empty:
            raise DataError(
                f"training data: channels {empty} have fewer than two observations per stream, "
                "so the ewma forecaster cannot be fitted"
            )
        best = sse.argmin(axis=0)  # (C,), the smallest alpha on ties
        alpha = np.broadcast_to(grid, (grid.shape[0], 1, C))[best, 0, np.arange(C)]  # (C,)
        sigma2 = scaled_sse[best, np.arange(C)] / count
        self.alpha = alpha.astype(np.float64)
        self.sigma2 = np.maximum(sigma2, MIN_VAR)
        self.prior_mean = prior_mean.numpy()
        self.prior_var = prior_var.numpy()
        self.n_channels = C
        self.fitted = True
        return self

    def _initial_state(self, batch: int) -> EWMAState:
        C = self.n_channels
        return EWMAState(
            torch.zeros(batch, C, dtype=torch.float64),
            torch.zeros(batch, C, dtype=torch.bool),
            torch.zeros(batch, C, dtype=torch.int64),
        )

    def _check_state(self, state: Any, batch: int) -> EWMAState:
        if state is None:
            return self._initial_state(batch)
        if not isinstance(state, EWMAState) or tuple(state.level.shape) != (batch, self.n_channels):
            raise DataError(
                f"ewma state does not fit a batch of {batch} streams with {self.n_channels} "
                "channels; pass the state returned for the same streams"
            )
        return state

    def _predictive(self, level, started, gap) -> tuple[np.ndarray, np.ndarray]:
        mean = np.where(started, level, self.prior_mean)
        var = np.where(started, self.sigma2 * (1.0 + gap * np.square(self.alpha)), self.prior_var)
        return mean, var

    def one_step(self, y: Tensor, state: Any = None) -> tuple[Gaussian, EWMAState]:
        """One-step predictive Gaussian (B, T, C) for every step of ``y`` (B, T, C)."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        st = self._check_state(state, y.shape[0])
        y_np = y.detach().to(torch.float64).cpu().numpy()
        pred, started, gap, level, st_started, st_gap = _smooth(
            y_np, self.alpha, st.level.cpu().numpy(), st.started.cpu().numpy(),
            st.gap.cpu().numpy(),
        )
        mean, var = self._predictive(pred, started, gap)
        new_state = EWMAState(
            torch.from_numpy(level), torch.from_numpy(st_started), torch.from_numpy(st_gap)
        )
        out = Gaussian(
            torch.from_numpy(mean).to(device=y.device, dtype=y.dtype),
            torch.from_numpy(var).to(device=y.device, dtype=y.dtype),
        )
        return out, new_state

    def forecast(self, context: Tensor, horizon: int, state: Any = None) -> Gaussian:
        """Predictive Gaussian (B, horizon, C): flat level, variance growing with ``alpha^2``."""
        if int(horizon) != horizon or horizon < 1:
            raise ConfigError(f"forecast horizon must be a positive integer; got {horizon!r}")
        require_fitted(self)
        context = as_series(context, "context", self.n_channels)
        _, st = self.one_step(context, state)
        level = st.level.numpy()[:, None, :]  # (B, 1, C)
        started = st.started.numpy()[:, None, :]
        steps = np.arange(int(horizon)).reshape(1, -1, 1)  # h - 1
        mean, var = self._predictive(level, started, st.gap.numpy()[:, None, :] + steps)
        mean = np.broadcast_to(mean, var.shape)
        return Gaussian(
            torch.from_numpy(np.ascontiguousarray(mean)).to(context.device, context.dtype),
            torch.from_numpy(var).to(context.device, context.dtype),
        )
