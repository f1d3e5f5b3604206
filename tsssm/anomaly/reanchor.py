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

In the product it is ``task.window.reanchor.{alpha,gamma,rho,hold}`` (off by default; the
ScoreSpec's ``reanchor``, saved with the bundle): ``tsssm train`` scores the val/test rows with it
(tsssm.tasks.evaluate), ``tsssm score`` and the API score whole streams with it
(``flag_stream``), and files in chunks and live streams carry a :class:`ReanchoredShift` per
stream (tsssm.scoring.stream_scores), so all of them give the same scores.

Several streams and several settings run as one batch (B, T, C): the loop is over time only, so
a grid of settings over many streams costs one pass. :class:`ReanchoredShift` carries the whole
state from one piece of the streams to the next (chunked scoring, live streams): pieces of any
size give the same scores as the whole stream, bit for bit.
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

    def problem(self) -> tuple[str, str] | None:
        """The first bad value as (field, what it must be), or None: the one statement of the
        bounds, worded by each caller (:meth:`check`, the config schema's validate)."""
        if not 0.0 <= self.alpha < 1.0:
            return "alpha", "must lie in [0, 1)"
        if not self.gamma > 0.0:
            return "gamma", "must be > 0"
        if not 0.0 <= self.rho < 1.0:
            return "rho", "must lie in [0, 1)"
        if int(self.hold) != self.hold or self.hold < 1:
            return "hold", "must be a positive integer"
        return None

    def check(self) -> ReanchorSpec:
        """Raises one ConfigError naming the key (task.window.reanchor.<key>) of a bad value."""
        found = self.problem()
        if found is not None:
            name, requirement = found
            raise ConfigError(f"task.window.reanchor.{name} (re-anchor {name}) {requirement}; "
                              f"got {getattr(self, name)!r}")
        return self

    @property
    def active(self) -> bool:
        """Whether the reference can move at all (alpha = rho = 0: the plain shift score)."""
        return self.alpha > 0.0 or self.rho > 0.0


def require_fixed_threshold(threshold, whose: str = "") -> None:
    """Refuse a threshold that moves with the stream (spot, dspot): the re-anchored score is
    flagged around one fixed value, fitted on the plain score. ``whose``: e.g. "the bundle's "."""
    if threshold.follows_stream:
        raise ConfigError("task.window.reanchor needs a fixed threshold (quantile, max or "
                          f"pot); {whose}{threshold.name} moves with the stream")


def _per_row(x, n: int, name: str, dtype=np.float64) -> np.ndarray:
    a = np.broadcast_to(np.asarray(x, dtype=dtype), (n,))
    if not np.all(np.isfinite(a)):
        raise DataError(f"re-anchored score: {name} must be finite; got {x!r}")
    return a


def _settings(B: int, window, spec: ReanchorSpec | None, alpha, gamma, rho, hold
              ) -> tuple[np.ndarray, ...]:
    """Per-batch-row window, alpha, gamma, rho, hold (each (B,)), checked."""
    spec = (spec or ReanchorSpec()).check()
    w = _per_row(window, B, "window", np.int64)
    if np.any(w < 1):
        raise ConfigError(f"score window must be a positive integer; got {window!r}")
    a = _per_row(spec.alpha if alpha is None else alpha, B, "alpha")
    g = _per_row(spec.gamma if gamma is None else gamma, B, "gamma")
    r = _per_row(spec.rho if rho is None else rho, B, "rho")
    h = _per_row(spec.hold if hold is None else hold, B, "hold", np.int64)
    for row in zip(a, g, r, h):  # every batch row's setting must be valid
        ReanchorSpec(float(row[0]), float(row[1]), float(row[2]), int(row[3])).check()
    return w, a, g, r, h


class ReanchoredShift:
    """The re-anchored shift score of B streams fed in consecutive pieces (module doc).

    All of its state is carried between :meth:`update` calls (the reference, the running window
    sums, the alarm's peak and low-row count, and a ring of the last ``max(window, hold) + 1``
    rows' centred innovations and cumulative sums), so pieces of any size give the scores of the
    whole stream at once, bit for bit. Memory is O(B (window + hold) C), not O(B T C).

    n_channels: C; threshold, window: scalars or (B,); the setting is ``spec`` or, per batch
    row, the keyword arrays (as :func:`reanchored_shift_scores`).
    """

    def __init__(self, n_channels: int, threshold, window, spec: ReanchorSpec | None = None,
                 *, batch: int = 1, alpha=None, gamma=None, rho=None, hold=None) -> None:
        B, C = int(batch), int(n_channels)
        self.B, self.C = B, C
        self.thr = _per_row(threshold, B, "threshold")
        self.w, self.a, self.g, self.r, self.h = _settings(B, window, spec, alpha, gamma, rho,
                                                           hold)
        self.L = int(max(self.w.max(), self.h.max())) + 1
        self.t = 0  # rows received
        self.ref = np.zeros((B, C))
        self.run_s = np.zeros((B, C))
        self.run_n = np.zeros((B, C))
        self.CE = np.zeros((B, C))  # cumulative centred innovations and observed counts
        self.CN = np.zeros((B, C))
        # rings (L, B, C), slot t % L: row t's centred innovation, observed indicator and the
        # cumulative sums after it (time-major: one contiguous write per row)
        self.RE = np.zeros((self.L, B, C))
        self.RO = np.zeros((self.L, B, C))
        self.RCE = np.zeros((self.L, B, C))
        self.RCN = np.zeros((self.L, B, C))
        self.anchor = np.zeros(B, np.int64)  # the window never reaches before the last re-anchor
        self.anchored = np.zeros(B, bool)  # re-anchored at least once (reference is an estimate)
        self.alarm = np.zeros(B, bool)
        self.peak = np.zeros(B)
        self.low = np.zeros(B, np.int64)

    def update(self, whitened: np.ndarray, observed: np.ndarray, contributions: bool = True
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """The next rows: whitened innovations (B, n, C) and observed (B, n, C) bool ->
        (score (B, n), contributions (B, n, C) or None)."""
        u = np.asarray(whitened, dtype=np.float64)
        obs = np.asarray(observed, dtype=bool)
        if u.ndim != 3 or obs.shape != u.shape or u.shape[0] != self.B or u.shape[2] != self.C:
            raise DataError(f"whitened innovations must be ({self.B}, n, {self.C}) with observed "
                            f"of the same shape; got {u.shape} and {obs.shape}")
        n = u.shape[1]
        # time-major copies: u_t and obs_t are contiguous (B, C) blocks
        of = np.ascontiguousarray(obs.transpose(1, 0, 2), dtype=np.float64)
        ut = np.where(of > 0, u.transpose(1, 0, 2), 0.0)  # 0 where missing
        score = np.zeros((n, self.B))
        contrib = np.zeros((n, self.B, self.C)) if contributions else None
        L, idx = self.L, np.arange(self.B)
        ref, run_s, run_n, CE, CN = self.ref, self.run_s, self.run_n, self.CE, self.CN
        RE, RO, RCE, RCN = self.RE, self.RO, self.RCE, self.RCN
        w, a, g, r, h, thr = self.w, self.a, self.g, self.r, self.h, self.thr
        anchor, anchored = self.anchor, self.anchored
        alarm, peak, low = self.alarm, self.peak, self.low
        hcol = h[:, None]
        drifting = bool((a > 0).any())
        anchoring = r > 0
        any_anchoring = bool(anchoring.any())
        part = np.empty((self.B, self.C))
        for k in range(n):
            t = self.t
            slot = t % L
            o = of[k]
            e = (ut[k] - ref) * o
            RE[slot] = e
            RO[slot] = o
            CE += e
            CN += o
            RCE[slot] = CE
            RCN[slot] = CN
            run_s += e
            run_n += o
            old = t - w  # the row leaving each window, if the window has not restarted since
            leave = old >= anchor
            if leave.any():
                j = old % L
                run_s -= np.where(leave[:, None], RE[j, idx], 0.0)
                run_n -= np.where(leave[:, None], RO[j, idx], 0.0)
            n_ch = np.count_nonzero(run_n > 0.5, axis=1)
            np.multiply(run_s, run_s, out=part)
            den = np.maximum(run_n, 1.0)
            if anchored.any():
                # after a re-anchor the reference is the mean of `hold` rows, so a sum over n
                # rows around it has variance n (1 + n / hold) rather than n: scaled back to
                # chi-square (elsewhere the factor is 1, and x * 1.0 == x exactly)
                den *= np.where(anchored[:, None], 1.0 + run_n / hcol, 1.0)
            part /= den
            part /= np.maximum(n_ch, 1)[:, None]
            empty = n_ch == 0
            if empty.any():
                part[empty] = 0.0
            if contrib is not None:
                contrib[k] = part
            s = part.sum(axis=1)
            score[k] = s
            above = s > thr
            start = above & ~alarm
            peak = np.where(start, s, np.where(above, np.maximum(peak, s), 0.0))
            low = np.where(above & (s < r * peak), low + 1, 0)
            alarm = above
            if any_anchoring:
                jump = above & anchoring & (low >= h)
                if jump.any():
                    q = np.flatnonzero(jump)
                    lo = (t - h[q]) % L  # the cumulative sums before row t + 1 - hold
                    cnt = CN[q] - RCN[lo, q]
                    mean = (CE[q] - RCE[lo, q]) / np.maximum(cnt, 1.0)
                    ref[q] += np.where(cnt > 0, mean, 0.0)
                    anchor[q] = t + 1
                    anchored[q] = True
                    run_s[q] = 0.0
                    run_n[q] = 0.0
                    alarm[q] = False
                    peak[q] = 0.0
                    low[q] = 0
            if drifting:
                drift = ~above & (a > 0) & (s < g * thr)
                if drift.any():
                    ref[drift] += a[drift, None] * e[drift]
            self.t = t + 1
        self.alarm, self.peak, self.low = alarm, peak, low
        return (score.T.copy(),
                None if contrib is None else np.ascontiguousarray(contrib.transpose(1, 0, 2)))


def reanchored_shift_scores(whitened: np.ndarray, observed: np.ndarray, threshold,
                            window, spec: ReanchorSpec | None = None, *, alpha=None,
                            gamma=None, rho=None, hold=None, contributions: bool = True
                            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Shift scores (B, T) and their per-channel contributions (B, T, C) around the guarded
    reference (module doc), the whole streams at once (:class:`ReanchoredShift` in one piece).

    whitened: (B, T, C) or (T, C) whitened innovations (``StepTerms.whitened``; 0 where
    missing); observed: the same shape, bool. threshold, window: scalars or (B,) (one per batch
    row, e.g. a grid of settings); the setting is ``spec`` or, per batch row, the keyword
    arrays ``alpha``, ``gamma``, ``rho``, ``hold`` (each scalar or (B,), defaulting to
    ``spec``'s). A (T, C) input gives (T,) and (T, C) back. The contributions of a row sum to
    its score; a row whose window holds no observation scores 0. ``contributions=False``:
    None in their place (less memory for a large grid).
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
    state = ReanchoredShift(C, threshold, window, spec, batch=B, alpha=alpha, gamma=gamma,
                            rho=rho, hold=hold)
    score, contrib = state.update(u, obs, contributions)
    if single:
        return score[0], None if contrib is None else contrib[0]
    return score, contrib
