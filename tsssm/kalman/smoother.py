"""Fixed-interval (RTS) smoothing: E[x_t | all y], Cov[x_t | all y], Cov[x_{t+1}, x_t | all y].

The default method evaluates the smoother in the Durbin-Koopman form, which gives the same moments
as the Rauch-Tung-Striebel recursion without inverting P_{t+1|t} (so it also works for models
whose predicted covariance is singular, e.g. deterministic seasonals)::

    r_t = H_t' S_t^-1 v_t + L_t' r_{t+1},          r_T = 0
    N_t = H_t' S_t^-1 H_t + L_t' N_{t+1} L_t,      N_T = 0
    L_t = F_{t+1} (I - K_t H_t)
    E[x_t | y]   = m_{t|t-1} + P_{t|t-1} r_t
    Cov[x_t | y] = P_{t|t-1} - P_{t|t-1} N_t P_{t|t-1}
    Cov[x_{t+1}, x_t | y] = (I - P_{t+1|t} N_{t+1}) L_t P_{t|t-1}

(H, S, v with missing channels decoupled as in the filter). Both backward recursions are affine,
so ``method="sequential"`` evaluates them by a reverse prefix scan (all steps in a few batched
ops); ``"loop"`` runs them step by step (the specification); ``"parallel"`` uses Särkkä &
García-Fernández's RTS elements (:func:`tsssm.kalman.parallel.parallel_rts_smoother`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from tsssm.errors import ModelError
from tsssm.kalman.filter import FilterResult, _check_cholesky, masked_observation
from tsssm.kalman.parallel import smoother_combine
from tsssm.kalman.scan import associative_scan
from tsssm.kalman.ssm import LinearGaussianSSM, stacked, step_loop_threads, symmetrize

SmootherMethod = Literal["sequential", "loop", "parallel"]


class SmootherResult(NamedTuple):
    """Smoothed moments given all observations y_0..y_{T-1}."""

    mean: Tensor  # (..., T, n)        E[x_t | y]
    cov: Tensor  # (..., T, n, n)      Cov[x_t | y]
    lag_one_cov: Tensor  # (..., T-1, n, n)  Cov[x_{t+1}, x_t | y] for t = 0..T-2


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def rts_smoother(
    ssm: LinearGaussianSSM, result: FilterResult, *, method: SmootherMethod = "sequential"
) -> SmootherResult:
    """Smooth the output of :func:`tsssm.kalman.kalman_filter` (same model, same data)."""
    if result.predicted_cov.shape[-3] != result.filtered_mean.shape[-2]:
        raise ModelError(
            "the smoother needs the covariances of every step: filter with covariances='all'"
        )
    if method == "parallel":
        from tsssm.kalman.parallel import parallel_rts_smoother

        return SmootherResult(*parallel_rts_smoother(ssm, result))
    if method not in ("sequential", "loop"):
        raise ModelError(
            f"unknown smoother method {method!r}; choose sequential, loop or parallel"
        )
    T = result.filtered_mean.shape[-2]
    n = result.filtered_mean.shape[-1]
    observed = result.observed
    any_missing = not bool(observed.all())
    Hm, Rm = masked_observation(ssm, observed if any_missing else None, T)
    P_p = result.predicted_cov
    S = symmetrize(Hm @ P_p @ Hm.mT + Rm)
    chol, info = torch.linalg.cholesky_ex(S)
    _check_cholesky(info, "the innovation covariance")
    SinvH = torch.cholesky_solve(Hm, chol)  # S^-1 H (..., T, p, n)
    u = _mv(SinvH.mT, result.innovation)  # H' S^-1 v (..., T, n)
    Lam = symmetrize(Hm.mT @ SinvH)  # H' S^-1 H (..., T, n, n)
    K = P_p @ SinvH.mT  # (..., T, n, p)
    eye = torch.eye(n, dtype=P_p.dtype, device=P_p.device)
    F = stacked(ssm, "F", T)
    # L_t = F_{t+1} (I - K_t H_t) for t < T-1; the last one multiplies r_T = 0
    L = F[..., 1:, :, :] @ (eye - K[..., :-1, :, :] @ Hm[..., :-1, :, :])
    L = torch.cat([L, L.new_zeros(*L.shape[:-3], 1, n, n)], dim=-3)  # (..., T, n, n)

    if method == "loop":
        r = torch.zeros_like(u[..., 0, :])
        N = torch.zeros_like(Lam[..., 0, :, :])
        rs, Ns = [], []
        Ls, us, Lams = L.unbind(-3), u.unbind(-2), Lam.unbind(-3)
        with step_loop_threads():
            for t in range(T - 1, -1, -1):
                Lt = Ls[t]
                r = us[t] + _mv(Lt.mT, r)
                N = symmetrize(Lams[t] + Lt.mT @ N @ Lt)
                rs.append(r)
                Ns.append(N)
        r_all = torch.stack(rs[::-1], dim=-2)
        N_all = torch.stack(torch.broadcast_tensors(*Ns[::-1]), dim=-3)
    else:
        nd = max(u.ndim - 2, L.ndim - 3, Lam.ndim - 3)

        def time_first(x: Tensor, core: int) -> Tensor:
            x = x.reshape((1,) * (nd - (x.ndim - core - 1)) + x.shape)
            return x.movedim(x.ndim - core - 1, 0)

        _, r_all, N_all = associative_scan(
            smoother_combine,  # value_t = E_t value_{t+1} + g_t, E_t V_{t+1} E_t' + G_t
            (time_first(L.mT, 2), time_first(u, 1), time_first(Lam, 2)),
            reverse=True,
        )
        r_all, N_all = r_all.movedim(0, -2), N_all.movedim(0, -3)
    mean = result.predicted_mean + _mv(P_p, r_all)
    cov = symmetrize(P_p - P_p @ N_all @ P_p)
    lag = (eye - P_p[..., 1:, :, :] @ N_all[..., 1:, :, :]) @ L[..., :-1, :, :]
    lag = lag @ P_p[..., :-1, :, :]
    full = mean.shape[:-1]
    return SmootherResult(mean, cov.expand(*full, n, n), lag.expand(*full[:-1], T - 1, n, n))
