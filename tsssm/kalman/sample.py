"""Simulate states and observations from a linear Gaussian state space model."""

from __future__ import annotations

import torch
from torch import Tensor

from tsssm.errors import ModelError
from tsssm.kalman.scan import linear_recurrence
from tsssm.kalman.ssm import (
    LinearGaussianSSM,
    batch_shape,
    is_time_varying,
    n_steps,
    obs_dim,
    stacked,
    state_dim,
    transition_offset,
    validate,
)


def psd_sqrt(M: Tensor) -> Tensor:
    """A square root S with S S' = M of a positive semi-definite M (..., n, n), via eigh.

    Works for singular M (e.g. a state noise that drives only some states).
    """
    evals, evecs = torch.linalg.eigh(M)
    return evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)


def cov_factor(M: Tensor) -> Tensor:
    """A factor S with S S' = M: the Cholesky factor when M is positive definite (smooth
    gradients), else the eigen square root (singular M)."""
    chol, info = torch.linalg.cholesky_ex(M)
    if bool((info == 0).all()):
        return chol
    return psd_sqrt(M)


def sample(
    ssm: LinearGaussianSSM,
    T: int,
    *,
    batch_shape_: tuple[int, ...] = (),
    u: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``x (..., T, n)`` and ``y (..., T, p)`` from the model (x_0 ~ N(m0, P0)).

    batch_shape_: extra leading batch axes (independent draws), broadcast with the model's.
    """
    if T < 1:
        raise ModelError(f"sample needs T >= 1 steps, got {T}")
    validate(ssm, None, None)
    steps = n_steps(ssm)
    if steps is not None and steps != T:
        raise ModelError(f"the model's time-varying matrices have {steps} steps, asked for T={T}")
    if ssm.B is not None and u is None:
        raise ModelError("the model has a control matrix B; pass u (..., T, k)")
    n, p = state_dim(ssm), obs_dim(ssm)
    batch = torch.broadcast_shapes(torch.Size(batch_shape_), batch_shape(ssm))
    if u is not None:
        batch = torch.broadcast_shapes(batch, u.shape[:-2])
    dtype, device = ssm.F.dtype, ssm.F.device

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator)

    x0 = ssm.m0 + (psd_sqrt(ssm.P0) @ normal(*batch, n, 1)).squeeze(-1)
    # square roots of the (constant or per-step) covariances, broadcast over the steps
    Q_sqrt = psd_sqrt(ssm.Q)
    if not is_time_varying(ssm, "Q"):
        Q_sqrt = Q_sqrt.unsqueeze(-3)
    w = (Q_sqrt @ normal(*batch, T, n, 1)).squeeze(-1)  # (..., T, n)
    off = transition_offset(ssm, u, T)
    if off is not None:
        w = w + off
    w = torch.cat([x0.expand(*batch, n).unsqueeze(-2), w[..., 1:, :]], dim=-2)
    F = ssm.F
    if is_time_varying(ssm, "F"):
        F = torch.cat([torch.zeros_like(F[..., :1, :, :]), F[..., 1:, :, :]], dim=-3)
        x = linear_recurrence(F, w)
    else:
        x = linear_recurrence(F, w, constant_A=True)  # from x_{-1} = 0, so x_0 = w_0
    R_sqrt = psd_sqrt(ssm.R)
    if not is_time_varying(ssm, "R"):
        R_sqrt = R_sqrt.unsqueeze(-3)
    v = (R_sqrt @ normal(*batch, T, p, 1)).squeeze(-1)
    y = (stacked(ssm, "H", T) @ x.unsqueeze(-1)).squeeze(-1) + v
    if ssm.d is not None:
        y = y + stacked(ssm, "d", T)
    return x, y
