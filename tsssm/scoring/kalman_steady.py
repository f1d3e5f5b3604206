"""The Kalman forecaster's filter in numpy, for scoring: chunk by chunk or sample by sample.

:class:`tsssm.models.kalman.KalmanForecaster` runs one univariate, time-invariant structural
model per channel. Scoring needs only its one-step predictive moments, and for a time-invariant
model the covariance recursion reaches a fixed point after a few hundred observed steps: from
then on the gain ``K``, the predictive variance ``S`` and the closed-loop matrix
``A = F - K h'F`` are constants and the filter is a linear time-invariant system of the data::

    pred_t = g' s_{t-1}            g = F' h  (the prediction of y_t from the last filtered state)
    s_t    = A s_{t-1} + K y_t     (the filtered state)

This module runs that system without torch's per-op overhead (~5-10 us, too much for a live
sample): one step costs a handful of numpy calls on (C, n) arrays, and a chunk of rows at the
fixed point is solved in blocks of ``BLOCK`` rows by matrix products (the block's outputs from its
start state and its inputs, the block-start states by the same recurrence one level up), so a
long stream costs O(n) multiply-adds per row and channel instead of a Python step. Rows with a
missing entry, and the rows after one until the covariance is back at its fixed point, run the
textbook recursion step by step with exactly the torch filter's formulas (Joseph form for a
scalar observation, symmetrised). The fixed point is found by the discrete algebraic Riccati
equation and polished by the filter's own map until it repeats, so switching to it changes no
result beyond rounding (the torch filter stops its covariance recursion the same way).

Results equal ``KalmanForecaster.one_step`` (tests/scoring/test_kalman_steady.py) to ~1e-12
relative in float64; chunked calls and single steps equal one call over the whole stream.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tsssm.errors import ModelError

#: rows per block of the fixed-point solve (the block Toeplitz product costs BLOCK per row)
BLOCK = 32
#: the covariance counts as at its fixed point within this many ulps (relative to its largest
#: entry); the torch filter uses 64 between consecutive steps
TOL_ULPS = 256
#: at most this many polishing steps of the Riccati map from the DARE solution
MAX_POLISH = 10_000


class SteadyState(NamedTuple):
    """The filter at its fixed point (every channel observed at every step)."""

    P_pred: np.ndarray  # (C, n, n) predicted state covariance
    P_filt: np.ndarray  # (C, n, n) filtered state covariance
    S: np.ndarray  # (C,) predictive variance of the observation
    K: np.ndarray  # (C, n) gain
    g: np.ndarray  # (C, n) F' h: pred_t = g . s_{t-1}
    A: np.ndarray  # (C, n, n) F - K g': s_t = A s_{t-1} + K y_t


class FilterState(NamedTuple):
    """The filtered state after the last step (as ``KalmanState``, in numpy)."""

    mean: np.ndarray  # (C, n)
    cov: np.ndarray  # (C, n, n)


def _sym(P: np.ndarray) -> np.ndarray:
    return 0.5 * (P + np.swapaxes(P, -1, -2))


def _mv(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Batched matrix-vector product: (C, a, b) x (C, b) -> (C, a)."""
    return np.matmul(M, v[..., None])[..., 0]


class KalmanSteadyFilter:
    """One-step predictive moments of C independent univariate state space models, carried
    across calls.

    F, Q (C, n, n); h (C, n); r (C,); m0 (C, n), P0 (C, n, n): the prior of the first state.
    ``filter(y)`` (T, C) and ``step(y)`` (C,) return the predictive mean and variance of every
    observation given the ones before it (NaN = missing), and advance the state.
    """

    def __init__(self, F: np.ndarray, Q: np.ndarray, h: np.ndarray, r: np.ndarray,
                 m0: np.ndarray, P0: np.ndarray) -> None:
        self.F = np.ascontiguousarray(F, np.float64)
        self.Q = np.ascontiguousarray(Q, np.float64)
        self.h = np.ascontiguousarray(h, np.float64)
        self.r = np.ascontiguousarray(r, np.float64)
        self.m0 = np.ascontiguousarray(m0, np.float64)
        self.P0 = np.ascontiguousarray(P0, np.float64)
        C, n = self.h.shape
        for name, x, shape in (("F", self.F, (C, n, n)), ("Q", self.Q, (C, n, n)),
                               ("r", self.r, (C,)), ("m0", self.m0, (C, n)),
                               ("P0", self.P0, (C, n, n))):
            if x.shape != shape:
                raise ModelError(f"KalmanSteadyFilter: {name} must be {shape}, got {x.shape}")
        self.n_channels, self.n_states = C, n
        self.FT = np.ascontiguousarray(np.swapaxes(self.F, -1, -2))
        self.steady = self._fixed_point()
        self._blocks: dict[int, tuple[np.ndarray, ...]] = {}
        self.reset()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_forecaster(cls, model) -> KalmanSteadyFilter:
        """The filter of a :class:`tsssm.models.kalman.KalmanForecaster` (its current weights)."""
        import torch

        with torch.no_grad():
            ssm = model.ssm()  # batch (C,): F, H (C, 1, n), Q, R (C, 1, 1), m0, P0
        if ssm.H.shape[-2] != 1 or ssm.time_varying or ssm.d is not None or ssm.c is not None:
            raise ModelError("KalmanSteadyFilter needs univariate, time-invariant models")

        def arr(x):
            return x.detach().to("cpu", torch.float64).numpy()

        C = model.n_channels
        n = ssm.F.shape[-1]
        h = np.broadcast_to(arr(ssm.H)[..., 0, :], (C, n))
        return cls(np.broadcast_to(arr(ssm.F), (C, n, n)), np.broadcast_to(arr(ssm.Q), (C, n, n)),
                   h, np.broadcast_to(arr(ssm.R)[..., 0, 0], (C,)),
                   np.broadcast_to(arr(ssm.m0), (C, n)), np.broadcast_to(arr(ssm.P0), (C, n, n)))

    def _riccati(self, P_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One observed step of the covariance recursion: (P_filt, next P_pred)."""
        PHt = _mv(P_pred, self.h)
        S = (self.h * PHt).sum(-1) + self.r
        K = PHt / S[:, None]
        G = K[:, :, None] * PHt[:, None, :]
        P = _sym(P_pred - G - np.swapaxes(G, -1, -2) + (K * S[:, None])[:, :, None] * K[:, None, :])
        return P, _sym(self.Q + np.matmul(np.matmul(self.F, P), self.FT))

    def _fixed_point(self) -> SteadyState | None:
        """The covariance fixed point with every channel observed, or None where there is none
        (then every step runs the full recursion: still exact, only slower)."""
        from scipy.linalg import solve_discrete_are

        C, n = self.n_channels, self.n_states
        P = np.empty((C, n, n))
        try:
            for c in range(C):
                P[c] = solve_discrete_are(self.FT[c], self.h[c][:, None], self.Q[c],
                                          self.r[c].reshape(1, 1))
        except (ValueError, np.linalg.LinAlgError):
            return None
        if not np.isfinite(P).all():
            return None
        P = _sym(P)
        tol = TOL_ULPS * np.finfo(np.float64).eps
        for _ in range(MAX_POLISH):
            P_filt, nxt = self._riccati(P)
            scale = np.abs(P).max((-2, -1), keepdims=True)
            done = bool((np.abs(nxt - P) <= tol * scale).all())
            if done:
                break
            P = nxt
        else:
            return None
        PHt = _mv(P, self.h)
        S = (self.h * PHt).sum(-1) + self.r
        if not (S > 0).all():
            return None
        K = PHt / S[:, None]
        g = _mv(self.FT, self.h)
        A = self.F - K[:, :, None] * g[:, None, :]
        if np.abs(np.linalg.eigvals(A)).max() >= 1.0:
            return None  # not a stable closed loop: the blocked solve would not be exact
        return SteadyState(P, P_filt, S, K, g, A)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the prior: the next step is the stream's first."""
        self.m: np.ndarray | None = None  # (C, n) filtered mean after the last step
        self.P: np.ndarray | None = None  # (C, n, n) filtered covariance (unless at_fixed_point)
        self.at_fixed_point = False  # P is the fixed point's P_filt (and not tracked)

    def get_state(self) -> FilterState | None:
        """The filtered state after the last step, or None before the first."""
        if self.m is None:
            return None
        P = self.steady.P_filt if self.at_fixed_point else self.P
        return FilterState(self.m.copy(), P.copy())

    def set_state(self, state: FilterState | None) -> None:
        """Continue from a state of ``get_state`` (or a KalmanState's mean/cov, (1, C, ...))."""
        if state is None:
            self.reset()
            return
        m = np.asarray(state.mean, np.float64).reshape(self.n_channels, self.n_states)
        P = np.asarray(state.cov, np.float64).reshape(self.n_channels, self.n_states,
                                                      self.n_states)
        self.m, self.P, self.at_fixed_point = m.copy(), P.copy(), False
        self._check_fixed_point()

    def _check_fixed_point(self) -> None:
        ss = self.steady
        if ss is None or self.P is None:
            return
        tol = TOL_ULPS * np.finfo(np.float64).eps
        scale = np.abs(ss.P_filt).max((-2, -1), keepdims=True)
        if bool((np.abs(self.P - ss.P_filt) <= tol * scale).all()):
            self.at_fixed_point, self.P = True, None

    # ------------------------------------------------------------------ one step
    def step(self, y: np.ndarray, observed: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Advance by one observation y (C,) (NaN = missing; ``observed=True``: the caller knows
        there is none): predictive (mean, var) (C,), float64 (var is ``steady.S`` itself at the
        fixed point)."""
        if self.at_fixed_point and (observed or (observed is None and not np.isnan(y).any())):
            ss = self.steady
            Fm = np.matmul(self.F, self.m[..., None])[..., 0]
            pred = np.einsum("cn,cn->c", self.h, Fm)
            Fm += ss.K * (y - pred)[:, None]
            self.m = Fm
            return pred, ss.S
        return self._general_step(np.asarray(y, np.float64))

    def _general_step(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full recursion, as the torch filter computes it (missing channels: no update)."""
        observed = ~np.isnan(y)
        if self.m is None:
            m, P = self.m0.copy(), self.P0
        else:
            P = self.steady.P_filt if self.at_fixed_point else self.P
            m = _mv(self.F, self.m)
            P = _sym(self.Q + np.matmul(np.matmul(self.F, P), self.FT))
        PHt = _mv(P, self.h)
        S = (self.h * PHt).sum(-1) + self.r  # unmasked: the predictive variance of every channel
        pred = (self.h * m).sum(-1)
        if not (S > 0).all():
            from tsssm.errors import NumericalError

            raise NumericalError("the innovation variance is not positive; check the model's "
                                 "parameters and the data's scale")
        K = PHt / S[:, None]
        v = np.where(observed, np.where(observed, y, 0.0) - pred, 0.0)
        m = m + K * v[:, None]
        G = K[:, :, None] * PHt[:, None, :]
        P_upd = _sym(P - G - np.swapaxes(G, -1, -2) + (K * S[:, None])[:, :, None] * K[:, None, :])
        self.P = np.where(observed[:, None, None], P_upd, P)
        self.m = m
        self.at_fixed_point = False
        if observed.all():
            self._check_fixed_point()
        return pred, S

    # ------------------------------------------------------------------ many steps
    def filter(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predictive (mean, var) (T, C) of every row of y (T, C) (NaN = missing), in order;
        the state carries on to the next call. A chunk wholly at the fixed point gets its one
        variance as a read-only broadcast view."""
        y = np.asarray(y, np.float64)
        T, width = y.shape
        if width != self.n_channels:
            raise ModelError(f"expected {self.n_channels} channels, got {width}")
        mean = np.empty((T, width))
        gaps = np.flatnonzero(np.isnan(y).any(1))  # rows that leave the fixed point
        if self.at_fixed_point and len(gaps) == 0 and T:
            # the whole chunk at the fixed point: one variance for every row (a read-only view)
            self._steady_run(y, mean, None)
            return mean, np.broadcast_to(self.steady.S, (T, width))
        var = np.empty((T, width))
        t, g = 0, 0
        while t < T:
            if self.at_fixed_point:
                while g < len(gaps) and gaps[g] < t:
                    g += 1
                end = int(gaps[g]) if g < len(gaps) else T
                if end > t:
                    self._steady_run(y[t:end], mean[t:end], var[t:end])
                    t = end
                    continue
            mean[t], var[t] = self._general_step(y[t])
            t += 1
        return mean, var

    def _steady_run(self, y: np.ndarray, mean: np.ndarray, var: np.ndarray | None) -> None:
        """Rows y (T, C), all observed, from the fixed point: outputs into mean/var (T, C)
        (var None: the caller needs no copy of the constant variance)."""
        ss = self.steady
        if var is not None:
            var[:] = ss.S
        T = len(y)
        L = BLOCK
        nb = T // L if T >= 4 * L else 0
        s = self.m
        if nb:
            O, M, Cc, carries = self._block_matrices(L)
            main = nb * L
            Yb = np.ascontiguousarray(y[:main].T).reshape(self.n_channels, nb, L)  # (C, nb, L)
            U = np.matmul(Yb, Cc)  # (C, nb, n): each block's end state from a zero start
            ends = carries.states(U, s)  # (C, nb, n) the filtered state at each block's end
            starts = np.concatenate([s[:, None, :], ends[:, :-1]], axis=1)
            pred = np.matmul(Yb, M) + np.matmul(starts, O)  # (C, nb, L)
            mean[:main] = pred.reshape(self.n_channels, main).T
            s = ends[:, -1]
        else:
            main = 0
        for t in range(main, T):  # the rest, step by step
            Fm = _mv(self.F, s)
            p = (self.h * Fm).sum(-1)
            mean[t] = p
            s = Fm + ss.K * (y[t] - p)[:, None]
        self.m = np.ascontiguousarray(s)

    def _block_matrices(self, L: int) -> tuple[np.ndarray, ...]:
        """For blocks of L rows from the fixed point, with s the state before the block:
        pred (L,) = y_block @ M + s @ O; state after it = A^L s + y_block @ Cc.
        O (C, n, L), M (C, L, L) strictly upper (pred_i from y_j, j < i), Cc (C, L, n), and
        the recurrence of the block ends (by A^L)."""
        if L in self._blocks:
            return self._blocks[L]
        ss = self.steady
        C, n = self.n_channels, self.n_states
        powers = np.empty((L + 1, C, n, n))
        powers[0] = np.eye(n)
        for i in range(1, L + 1):
            powers[i] = np.matmul(ss.A, powers[i - 1])
        # O[:, :, i] = (g' A^i)'
        O = np.einsum("icjk,cj->cki", powers[:L], ss.g)
        # markov[l] = g' A^l K for l = 0..L-2: y_j's effect on pred_{j+1+l}
        markov = np.einsum("cj,icjk,ck->ci", ss.g, powers[: L - 1], ss.K)  # (C, L-1)
        lag = np.arange(L)[None, :] - np.arange(L)[:, None] - 1  # [j, i] -> i - 1 - j
        M = np.where(lag >= 0, markov[:, np.clip(lag, 0, L - 2)], 0.0)  # (C, L, L)
        # Cc[:, j] = A^(L-1-j) K
        Cc = np.einsum("icjk,ck->cij", powers[L - 1 :: -1][:L], ss.K)  # (C, L, n)
        AL = np.ascontiguousarray(powers[L])
        out = (np.ascontiguousarray(O), np.ascontiguousarray(M), np.ascontiguousarray(Cc),
               ConstantRecurrence(AL))
        self._blocks[L] = out
        return out


class ConstantRecurrence:
    """All states of x_k = A x_{k-1} + u_k, k = 0..N-1, x_{-1} = x0, for a constant A (C, n, n).

    Blocks of ``block`` steps are solved by one product with the block Toeplitz matrix of powers
    of A, their carries by the same recurrence with A^block (recursively, built on first use):
    O(log N) levels instead of N Python steps. The matrices are built once per A.
    """

    def __init__(self, A: np.ndarray, block: int = 16) -> None:
        C, n, _ = A.shape
        L = block
        self.A, self.block = A, block
        powers = np.empty((L + 1, C, n, n))
        powers[0] = np.eye(n)
        for i in range(1, L + 1):
            powers[i] = np.matmul(A, powers[i - 1])
        # row-vector form: x_row_block = u_row_block @ W, W[(j, a), (i, b)] = (A^(i-j))[b, a]
        lag = np.arange(L)[None, :] - np.arange(L)[:, None]  # [j, i] -> i - j
        Pt = np.swapaxes(powers, -1, -2)  # (L+1, C, n, n): (A^k)'
        W = Pt[np.clip(lag, 0, L)] * (lag >= 0)[:, :, None, None, None]  # [j, i, C, a, b]
        self.W = np.ascontiguousarray(W.transpose(2, 0, 3, 1, 4).reshape(C, L * n, L * n))
        # V[(a), (i, b)] = (A^(i+1))[b, a]: the state before a block, into its steps
        self.V = np.ascontiguousarray(Pt[1:].transpose(1, 2, 0, 3).reshape(C, n, L * n))
        self.AL = np.ascontiguousarray(powers[L])
        self._carry: ConstantRecurrence | None = None

    def states(self, u: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """u (C, N, n), x0 (C, n) -> (C, N, n)."""
        C, steps, n = u.shape
        L = self.block
        if steps <= L:
            out = np.empty_like(u)
            x = x0
            for k in range(steps):
                x = _mv(self.A, x) + u[:, k]
                out[:, k] = x
            return out
        nb = steps // L
        main = nb * L
        local = np.matmul(u[:, :main].reshape(C, nb, L * n), self.W).reshape(C, nb, L, n)
        if self._carry is None:
            self._carry = ConstantRecurrence(self.AL, L)
        ends = self._carry.states(np.ascontiguousarray(local[:, :, -1]), x0)
        before = np.concatenate([x0[:, None, :], ends[:, :-1]], axis=1)  # (C, nb, n)
        x = local + np.matmul(before, self.V).reshape(C, nb, L, n)
        out = np.empty_like(u)
        out[:, :main] = x.reshape(C, main, n)
        if main < steps:
            out[:, main:] = self.states(u[:, main:], out[:, main - 1])
        return out
