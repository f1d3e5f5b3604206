"""Square-root Kalman filter: propagates Cholesky factors of the covariances.

For ill-conditioned problems in float32: covariances are never formed by subtraction, so they
stay positive semi-definite by construction. Each step triangularises an array by a QR
decomposition (Morf & Kailath 1975)::

    predict:  [F_t L_{t-1}, Q_t^(1/2)]  -> lower-triangular L_{t|t-1}
    update:   [[R^(1/2), H L_{t|t-1}],   -> [[S^(1/2), 0          ],
               [0,       L_{t|t-1}  ]]      [K S^(1/2), L_t       ]]

Same FilterResult as :func:`tsssm.kalman.kalman_filter` (``method="sqrt"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsssm.kalman.filter import FilterResult, finish, masked_observation, prepare
from tsssm.kalman.sample import cov_factor
from tsssm.kalman.ssm import (
    LinearGaussianSSM,
    is_time_varying,
    per_step,
    stacked,
    state_dim,
    step_loop_threads,
)


def _lower_triangularize(M: Tensor) -> Tensor:
    """A lower-triangular X with X X' = M M' (M: (..., r, c), c >= r), positive diagonal."""
    _, Rt = torch.linalg.qr(M.mT, mode="reduced")  # M' = Q R  =>  M M' = R' R
    X = Rt.mT
    sign = torch.sign(torch.diagonal(X, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return X * sign.unsqueeze(-2)


@step_loop_threads()
def sqrt_kalman_filter(
    ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None
) -> FilterResult:
    """The Kalman filter in square-root (Cholesky factor) form."""
    prep = prepare(ssm, y, u)
    T, n = prep.T, state_dim(ssm)
    Hm_all, Rm_all = masked_observation(ssm, prep.observed, T)
    p = Hm_all.shape[-2]
    Rsqrt_all = cov_factor(Rm_all)  # (..., T, p, p) any square root of the masked R
    Q_sqrt = cov_factor(ssm.Q)  # once, or per step when Q is time-varying
    Qsqrt_all = Q_sqrt if is_time_varying(ssm, "Q") else (
        Q_sqrt.unsqueeze(-3).expand(*Q_sqrt.shape[:-2], T, *Q_sqrt.shape[-2:]))
    ym_all = prep.y0
    if ssm.d is not None:
        ym_all = ym_all - prep.observed.to(y.dtype) * stacked(ssm, "d", T)
    m = ssm.m0.expand(*prep.batch, n)
    L = _lower_triangularize(cov_factor(ssm.P0))
    Fs, Qsqrts, Hms = per_step(ssm, "F", T), Qsqrt_all.unbind(-3), Hm_all.unbind(-3)
    Rsqrts, yms = Rsqrt_all.unbind(-3), ym_all.unbind(-2)
    offs = prep.offset.unbind(-2) if prep.offset is not None else None
    m_filt, L_pred, L_filt, chols = [], [], [], []
    for t in range(T):
        if t > 0:
            F = Fs[t]
            m = (F @ m.unsqueeze(-1)).squeeze(-1)
            if offs is not None:
                m = m + offs[t]
            FL = F @ L
            Qs = Qsqrts[t].expand(*FL.shape[:-2], n, n)
            L = _lower_triangularize(torch.cat([FL, Qs], dim=-1))
        L_pred.append(L)
        Hm = Hms[t]
        HL = Hm @ L  # (..., p, n)
        batch = torch.broadcast_shapes(HL.shape[:-2], Rsqrts[t].shape[:-2])
        top = torch.cat([Rsqrts[t].expand(*batch, p, p), HL.expand(*batch, p, n)], -1)
        bottom = torch.cat([L.new_zeros(*batch, n, p), L.expand(*batch, n, n)], -1)
        post = _lower_triangularize(torch.cat([top, bottom], dim=-2))  # (..., p+n, p+n)
        Ssq, KSsq, L = post[..., :p, :p], post[..., p:, :p], post[..., p:, p:]
        v = yms[t] - (Hm @ m.unsqueeze(-1)).squeeze(-1)
        w = torch.linalg.solve_triangular(Ssq, v.unsqueeze(-1), upper=False)
        m = m + (KSsq @ w).squeeze(-1)  # K v = (K S^(1/2)) S^(-1/2) v
        m_filt.append(m)
        L_filt.append(L)
        chols.append(Ssq)

    def cov(Ls: list[Tensor]) -> Tensor:
        Ls = torch.stack(torch.broadcast_tensors(*Ls), dim=-3)
        return Ls @ Ls.mT

    chol_S = torch.stack(torch.broadcast_tensors(*chols), dim=-3)
    return finish(ssm, prep, torch.stack(m_filt, -2), cov(L_pred), cov(L_filt), chol_S)
