"""Thresholds on anomaly scores, as small fitted components saved with the model.

A threshold is fitted on scores of (assumed normal) training data and then flags
``score > value`` on new data (strictly greater, so a score exactly at the threshold is normal).
Each threshold round-trips through a plain JSON-able dict (``to_dict`` / ``threshold_from_dict``)
so it can be stored next to the model checkpoint.

- ``QuantileThreshold(q)``: the q-quantile of the training scores.
- ``MaxThreshold(factor)``: max of the training scores times ``factor`` (as in SKAB's notebooks).
- ``POTThreshold(q, level)``: peaks over threshold (Siffer et al., KDD 2017, "Anomaly detection in
  streams with extreme value theory"): the excesses over the ``level`` quantile are fitted with a
  generalised Pareto distribution and the threshold is the score exceeded with probability ``q``
  (the risk).
- ``SPOTThreshold(q, level)``: streaming POT (the paper's SPOT): fitted as POT, then, along each
  stream, every score above the initial threshold but below the current one is a new peak that
  refits the tail; scores above the current threshold are flagged and left out.
- ``DSPOTThreshold(q, level, depth)``: SPOT on the score minus the mean of the ``depth`` preceding
  unflagged scores (the paper's DSPOT, for drifting scores).

All thresholds are fitted on scores of training rows only; nothing here sees a label. ``levels``
gives the threshold in force at every row (constant except for the streaming rules), ``flags``
the rows above it; the streaming rules treat the array they get as one stream in time order, so
call them once per stream.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

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
    #: True when the level follows the stream (SPOT): a stream fed in pieces carries
    #: :meth:`levels_update`'s state; False: one constant level
    follows_stream: ClassVar[bool] = False

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

    def levels(self, scores: Any) -> np.ndarray:
        """The threshold in force at every entry of ``scores`` (same shape)."""
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        arr = np.asarray(scores, dtype=np.float64)
        _as_scores(arr, "scores to flag")
        return np.full(arr.shape, self.value)

    def levels_update(self, scores: Any, carry: Any = None) -> tuple[np.ndarray, Any]:
        """The levels of the next scores (1-D) of a stream fed in pieces, continuing from
        ``carry`` (None: the stream's start). Returns (levels, carry for the next piece); the
        pieces' levels equal :meth:`levels` of the whole stream (a constant rule carries
        nothing)."""
        return self.levels(scores), None

    def flags(self, scores: Any) -> np.ndarray:
        """Boolean array of the same shape as ``scores``: ``score > level`` (strictly)."""
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        arr = np.asarray(scores, dtype=np.float64)
        return arr > self.levels(arr)

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
    At least ``MIN_EXCESSES`` excesses are needed: with few scores the initial threshold moves
    below the ``level`` quantile to leave that many (``state["level_used"]``); with fewer than
    ``2 * MIN_EXCESSES`` scores (or a risk not below the excess fraction) it raises DataError.
    If all excesses are equal (no tail spread), the threshold is the largest
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
        n = int(scores.size)
        # With few scores the level quantile leaves too few excesses to fit a tail: the initial
        # threshold then moves down to leave MIN_EXCESSES of them (recorded as "level_used"),
        # as long as the risk stays below the fraction of excesses.
        level = min(self.level, 1.0 - self.MIN_EXCESSES / n)
        if level < 0.5 or self.q >= 1.0 - level:
            raise DataError(
                f"POT threshold needs at least {self.MIN_EXCESSES} training scores above the "
                f"level={self.level} quantile and a risk below their fraction; got {n} scores: "
                "give more training data, or use the quantile threshold"
            )
        init = float(np.quantile(scores, level))
        excesses = scores[scores > init] - init
        k = int(excesses.size)
        if k < self.MIN_EXCESSES:
            raise DataError(
                f"POT threshold needs at least {self.MIN_EXCESSES} training scores above the "
                f"level={level:g} quantile; got {k} of {n} (many equal scores): lower the level, "
                "give more training data, or use the quantile threshold"
            )
        base = {"init_threshold": init, "n": n, "n_excesses": k, "level_used": level}
        if float(excesses.var()) <= 1e-12 * max(float(excesses.mean()) ** 2, 1e-300):
            return {"value": float(scores.max()), "gamma": 0.0, "sigma": 0.0,
                    "fit": "degenerate", **base}
        gamma, sigma, fit = _gpd_fit(excesses, self.method)
        value = _pot_value(init, gamma, sigma, self.q, n, k)
        return {"value": value, "gamma": gamma, "sigma": sigma, "fit": fit, **base}


def _gpd_fit(excesses: np.ndarray, method: str) -> tuple[float, float, str]:
    """(gamma, sigma, how) of a GPD fitted to positive excesses (MLE falling back to moments)."""
    gamma, sigma, fit = math.nan, math.nan, method
    if method == "mle":
        try:
            gamma, sigma = _gpd_mle(excesses)
        except (RuntimeError, ValueError, FloatingPointError):
            gamma = math.nan
    if not (math.isfinite(gamma) and math.isfinite(sigma) and sigma > 0 and gamma > -1.0):
        gamma, sigma = _gpd_moments(excesses)
        fit = "moments"
    return gamma, sigma, fit


def _pot_value(init: float, gamma: float, sigma: float, q: float, n: int, k: int) -> float:
    """The score exceeded with probability q under the tail model (Siffer et al., eq. 1)."""
    r = q * n / k
    if abs(gamma) < 1e-9:
        return init - sigma * math.log(r)
    return init + sigma / gamma * (r ** (-gamma) - 1.0)


class SPOTThreshold(POTThreshold):
    """Streaming POT: POT fitted on training scores, its tail updated along each stream.

    ``flags(scores)`` / ``levels(scores)`` run the SPOT recursion over ``scores`` as one stream in
    time order, from the fitted state (the fitted threshold itself never changes, so every stream
    starts from the same training fit). A score above the current threshold is flagged and not
    added to the tail; a score between the initial and the current threshold is a new peak, and
    the GPD is refitted (by moments, O(1) per peak: the recursion must keep up with a live stream;
    the initial fit uses ``method``). Leaving flagged scores out of the tail censors it slightly,
    so over a long normal stream the threshold creeps down (measured: -11% after 50,000
    exponential scores at risk 1e-3, i.e. a false-alarm rate of 2e-3 instead of 1e-3); refit
    from training data now and then.
    """

    name = "spot"
    follows_stream = True

    def _fit(self, scores: np.ndarray) -> dict[str, Any]:
        state = super()._fit(self._transform_train(scores))
        init = state["init_threshold"]
        t = self._transform_train(scores)
        # the peaks are part of the state: the stream's new peaks are added to them
        state["peaks"] = (t[t > init] - init).tolist()
        state["train_mean"] = float(np.mean(scores))
        return state

    def _transform_train(self, scores: np.ndarray) -> np.ndarray:
        return scores

    def _drift(self) -> _Drift | None:
        return None

    def levels(self, scores: Any) -> np.ndarray:
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        return self.levels_update(scores)[0].reshape(np.shape(scores))

    def levels_update(self, scores: Any, carry: SpotCarry | None = None
                      ) -> tuple[np.ndarray, SpotCarry]:
        """The SPOT recursion over the next scores, from ``carry`` (None: the fitted state)."""
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        arr = _as_scores(scores, "scores to flag")
        value = self.value  # raises if not fitted
        st = self._state
        init = st["init_threshold"]
        if carry is None:
            peaks = list(st.get("peaks", []))
            carry = SpotCarry(value, int(st["n"]), float(np.sum(peaks)),
                              float(np.sum(np.square(peaks))), len(peaks), ())
        z, n, s1, s2, k = carry.z, carry.n, carry.s1, carry.s2, carry.k
        drift = self._drift()
        if drift is not None:
            drift.window = list(carry.recent)
        out = np.empty(arr.size)
        for i, x in enumerate(arr):
            base = drift.level() if drift is not None else 0.0
            out[i] = z + base
            v = x - base
            if v > z:  # flagged: an anomaly does not teach the tail
                continue
            n += 1
            if drift is not None:
                drift.push(x)
            if v > init:
                e = v - init
                s1, s2, k = s1 + e, s2 + e * e, k + 1
                mean = s1 / k
                var = (s2 - k * mean * mean) / max(k - 1, 1)
                if var > 1e-12 * max(mean * mean, 1e-300):
                    ratio = mean * mean / var
                    gamma, sigma = 0.5 * (1.0 - ratio), 0.5 * mean * (ratio + 1.0)
                    z = _pot_value(init, gamma, sigma, self.q, n, k)
        recent = tuple(drift.window) if drift is not None else ()
        return out, SpotCarry(z, n, s1, s2, k, recent)


class SpotCarry(NamedTuple):
    """What SPOT carries along a stream: the current threshold, the score count, the tail's
    sums and size, and (DSPOT) the last ``depth`` unflagged scores."""

    z: float
    n: int
    s1: float
    s2: float
    k: int
    recent: tuple[float, ...]


class _Drift:
    """Mean of the last ``depth`` unflagged scores (DSPOT's local model), ``fallback`` before."""

    def __init__(self, depth: int, fallback: float) -> None:
        self.depth, self.fallback = depth, fallback
        self.window: list[float] = []

    def level(self) -> float:
        return float(np.mean(self.window)) if self.window else self.fallback

    def push(self, x: float) -> None:
        self.window.append(float(x))
        if len(self.window) > self.depth:
            self.window.pop(0)


class DSPOTThreshold(SPOTThreshold):
    """SPOT on drift-corrected scores: ``score - mean(last depth unflagged scores)``.

    The tail is fitted on the training scores minus their own moving mean; along a stream the
    moving mean starts from the training mean and follows the stream's unflagged scores, and the
    threshold in force is the drift level plus the SPOT threshold of the corrected scores.
    """

    name = "dspot"

    def __init__(self, q: float = 1e-3, level: float = 0.98, method: str = "mle",
                 depth: int = 10) -> None:
        super().__init__(q, level, method)
        if isinstance(depth, bool) or int(depth) != depth or depth < 1:
            raise ConfigError(f"DSPOT depth must be a positive integer; got {depth!r}")
        self.depth = int(depth)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "depth": self.depth}

    def _transform_train(self, scores: np.ndarray) -> np.ndarray:
        d = self.depth
        if scores.size <= d:
            raise DataError(f"DSPOT needs more than depth={d} training scores; got {scores.size}")
        c = np.concatenate([[0.0], np.cumsum(scores)])
        moving = (c[d:-1] - c[:-d - 1]) / d  # mean of the d scores before each of scores[d:]
        return scores[d:] - moving

    def _drift(self) -> _Drift:
        return _Drift(self.depth, float(self._state.get("train_mean", 0.0)))


THRESHOLDS: dict[str, type[Threshold]] = {
    cls.name: cls
    for cls in (QuantileThreshold, MaxThreshold, POTThreshold, SPOTThreshold, DSPOTThreshold)
}


def build_threshold(name: str, **kwargs: Any) -> Threshold:
    """Build an unfitted threshold by registry name ("quantile", "max", "pot", "spot",
    "dspot")."""
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
