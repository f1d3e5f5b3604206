"""MSET-style similarity model: every row estimated from a memory of normal training rows.

The Multivariate State Estimation Technique (Gross, Singer et al.) keeps a memory matrix ``D``
(M normal rows) and estimates a row ``x`` as ``x_hat = D' W`` with weights ``W = (G + r I)^-1
k(x)``, where ``G_ij = s(d_i, d_j)`` and ``k_i = s(d_i, x)`` are similarities; here ``s`` is the
Gaussian (RBF) kernel of scikit-learn on standardised rows, its bandwidth the median distance
between memory rows (unless given), and ``r`` a small ridge that keeps the Gram solve well posed.
A row like the normal ones is reconstructed closely; a fault is not. The score is the mean
squared residual over the channels, ``|x - x_hat|^2 / C``; each channel's squared residual / C is
its additive contribution.

Memory: for every channel the training rows with its smallest and largest value (the edges of the
normal operating range, as MSET's vector ordering does), then rows evenly spaced over the
training data, up to ``memory`` rows. ``window > 1``: trailing moving mean of the score (SKAB's
MSET notebook smooths its error over 60 rows). Missing values are forward-filled per stream.
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
from tsssm.baselines.pca import trailing_mean
from tsssm.errors import ConfigError, DataError


class MSETDetector:
    """Similarity-based state estimation; score = mean squared estimation residual."""

    name = "mset"

    def __init__(self, memory: int = 600, bandwidth: float | None = None, ridge: float = 1e-3,
                 window: int = 1) -> None:
        if int(memory) != memory or memory < 2:
            raise ConfigError(f"mset memory must be an integer >= 2; got {memory!r}")
        if bandwidth is not None and not bandwidth > 0:
            raise ConfigError(f"mset bandwidth must be > 0; got {bandwidth!r}")
        if not ridge >= 0:
            raise ConfigError(f"mset ridge must be >= 0; got {ridge!r}")
        if int(window) != window or window < 1:
            raise ConfigError(f"mset window must be a positive integer; got {window!r}")
        self.memory = int(memory)
        self.bandwidth = bandwidth
        self.ridge = float(ridge)
        self.window = int(window)
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(memory={self.memory}, bandwidth={self.bandwidth}, "
                f"window={self.window})")

    def _standardise(self, y: torch.Tensor) -> np.ndarray:
        z = (y.detach().to(torch.float64).cpu().numpy() - self.mean) / self.std
        return _forward_fill(z)

    def fit(self, y_train: Any) -> MSETDetector:
        """Choose the memory rows and factor the Gram matrix: (B, T, C) or a list of streams."""
        from sklearn.metrics.pairwise import euclidean_distances  # deferred: slow import

        streams = as_streams(y_train, "training data")
        mean, var = channel_moments(concat_streams(streams), "training data")
        self.mean, self.std = mean.numpy(), np.sqrt(var.numpy())
        self.n_channels = C = int(streams[0].shape[-1])
        rows = np.concatenate([self._standardise(st)[0] for st in streams])
        self.n_train_rows = sum(st.shape[1] for st in streams)  # real rows, no padding
        if len(rows) < 2:
            raise DataError("mset needs at least two training rows")
        chosen = list(dict.fromkeys([*rows.argmin(0).tolist(), *rows.argmax(0).tolist()]))
        rest = max(0, min(self.memory, len(rows)) - len(chosen))
        even = np.linspace(0, len(rows) - 1, rest + len(chosen)).round().astype(int)
        for i in even.tolist():
            if len(chosen) >= min(self.memory, len(rows)):
                break
            if i not in chosen:
                chosen.append(i)
        D = rows[np.asarray(chosen)]
        self.memory_rows = D
        if self.bandwidth is None:
            d = euclidean_distances(D)
            self.gamma = 1.0 / (2.0 * max(float(np.median(d[np.triu_indices(len(D), 1)])),
                                          1e-6) ** 2)
        else:
            self.gamma = 1.0 / (2.0 * float(self.bandwidth) ** 2)
        G = self._kernel(D)
        self.gram_factor = np.linalg.cholesky(G + self.ridge * np.eye(len(D)))
        self.n_channels = C
        self.fitted = True
        return self

    def _kernel(self, X: np.ndarray) -> np.ndarray:
        from sklearn.metrics.pairwise import rbf_kernel

        return rbf_kernel(X, self.memory_rows, gamma=self.gamma)

    def estimate(self, y: Any) -> np.ndarray:
        """The estimate x_hat (B, T, C) of every row, standardised."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        z = self._standardise(y)
        B, T, C = z.shape
        k = self._kernel(z.reshape(B * T, C))  # (N, M)
        L = self.gram_factor
        W = np.linalg.solve(L.T, np.linalg.solve(L, k.T))  # (M, N)
        return (W.T @ self.memory_rows).reshape(B, T, C)

    def contributions(self, y: Any) -> np.ndarray:
        """Each channel's squared residual / C (B, T, C): additive parts of ``score(y)``."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        z = self._standardise(y)
        resid = np.square(z - self.estimate(y)) / self.n_channels
        return trailing_mean(resid, self.window)

    def score(self, y: Any) -> np.ndarray:
        """Anomaly score (B, T), higher = more anomalous, for every step of ``y`` (B, T, C)."""
        return self.contributions(y).sum(-1)
