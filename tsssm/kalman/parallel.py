"""Parallel-in-time Kalman filter and RTS smoother (Särkkä & García-Fernández 2021).

"Temporal parallelization of Bayesian smoothers", IEEE TAC 66(1), 2021. Every step becomes an
element of an associative operator; a prefix scan (:func:`tsssm.kalman.scan.associative_scan`,
O(log T) depth) combines them, so all steps are processed by a few large batched tensor ops
instead of T small ones.

Filter element of step t: ``(A, b, C, eta, J)`` describing p(x_t | x_{t-1}, y_t) and the
likelihood of y_t as a function of x_{t-1}; the prefix combination over steps 0..t gives the
filtering distribution N(b, C) (A = 0 at the first step, which carries the prior m0, P0).
Missing channels are decoupled as in :mod:`tsssm.kalman.filter`.

The log-likelihood is NOT taken from accumulated normalising constants (which lose accuracy over
long sequences); it follows from the prediction-error decomposition, evaluated for all steps at
once from the scanned filtering moments, so it equals the sequential filter's to rounding.

Smoother element of step t: ``(E, g, L)`` with E_t = P_t F_{t+1}' P_{t+1|t}^-1 (the RTS gain),
g_t = m_t - E_t m_{t+1|t}, L_t = P_t - E_t P_{t+1|t} E_t'; a reverse scan gives the smoothed
means and covariances. Needs P_{t+1|t} positive definite (the DK-form smoother of
:mod:`tsssm.kalman.smoother` does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsssm.errors import ModelError
from tsssm.kalman.filter import (
    FilterResult,
    _check_cholesky,
    finish,
    joseph_update,
    masked_observation,
    prepare,
    update_gain,
)
from tsssm.kalman.scan import associative_scan
from tsssm.kalman.ssm import LinearGaussianSSM, stacked, state_dim, symmetrize

_Elems = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def filter_elements(
    ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None
) -> tuple[_Elems, object]:
    """The associative elements of every step, time axis first: (A, b, C, eta, J), prepared data.

    Shapes: A, C, J (T, ..., n, n); b, eta (T, ..., n).
    """
    prep = prepare(ssm, y, u)
    T, n = prep.T, state_dim(ssm)
    batch = prep.batch
    Hm, Rm = masked_observation(ssm, prep.observed if prep.any_missing else None, T)
    F, Q = stacked(ssm, "F", T), stacked(ssm, "Q", T)
    ym = prep.y0
    if ssm.d is not None:
        ym = ym - prep.observed.to(y.dtype) * stacked(ssm, "d", T)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)

    # prior of each step given x_{t-1} = 0: mean off_t, covariance Q_t; step 0: m0, P0
    off = prep.offset if prep.offset is not None else ym.new_zeros(T, n)
    mbar = prepend_step(ssm.m0, off[..., 1:, :], 1)
    Pbar = prepend_step(ssm.P0, Q[..., 1:, :, :], 2)
    PHt = Pbar @ Hm.mT  # (..., T, n, p)
    S = symmetrize(Hm @ PHt + Rm)
    chol, info = torch.linalg.cholesky_ex(S)
    _check_cholesky(info, "the innovation covariance")
    K = torch.cholesky_solve(PHt.mT, chol).mT  # (..., T, n, p)
    IKH = eye - K @ Hm
    v = ym - _mv(Hm, mbar)  # innovation against the element's own prior
    b = mbar + _mv(K, v)
    C = symmetrize(IKH @ Pbar @ IKH.mT + K @ Rm @ K.mT)
    A = IKH @ F
    A = torch.cat([torch.zeros_like(A[..., :1, :, :]), A[..., 1:, :, :]], dim=-3)
    # eta, J: information about x_{t-1} carried by y_t (zero at step 0, which has no x_{-1})
    HF = Hm @ F  # (..., T, p, n)
    SinvHF = torch.cholesky_solve(HF, chol)  # S^-1 H F
    eta = _mv(SinvHF.mT, v)
    J = symmetrize(HF.mT @ SinvHF)
    eta = torch.cat([torch.zeros_like(eta[..., :1, :]), eta[..., 1:, :]], dim=-2)
    J = torch.cat([torch.zeros_like(J[..., :1, :, :]), J[..., 1:, :, :]], dim=-3)

    nd = len(batch)
    elems = (
        _time_first(A, 2, nd), _time_first(b, 1, nd), _time_first(C, 2, nd),
        _time_first(eta, 1, nd), _time_first(J, 2, nd),
    )
    return elems, prep


def prepend_step(first: Tensor, rest: Tensor, core: int) -> Tensor:
    """Concatenate ``first (..., *core)`` before ``rest (..., T-1, *core)`` on the time axis,
    broadcasting their batch axes."""
    first = first.unsqueeze(first.ndim - core)
    batch = torch.broadcast_shapes(first.shape[: first.ndim - core - 1],
                                   rest.shape[: rest.ndim - core - 1])
    first = first.expand(*batch, *first.shape[first.ndim - core - 1 :])
    rest = rest.expand(*batch, *rest.shape[rest.ndim - core - 1 :])
    return torch.cat([first, rest], dim=-core - 1)


def _time_first(x: Tensor, core: int, batch_ndim: int) -> Tensor:
    """(..., T, *core) -> (T, 1.., ..., *core) with ``batch_ndim`` batch axes (broadcastable)."""
    missing = batch_ndim - (x.ndim - core - 1)
    x = x.reshape((1,) * missing + x.shape)
    return x.movedim(x.ndim - core - 1, 0)


def filter_combine(earlier: _Elems, later: _Elems) -> _Elems:
    """Associative operator of the filter elements (earlier step i, later step j)."""
    A1, b1, C1, eta1, J1 = earlier
    A2, b2, C2, eta2, J2 = later
    n = A1.shape[-1]
    eye = torch.eye(n, dtype=A1.dtype, device=A1.device)
    M = eye + C1 @ J2  # (I + C_i J_j)
    # M is never singular (C_i J_j is similar to the PSD C_i^1/2 J_j C_i^1/2, so M's eigenvalues
    # are >= 1): the _ex form skips lu_factor's error check, a device sync at every level
    LU, piv, _ = torch.linalg.lu_factor_ex(M)
    # matrices (batch of the mask) and vectors (batch of the data) are solved separately so
    # that series sharing a model share the matrix work
    Z = torch.linalg.lu_solve(LU, piv, torch.cat([A1, C1], dim=-1))  # (..., n, 2n)
    z = torch.linalg.lu_solve(LU, piv, (b1 + _mv(C1, eta2)).unsqueeze(-1))[..., 0]
    A2Z = A2 @ Z
    A = A2Z[..., :n]
    b = _mv(A2, z) + b2
    C = symmetrize(A2Z[..., n:] @ A2.mT + C2)
    # (I + J_j C_i)^-1 = ((I + C_i J_j)^-1)' : solve with the same factors, transposed
    W = torch.linalg.lu_solve(LU, piv, J2 @ A1, adjoint=True)
    w = torch.linalg.lu_solve(LU, piv, (eta2 - _mv(J2, b1)).unsqueeze(-1), adjoint=True)[..., 0]
    eta = _mv(A1.mT, w) + eta1
    J = symmetrize(A1.mT @ W + J1)
    return A, b, C, eta, J


# --------------------------------------------------------------------------------------------
# covariances of a time-invariant model: powers of one element

_CovElems = tuple[Tensor, Tensor, Tensor]


def covariance_combine(earlier: _CovElems, later: _CovElems, eye: Tensor | None = None
                       ) -> _CovElems:
    """The (A, C, J) part of :func:`filter_combine` (the data-free half of the elements: the
    transfer, the covariance and the information matrix): the same formulas, with the inverse
    of the small (n x n) M = I + C_i J_j formed once (its eigenvalues are >= 1, see
    filter_combine; an explicit inverse has the fewest kernels forward and backward). C and J
    come back symmetric to rounding, not symmetrised (the caller symmetrises what it keeps).
    ``eye``: the (n, n) identity, to build it once for many calls."""
    A1, C1, J1 = earlier
    A2, C2, J2 = later
    if eye is None:
        eye = torch.eye(A1.shape[-1], dtype=A1.dtype, device=A1.device)
    Minv = torch.linalg.inv_ex(eye + C1 @ J2)[0]
    A2M = A2 @ Minv
    # (I + J_j C_i)^-1 = ((I + C_i J_j)^-1)'
    return A2M @ A1, A2M @ C1 @ A2.mT + C2, A1.mT @ (Minv.mT @ (J2 @ A1)) + J1


def invariant_filtered_covariances(ssm: LinearGaussianSSM, T: int) -> tuple[Tensor, Tensor]:
    """Filtered covariances P_t (model batch.., T, n, n) of a time-invariant model observed at
    every step (nothing missing): they do not depend on the data. Also returns ``info`` (model
    batch..): nonzero where an innovation covariance was not positive definite (the caller
    checks it, with its own checks, in one read of the device).

    The element of every step t >= 1 is the same, e (the model does not change), so the prefix
    combination of step t is e_0 * e^t (e_0: the first step's, from the prior). The powers
    e^1 .. e^(T-1) come from ceil(log2 T) doublings, e^(m+1..2m) = e^(1..m) * e^m (one batched
    combine each; the factors commute, all being powers of e), then one combine with e_0:
    O(log T) batched ops on the model's batch, instead of T small steps.
    """
    F, H, Q, R, P0 = ssm.F, ssm.H, ssm.Q, ssm.R, ssm.P0
    batch = torch.broadcast_shapes(F.shape[:-2], H.shape[:-2], Q.shape[:-2], R.shape[:-2],
                                   P0.shape[:-2])
    n, p = F.shape[-1], H.shape[-2]
    K0, _, info0 = update_gain(P0, H, R)
    C0 = joseph_update(P0, K0, H, R).expand(*batch, n, n)  # A, J of the first step: 0
    info0 = info0.expand(batch)
    if T == 1:
        return C0.unsqueeze(-3), info0
    # the element of a later step: its state given x_{t-1} = 0 has covariance Q
    K, chol, info = update_gain(Q, H, R)
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    HF = H @ F
    SinvHF = HF / (chol * chol) if p == 1 else torch.cholesky_solve(HF, chol)
    e = tuple(x.expand(*batch, n, n) for x in ((eye - K @ H) @ F, joseph_update(Q, K, H, R),
                                                symmetrize(HF.mT @ SinvHF)))
    powers = tuple(x.unsqueeze(-3) for x in e)  # e^1 .. e^m on axis -3
    while powers[0].shape[-3] < T - 1:
        last = tuple(x[..., -1:, :, :] for x in powers)  # e^m
        more = covariance_combine(powers, last, eye)  # e^(m+1) .. e^(2m)
        powers = tuple(torch.cat([x, y], dim=-3) for x, y in zip(powers, more))
    A, C, J = (x[..., : T - 1, :, :] for x in powers)
    # e_0 * e^t: the A and J of e_0 are 0, so only C is left (filter_combine with A1 = J1 = 0)
    C0t = C0.unsqueeze(-3)
    Minv = torch.linalg.inv_ex(eye + C0t @ J)[0]
    Ct = symmetrize(A @ (Minv @ C0t) @ A.mT + C)
    return torch.cat([C0t, Ct], dim=-3), info0 | info.expand(batch)


#: Backends of the parallel filter: "auto" (Triton on CUDA when the call allows it, else torch),
#: "torch" (the odd-even recursion in tensor ops, differentiable), "triton" (the chunked scan
#: kernels of :mod:`tsssm.kalman.parallel_triton`; an error when the call does not allow them).
BACKENDS = ("auto", "torch", "triton")


def parallel_kalman_filter(
    ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None, *, backend: str = "auto",
    **launch,
) -> FilterResult:
    """Kalman filter by a parallel prefix scan over time; same FilterResult as sequential.

    ``backend``: see ``BACKENDS``. On CUDA, "auto" runs the Triton kernels for a time-invariant
    model without controls with n, p <= 4 when no gradient is needed (they have no backward),
    else the torch ops. ``launch``: launch options of
    :func:`tsssm.kalman.parallel_triton.parallel_filter_arrays` (block_t, num_warps, block_c).
    """
    if backend not in BACKENDS:
        raise ModelError(f"parallel filter: backend must be one of {BACKENDS}, got {backend!r}")
    prep = None
    if backend != "torch":
        why = _triton_unavailable(ssm, y, u, backend)
        if why is None:
            from tsssm.kalman.fused_triton import flat_params
            from tsssm.kalman.parallel_triton import MAX_SERIES, parallel_filter_arrays

            prep = prepare(ssm, y, u)
            S = prep.batch.numel()
            if S > MAX_SERIES:
                why = f"{S} series (the kernels' grid takes up to {MAX_SERIES})"
                if backend == "triton":
                    raise ModelError(f"parallel filter: the Triton backend cannot run this "
                                     f"call: {why}")
                prep = None
            else:
                T, p = prep.T, y.shape[-1]
                y_flat = prep.y.reshape(S, T, p)
                mean, cov = parallel_filter_arrays(y_flat, flat_params(ssm, tuple(prep.batch)),
                                                   **launch)
                m_filt = mean.reshape(*prep.batch, T, -1)
                P_filt = cov.reshape(*prep.batch, T, *cov.shape[-2:])
        elif backend == "triton":
            raise ModelError(f"parallel filter: the Triton backend cannot run this call: {why}")
    if prep is None:
        elems, prep = filter_elements(ssm, y, u)
        _, b, C, _, _ = associative_scan(filter_combine, elems)
        m_filt = b.movedim(0, -2)  # (..., T, n)
        P_filt = C.movedim(0, -3)  # (..., T, n, n)
    T = prep.T
    F, Q = stacked(ssm, "F", T), stacked(ssm, "Q", T)
    P_prev = symmetrize(F[..., 1:, :, :] @ P_filt[..., :-1, :, :] @ F[..., 1:, :, :].mT
                        + Q[..., 1:, :, :])
    P_pred = prepend_step(ssm.P0, P_prev, 2)
    return finish(ssm, prep, m_filt, P_pred, P_filt)


def _triton_unavailable(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None,
                        backend: str) -> str | None:
    """Why the Triton parallel filter cannot run this call (None: it can). "auto" runs it on
    CUDA only; "triton" also on the CPU under TRITON_INTERPRET=1 (tests)."""
    if backend == "auto" and y.device.type != "cuda":
        return "not a CUDA tensor"
    try:
        from tsssm.kalman.parallel_triton import eligible
    except ImportError:
        return "Triton is not installed (pip install 'tsssm[gpu]')"
    return eligible(ssm, y, u)


# --------------------------------------------------------------------------------------------
# smoother


def smoother_combine(
    earlier: tuple[Tensor, Tensor, Tensor], later: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Operator of the smoother elements; reverse scan: value_t = E_t value_{t+1} + g_t (vectors)
    and E_t V_{t+1} E_t' + L_t (matrices). Also the DK-form smoother's (tsssm.kalman.smoother)."""
    E1, g1, L1 = earlier
    E2, g2, L2 = later
    return E1 @ E2, _mv(E1, g2) + g1, symmetrize(E1 @ L2 @ E1.mT + L1)


def parallel_rts_smoother(
    ssm: LinearGaussianSSM, result: FilterResult
) -> tuple[Tensor, Tensor, Tensor]:
    """Smoothed means (..., T, n), covariances (..., T, n, n), lag-one covariances
    Cov[x_{t+1}, x_t | y] (..., T-1, n, n), by a reverse parallel scan."""
    T = result.filtered_mean.shape[-2]
    F = stacked(ssm, "F", T)
    m_f, P_f = result.filtered_mean, result.filtered_cov
    m_p, P_p = result.predicted_mean, result.predicted_cov
    # RTS gain E_t = P_t F_{t+1}' P_{t+1|t}^-1 via a Cholesky solve: P_{t+1|t} E_t' = F_{t+1} P_t
    chol, info = torch.linalg.cholesky_ex(P_p[..., 1:, :, :])
    _check_cholesky(info, "the predicted state covariance (needed by the parallel RTS smoother; "
                    "use method='sequential' for singular ones)")
    E = torch.cholesky_solve(F[..., 1:, :, :] @ P_f[..., :-1, :, :], chol).mT  # (..., T-1, n, n)
    g = m_f[..., :-1, :] - _mv(E, m_p[..., 1:, :])
    L = symmetrize(P_f[..., :-1, :, :] - E @ P_p[..., 1:, :, :] @ E.mT)
    E = torch.cat([E, E.new_zeros(*E.shape[:-3], 1, *E.shape[-2:])], dim=-3)
    g = torch.cat([g, m_f[..., -1:, :]], dim=-2)
    L = torch.cat([L, P_f[..., -1:, :, :]], dim=-3)
    nd = m_f.ndim - 2
    _, m_s, P_s = associative_scan(
        smoother_combine,
        (_time_first(E, 2, nd), _time_first(g, 1, nd), _time_first(L, 2, nd)),
        reverse=True,
    )
    m_s, P_s = m_s.movedim(0, -2), P_s.movedim(0, -3)
    P_s = P_s.expand(*m_s.shape, m_s.shape[-1])
    lag_one = P_s[..., 1:, :, :] @ E[..., :-1, :, :].mT  # Cov[x_{t+1}, x_t | y] = P^s_{t+1} E_t'
    return m_s, P_s, lag_one
