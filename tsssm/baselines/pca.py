"""PCA T² + Q: the classical multivariate control chart (scikit-learn PCA).

Every row is standardised with the training mean and standard deviation; a PCA fitted on the
training rows keeps the components explaining ``explained_variance`` of the variance. Hotelling's
``T² = sum_k t_k^2 / lambda_k`` measures how far a row lies inside the principal subspace, the
``Q`` statistic (squared prediction error) ``|x - P P' x|^2`` how far it lies off it. SKAB's
T²+Q flags a row when either exceeds its control limit; here each is divided by its
``reference`` quantile over the training rows (a fitted normaliser, never a label) and the score
is the larger of the two, so one threshold (fitted like every other method's) plays both limits.

Attribution (``contributions``): the statistic that sets the score is split into additive
per-channel parts: for Q the squared residual of each channel, for T² the complete decomposition
``((P L^-1/2 P') x)_c^2`` (L the component variances); both divided by their reference, so the
contributions of a row sum to its score.

``window > 1`` replaces the score by its trailing moving mean (as SKAB's T² notebook smooths).
Missing values are forward-filled per stream (leading gaps: the training mean), as PCA needs
complete rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tsssm.baselines._common import (
    as_series,
    as_streams,
    channel_moments,
    concat_streams,
    require_fitted,
)
from tsssm.baselines.isolation_forest import _forward_fill
from tsssm.errors import ConfigError, DataError


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean along axis 1 of (B, T, ...) (shorter windows at the start)."""
    if window <= 1:
        return x
    c = np.cumsum(x, axis=1)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    T = x.shape[1]
    t = np.arange(T)
    lo = np.maximum(0, t + 1 - window)
    count = (t + 1 - lo).reshape((1, T) + (1,) * (x.ndim - 2))
    return (c[:, t + 1] - c[:, lo]) / count


class PCAT2QDetector:
    """max(T²/ref_T², Q/ref_Q) of standardised rows under a training PCA (score-only)."""

    name = "pca_t2q"

    def __init__(self, explained_variance: float = 0.85, reference: float = 0.99,
                 window: int = 1) -> None:
        if not 0.0 < explained_variance < 1.0:
            raise ConfigError(f"pca_t2q explained_variance must be in (0, 1); got "
                              f"{explained_variance!r}")
        if not 0.0 < reference < 1.0:
            raise ConfigError(f"pca_t2q reference must be a quantile in (0, 1); got {reference!r}")
        if int(window) != window or window < 1:
            raise ConfigError(f"pca_t2q window must be a positive integer; got {window!r}")
        self.explained_variance = float(explained_variance)
        self.reference = float(reference)
        self.window = int(window)
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(explained_variance={self.explained_variance}, "
                f"reference={self.reference}, window={self.window})")

    def _standardise(self, y: torch.Tensor) -> np.ndarray:
        z = (y.detach().to(torch.float64).cpu().numpy() - self.mean) / self.std
        return _forward_fill(z)  # (B, T, C)

    def fit(self, y_train: Any) -> PCAT2QDetector:
        """Fit scaling, PCA and the references on ``y_train``: (B, T, C) or a list of streams."""
        from sklearn.decomposition import PCA  # deferred: sklearn import is slow

        streams = as_streams(y_train, "training data")
        mean, var = channel_moments(concat_streams(streams), "training data")
        self.mean, self.std = mean.numpy(), np.sqrt(var.numpy())
        self.n_channels = int(streams[0].shape[-1])
        rows = np.concatenate([self._standardise(st)[0] for st in streams])
        self.n_train_rows = sum(st.shape[1] for st in streams)  # real rows, no padding
        if len(rows) <= self.n_channels:
            raise DataError(f"pca_t2q needs more than {self.n_channels} training rows; got "
                            f"{len(rows)}")
        pca = PCA(n_components=self.explained_variance, svd_solver="full").fit(rows)
        P = pca.components_.T  # (C, k)
        lam = np.maximum(pca.explained_variance_, 1e-12)
        self.components = P
        self.t2_sqrt = (P / np.sqrt(lam)) @ P.T  # symmetric square root of P L^-1 P'
        self.residual = np.eye(self.n_channels) - P @ P.T
        t2, q = self._statistics(rows[None])
        self.t2_ref = max(float(np.quantile(t2, self.reference)), 1e-12)
        self.q_ref = max(float(np.quantile(q, self.reference)), 1e-12)
        self.fitted = True
        return self

    def _parts(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel T² and Q parts (B, T, C) of standardised rows z (B, T, C)."""
        return np.square(z @ self.t2_sqrt), np.square(z @ self.residual)

    def _statistics(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t2, q = self._parts(z)
        return t2.sum(-1), q.sum(-1)

    def contributions(self, y: Any) -> np.ndarray:
        """Additive per-channel parts (B, T, C) of ``score(y)``."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        t2, q = self._parts(self._standardise(y))
        t2, q = trailing_mean(t2 / self.t2_ref, self.window), trailing_mean(q / self.q_ref,
                                                                            self.window)
        use_t2 = (t2.sum(-1) >= q.sum(-1))[..., None]
        return np.where(use_t2, t2, q)

    def score(self, y: Any) -> np.ndarray:
        """Anomaly score (B, T), higher = more anomalous, for every step of ``y`` (B, T, C)."""
        return self.contributions(y).sum(-1)
