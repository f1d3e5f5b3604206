"""Horizon-forecast metrics as the long-horizon benchmarks report them, plus probabilistic quality.

Point accuracy follows the ETT protocol of Informer / Time-Series-Library: MSE and MAE over every
test window (stride 1), every lead time and every channel, on the normalised scale. Probabilistic
quality of the Gaussian forecasts:

- CRPS of a Gaussian N(mu, s^2) at y, in closed form (Gneiting & Raftery 2007):
  ``s * (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))`` with ``z = (y - mu) / s``;
- the Gaussian negative log predictive density (NLL, including 0.5 log 2 pi);
- coverage95: the fraction of targets inside ``mu +- 1.959964 s`` (the central 95% interval).

Windows arrive in batches (:meth:`HorizonAccumulator.add`), so a split of 10^4 windows x 720 lead
times never has to be held at once. Entries whose target is NaN (missing) are skipped.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from tsssm.errors import NumericalError

#: z of the central 95% interval of a Gaussian
Z95 = 1.959963984540054
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def gaussian_crps(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Elementwise CRPS of N(mean, std^2) at y (same shapes; std > 0)."""
    z = (y - mean) / std
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return std * (z * (2.0 * ndtr(z) - 1.0) + 2.0 * pdf - _INV_SQRT_PI)


class HorizonAccumulator:
    """Running sums of horizon-forecast errors, per lead time, over batches of windows.

    ``add(target, mean, var)`` with arrays (N, H, C); ``result()`` gives the pooled metrics and
    ``by_lead()`` the same per lead time (H,).
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.windows = 0
        self._sums = {k: np.zeros(horizon) for k in ("se", "ae", "crps", "nll", "covered", "n")}

    def add(self, target: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
        t = np.asarray(target, np.float64)
        m = np.asarray(mean, np.float64)
        v = np.asarray(var, np.float64)
        if t.shape != m.shape or t.shape != v.shape or t.ndim != 3 or t.shape[1] != self.horizon:
            raise ValueError(f"forecast batch shapes differ: target {t.shape}, mean {m.shape}, "
                             f"var {v.shape} (expected (N, {self.horizon}, C))")
        valid = ~np.isnan(t)
        if not (np.isfinite(m[valid]).all() and np.isfinite(v[valid]).all()
                and (v[valid] > 0).all()):
            raise NumericalError(
                "horizon forecasts contain non-finite means or non-positive variances at observed "
                "targets (a model bug or diverged training)")
        t0 = np.where(valid, t, m)  # missing targets contribute exactly zero below
        v0 = np.where(valid, v, 1.0)
        err = t0 - m
        std = np.sqrt(v0)
        s = self._sums
        s["se"] += np.square(err).sum(axis=(0, 2))
        s["ae"] += np.abs(err).sum(axis=(0, 2))
        s["crps"] += np.where(valid, gaussian_crps(t0, m, std), 0.0).sum(axis=(0, 2))
        nll = 0.5 * (np.log(v0) + np.square(err) / v0) + _HALF_LOG_2PI
        s["nll"] += np.where(valid, nll, 0.0).sum(axis=(0, 2))
        s["covered"] += (valid & (np.abs(err) <= Z95 * std)).sum(axis=(0, 2))
        s["n"] += valid.sum(axis=(0, 2))
        self.windows += t.shape[0]

    def result(self) -> dict[str, float]:
        """{"mse", "mae", "crps", "nll", "coverage95", "windows"} pooled over every lead time."""
        s = self._sums
        n = float(s["n"].sum())
        if n == 0:
            return {"windows": float(self.windows)}
        return {
            "mse": float(s["se"].sum() / n),
            "mae": float(s["ae"].sum() / n),
            "crps": float(s["crps"].sum() / n),
            "nll": float(s["nll"].sum() / n),
            "coverage95": float(s["covered"].sum() / n),
            "windows": float(self.windows),
        }

    def by_lead(self) -> dict[str, np.ndarray]:
        """{"mse", "coverage95", "crps"}: (H,) arrays for lead times 1..H (NaN: nothing counted)."""
        s = self._sums
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(s["n"] > 0, s["n"], np.nan)
            return {"mse": s["se"] / n, "coverage95": s["covered"] / n, "crps": s["crps"] / n}
