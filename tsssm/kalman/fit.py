"""Fitting: maximum likelihood through the filter (L-BFGS, Adam) and EM for the general model.

Both work on many series at once: ``y (S, T, p)`` with parameters ``theta (S, n_params)`` (one
model per series) — the series are independent, so the summed log-likelihood separates and one
optimiser run fits them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from tsssm.errors import ConfigError, ModelError, NumericalError
from tsssm.kalman.filter import Method, kalman_filter, masked_observation
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.smoother import rts_smoother
from tsssm.kalman.ssm import LinearGaussianSSM, batch_shape, is_time_invariant, symmetrize


class FitResult(NamedTuple):
    """Outcome of :func:`fit_mle`."""

    theta: Tensor  # (..., n_params) unconstrained parameters at the optimum
    loglik: Tensor  # (...) log-likelihood of each series at theta
    n_iter: int  # optimiser iterations (L-BFGS: function evaluations)
    converged: bool
    history: list[float]  # total log-likelihood after each iteration


class EMResult(NamedTuple):
    """Outcome of :func:`fit_em`."""

    ssm: LinearGaussianSSM  # the estimated model
    logliks: Tensor  # (n_iter + 1, ...) log-likelihood before each M-step and at the end


def _raise_if_not_finite(loglik: Tensor, what: str = "log-likelihood") -> None:
    bad = ~torch.isfinite(loglik)
    if bool(bad.any()):
        idx = [tuple(i) if len(i) != 1 else i[0] for i in bad.nonzero().tolist()]
        shown = ", ".join(str(i) for i in idx[:10]) + (" ..." if len(idx) > 10 else "")
        raise NumericalError(
            f"the {what} is not finite for series {shown} (of batch shape "
            f"{tuple(loglik.shape)}); check those series for extreme values or constant "
            f"stretches, rescale the data, or start from other parameters"
        )


def structural_loglik(
    model: StructuralModel,
    theta: Tensor,
    y: Tensor,
    *,
    prior: Literal["data", "default"] = "data",
    method: Method = "sequential",
) -> Tensor:
    """Log-likelihood (...) of series y (..., T, p) under ``model`` with parameters theta."""
    m0, P0 = model.initial_state(theta, y) if prior == "data" else (None, None)
    ssm = model.to_ssm(theta, m0, P0)
    return kalman_filter(ssm, y, method=method).loglik


def fit_mle(
    model: StructuralModel,
    y: Tensor,
    theta0: Tensor | None = None,
    *,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
    max_iter: int = 200,
    lr: float | None = None,
    tol: float = 1e-10,
    prior: Literal["data", "default"] = "data",
    method: Method = "sequential",
) -> FitResult:
    """Maximum likelihood by gradient through the filter, for all series of y (..., T, p) at once.

    theta0: starting parameters (..., n_params); default ``model.initial_params(y)``.
    L-BFGS (strong Wolfe line search) is the default; Adam (``lr`` default 0.05) for very many
    series or noisy objectives. Stops when the relative change of the objective is below ``tol``.
    Raises NumericalError naming the series whose likelihood is not finite.
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ConfigError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if theta0 is None:
        theta0 = model.initial_params(y)
    theta = theta0.detach().clone().to(y.dtype).requires_grad_(True)
    n_obs = max(int((~torch.isnan(y)).sum()), 1)
    history: list[float] = []

    def objective() -> tuple[Tensor, Tensor]:
        ll = structural_loglik(model, theta, y, prior=prior, method=method)
        _raise_if_not_finite(ll.detach())
        return -ll.sum() / n_obs, ll

    converged = False
    n_iter = 0
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                tolerance_change=tol, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            nonlocal n_iter
            opt.zero_grad()
            loss, _ = objective()
            loss.backward()
            n_iter += 1
            history.append(-float(loss.detach()) * n_obs)
            return loss

        opt.step(closure)
        state = opt.state[opt._params[0]]
        converged = state.get("n_iter", max_iter) < max_iter
    else:
        opt = torch.optim.Adam([theta], lr=0.05 if lr is None else lr)
        prev = math.inf
        for _ in range(max_iter):
            opt.zero_grad()
            loss, _ = objective()
            loss.backward()
            opt.step()
            n_iter += 1
            value = float(loss.detach())
            history.append(-value * n_obs)
            if abs(prev - value) <= tol * max(1.0, abs(value)):
                converged = True
                break
            prev = value
    with torch.no_grad():
        ll = structural_loglik(model, theta, y, prior=prior, method=method)
    _raise_if_not_finite(ll)
    return FitResult(theta.detach(), ll, n_iter, converged, history)


def standard_errors(
    model: StructuralModel,
    theta: Tensor,
    y: Tensor,
    *,
    prior: Literal["data", "default"] = "data",
) -> Tensor:
    """Asymptotic standard errors (..., n_params) of the unconstrained parameters at theta.

    From the observed information (Hessian of the negative log-likelihood, by double
    backpropagation). The series are independent, so the Hessian of the summed log-likelihood
    is block diagonal and one backward pass per parameter gives every series' block.
    """
    theta = theta.detach().clone().requires_grad_(True)
    ll = structural_loglik(model, theta, y, prior=prior).sum()
    (grad,) = torch.autograd.grad(ll, theta, create_graph=True)
    k = theta.shape[-1]
    rows = []
    for j in range(k):
        (row,) = torch.autograd.grad(grad[..., j].sum(), theta, retain_graph=j < k - 1)
        rows.append(row)
    hess = torch.stack(rows, dim=-2)  # (..., k, k)
    info = -symmetrize(hess)
    cov = torch.linalg.inv(info)  # the covariance of the estimates is what is asked for here
    return torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()


# --------------------------------------------------------------------------------------------
# EM


EM_FIELDS = ("F", "H", "Q", "R", "m0", "P0")


def fit_em(
    ssm: LinearGaussianSSM,
    y: Tensor,
    *,
    n_iter: int = 50,
    estimate: Sequence[str] = EM_FIELDS,
    diagonal_R: bool = False,
    tol: float | None = None,
) -> EMResult:
    """Expectation-maximisation for a time-invariant LinearGaussianSSM (Shumway & Stoffer 1982).

    E-step: Kalman filter + smoother (with lag-one covariances). M-step: closed-form updates of
    the fields named in ``estimate`` from the smoothed sufficient statistics; ``c`` and ``d``
    (if present) stay fixed. Missing values are latent in the complete-data likelihood: their
    conditional moments given the observed channels of the same step enter the H and R updates,
    so the updates are exact EM and the likelihood never decreases (up to rounding).
    If the model has no batch axes but y has, the statistics are pooled over the series.
    ``diagonal_R``: keep R diagonal. ``tol``: stop when the log-likelihood gains less than
    ``tol`` (relative). Returns the model and the log-likelihood history.
    """
    unknown = set(estimate) - set(EM_FIELDS)
    if unknown:
        raise ConfigError(f"EM cannot estimate {sorted(unknown)}; choose from {EM_FIELDS}")
    if not is_time_invariant(ssm) or ssm.B is not None:
        raise ModelError("EM here needs a time-invariant model without controls (B)")
    logliks = []
    with torch.no_grad():
        for it in range(n_iter + 1):
            res = kalman_filter(ssm, y)
            _raise_if_not_finite(res.loglik)
            logliks.append(res.loglik)
            if it == n_iter:
                break
            if tol is not None and it > 0:
                gain = (logliks[-1] - logliks[-2]).sum()
                if float(gain) <= tol * float(logliks[-1].abs().sum()):
                    break
            ssm = _m_step(ssm, y, res, set(estimate), diagonal_R)
    return EMResult(ssm, torch.stack(logliks, 0))


def _m_step(ssm: LinearGaussianSSM, y: Tensor, res, estimate: set[str], diagonal_R: bool
            ) -> LinearGaussianSSM:
    sm = rts_smoother(ssm, res)
    T = y.shape[-2]
    n = ssm.F.shape[-1]
    target = batch_shape(ssm)
    pooled = math.prod(sm.mean.shape[:-2]) // max(math.prod(target), 1)

    def reduce(x: Tensor, core: tuple[int, ...]) -> Tensor:
        """Sum over time (already done by caller) and pool over broadcast series axes."""
        return x.sum_to_size(*target, *core) if x.shape[: x.ndim - len(core)] != target else x

    xm = sm.mean  # (..., T, n)
    Exx = sm.cov + xm.unsqueeze(-1) * xm.unsqueeze(-2)  # (..., T, n, n)
    new = {}
    if "m0" in estimate:
        m0 = reduce(xm[..., 0, :], (n,)) / pooled
        new["m0"] = m0
    if "P0" in estimate:
        m0 = new.get("m0", ssm.m0)
        d0 = xm[..., 0, :] - m0
        new["P0"] = symmetrize(reduce(sm.cov[..., 0, :, :] + d0.unsqueeze(-1) * d0.unsqueeze(-2),
                                      (n, n)) / pooled)
    if T > 1 and ("F" in estimate or "Q" in estimate):
        S11 = reduce(Exx[..., 1:, :, :].sum(-3), (n, n))
        S00 = reduce(Exx[..., :-1, :, :].sum(-3), (n, n))
        E10 = sm.lag_one_cov + xm[..., 1:, :].unsqueeze(-1) * xm[..., :-1, :].unsqueeze(-2)
        S10 = reduce(E10.sum(-3), (n, n))
        sx1 = reduce(xm[..., 1:, :].sum(-2), (n,))
        sx0 = reduce(xm[..., :-1, :].sum(-2), (n,))
        c = ssm.c if ssm.c is not None else torch.zeros_like(sx1)
        cnt = (T - 1) * pooled
        if "F" in estimate:
            rhs = S10 - c.unsqueeze(-1) * sx0.unsqueeze(-2)  # F S00 = S10 - c sx0'
            F = torch.linalg.solve(S00, rhs.mT).mT
            new["F"] = F
        F = new.get("F", ssm.F)
        if "Q" in estimate:
            FS10t = F @ S10.mT
            Fsx0 = (F @ sx0.unsqueeze(-1)).squeeze(-1)
            cc = c.unsqueeze(-1)
            Q = (S11 - FS10t - FS10t.mT + F @ S00 @ F.mT
                 - cc @ (sx1 - Fsx0).unsqueeze(-2) - (sx1 - Fsx0).unsqueeze(-1) @ cc.mT
                 + cnt * cc @ cc.mT) / cnt
            new["Q"] = symmetrize(Q)
    if "H" in estimate or "R" in estimate:
        H, R = ssm.H, ssm.R
        p = H.shape[-2]
        Ht, Rt = H.unsqueeze(-3), R.unsqueeze(-3)  # with a time axis, to meet (..., T, ., .)
        o = res.observed.to(y.dtype)  # (..., T, p)
        any_missing = not bool(res.observed.all())
        y0 = torch.where(res.observed, y.expand_as(res.observed), torch.zeros_like(o))
        d = ssm.d.unsqueeze(-2) if ssm.d is not None else y0.new_zeros(p)  # (..., 1, p)
        if any_missing:
            # completion of the missing channels given x_t and the observed ones (old R):
            # E[y | x, Y] = G x + g, Cov[y | x, Y] = Omega (missing rows/cols only)
            _, Rm = masked_observation(ssm, res.observed, T)
            Mo = torch.diag_embed(o)
            Nm = torch.diag_embed(1.0 - o)
            RM = Rt @ Mo  # (..., T, p, p)
            W = Nm @ torch.linalg.solve(Rm, RM.mT).mT @ Mo  # N R M Rm^-1 M  (rows m, cols o)
            G = Nm @ Ht - W @ Ht
            g = o * y0 + (1.0 - o) * d + (W @ (y0 - d).unsqueeze(-1)).squeeze(-1)
            Omega = symmetrize(Nm @ (Rt - W @ Rt.mT @ Nm) @ Nm)
            Gx = (G @ xm.unsqueeze(-1)).squeeze(-1)
            Eyx = G @ Exx + g.unsqueeze(-1) * xm.unsqueeze(-2)  # (..., T, p, n)
            Ey = Gx + g
            Eyy = (G @ Exx @ G.mT + Gx.unsqueeze(-1) * g.unsqueeze(-2)
                   + g.unsqueeze(-1) * Gx.unsqueeze(-2) + g.unsqueeze(-1) * g.unsqueeze(-2)
                   + Omega)
        else:
            Ey = y0
            Eyx = y0.unsqueeze(-1) * xm.unsqueeze(-2)
            Eyy = y0.unsqueeze(-1) * y0.unsqueeze(-2)
        # centre on the fixed intercept d: ytilde = y - d
        Etx = Eyx - d.unsqueeze(-1) * xm.unsqueeze(-2)
        Ett = (Eyy - Ey.unsqueeze(-1) * d.unsqueeze(-2) - d.unsqueeze(-1) * Ey.unsqueeze(-2)
               + d.unsqueeze(-1) * d.unsqueeze(-2))
        Sxx = reduce(Exx.sum(-3), (n, n))
        Stx = reduce(Etx.sum(-3), (p, n))
        Stt = reduce(Ett.sum(-3), (p, p))
        if "H" in estimate:
            H = torch.linalg.solve(Sxx, Stx.mT).mT  # H Sxx = Stx
            new["H"] = H
        if "R" in estimate:
            HStx = H @ Stx.mT
            Rn = symmetrize((Stt - HStx - HStx.mT + H @ Sxx @ H.mT) / (T * pooled))
            if diagonal_R:
                Rn = torch.diag_embed(torch.diagonal(Rn, dim1=-2, dim2=-1))
            new["R"] = Rn
    return ssm._replace(**new)
