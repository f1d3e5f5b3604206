"""A windowed shift score whose reference re-anchors after a fault, without following it.

The ``"shift"`` window score (tsssm.anomaly.scores) adds up the whitened one-step innovations
``u_t`` of the last ``w`` rows around a reference of 0: the operating point of the rows the model
was fitted on, frozen. That is what lets it see a long fault at all (a reference that followed the
data would absorb the fault's level shift), and also why it keeps alarming after a fault when the
process settles at a slightly different operating point (SKAB: 36% of the normal rows after each
file's fault are flagged, 8% before it).

Here the reference ``b_t`` (C,) moves, but only in two guarded ways:

- **drift on normal rows**: on a row whose score is below ``gamma`` x the threshold (clearly
  normal, not merely unflagged) the reference takes a step ``alpha`` towards the row's
  innovation, ``b += alpha * (u_t - b)`` (an EWMA of the normal rows, time constant
  ``1 / alpha`` rows). Rows near or above the threshold never move it, so a fault's onset is not
  absorbed while it builds up.
- **re-anchoring after an alarm**: while an alarm lasts, its peak score is tracked; once the
  score has stayed below ``rho`` x that peak for ``hold`` consecutive rows (the fault is over: the
  deviation fell by a factor ``1 / rho`` though it is still above the threshold), the reference
  jumps to the mean innovation of those ``hold`` rows and the window restarts there. A steady
  fault never re-anchors (its score does not fall relative to its own peak); what is left after
  a large fault, an offset far smaller than the fault, is taken as the new normal. The new
  reference is an estimate from ``hold`` rows, so a window sum of ``n`` rows around it has
  variance ``n (1 + n / hold)`` per channel, not ``n``: the score divides by that, and stays
  on the scale of the threshold.

With ``alpha = 0`` and ``rho = 0`` the score equals the plain trailing ``"shift"`` score exactly
(tests/anomaly/test_reanchor.py). The threshold is an input, not an output: it is the threshold
fitted as usual on the plain score of the validation rows (no label), where the reference has
not moved. The score is causal (trailing windows only): every row's score uses rows up to it.

Several streams and several settings run as one batch (B, T, C): the loop is over time only, so
a grid of settings over many streams costs one pass.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tsssm.errors import ConfigError, DataError


class ReanchorSpec(NamedTuple):
    """How the reference of the shift score moves (see the module doc)."""

    alpha: float = 0.0  # EWMA rate of the reference on clearly normal rows (0: never drifts)
    gamma: float = 0.5  # "clearly normal": score below gamma x threshold
    rho: float = 0.0  # re-anchor when an alarm's score stays below rho x its peak (0: never)
    hold: int = 20  # ... for this many consecutive rows

    def check(self) -> ReanchorSpec:
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"re-anchor alpha must be in [0, 1); got {self.alpha!r}")
        if not self.gamma > 0.0:
            raise ConfigError(f"re-anchor gamma must be > 0; got {self.gamma!r}")
        if not 0.0 <= self.rho < 1.0:
            raise ConfigError(f"re-anchor rho must be in [0, 1); got {self.rho!r}")
        if int(self.hold) != self.hold or self.hold < 1:
            raise ConfigError(f"re-anchor hold must be a positive integer; got {self.hold!r}")
        return self


def _per_row(x, n: int, name: str, dtype=np.float64) -> np.ndarray:
    a = np.broadcast_to(np.asarray(x, dtype=dtype), (n,))
    if not np.all(np.isfinite(a)):
        raise DataError(f"re-anchored score: {name} must be finite; got {x!r}")
    return a


def reanchored_shift_scores(whitened: np.ndarray, observed: np.ndarray, threshold,
                            window, spec: ReanchorSpec | None = None, *, alpha=None,
                            gamma=None, rho=None, hold=None) -> tuple[np.ndarray, np.ndarray]:
    """Shift scores (B, T) and their per-channel contributions (B, T, C) around the guarded
    reference (module doc).

    whitened: (B, T, C) or (T, C) whitened innovations (``StepTerms.whitened``; 0 where
    missing); observed: the same shape, bool. threshold, window: scalars or (B,) (one per batch
    row, e.g. a grid of settings); the setting is ``spec`` or, per batch row, the keyword
    arrays ``alpha``, ``gamma``, ``rho``, ``hold`` (each scalar or (B,), defaulting to
    ``spec``'s). A (T, C) input gives (T,) and (T, C) back. The contributions of a row sum to
    its score; a row whose window holds no observation scores 0.
    """
    u = np.asarray(whitened, dtype=np.float64)
    obs = np.asarray(observed, dtype=bool)
    single = u.ndim == 2
    if single:
        u, obs = u[None], obs[None]
    if u.ndim != 3 or obs.shape != u.shape:
        raise DataError(f"whitened innovations must be (B, T, C) with observed of the same "
                        f"shape; got {u.shape} and {obs.shape}")
    B, T, C = u.shape
    spec = (spec or ReanchorSpec()).check()
    thr = _per_row(threshold, B, "threshold")
    w = _per_row(window, B, "window", np.int64)
    if np.any(w < 1):
        raise ConfigError(f"score window must be a positive integer; got {window!r}")
    a = _per_row(spec.alpha if alpha is None else alpha, B, "alpha")
    g = _per_row(spec.gamma if gamma is None else gamma, B, "gamma")
    r = _per_row(spec.rho if rho is None else rho, B, "rho")
    h = _per_row(spec.hold if hold is None else hold, B, "hold", np.int64)
    for row in zip(a, g, r, h):  # every batch row's setting must be valid
        ReanchorSpec(float(row[0]), float(row[1]), float(row[2]), int(row[3])).check()
    u = np.where(obs, u, 0.0)
    of = obs.astype(np.float64)
    idx = np.arange(B)
    ref = np.zeros((B, C))
    # E[:, t] = the row's innovation around the reference in force at t (0 where missing);
    # CE / CN their cumulative sums and observed counts (for the window and the re-anchor mean)
    E = np.zeros((B, T, C))
    CE = np.zeros((B, T + 1, C))
    CN = np.zeros((B, T + 1, C))
    run_s = np.zeros((B, C))
    run_n = np.zeros((B, C))
    anchor = np.zeros(B, np.int64)  # the window never reaches before the last re-anchor
    anchored = np.zeros(B, bool)  # re-anchored at least once (the reference is an estimate)
    alarm = np.zeros(B, bool)
    peak = np.zeros(B)
    low = np.zeros(B, np.int64)
    score = np.zeros((B, T))
    contrib = np.zeros((B, T, C))
    for t in range(T):
        e = (u[:, t] - ref) * of[:, t]
        E[:, t] = e
        CE[:, t + 1] = CE[:, t] + e
        CN[:, t + 1] = CN[:, t] + of[:, t]
        run_s += e
        run_n += of[:, t]
        old = t - w  # the row leaving each window, if the window has not restarted since
        leave = old >= anchor
        if leave.any():
            j = np.clip(old, 0, None)
            run_s -= np.where(leave[:, None], E[idx, j], 0.0)
            run_n -= np.where(leave[:, None], of[idx, j], 0.0)
        n_ch = np.count_nonzero(run_n > 0.5, axis=1)
        # after a re-anchor the reference is the mean of `hold` rows, so a sum over n rows
        # around it has variance n (1 + n / hold) rather than n: scaled back to chi-square
        inflate = np.where(anchored[:, None], 1.0 + run_n / h[:, None], 1.0)
        part = run_s * run_s / (np.maximum(run_n, 1.0) * inflate) / np.maximum(n_ch, 1)[:, None]
        part[n_ch == 0] = 0.0
        contrib[:, t] = part
        s = part.sum(axis=1)
        score[:, t] = s
        above = s > thr
        start = above & ~alarm
        peak = np.where(start, s, np.where(above, np.maximum(peak, s), 0.0))
        low = np.where(above & (s < r * peak), low + 1, 0)
        alarm = above
        jump = above & (r > 0) & (low >= h)
        if jump.any():
            k = np.flatnonzero(jump)
            lo = t + 1 - h[k]
            cnt = CN[k, t + 1] - CN[k, lo]
            mean = (CE[k, t + 1] - CE[k, lo]) / np.maximum(cnt, 1.0)
            ref[k] += np.where(cnt > 0, mean, 0.0)
            anchor[k] = t + 1
            anchored[k] = True
            run_s[k] = 0.0
            run_n[k] = 0.0
            alarm[k] = False
            peak[k] = 0.0
            low[k] = 0
        drift = ~above & (a > 0) & (s < g * thr)
        if drift.any():
            ref[drift] += a[drift, None] * e[drift]
    if single:
        return score[0], contrib[0]
    return score, contrib
