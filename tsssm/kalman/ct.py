"""Continuous-time linear Gaussian state space models on irregular grids (zero-order hold).

Model, with ``s`` the time in the data's time unit (seconds for timestamps)::

    dx/ds = A x + B u(s) + a + w(s),     w white noise: Cov[w(s), w(s')] = Qc δ(s - s')
    y_t   = C x(s_t) + D u_t + d + v_t,  v_t ~ N(0, R), at the sample times s_t
    x(s_0) ~ N(m0, P0),                  the state at the first sample

Inputs are held between samples (zero-order hold): over ``(s_{t-1}, s_t]`` the input is
``u_{t-1}``, the value sampled at the start of the interval; the feedthrough ``D u_t`` uses the
input sampled with ``y_t``.

Discretisation of one step ``Δ = s_t - s_{t-1}`` (exact for a held input)::

    F = exp(Δ A)
    G = ∫_0^Δ exp(τ A) dτ [B, a]          input and drift: a block of exp([[A, [B, a]], [0, 0]] Δ)
    Q = ∫_0^Δ exp(τ A) Qc exp(τ A)' dτ    Van Loan (1978): from exp([[-A, Qc], [0, A']] Δ)

so that ``x_t = F x_{t-1} + G [u_{t-1}; 1] + w_t, w_t ~ N(0, Q)``: the continuous model observed on
a grid is a time-varying :class:`~tsssm.kalman.ssm.LinearGaussianSSM`, and the filter, smoother,
forecasts and likelihood are those of :mod:`tsssm.kalman` on it. Large ``‖A‖Δ`` (a long gap in a
fast system) is discretised at ``Δ / 2^s`` and doubled back exactly (``F ← F F``,
``G ← G + F G``, ``Q ← Q + F Q F'``), so no block of the exponentials overflows.

Grids: ``dt (..., T)`` holds ``s_t - s_{t-1}``; ``dt[..., 0]`` is unused (the prior describes the
first sample). Sensor streams repeat a few step lengths (SKAB: 44,222 steps of 1 s, 2,479 of 2 s),
so :func:`discretize` computes the matrices once per distinct step and gathers them: the cost is
that of the distinct steps, not of T. Everything is differentiable with respect to the model's
matrices (``torch.linalg.matrix_exp``); ``dt`` is data (no gradient through the cache).

Shapes (``n`` states, ``p`` channels, ``k`` inputs, ``...`` batch axes that broadcast)::

    A (..., n, n)  B (..., n, k)  a (..., n)  Qc (..., n, n)
    C (..., p, n)  D (..., p, k)  d (..., p)  R (..., p, p)   m0 (..., n)  P0 (..., n, n)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tsssm.errors import DataError, ModelError
from tsssm.kalman.filter import FilterResult, Method, kalman_filter
from tsssm.kalman.forecast import ForecastResult
from tsssm.kalman.forecast import forecast as discrete_forecast
from tsssm.kalman.smoother import SmootherResult, rts_smoother
from tsssm.kalman.ssm import LinearGaussianSSM, symmetrize

#: ``‖A‖_1 Δ`` above this is discretised in halved steps and doubled back.
MAX_SCALED_NORM = 4.0


class ContinuousLinearSSM(NamedTuple):
    """Matrices of a continuous-time linear Gaussian model (see the module docstring)."""

    A: Tensor  # (..., n, n) drift
    C: Tensor  # (..., p, n) observation
    Qc: Tensor  # (..., n, n) diffusion of the state noise (per unit time)
    R: Tensor  # (..., p, p) observation noise covariance (per sample)
    m0: Tensor  # (..., n) mean of the state at the first sample
    P0: Tensor  # (..., n, n) its covariance
    B: Tensor | None = None  # (..., n, k) input matrix
    D: Tensor | None = None  # (..., p, k) feedthrough
    a: Tensor | None = None  # (..., n) constant drift
    d: Tensor | None = None  # (..., p) observation intercept


class Discretized(NamedTuple):
    """The exact discrete-time step of length Δ (one per entry of dt)."""

    F: Tensor  # (..., n, n)  exp(Δ A)
    G: Tensor | None  # (..., n, k')  ∫ exp(τA) dτ [B, a]  (None without B and a)
    Q: Tensor  # (..., n, n)  ∫ exp(τA) Qc exp(τA)' dτ


def n_inputs(ct: ContinuousLinearSSM) -> int:
    """Number of inputs ``k`` (0 when the model takes none)."""
    for M in (ct.B, ct.D):
        if M is not None:
            return M.shape[-1]
    return 0


def input_block(ct: ContinuousLinearSSM) -> Tensor | None:
    """[B, a] (..., n, k + 1), [B] or [a] as a column: the inputs of the drift (None if none)."""
    cols = []
    if ct.B is not None:
        cols.append(ct.B)
    if ct.a is not None:
        cols.append(ct.a.unsqueeze(-1))
    if not cols:
        return None
    if len(cols) == 1:
        return cols[0]
    batch = torch.broadcast_shapes(cols[0].shape[:-2], cols[1].shape[:-2])
    return torch.cat([c.expand(*batch, *c.shape[-2:]) for c in cols], dim=-1)


def validate_ct(ct: ContinuousLinearSSM) -> None:
    """Check core shapes, dtypes and devices; raise ModelError naming the field."""
    if not isinstance(ct, ContinuousLinearSSM):
        raise ModelError(f"expected a ContinuousLinearSSM, got {type(ct).__name__}")
    n, p = ct.A.shape[-1], ct.C.shape[-2]
    k = n_inputs(ct)
    expected = {"A": (n, n), "C": (p, n), "Qc": (n, n), "R": (p, p), "m0": (n,), "P0": (n, n),
                "B": (n, k), "D": (p, k), "a": (n,), "d": (p,)}
    present = {name: getattr(ct, name) for name in expected if getattr(ct, name) is not None}
    for name, x in present.items():
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ModelError(f"field {name} of the continuous model must be a floating point "
                             f"tensor, got {type(x).__name__}")
        core = tuple(x.shape[x.ndim - len(expected[name]):]) if x.ndim >= len(expected[name]) \
            else tuple(x.shape)
        if core != expected[name]:
            raise ModelError(
                f"field {name} of the continuous model has core shape {core}, expected "
                f"{expected[name]} for n={n} states, p={p} channels, k={k} inputs"
            )
    kinds = {(x.dtype, x.device) for x in present.values()}
    if len(kinds) > 1:
        raise ModelError("all matrices of the continuous model must share one dtype and device, "
                         "got " + ", ".join(f"{nm}: {x.dtype}/{x.device}"
                                            for nm, x in present.items()))


def _check_steps(dt: Tensor) -> None:
    if not isinstance(dt, Tensor) or not dt.is_floating_point():
        raise DataError("time steps dt must be a floating point tensor")
    if not bool(torch.isfinite(dt).all()):
        raise DataError("time steps dt contain NaN or inf; every sample needs a timestamp")
    if bool((dt < 0).any()):
        raise DataError("time steps dt are negative somewhere: the samples must be sorted by time")


def zoh(A: Tensor, dt: Tensor, Qc: Tensor, Bc: Tensor | None = None) -> Discretized:
    """Exact discretisation of ``dx = (A x + Bc v) ds + dw`` over steps ``dt`` with v held.

    A (..., n, n), Qc (..., n, n), Bc (..., n, k') or None, dt (...) broadcasting with the batch
    axes of the matrices. Returns F, G (None without Bc) and Q for every step: (..., n, n),
    (..., n, k'), (..., n, n). Differentiable in every argument.
    """
    _check_steps(dt)
    n = A.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-2], Qc.shape[:-2], dt.shape,
                                   *(() if Bc is None else (Bc.shape[:-2],)))
    dtype = A.dtype
    dt = dt.to(dtype)
    # halvings per step: ||A||_1 dt / 2^s <= MAX_SCALED_NORM (no overflow in the exponentials)
    norm = torch.linalg.matrix_norm(A.detach(), ord=1).expand(batch) * dt.detach().expand(batch)
    halvings = torch.ceil(torch.log2(norm.clamp_min(1e-300) / MAX_SCALED_NORM)).clamp_min(0)
    halvings = halvings.to(torch.int64)
    h = dt.expand(batch) / torch.pow(2.0, halvings.to(dtype))  # (...)
    hm = h[..., None, None]
    A_b, Qc_b = A.expand(*batch, n, n), Qc.expand(*batch, n, n)
    zeros = A_b.new_zeros(*batch, n, n)
    # Van Loan: exp([[-A, Qc], [0, A']] h) = [[., X], [0, exp(A' h)]], Q = exp(A h) X
    M = torch.cat([torch.cat([-A_b, Qc_b], -1), torch.cat([zeros, A_b.mT], -1)], -2)
    E = torch.linalg.matrix_exp(M * hm)
    F = E[..., n:, n:].mT
    Q = symmetrize(F @ E[..., :n, n:])
    G = None
    if Bc is not None:
        k = Bc.shape[-1]
        Bc_b = Bc.expand(*batch, n, k)
        top = torch.cat([A_b, Bc_b], -1)
        Mb = torch.cat([top, A_b.new_zeros(*batch, k, n + k)], -2)
        G = torch.linalg.matrix_exp(Mb * hm)[..., :n, n:]
    s_max = int(halvings.max()) if halvings.numel() else 0
    for i in range(s_max):  # doubling: exact for a time-invariant model
        more = (halvings > i)[..., None, None]
        FQF = symmetrize(F @ Q @ F.mT)
        Q = torch.where(more, Q + FQF, Q)
        if G is not None:
            G = torch.where(more, G + F @ G, G)
        F = torch.where(more, F @ F, F)
    return Discretized(F, G, Q)


def discretize_steps(ct: ContinuousLinearSSM, dt: Tensor) -> Discretized:
    """F, G, Q for every entry of ``dt (*D, T)``: (*batch, T, n, n), (*batch, T, n, k'), ...

    Computed once per distinct value of dt (``torch.unique``) and gathered, so a grid of a few
    step lengths costs a few matrix exponentials. ``batch`` broadcasts the model's batch axes
    with ``*D``.
    """
    _check_steps(dt)
    if dt.ndim < 1:
        raise DataError(f"time steps dt must be shaped (..., T), got {tuple(dt.shape)}")
    Bc = input_block(ct)
    model_batch = torch.broadcast_shapes(ct.A.shape[:-2], ct.Qc.shape[:-2],
                                         *(() if Bc is None else (Bc.shape[:-2],)))
    values, inverse = torch.unique(dt.detach().to(ct.A.dtype), return_inverse=True)  # (U,)
    # one step per distinct value: the matrices get a value axis, (*Mb, 1, a, b) x (U,)
    disc = zoh(ct.A.unsqueeze(-3), values, ct.Qc.unsqueeze(-3),
               None if Bc is None else Bc.unsqueeze(-3))  # (*Mb, U, ., .)
    data_batch = dt.shape[:-1]
    T = dt.shape[-1]
    batch = torch.broadcast_shapes(model_batch, data_batch)

    def gather(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        if len(data_batch) == 0:  # one grid for every series: plain index_select
            return x.index_select(-3, inverse)
        a, b = x.shape[-2:]
        x = x.reshape(*((1,) * (len(batch) - len(model_batch))), *x.shape)
        x = x.expand(*batch, x.shape[-3], a, b)
        idx = inverse.expand(*batch, T)[..., None, None].expand(*batch, T, a, b)
        return torch.gather(x, -3, idx)

    return Discretized(gather(disc.F), gather(disc.G), gather(disc.Q))


def _inputs_with_one(ct: ContinuousLinearSSM, u: Tensor | None, T: int) -> Tensor | None:
    """[u; 1] (..., T, k + 1), [u] or [1] matching :func:`input_block` (None without inputs)."""
    parts = []
    if ct.B is not None:
        parts.append(u)
    if ct.a is not None:
        ref = u if u is not None else ct.A
        shape = (*u.shape[:-1], 1) if u is not None else (T, 1)
        parts.append(torch.ones(shape, dtype=ref.dtype, device=ref.device))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _check_inputs(ct: ContinuousLinearSSM, u: Tensor | None, T: int, what: str) -> None:
    k = n_inputs(ct)
    if k == 0:
        if u is not None:
            raise DataError("inputs u were given but the model has no input matrix B or D")
        return
    if u is None:
        raise DataError(f"the model takes {k} inputs (B or D): pass u shaped (..., {T}, {k}) "
                        f"({what})")
    if not isinstance(u, Tensor) or u.ndim < 2 or u.shape[-1] != k or u.shape[-2] != T:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise DataError(f"inputs u have shape {shape}; expected (..., {T}, {k}) ({what})")
    if not bool(torch.isfinite(u).all()):
        raise DataError("inputs u contain NaN or inf; inputs cannot be missing (forward-fill "
                        "them: a held input is what zero-order hold assumes)")


def discretize(ct: ContinuousLinearSSM, dt: Tensor, u: Tensor | None = None
               ) -> LinearGaussianSSM:
    """The discrete model of ``ct`` on the grid ``dt (..., T)`` (``dt[..., 0]`` unused).

    u: inputs (..., T, k) sampled with y when the model has B or D. Returns a LinearGaussianSSM
    with ``time_varying`` declaring F, Q and, where present, the transition offset
    ``c_t = G_t [u_{t-1}; 1]`` and the observation intercept ``d_t = D u_t + d``.
    """
    validate_ct(ct)
    T = dt.shape[-1] if isinstance(dt, Tensor) and dt.ndim >= 1 else 0
    if T == 0:
        raise DataError("time steps dt must be shaped (..., T) with T >= 1")
    _check_inputs(ct, u, T, "one per sample")
    if u is not None:
        u = u.to(ct.A.dtype)
    # step 0 is described by the prior: its discretisation is never used
    steps = torch.cat([torch.zeros_like(dt[..., :1]), dt[..., 1:]], dim=-1)
    disc = discretize_steps(ct, steps)
    tv = ["F", "Q"]
    c = None
    v = _inputs_with_one(ct, u, T)
    if disc.G is not None:
        # ZOH: the input held over (s_{t-1}, s_t] is the one sampled at s_{t-1}
        v_prev = torch.cat([v[..., :1, :], v[..., :-1, :]], dim=-2)
        c = (disc.G @ v_prev.unsqueeze(-1)).squeeze(-1)  # (..., T, n)
        tv.append("c")
    d = ct.d
    if ct.D is not None:
        Du = (ct.D.unsqueeze(-3) @ u.unsqueeze(-1)).squeeze(-1)  # (..., T, p)
        d = Du if ct.d is None else Du + ct.d.unsqueeze(-2)
        tv.append("d")
    return LinearGaussianSSM(disc.F, ct.C, disc.Q, ct.R, ct.m0, ct.P0, c=c, d=d,
                             time_varying=tuple(tv))


#: below this many series x states the parallel-in-time filter is the faster exact method for
#: a time-varying model (the sequential one cannot stop at a steady state there); above it
#: the step-by-step filter amortises its per-step cost over the batch
PARALLEL_MAX_WIDTH = 256


def choose_ct_method(ssm: LinearGaussianSSM, y: Tensor) -> str:
    """"parallel" for few long series, "sequential" for many or short ones."""
    width = math.prod(torch.broadcast_shapes(y.shape[:-2], ssm.F.shape[:-3])) * ssm.F.shape[-1]
    return "parallel" if width < PARALLEL_MAX_WIDTH and y.shape[-2] > 64 else "sequential"


def ct_filter(ct: ContinuousLinearSSM, y: Tensor, dt: Tensor, u: Tensor | None = None, *,
              method: Method | None = None, covariances: str = "all") -> FilterResult:
    """Kalman filter of ``y (..., T, p)`` (NaN = missing) sampled with steps ``dt (..., T)``.

    method: any of :data:`tsssm.kalman.METHODS`; default :func:`choose_ct_method`.
    """
    ssm = discretize(ct, dt, u)
    method = method or choose_ct_method(ssm, y)
    return kalman_filter(ssm, y, method=method, covariances=covariances)


def ct_loglik(ct: ContinuousLinearSSM, y: Tensor, dt: Tensor, u: Tensor | None = None, *,
              method: Method | None = None) -> Tensor:
    """Exact log-likelihood (...) of y (..., T, p) on the grid dt (..., T)."""
    return ct_filter(ct, y, dt, u, method=method, covariances="last").loglik


def ct_smoother(ct: ContinuousLinearSSM, y: Tensor, dt: Tensor, u: Tensor | None = None
                ) -> SmootherResult:
    """RTS-smoothed states at the sample times (mean (..., T, n), cov, lag-one cov)."""
    ssm = discretize(ct, dt, u)
    return rts_smoother(ssm, kalman_filter(ssm, y, method=choose_ct_method(ssm, y)))


def ct_forecast(ct: ContinuousLinearSSM, start: FilterResult | tuple[Tensor, Tensor],
                dt: Tensor, u: Tensor | None = None) -> ForecastResult:
    """Predictive moments at future times after the last filtered sample.

    start: a FilterResult (its last filtered state) or ``(mean (..., n), cov (..., n, n))`` of
    the state at the last sample time ``s``. dt (..., h): the steps to the forecast times, so
    forecast step j lies at ``s + dt_1 + ... + dt_j`` (any spacing, e.g. a query grid).
    u (..., h + 1, k): the inputs at ``s`` and at the h forecast times (held over the step after
    each; the last one enters through D only). Returns state and observation moments (..., h, .).
    """
    validate_ct(ct)
    if not isinstance(dt, Tensor) or dt.ndim < 1 or dt.shape[-1] < 1:
        raise DataError("forecast steps dt must be shaped (..., h) with h >= 1")
    h = dt.shape[-1]
    _check_inputs(ct, u, h + 1, "the last input and one per forecast time")
    if u is not None:
        u = u.to(ct.A.dtype)
    disc = discretize_steps(ct, dt.to(ct.A.dtype))
    tv = ["F", "Q"]
    c = None
    v = _inputs_with_one(ct, u, h + 1)
    if disc.G is not None:
        c = (disc.G @ v[..., :-1, :].unsqueeze(-1)).squeeze(-1)  # held input leads into step j
        tv.append("c")
    d = ct.d
    if ct.D is not None:
        Du = (ct.D.unsqueeze(-3) @ u[..., 1:, :].unsqueeze(-1)).squeeze(-1)
        d = Du if ct.d is None else Du + ct.d.unsqueeze(-2)
        tv.append("d")
    ssm = LinearGaussianSSM(disc.F, ct.C, disc.Q, ct.R, ct.m0, ct.P0, c=c, d=d,
                            time_varying=tuple(tv))
    return discrete_forecast(ssm, start, h)


def steps_from_times(times: Tensor) -> Tensor:
    """Sample times (..., T) -> steps dt (..., T) with ``dt[..., 0] = 0`` (unused)."""
    return torch.cat([torch.zeros_like(times[..., :1]), times[..., 1:] - times[..., :-1]], -1)


def continuous_lyapunov(A: Tensor, Qc: Tensor, *, check: bool = True) -> Tensor:
    """Stationary covariance P of a stable A: ``A P + P A' + Qc = 0`` (..., n, n).

    Solved as the linear system (A ⊗ I + I ⊗ A) vec P = -vec Qc (row-major vec). With
    ``check``, raises ModelError when A has an eigenvalue with non-negative real part (no
    stationary law); without, such an A gives a matrix that is not a covariance (the filter
    then reports it), which is what an optimiser's trial step needs.
    """
    n = A.shape[-1]
    if check and bool((torch.linalg.eigvals(A.detach()).real >= 0).any()):
        raise ModelError("the drift A has an eigenvalue with non-negative real part: the "
                         "process has no stationary covariance (use a diffuse prior)")
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    batch = torch.broadcast_shapes(A.shape[:-2], Qc.shape[:-2])
    A = A.expand(*batch, n, n)
    # (A ⊗ I)[(i,j),(k,l)] = A_ik δ_jl ; (I ⊗ A)[(i,j),(k,l)] = δ_ik A_jl
    left = A[..., :, None, :, None] * eye[None, :, None, :]
    right = eye[:, None, :, None] * A[..., None, :, None, :]
    L = (left + right).reshape(*batch, n * n, n * n)
    vec = torch.linalg.solve(L, -Qc.expand(*batch, n, n).reshape(*batch, n * n, 1))
    return symmetrize(vec.reshape(*batch, n, n))


def nominal_step(dt: Tensor) -> float:
    """The median of the real steps ``dt[..., 1:]`` (1.0 when there are none)."""
    if dt.shape[-1] < 2:
        return 1.0
    value = float(dt[..., 1:].detach().flatten().median())
    return value if math.isfinite(value) and value > 0 else 1.0


def ct_sample(ct: ContinuousLinearSSM, dt: Tensor, u: Tensor | None = None, *,
              batch_shape_: tuple[int, ...] = (), generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
    """Draw states x (..., T, n) and observations y (..., T, p) at the sample times of the grid
    ``dt (..., T)`` (exact: the discretisation is exact for held inputs)."""
    from tsssm.kalman.sample import sample

    return sample(discretize(ct, dt, u), dt.shape[-1], batch_shape_=batch_shape_,
                  generator=generator)
