"""Adaptive (online) calibration of the horizon band: a factor per lead time on the forecast
variances, updated causally from the forecasts whose targets have already been observed.

The factor fitted on validation (tsssm.tasks.calibrate) is right for the validation months; when
the stream moves to a calmer or a rougher regime it no longer is (ETTh1: the validation months'
horizon errors are 1.8-3.3x the test months', so a band fitted there covers 98-99.5% on test).
A forecaster that runs on a stream sees its own past errors as soon as their targets arrive, and
adaptive conformal inference (Gibbs & Candes 2021, "Adaptive conformal inference under
distribution shift") uses exactly that: after each resolved forecast, move the band's level by
``gamma * (miss - alpha)``. Its long-run miss rate is within O(1/(gamma T)) of alpha whatever
the shift.

Here the band is the Gaussian ``mean +- 1.96 sd`` and the adapted quantity is the log of a
variance factor per lead time h: for the forecast issued at origin o (rows o..o+H-1), lead h is
resolved once row o+h-1 has been observed, i.e. at every origin after o+h-1 (delayed feedback:
only forecasts resolved *before* an origin move the factor that origin's forecast uses). A
resolved forecast's ``miss`` is the fraction of its observed channels outside the band of the
factor in force when it resolves: online quantile tracking, the "P" part of conformal PID
control (Angelopoulos, Barber & Bates 2023). ACI's own rule (judge it against the band it was
issued with) feeds the factor back with a delay of h steps at lead h and oscillates at long
leads (ETTh1 h720: test CRPS 0.43 -> 2.4 at gamma 0.01); the current-band rule has no such
loop, and its long-run miss rate is within 2 B / (step T) of alpha over T resolved forecasts
while the log factor stays inside its bounds +-B (the sum of the steps is its change).
``gamma`` is given in ACI's units (a step in the miss level, the paper uses 0.005) and
converted to the log-variance step that moves the Gaussian band's coverage by as much
(d coverage / d log c = z phi(z) at z = 1.96, 0.1145).

Nothing here reads a target before it is observed: a stream scored origin by origin gets
exactly the factors that the batched evaluation computes (tests/tasks/test_adaptive_calibration).
"""

from __future__ import annotations

import math

import numpy as np

from tsssm.tasks.forecast_metrics import Z95

#: Gibbs & Candes' step size (their experiments), in miss-level units
DEFAULT_RATE = 0.005
#: the miss level of the central 95% band
ALPHA = 0.05
#: d coverage / d log(variance factor) of the Gaussian band at 1.96 sd: 1.96 * phi(1.96)
COVERAGE_SLOPE = Z95 * math.exp(-0.5 * Z95 * Z95) / math.sqrt(2.0 * math.pi)
#: the factor stays within these bounds (as the fitted one, tsssm.tasks.calibrate.SCALE_RANGE)
LOG_FACTOR_BOUND = math.log(1e3)


class AdaptiveCalibration:
    """The causal variance factor per lead time of one stream's horizon forecasts.

    Feed the forecasts in the order of their origins (strictly increasing row indices) with
    :meth:`adapt`, in batches of any size; each origin's variances are multiplied by the
    factors that the forecasts resolved before it have set. Memory: O(H^2 C / stride).
    """

    def __init__(self, horizon: int, rate: float = DEFAULT_RATE) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"the adaptive calibration rate must be > 0, got {rate}")
        self.horizon = horizon
        self.rate = rate
        self._step = rate / COVERAGE_SLOPE  # log-variance step per unit of (miss - alpha)
        self._leads = np.arange(1, horizon + 1)
        self._cols = np.arange(horizon)
        self.log_factor = np.zeros(horizon)  # (H,) in force for the next origin
        # the issued forecasts not yet resolved at every lead: their origins (n,) and squared
        # errors standardised by the variance they were given with (n, H, C), NaN if missing;
        # _next[h]: the first of them whose lead h + 1 is unresolved
        self._origins = np.zeros(0, dtype=np.int64)
        self._z2: np.ndarray | None = None
        self._next = np.zeros(horizon, dtype=np.int64)
        self._last: int | None = None

    def factors_at(self, origin: int) -> np.ndarray:
        """(H,) the variance factors in force for a forecast from row ``origin`` (after every
        origin fed so far), without issuing one: e.g. the next forecast of a live stream."""
        self._resolve(origin)
        return np.exp(self.log_factor)

    def _resolve(self, origin: int) -> None:
        """Move the factors with every forecast lead whose target row is before ``origin``, in
        the order of their origins, each judged against the factor in force now."""
        if self._last is not None and origin <= self._last:
            raise ValueError(f"forecast origins must increase: {origin} after {self._last}")
        # lead h of the forecast from o' is resolved at ``origin`` when o' + h - 1 < origin
        ready = np.searchsorted(self._origins, origin - self._leads, side="right")  # (H,)
        while True:
            due = self._next < ready
            if not due.any():
                return
            leads = self._cols[due]
            z2 = self._z2[self._next[due], leads]  # (k, C)
            observed = ~np.isnan(z2)
            bound = Z95 * Z95 * np.exp(self.log_factor[leads])[:, None]
            with np.errstate(invalid="ignore"):
                missed = observed & (z2 > bound)
            n_channels = z2.shape[-1]
            step = (missed.sum(axis=-1) - ALPHA * observed.sum(axis=-1)) / n_channels
            self.log_factor[leads] = np.clip(self.log_factor[leads] + self._step * step,
                                             -LOG_FACTOR_BOUND, LOG_FACTOR_BOUND)
            self._next[due] += 1

    def adapt(self, origins: np.ndarray, target: np.ndarray, mean: np.ndarray,
              var: np.ndarray) -> np.ndarray:
        """The adapted variances (N, H, C) of the forecasts from ``origins`` (N,) (increasing,
        after every origin fed before) with targets, means and variances (N, H, C); NaN
        targets (missing) neither count as misses nor as hits."""
        var = np.asarray(var, dtype=np.float64)
        err = np.asarray(target, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            z2 = err * err / var  # (N, H, C); NaN where the target is missing
        out = np.empty_like(var)
        for i, origin in enumerate(np.asarray(origins, dtype=np.int64).tolist()):
            self._resolve(origin)
            out[i] = var[i] * np.exp(self.log_factor)[:, None]
            self._push(origin, z2[i])
        return out

    def _push(self, origin: int, z2: np.ndarray) -> None:
        if self._z2 is None:
            self._z2 = np.zeros((2 * (self.horizon + 2), *z2.shape))
        n = len(self._origins)
        done = int(self._next.min())  # resolved at every lead: no longer needed
        if n == len(self._z2) or done > len(self._z2) // 2:
            keep = n - done
            if keep == len(self._z2):  # stride 1 keeps at most H + 1: grow for safety
                self._z2 = np.concatenate([self._z2, np.zeros_like(self._z2)])
            self._z2[:keep] = self._z2[done:n]
            self._origins = self._origins[done:]
            self._next -= done
            n = keep
        self._z2[n] = z2
        self._origins = np.append(self._origins, origin)
        self._last = origin
