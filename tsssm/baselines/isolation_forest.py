"""scikit-learn IsolationForest on sliding windows of the channels.

Each time step ``t`` is described by the window ``y[t-window+1 .. t]`` of all channels, flattened
to ``window * C`` features, after standardising every channel with the training mean and standard
deviation. The forest is fitted on the windows of the training streams and the anomaly score of a
step is ``-score_samples`` (higher = more anomalous; in (0, 1], about 0.5 for ordinary points).

Edges and gaps: the first ``window - 1`` steps of a stream have a short history, so the window is
padded on the left by repeating the stream's first row (edge padding); their scores therefore use
a shorter effective window. Missing values (NaN) are forward-filled within each stream and channel,
and values missing from the start are set to the training mean (0 after standardising), because
IsolationForest does not accept NaN. Each call scores whole streams: there is no state carried
between chunks (pass the preceding ``window - 1`` steps along if you score in chunks).

Choosing ``window``: a longer window sees sustained changes (level shifts, drifts such as SKAB's
valve faults) but dilutes a single-sample spike among ``window * C`` features, which random
splits rarely pick; ``window=1`` is the point-wise detector that catches spikes best.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from tsssm.baselines._common import (
    as_series,
    as_streams,
    channel_moments,
    concat_streams,
    require_fitted,
)
from tsssm.errors import ConfigError


def _forward_fill(z: np.ndarray) -> np.ndarray:
    """Forward-fill NaN along time in z (B, T, C); leading NaN become 0."""
    B, T, C = z.shape
    observed = ~np.isnan(z)
    idx = np.where(observed, np.arange(T).reshape(1, T, 1), -1)
    idx = np.maximum.accumulate(idx, axis=1)
    filled = np.take_along_axis(np.nan_to_num(z), np.maximum(idx, 0), axis=1)
    return np.where(idx >= 0, filled, 0.0)


class IsolationForestDetector:
    """Window-based IsolationForest anomaly detector (not a forecaster: it gives scores only)."""

    name = "isolation_forest"

    def __init__(
        self,
        window: int = 10,
        n_estimators: int = 200,
        random_state: int = 0,
        max_samples: int | float | str = "auto",
    ) -> None:
        if int(window) != window or window < 1:
            raise ConfigError(f"isolation_forest window must be a positive integer; got {window!r}")
        if int(n_estimators) != n_estimators or n_estimators < 1:
            raise ConfigError(
                f"isolation_forest n_estimators must be a positive integer; got {n_estimators!r}"
            )
        self.window = int(window)
        self.n_estimators = int(n_estimators)
        self.random_state = int(random_state)
        self.max_samples = max_samples
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window={self.window}, n_estimators={self.n_estimators}, "
            f"random_state={self.random_state})"
        )

    def _features(self, y: torch.Tensor) -> np.ndarray:
        """(B*T, window*C) standardised, filled, edge-padded sliding windows of y (B, T, C)."""
        z = (y.detach().to(torch.float64).cpu().numpy() - self.mean) / self.std
        z = _forward_fill(z)
        B, T, C = z.shape
        w = self.window
        if w > 1:
            z = np.concatenate([np.repeat(z[:, :1], w - 1, axis=1), z], axis=1)  # (B, T+w-1, C)
        windows = sliding_window_view(z, w, axis=1)  # (B, T, C, w)
        return np.ascontiguousarray(windows.transpose(0, 1, 3, 2)).reshape(B * T, w * C)

    def fit(self, y_train: Any) -> IsolationForestDetector:
        """Fit the channel scaling and the forest on the windows of ``y_train``: (B, T, C), or a
        list of streams (T_i, C) of different lengths (windows never cross streams)."""
        from sklearn.ensemble import IsolationForest  # deferred: sklearn import is slow

        streams = as_streams(y_train, "training data")
        mean, var = channel_moments(concat_streams(streams), "training data")
        self.mean = mean.numpy()
        self.std = np.sqrt(var.numpy())
        self.n_channels = int(streams[0].shape[-1])
        features = np.concatenate([self._features(st) for st in streams])
        self.n_train_rows = sum(st.shape[1] for st in streams)  # real rows, no padding
        self.forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            random_state=self.random_state,
            n_jobs=1,
        ).fit(features)
        self.fitted = True
        return self

    def score(self, y: Any) -> np.ndarray:
        """Anomaly score (B, T), higher = more anomalous, for every step of ``y`` (B, T, C)."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        B, T, _ = y.shape
        if T == 0:
            return np.zeros((B, 0))
        return -self.forest.score_samples(self._features(y)).reshape(B, T)
