"""Fitting: maximum likelihood through the filter (L-BFGS, Adam) and EM for the general model.

Both work on many series at once: ``y (S, T, p)`` with parameters ``theta (S, n_params)`` (one
model per series) — the series are independent, so the summed log-likelihood separates and one
optimiser run fits them all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from tsssm.errors import ConfigError, ModelError, NumericalError
from tsssm.kalman.filter import (
    CovariancePass,
    Method,
    covariance_pass,
    kalman_filter,
    masked_observation,
)
from tsssm.kalman.forecast import observation_powers
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.smoother import rts_smoother
from tsssm.kalman.ssm import (
    LinearGaussianSSM,
    batch_shape,
    compact,
    is_time_invariant,
    step_loop_threads,
    symmetrize,
)


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


#: objective value of a trial point whose likelihood cannot be evaluated (per observation)
REJECTED_LOSS = 1e12


def lbfgs_fit(var: Tensor, loss_fn: Callable[[], Tensor | None], n_obs: int, *,
              max_iter: int, tol: float) -> tuple[int, bool, list[float]]:
    """Minimise ``loss_fn()``, the negative log-likelihood per observation as a function of the
    leaf tensor ``var`` (requires grad), by L-BFGS with a strong Wolfe line search: the one
    driver of :func:`fit_mle` and :func:`tsssm.kalman.ct_fit.fit_ct_mle`.

    ``loss_fn`` returns None for a trial step of the line search that left the valid region (a
    covariance that is not positive definite, an overflow): the search sees ``REJECTED_LOSS``
    with a zero gradient and steps back; such evaluations are not counted. Returns the number
    of evaluations, whether L-BFGS stopped before ``max_iter`` iterations, and the total
    log-likelihood after every evaluation.
    """
    history: list[float] = []
    n_iter = 0
    opt = torch.optim.LBFGS([var], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=tol, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        nonlocal n_iter
        opt.zero_grad()
        loss = loss_fn()
        if loss is None:
            var.grad = torch.zeros_like(var)
            return torch.tensor(REJECTED_LOSS, dtype=var.dtype)
        loss.backward()
        n_iter += 1
        history.append(-float(loss.detach()) * n_obs)
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    return n_iter, state.get("n_iter", max_iter) < max_iter, history


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
        n_iter, converged, history = lbfgs_fit(theta, lambda: objective()[0], n_obs,
                                               max_iter=max_iter, tol=tol)
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


def observed_information(loglik: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """The observed information (..., k, k) at theta (..., k): minus the symmetrised Hessian of
    ``loglik(theta)`` (...), by double backpropagation. The batch entries are independent, so
    the Hessian of the summed log-likelihood is block diagonal and one backward pass per
    parameter gives every entry's block. Used by :func:`standard_errors` and
    :func:`tsssm.kalman.ct_fit.ct_standard_errors`."""
    theta = theta.detach().clone().requires_grad_(True)
    ll = loglik(theta).sum()
    (grad,) = torch.autograd.grad(ll, theta, create_graph=True)
    k = theta.shape[-1]
    rows = []
    for j in range(k):
        (row,) = torch.autograd.grad(grad[..., j].sum(), theta, retain_graph=j < k - 1)
        rows.append(row)
    return -symmetrize(torch.stack(rows, dim=-2))  # (..., k, k)


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
    info = observed_information(lambda th: structural_loglik(model, th, y, prior=prior), theta)
    cov = torch.linalg.inv(info)  # the covariance of the estimates is what is asked for here
    return torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()


# --------------------------------------------------------------------------------------------
# EM


log = logging.getLogger("tsssm")

EM_FIELDS = ("F", "H", "Q", "R", "m0", "P0")
#: the multi-step criterion's log-variances stay at or below this (variances up to e^30 ~ 1e13
#: times the data's scale): the criterion only sees ratios of variances, and where its optimum
#: lies at an infinite ratio (a noise that should swamp the others) the unbounded parameter
#: would run to an overflow; below the bound nothing changes
MULTISTEP_LOG_VAR_MAX = 30.0


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


# --------------------------------------------------------------------------------------------
# EM for structural models (parameters of the components, and the prior)


class StructuralEMResult(NamedTuple):
    """Outcome of :func:`fit_structural_em`."""

    theta: Tensor  # (..., n_params)
    m0: Tensor  # (..., n) prior mean of the first state of every segment
    P0: Tensor  # (..., n, n) its covariance
    history: list[float]  # total log-likelihood before each M-step and at the end


def _pooled(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x.sum(dims)`` without the work of summing along axes that are broadcast views."""
    scale = 1
    for d in sorted(dims, reverse=True):
        if x.stride(d) == 0 and x.shape[d] > 1:
            scale *= x.shape[d]
            x = x.narrow(d, 0, 1)
    return x.sum(dims) * scale


def _outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """sum over axis 0 and the time axis of a_t b_t': a, b (G, ..., T, n) -> (..., n, n)."""
    G, T, n = a.shape[0], a.shape[-2], a.shape[-1]
    batch = a.shape[1:-2]
    a2 = a.movedim(0, -3).reshape(*batch, G * T, n)
    b2 = b.movedim(0, -3).reshape(*batch, G * T, n)
    return a2.mT @ b2


def structural_em_statistics(ssm: LinearGaussianSSM, y: Tensor, method: Method = "sequential"
                             ) -> tuple[Tensor, dict[str, Tensor]]:
    """E-step for segments y (G, ..., T, 1) under a univariate model of batch (...).

    Returns (log-likelihood summed over the segments (...), sums over the segments and steps):
    S11, S10, S00 (..., n, n) over transitions, ``trans`` their count, ``e2`` the sum over
    observed steps of E[(y_t - h x_t)^2], ``n_obs`` their count (...), ``x0_sum`` (..., n) and
    ``x0_outer`` (..., n, n) the sums of E[x_0] and E[x_0 x_0'] over the segments, ``n_seg``.

    Segments without missing values under a time-invariant model take the linear path
    (:func:`_linear_em_statistics`), whose cost does not grow with the number of segments.
    """
    if _linear_ok(ssm, y):
        return _linear_em_statistics(ssm, y)
    res = kalman_filter(ssm, y, method=method)
    sm = rts_smoother(ssm, res)
    xm, P = sm.mean, sm.cov  # (G, ..., T, n), (G, ..., T, n, n)
    G, T = xm.shape[0], xm.shape[-2]
    pool = (0, xm.ndim - 2)  # segments and time (of the (G, ..., T, n, n) covariances)
    stats: dict[str, Tensor] = {}
    if T > 1:
        x1, x0 = xm[..., 1:, :], xm[..., :-1, :]
        stats["S11"] = _pooled(P[..., 1:, :, :], pool) + _outer_sum(x1, x1)
        stats["S00"] = _pooled(P[..., :-1, :, :], pool) + _outer_sum(x0, x0)
        stats["S10"] = _pooled(sm.lag_one_cov, pool) + _outer_sum(x1, x0)
    stats["trans"] = torch.tensor(float(G * (T - 1)), dtype=xm.dtype)
    h = ssm.H[..., 0, :]  # (..., n): univariate observation rows
    o = res.observed[..., 0]  # (G, ..., T)
    y0 = torch.where(o, y[..., 0], 0)
    resid = y0 - (xm * h.unsqueeze(-2)).sum(-1)
    hc = h.unsqueeze(-2)  # (..., 1, n) against the time axis
    Pc = compact(P, 3)  # the shared covariances once, not per segment
    hPh = ((Pc @ hc.unsqueeze(-1)).squeeze(-1) * hc).sum(-1)  # (G or 1, ..., T)
    stats["e2"] = torch.where(o, resid * resid + hPh, 0).sum((0, o.ndim - 1))
    stats["n_obs"] = o.sum((0, o.ndim - 1)).to(xm.dtype)
    x0 = xm[..., 0, :]
    stats["x0_sum"] = x0.sum(0)
    stats["x0_outer"] = _pooled(P[..., 0, :, :], (0,)) + _outer_sum(x0.unsqueeze(-2),
                                                                    x0.unsqueeze(-2))
    stats["n_seg"] = torch.tensor(float(G), dtype=xm.dtype)
    return res.loglik.sum(0), stats


#: the linear path keeps T maps of (n, T + 1) per series: O(T^2 n) memory, so it is taken only
#: for segments short enough (ETT's windows of a few hundred steps), never for a whole stream
LINEAR_PATH_MAX_BYTES = 512 * 2**20


def _linear_ok(ssm: LinearGaussianSSM, y: Tensor) -> bool:
    """Whether segments y (G, ..., T, 1) can take the linear (second-moment) path."""
    if not (is_time_invariant(ssm) and ssm.B is None and ssm.c is None and ssm.d is None
            and ssm.H.shape[-2] == 1 and y.shape[-2] > 1):
        return False
    T, n = y.shape[-2], ssm.F.shape[-1]
    series = math.prod(torch.broadcast_shapes(y.shape[1:-2], batch_shape(ssm)))
    if 2 * T * (T + 1) * n * series * y.element_size() > LINEAR_PATH_MAX_BYTES:
        return False
    return not bool(torch.isnan(y).any())


def _second_moments(y: Tensor, batch: torch.Size) -> Tensor:
    """Z = sum_g z_g z_g' (..., T+1, T+1) of the segments augmented by a one, z = [y, 1]."""
    G, T = y.shape[0], y.shape[-2]
    y2 = y[..., 0].expand(G, *batch, T).movedim(0, -1)  # (..., T, G)
    Z = y2.new_zeros(*batch, T + 1, T + 1)
    Z[..., :T, :T] = y2 @ y2.mT
    Z[..., :T, T] = Z[..., T, :T] = y2.sum(-1)
    Z[..., T, T] = G
    return Z


class _FilterMaps(NamedTuple):
    cov: CovariancePass
    Mps: list[Tensor]  # T x (..., n, T+1): predicted means as maps of z
    Vs: list[Tensor]  # T x (..., 1, T+1): innovations as maps of z
    S: Tensor  # (..., T) innovation variances
    last: Tensor  # (..., n, T+1): the filtered mean after the last step as a map of z


def _filter_maps(ssm: LinearGaussianSSM, T: int, batch: torch.Size) -> _FilterMaps:
    """The filter on the basis of z = [y_0 .. y_{T-1}, 1] (the one carries the prior mean)."""
    n = ssm.F.shape[-1]
    Hm_all, Rm_all = masked_observation(ssm, None, T)
    cov = covariance_pass(ssm, Hm_all, Rm_all, T, None, True, "all")
    F = ssm.F.expand(*batch, n, n)
    H = ssm.H.expand(*batch, 1, n)
    K = cov.gain.expand(*batch, T, n, 1).unbind(-3)
    S = (cov.chol_S[..., 0, 0] ** 2).expand(*batch, T)
    basis = torch.eye(T, T + 1, dtype=F.dtype, device=F.device).unbind(0)  # rows e_t
    Mf = torch.cat([F.new_zeros(*batch, n, T), ssm.m0.expand(*batch, n).unsqueeze(-1)], -1)
    Mps, Vs = [], []
    for t in range(T):
        Mp = Mf if t == 0 else F @ Mf
        V = basis[t] - H @ Mp
        Mf = Mp + K[t] @ V
        Mps.append(Mp)
        Vs.append(V)
    return _FilterMaps(cov, Mps, Vs, S, Mf)


def _linear_loglik_from(maps: _FilterMaps, Z: Tensor, G: int) -> Tensor:
    """sum_g log p(y_g) (...): sum_g v_t^2 = b_t Z b_t' for the innovation rows b_t."""
    V = torch.cat(maps.Vs, dim=-2)  # (..., T, T+1)
    vZv = ((V @ Z) * V).sum(-1)  # (..., T)
    S = maps.S
    return -0.5 * (G * (math.log(2 * math.pi) + S.log()) + vZv / S).sum(-1)


@step_loop_threads()
def segments_loglik(ssm: LinearGaussianSSM, y: Tensor) -> Tensor:
    """Log-likelihood summed over segments y (G, ..., T, 1), each filtered from the prior: (...).

    Fully observed segments under a time-invariant model take the linear path (innovations
    as maps of the segment, a quadratic form in the segments' second moments: the cost does
    not grow with G); otherwise the filter. Differentiable either way.
    """
    if not _linear_ok(ssm, y):
        return kalman_filter(ssm, y).loglik.sum(0)
    G, T = y.shape[0], y.shape[-2]
    batch = torch.broadcast_shapes(y.shape[1:-2], batch_shape(ssm))
    loglik = _linear_loglik_from(_filter_maps(ssm, T, batch), _second_moments(y, batch), G)
    _raise_if_not_finite(loglik.detach())
    return loglik


@step_loop_threads()
def _linear_em_statistics(ssm: LinearGaussianSSM, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The E-step of :func:`structural_em_statistics` for fully observed segments of one length.

    The gains do not depend on the data, so every filtered and smoothed mean is a linear map of
    the segment augmented by a one, z = [y_0 .. y_{T-1}, 1] (the one carries the prior mean):
    E[x_t | y] = M_t z with M_t (n, T + 1), and every sufficient statistic is a quadratic form
    in the segments' second-moment matrix Z = sum_g z_g z_g' ((T+1) x (T+1)), e.g.
    sum_g E[x_t | y_g] E[x_{t-1} | y_g]' = M_t Z M_{t-1}'. The maps come from the filter and
    the Durbin-Koopman smoother run on the basis of z (the same recursions as
    :func:`tsssm.kalman.smoother.rts_smoother`), once per model; the cost is O(T^2 n) per model
    whatever the number of segments G. Log-likelihood: sum_g sum_t of the Gaussian terms, with
    sum_g v_t^2 = b_t Z b_t' for the innovation map b_t.
    """
    G, T = y.shape[0], y.shape[-2]
    batch = torch.broadcast_shapes(y.shape[1:-2], batch_shape(ssm))
    n, dt = ssm.F.shape[-1], y.dtype
    Z = _second_moments(y, batch)
    maps = _filter_maps(ssm, T, batch)
    cov, Mps, Vs, S, _ = maps
    F = ssm.F.expand(*batch, n, n)
    H = ssm.H.expand(*batch, 1, n)
    Pp = cov.predicted_cov.expand(*batch, T, n, n).unbind(-3)
    K = cov.gain.expand(*batch, T, n, 1).unbind(-3)
    eye = torch.eye(n, dtype=dt, device=y.device)
    # Durbin-Koopman smoother on the maps: r_t = H' S^-1 v_t + L_t' r_{t+1},
    # N_t = H' S^-1 H + L_t' N_{t+1} L_t, L_t = F (I - K_t H)
    R = y.new_zeros(*batch, n, T + 1)
    N = y.new_zeros(*batch, n, n)
    HtH = H.mT @ H
    Ms, Ps, lags = [None] * T, [None] * T, [None] * (T - 1)
    N_next = N
    for t in range(T - 1, -1, -1):
        sinv = (1.0 / S[..., t])[..., None, None]
        if t < T - 1:
            Lt = F @ (eye - K[t] @ H)
            R = H.mT @ (sinv * Vs[t]) + Lt.mT @ R
            N = symmetrize(sinv * HtH + Lt.mT @ N @ Lt)
            lags[t] = (eye - Pp[t + 1] @ N_next) @ Lt @ Pp[t]
        else:
            R = H.mT @ (sinv * Vs[t])
            N = sinv * HtH
        Ms[t] = Mps[t] + Pp[t] @ R
        Ps[t] = symmetrize(Pp[t] - Pp[t] @ N @ Pp[t])
        N_next = N
    M = torch.stack(Ms, dim=-3)  # (..., T, n, T+1)
    P = torch.stack(Ps, dim=-3)  # (..., T, n, n)
    MZ = M @ Z.unsqueeze(-3)
    outer = MZ @ M.mT  # (..., T, n, n): sum_g E[x_t] E[x_t]'
    stats: dict[str, Tensor] = {}
    Psum = P.sum(-3)
    stats["S11"] = G * (Psum - P[..., 0, :, :]) + outer[..., 1:, :, :].sum(-3)
    stats["S00"] = G * (Psum - P[..., -1, :, :]) + outer[..., :-1, :, :].sum(-3)
    lag = torch.stack(lags, dim=-3)  # (..., T-1, n, n): Cov[x_{t+1}, x_t | y]
    stats["S10"] = G * lag.sum(-3) + (MZ[..., 1:, :, :] @ M[..., :-1, :, :].mT).sum(-3)
    stats["trans"] = torch.tensor(float(G * (T - 1)), dtype=dt)
    # residual rows e_t - h M_t over z, and sum_g of their squares
    E = torch.eye(T, T + 1, dtype=dt, device=y.device)  # (T, T+1): row t = e_t
    res_rows = E - (H.unsqueeze(-3) @ M)[..., 0, :]  # (..., T, T+1)
    quad = ((res_rows @ Z) * res_rows).sum(-1)  # (..., T)
    hPh = (H.unsqueeze(-3) @ P @ H.mT.unsqueeze(-3))[..., 0, 0]  # (..., T)
    stats["e2"] = (quad + G * hPh).sum(-1)
    stats["n_obs"] = torch.full(batch, float(G * T), dtype=dt)
    stats["x0_sum"] = (M[..., 0, :, :] @ Z[..., :, T:])[..., 0]
    stats["x0_outer"] = G * P[..., 0, :, :] + outer[..., 0, :, :]
    stats["n_seg"] = torch.tensor(float(G), dtype=dt)
    return _linear_loglik_from(maps, Z, G), stats


def _with_extra(P0: Tensor, extra: Tensor | None) -> Tensor:
    return P0 if extra is None else P0 + torch.diag_embed(extra)


def _summer(stats: list[dict[str, Tensor]]):
    def total_of(key: str) -> Tensor:
        return sum(s[key] for s in stats if key in s)

    return total_of


def fit_structural_em(
    model: StructuralModel,
    theta: Tensor,
    segments: Sequence[Tensor],
    m0: Tensor,
    P0: Tensor,
    *,
    n_iter: int = 50,
    tol: float = 1e-8,
    estimate_prior: bool = True,
    prior_of: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    prior_extra: Tensor | None = None,
    floor: Tensor | float = 1e-12,
    method: Method = "sequential",
) -> StructuralEMResult:
    """EM for a univariate :class:`StructuralModel`: every component's parameters (variances,
    damping, AR coefficients) and, with ``estimate_prior``, the prior (m0, P0) of the first
    state of each segment.

    theta (..., n_params): one model per batch entry (e.g. per channel); m0 (..., n), P0
    (..., n, n) the current prior; segments: tensors (G_k, ..., T_k, 1) (NaN = missing),
    each a batch of G_k independent segments pooled into the same model (lengths differ
    between tensors). Every segment is filtered from the prior, so with many segments (e.g.
    a long training stream cut into windows of the forecasting context) the estimated prior is
    the distribution of the state at the start of a window: what a forecast from a short
    context needs. E-step: filter + smoother; M-step in closed form per component
    (:func:`tsssm.kalman.models.block_em_update`), the observation variance as the mean
    E[(y - h x)^2], the prior as the mean and covariance of the smoothed first states. Every
    step maximises the expected complete-data log-likelihood (AR steps that would leave the
    stationary region are shortened), so the likelihood never decreases. Stops when an iteration
    gains less than ``tol`` relative. Variances are floored at ``floor`` ((...) or a number).
    ``prior_of``: without ``estimate_prior``, a function theta -> (m0, P0) that rebuilds the
    prior from the parameters at every iteration (e.g. the stationary covariance of an AR
    block; EM then ignores the prior's dependence on the parameters, so the likelihood can dip
    slightly); otherwise the prior stays (m0, P0). ``prior_extra`` (..., n): a variance added
    to the diagonal of P0 wherever the prior is used (e.g. a diffuse level); the estimated P0
    excludes it.
    """
    from tsssm.kalman.models import block_em_update

    if model.observation != "univariate":
        raise ConfigError("fit_structural_em handles univariate models (observation='univariate')")
    if not segments:
        raise ModelError("fit_structural_em needs at least one segment")
    floor_t = torch.as_tensor(floor, dtype=theta.dtype, device=theta.device).expand(
        theta.shape[:-1])
    theta = theta.detach().clone()
    m0, P0 = m0.detach().clone(), P0.detach().clone()
    history: list[float] = []
    with torch.no_grad():
        for it in range(n_iter + 1):
            if prior_of is not None and not estimate_prior:
                m0, P0 = prior_of(theta)
            ssm = model.to_ssm(theta, m0, _with_extra(P0, prior_extra))
            outs = [structural_em_statistics(ssm, y, method) for y in segments]
            total = sum(float(ll.sum()) for ll, _ in outs)
            if not math.isfinite(total):
                raise NumericalError(
                    f"EM: the log-likelihood is not finite at iteration {it}; rescale the data "
                    f"or start from other parameters"
                )
            history.append(total)
            if it == n_iter or (it > 0 and total - history[-2] <= tol * abs(total)):
                break
            stats = [s for _, s in outs]
            total_of = _summer(stats)
            trans = total_of("trans")
            new = theta.clone()
            if float(trans) > 0:
                S11, S10, S00 = total_of("S11"), total_of("S10"), total_of("S00")
                i = j = 0
                for b in model.blocks:
                    sl = slice(i, i + b.n_states)
                    new[..., j : j + b.n_params] = block_em_update(
                        b, theta[..., j : j + b.n_params], S11[..., sl, sl], S10[..., sl, sl],
                        S00[..., sl, sl], trans, floor_t)
                    i += b.n_states
                    j += b.n_params
            n_obs = total_of("n_obs")
            r = torch.maximum(total_of("e2") / n_obs.clamp_min(1), floor_t).log()
            obs = model.param_names.index("log_var_obs")
            new[..., obs] = torch.where(n_obs > 0, r, theta[..., obs])
            if estimate_prior:
                n_seg = total_of("n_seg")
                m0 = total_of("x0_sum") / n_seg
                P0 = symmetrize(total_of("x0_outer") / n_seg
                                - m0.unsqueeze(-1) * m0.unsqueeze(-2))
            theta = new
    return StructuralEMResult(theta, m0, P0, history)


def _tril_param(P: Tensor) -> Tensor:
    """Unconstrained lower-triangular parameter of a covariance: log on the diagonal."""
    n = P.shape[-1]
    jitter = 1e-9 * torch.diagonal(P, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    L = torch.linalg.cholesky(symmetrize(P) + jitter[..., None, None]
                              * torch.eye(n, dtype=P.dtype, device=P.device))
    d = torch.diagonal(L, dim1=-2, dim2=-1)
    return torch.tril(L, -1) + torch.diag_embed(d.log())


def _tril_cov(raw: Tensor) -> Tensor:
    L = torch.tril(raw, -1) + torch.diag_embed(torch.diagonal(raw, dim1=-2, dim2=-1).exp())
    return L @ L.mT


def fit_structural_lbfgs(
    model: StructuralModel,
    theta: Tensor,
    segments: Sequence[Tensor],
    m0: Tensor,
    P0: Tensor,
    *,
    fit_prior: bool = True,
    prior_of: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    prior_extra: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> StructuralEMResult:
    """Maximum likelihood by L-BFGS over segments (G_k, ..., T_k, 1), each filtered from the
    prior: the parameters theta (..., n_params) and, with ``fit_prior``, the prior mean and
    covariance (Cholesky factor with log-diagonal, so it stays positive definite).

    Meant to finish what a few EM iterations start (EM climbs fast at first and slowly near
    the optimum; L-BFGS the other way round). Fully observed segments of one length cost
    O(T^2 n) per evaluation whatever their number (:func:`segments_loglik`). Returns the
    parameters, the prior and the total log-likelihood after every evaluation. ``prior_of``:
    without ``fit_prior``, the prior as a (differentiable) function of theta; otherwise the
    prior stays (m0, P0). ``prior_extra``: as in :func:`fit_structural_em`.
    """
    if model.observation != "univariate":
        raise ConfigError("fit_structural_lbfgs handles univariate models")
    theta = theta.detach().clone().requires_grad_(True)
    params = [theta]
    m0_p = m0.detach().clone().expand(*theta.shape[:-1], m0.shape[-1]).contiguous()
    P0_fixed = P0.detach()
    if fit_prior:
        m0_p.requires_grad_(True)
        raw = _tril_param(P0_fixed.expand(*theta.shape[:-1], *P0.shape[-2:])).requires_grad_(True)
        params += [m0_p, raw]
    n_obs = max(sum(int((~torch.isnan(y)).sum()) for y in segments), 1)
    history: list[float] = []

    def prior() -> tuple[Tensor, Tensor]:
        if fit_prior:
            return m0_p, _tril_cov(raw)
        return prior_of(theta) if prior_of is not None else (m0_p, P0_fixed)

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=tol, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        m, P = prior()
        ssm = model.to_ssm(theta, m, _with_extra(P, prior_extra))
        ll = sum(segments_loglik(ssm, y).sum() for y in segments)
        history.append(float(ll.detach()))
        loss = -ll / n_obs
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        m0_out, P0_out = prior()
        ssm = model.to_ssm(theta, m0_out, _with_extra(P0_out, prior_extra))
        final = sum(float(segments_loglik(ssm, y).sum()) for y in segments)
    history.append(final)
    return StructuralEMResult(theta.detach(), m0_out.detach(), symmetrize(P0_out.detach()),
                              history)


# --------------------------------------------------------------------------------------------
# multi-step criterion: the mean squared forecast error of training windows (ETS's "amse")


class WindowMoments(NamedTuple):
    """Second moments of training windows (context L, horizon H), per model batch entry."""

    Zc: Tensor  # (..., L+1, L+1) sum_g z_g z_g', z = [context, 1]
    Cz: Tensor  # (..., L+1, H) sum_g z_g f_g' (f: the H values after the context)
    d: Tensor  # (..., H) sum_g f_g^2
    count: Tensor  # (...) number of windows


def window_moments(streams: Sequence[Tensor], context: int, horizon: int, stride: int = 1
                   ) -> WindowMoments:
    """Moments of every window of ``context + horizon`` steps (every ``stride``-th start) of
    streams (B, ..., T, 1); a window with a missing value is left out (per batch entry).

    The windows are summed over, so the multi-step criterion costs the same whatever their
    number: (N_w, L + H) x (L + H) products once, then O(H L^2) per evaluation.
    """
    L, H = int(context), int(horizon)
    parts: list[WindowMoments] = []
    for y in streams:
        x = y[..., 0]  # (B, ..., T)
        if x.shape[-1] < L + H:
            continue
        w = x.unfold(-1, L + H, stride)  # (B, ..., N, L+H)
        w = w.movedim(0, -2).reshape(*w.shape[1:-2], -1, L + H)  # (..., B*N, L+H)
        ok = ~torch.isnan(w).any(-1, keepdim=True)
        w = torch.where(ok, w, 0)
        one = ok.to(w.dtype)
        z = torch.cat([w[..., :L], one], -1)  # (..., N, L+1)
        f = w[..., L:]
        parts.append(WindowMoments(z.mT @ z, z.mT @ f, (f * f).sum(-2), one[..., 0].sum(-1)))
    if not parts:
        raise ModelError(
            f"no training stream is longer than a window of context {L} + horizon {H} steps"
        )
    return WindowMoments(*(sum(p[i] for p in parts) for i in range(4)))


def forecast_maps(ssm: LinearGaussianSSM, context: int, horizon: int,
                  batch: torch.Size | None = None) -> Tensor:
    """W (..., H, L+1): the forecast means of the H steps after a fully observed context of
    L steps filtered from the prior, as a linear map of z = [context, 1] (univariate model)."""
    batch = batch_shape(ssm) if batch is None else batch
    maps = _filter_maps(ssm, int(context), batch)
    G = observation_powers(ssm.H, ssm.F, int(horizon))[..., 1:, 0, :]  # (..., H, n)
    return G.expand(*batch, *G.shape[-2:]) @ maps.last  # (..., H, L+1)


def multistep_mse(W: Tensor, mom: WindowMoments) -> Tensor:
    """Mean squared error (..., H) at each lead of the windows in ``mom`` under maps W."""
    quad = ((W @ mom.Zc) * W).sum(-1)  # (..., H): sum_g (W_k z_g)^2
    cross = (W * mom.Cz.mT).sum(-1)  # (..., H): sum_g (W_k z_g) f_gk
    return (quad - 2 * cross + mom.d) / mom.count.clamp_min(1).unsqueeze(-1)


@step_loop_threads()
def fit_structural_multistep(
    model: StructuralModel,
    theta: Tensor,
    moments: WindowMoments,
    m0: Tensor,
    P0: Tensor,
    context: int,
    horizon: int,
    *,
    fit_prior: bool = True,
    prior_extra: Tensor | None = None,
    fixed: Sequence[str] = ("log_var_obs",),
    max_iter: int = 200,
    tol: float = 1e-10,
) -> StructuralEMResult:
    """Fit the parameters (and the prior) so that forecasts from L-step contexts have the least
    mean squared error over leads 1..H on the training windows (the "amse" criterion of
    exponential smoothing, Hyndman et al. 2008, ch. 5), by L-BFGS on the exact quadratic form
    (:func:`multistep_mse`). The means do not change when every variance (and P0) is scaled by
    one factor, so the parameters in ``fixed`` (by default the observation variance) stay at
    their starting values; the free log-variances stay at or below ``MULTISTEP_LOG_VAR_MAX``
    (a bound that only a criterion whose optimum lies at an infinite variance ratio reaches).
    ``prior_extra``: as in :func:`fit_structural_em`. Returns the parameters, the prior and the
    criterion (mean over leads and batch entries) after every evaluation (``history``).
    """
    free = torch.tensor([name not in fixed for name in model.param_names])
    log_var = torch.tensor([name.startswith("log_var") for name in model.param_names])[free]
    theta0 = theta.detach().clone()
    free_part = theta0[..., free].clone().requires_grad_(True)
    params = [free_part]
    batch = theta.shape[:-1]
    m0_p = m0.detach().clone().expand(*batch, m0.shape[-1]).contiguous()
    if fit_prior:
        m0_p.requires_grad_(True)
        raw = _tril_param(P0.detach().expand(*batch, *P0.shape[-2:])).requires_grad_(True)
        params += [m0_p, raw]
    history: list[float] = []

    def current() -> tuple[Tensor, Tensor, Tensor]:
        th = theta0.clone()
        th[..., free] = torch.where(log_var.to(free_part.device),
                                    free_part.clamp(max=MULTISTEP_LOG_VAR_MAX), free_part)
        return th, m0_p, (_tril_cov(raw) if fit_prior else P0.detach())

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=tol, history_size=20,
                            line_search_fn="strong_wolfe")

    best: list = []  # (criterion, parameters) of the best evaluation so far

    def closure() -> Tensor:
        opt.zero_grad()
        th, m, P = current()
        try:
            W = forecast_maps(model.to_ssm(th, m, _with_extra(P, prior_extra)), context,
                              horizon, batch)
        except NumericalError as err:
            raise _DivergedError(str(err)) from err
        loss = multistep_mse(W, moments).mean()
        if not torch.isfinite(loss):
            raise _DivergedError("the multi-step criterion is not finite")
        history.append(float(loss.detach()))
        if not best or history[-1] < best[0]:
            best[:] = [history[-1], [p.detach().clone() for p in params]]
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except _DivergedError as err:
        # a trial step of the line search left the valid models (e.g. a variance ratio whose
        # optimum is infinite, run to an overflow): the best evaluation is the fit
        if not best:
            raise NumericalError(f"{err} at the start of the multi-step fit; rescale the data "
                                 "or start from other parameters") from None
        log.warning("multi-step fit: stopped after %d evaluations (a trial step made the model "
                    "invalid: %s); keeping the best parameters found", len(history),
                    str(err).split(";")[0])
        with torch.no_grad():
            for p, value in zip(params, best[1]):
                p.copy_(value)
    with torch.no_grad():
        th, m, P = current()
    return StructuralEMResult(th.detach(), m.detach(), symmetrize(P.detach()), history)


class _DivergedError(Exception):
    """A multi-step trial point outside the valid models (the criterion cannot be evaluated)."""
