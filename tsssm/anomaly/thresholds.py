"""Thresholds on anomaly scores, as small fitted components saved with the model.

A threshold is fitted on scores of (assumed normal) training data and then flags
``score > value`` on new data (strictly greater, so a score exactly at the threshold is normal).
Each threshold round-trips through a plain JSON-able dict (``to_dict`` / ``threshold_from_dict``)
so it can be stored next to the model checkpoint.

- ``QuantileThreshold(q)``: the q-quantile of the training scores.
- ``MaxThreshold(factor)``: max of the training scores times ``factor`` (as in SKAB's notebooks).
- ``POTThreshold(q, level)``: peaks over threshold (Siffer et al., KDD 2017, "Anomaly detection in
  streams with extreme value theory"): the excesses over the ``level`` quantile are fitted with a
  generalised Pareto distribution and the threshold is the score exceeded with probability ``q``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from tsssm.errors import ConfigError, DataError, ModelError, NumericalError


def _as_scores(scores: Any, what: str) -> np.ndarray:
    """Flatten scores (numpy array, torch tensor or sequence) to float64 1-D and check them."""
    if hasattr(scores, "detach"):  # torch.Tensor without importing torch here
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise NumericalError(
            f"{what} contain {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf); "
            "scores must be finite (drop unobserved steps before fitting)"
        )
    return arr


class Threshold(ABC):
    """A rule fitted on training scores that flags anomalous scores."""

    #: Registry name (used by build_threshold and to_dict).
    name: ClassVar[str]

    def __init__(self) -> None:
        self._value: float | None = None
        self._state: dict[str, Any] = {}

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able."""

    @abstractmethod
    def _fit(self, scores: np.ndarray) -> dict[str, Any]:
        """Fit on finite 1-D scores; return the fitted state (must contain "value")."""

    def fit(self, train_scores: Any) -> Threshold:
        """Fit on training scores (any shape; all values used). Returns self."""
        scores = _as_scores(train_scores, "training scores")
        if scores.size == 0:
            raise DataError(f"cannot fit the {self.name} threshold: no training scores")
        state = self._fit(scores)
        self._set_state(state)
        return self

    def _set_state(self, state: dict[str, Any]) -> None:
        value = float(state["value"])
        if not math.isfinite(value):
            raise NumericalError(f"the fitted {self.name} threshold is not finite ({value})")
        self._value = value
        self._state = {k: v for k, v in state.items() if k != "value"}

    @property
    def fitted(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> float:
        """The fitted threshold on the score scale."""
        if self._value is None:
            raise ModelError(
                f"the {self.name} threshold is not fitted: call fit(train_scores) first"
            )
        return self._value

    def flags(self, scores: Any) -> np.ndarray:
        """Boolean array of the same shape as ``scores``: ``score > value``."""
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        arr = np.asarray(scores, dtype=np.float64)
        _as_scores(arr, "scores to flag")
        return arr > self.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: name, constructor params and fitted state."""
        out: dict[str, Any] = {"name": self.name, "params": self.params()}
        if self.fitted:
            out["state"] = {"value": self.value, **self._state}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        """Rebuild a threshold (fitted if ``data`` has a state) from ``to_dict`` output."""
        return threshold_from_dict(data)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        fitted = f", value={self._value:.6g}" if self._value is not None else ""
        return f"{type(self).__name__}({args}{fitted})"


class QuantileThreshold(Threshold):
    """Threshold at the ``q`` quantile of the training scores (linear interpolation)."""

    name = "quantile"

    def __init__(self, q: float = 0.99) -> None:
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"quantile threshold q must be in (0, 1]; got {q}")
        self.q = float(q)

    def params(self) -> dict[str, Any]:
        return {"q": self.q}

    def _fit(self, scores: np.ndarray) -> dict[str, Any]:
        return {"value": float(np.quantile(scores, self.q))}


class MaxThreshold(Threshold):
    """Threshold at ``factor`` times the largest training score.

    With scores that can be negative (``kind="nll"``) a factor > 1 moves a negative maximum
    *down*; use it with non-negative scores such as NIS.
    """

    name = "max"

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        if not factor > 0.0:
            raise ConfigError(f"max threshold factor must be > 0; got {factor}")
        self.factor = float(factor)

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def _fit(self, scores: np.ndarray) -> dict[str, Any]:
        return {"value": float(scores.max() * self.factor)}


def _gpd_moments(excesses: np.ndarray) -> tuple[float, float]:
    """Method-of-moments GPD shape (gamma) and scale (sigma) from excesses (valid for gamma<1/2)."""
    m = float(excesses.mean())
    v = float(excesses.var(ddof=1))
    ratio = m * m / v
    return 0.5 * (1.0 - ratio), 0.5 * m * (ratio + 1.0)


def _gpd_mle(excesses: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood GPD shape and scale with location fixed at 0 (scipy)."""
    from scipy.stats import genpareto  # deferred: scipy import is slow and only POT needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, _loc, scale = genpareto.fit(excesses, floc=0.0)
    return float(shape), float(scale)


class POTThreshold(Threshold):
    """Peaks-over-threshold: GPD tail fit above the ``level`` quantile, risk ``q``.

    With ``t`` the ``level`` quantile, ``n`` scores and ``k`` excesses ``s - t > 0``, the GPD
    (shape gamma, scale sigma) fitted to the excesses gives the threshold
    ``t + sigma/gamma * ((q n / k)^(-gamma) - 1)`` (``t - sigma log(q n / k)`` when gamma = 0),
    the score exceeded with probability ``q`` under the tail model.

    method: "mle" (scipy.stats.genpareto, falling back to moments if the fit fails or gives an
    unusable shape, gamma <= -1 where the likelihood is unbounded) or "moments".
    At least ``MIN_EXCESSES`` excesses are needed; fewer raise DataError (lower ``level`` or use
    more training data). If all excesses are equal (no tail spread), the threshold is the largest
    training score.
    """

    name = "pot"
    MIN_EXCESSES = 5

    def __init__(self, q: float = 1e-3, level: float = 0.98, method: str = "mle") -> None:
        super().__init__()
        if not 0.0 < level < 1.0:
            raise ConfigError(f"POT threshold level must be in (0, 1); got {level}")
        if not 0.0 < q < 1.0 - level:
            raise ConfigError(
                f"POT threshold risk q must be in (0, 1 - level) = (0, {1.0 - level:g}); got {q}"
            )
        if method not in ("mle", "moments"):
            raise ConfigError(f"POT threshold method must be 'mle' or 'moments'; got {method!r}")
        self.q = float(q)
        self.level = float(level)
        self.method = method

    def params(self) -> dict[str, Any]:
        return {"q": self.q, "level": self.level, "method": self.method}

    def _fit(self, scores: np.ndarray) -> dict[str, Any]:
        init = float(np.quantile(scores, self.level))
        excesses = scores[scores > init] - init
        k, n = int(excesses.size), int(scores.size)
        if k < self.MIN_EXCESSES:
            raise DataError(
                f"POT threshold needs at least {self.MIN_EXCESSES} training scores above the "
                f"level={self.level} quantile; got {k} of {n}: lower the level, give more "
                "training data, or use the quantile threshold"
            )
        base = {"init_threshold": init, "n": n, "n_excesses": k}
        if float(excesses.var()) <= 1e-12 * max(float(excesses.mean()) ** 2, 1e-300):
            return {"value": float(scores.max()), "gamma": 0.0, "sigma": 0.0,
                    "fit": "degenerate", **base}
        gamma, sigma, fit = math.nan, math.nan, self.method
        if self.method == "mle":
            try:
                gamma, sigma = _gpd_mle(excesses)
            except (RuntimeError, ValueError, FloatingPointError):
                gamma = math.nan
        if not (math.isfinite(gamma) and math.isfinite(sigma) and sigma > 0 and gamma > -1.0):
            gamma, sigma = _gpd_moments(excesses)
            fit = "moments"
        r = self.q * n / k
        if abs(gamma) < 1e-9:
            value = init - sigma * math.log(r)
        else:
            value = init + sigma / gamma * (r ** (-gamma) - 1.0)
        return {"value": value, "gamma": gamma, "sigma": sigma, "fit": fit, **base}


THRESHOLDS: dict[str, type[Threshold]] = {
    cls.name: cls for cls in (QuantileThreshold, MaxThreshold, POTThreshold)
}


def build_threshold(name: str, **kwargs: Any) -> Threshold:
    """Build an unfitted threshold by registry name ("quantile", "max", "pot")."""
    cls = THRESHOLDS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown threshold {name!r}; choose one of {sorted(THRESHOLDS)}"
        )
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments for the {name!r} threshold {kwargs}: {err}") from None


def threshold_from_dict(data: dict[str, Any]) -> Threshold:
    """Inverse of ``Threshold.to_dict``."""
    if not isinstance(data, dict) or "name" not in data:
        raise ModelError(f"a saved threshold must be a dict with a 'name'; got {data!r}")
    threshold = build_threshold(data["name"], **dict(data.get("params", {})))
    state = data.get("state")
    if state is not None:
        if "value" not in state:
            raise ModelError(f"saved {data['name']} threshold state has no 'value': {state!r}")
        threshold._set_state(dict(state))
    return threshold
