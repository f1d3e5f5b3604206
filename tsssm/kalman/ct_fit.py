"""System identification for continuous-time models: maximum likelihood, standard errors.

A model is any function ``build(theta) -> ContinuousLinearSSM`` of unconstrained parameters
``theta (..., n_params)`` (a :class:`~tsssm.kalman.ct_models.CTStructuralModel`, a physical model
from expressions, ...). The data are :class:`Segment` s (streams of different lengths, each with
its grid and inputs); the log-likelihood of theta is the sum over the segments, reduced to
theta's batch shape: batch axes of theta are independent models (one per channel, or one per
starting point), so the summed likelihood separates over them and one optimiser run fits all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tsssm.errors import ConfigError, NumericalError
from tsssm.kalman.ct import ContinuousLinearSSM, ct_loglik
from tsssm.kalman.fit import FitResult, lbfgs_fit, observed_information
from tsssm.kalman.ssm import step_loop_threads

Build = Callable[[Tensor], ContinuousLinearSSM]


class Segment(NamedTuple):
    """One group of equally long series on their own grids."""

    y: Tensor  # (..., T, p) NaN = missing
    dt: Tensor  # (..., T) steps, dt[..., 0] unused
    u: Tensor | None = None  # (..., T, k) inputs


class Estimate(NamedTuple):
    """A fitted quantity with its asymptotic standard error (same shapes)."""

    value: Tensor
    se: Tensor


def total_loglik(build: Build, theta: Tensor, segments: Sequence[Segment]) -> Tensor:
    """Sum of the segments' log-likelihoods, reduced to theta's batch shape (...)."""
    if not segments:
        raise ConfigError("no data to fit: give at least one segment")
    batch = theta.shape[:-1]
    ct = build(theta)
    total = None
    for seg in segments:
        ll = ct_loglik(ct, seg.y, seg.dt, seg.u)
        ll = ll.sum_to_size(batch) if ll.shape != batch else ll
        total = ll if total is None else total + ll
    return total


def count_observed(segments: Sequence[Segment]) -> int:
    return max(sum(int((~torch.isnan(s.y)).sum()) for s in segments), 1)


def _raise_if_not_finite(ll: Tensor) -> None:
    bad = ~torch.isfinite(ll)
    if bool(bad.any()):
        idx = bad.nonzero().tolist()[:5]
        raise NumericalError(
            f"the log-likelihood is not finite for the models at batch index {idx}; start "
            f"from other parameters, rescale the data or fix more of the parameters"
        )


def best_start(build: Build, candidates: Tensor, segments: Sequence[Segment]) -> Tensor:
    """The candidate (S, ..., n_params) with the highest likelihood, per batch entry (...)."""
    with torch.no_grad():
        ll = total_loglik(build, candidates, segments)  # (S, ...)
        ll = torch.where(torch.isfinite(ll), ll, torch.full_like(ll, -torch.inf))
        best = ll.argmax(0)  # (...)
    idx = best.unsqueeze(0).unsqueeze(-1).expand(1, *candidates.shape[1:])
    return torch.gather(candidates, 0, idx)[0]


@step_loop_threads()
def fit_ct_mle(build: Build, segments: Sequence[Segment], theta0: Tensor, *,
               candidates: Tensor | None = None, max_iter: int = 200, tol: float = 1e-10,
               fixed: Tensor | None = None) -> FitResult:
    """Maximum likelihood by L-BFGS (strong Wolfe) through the filter.

    theta0 (..., n_params): the start; candidates (S, ..., n_params): several starts, the best
    by likelihood is used (for multimodal likelihoods such as an oscillator's frequency).
    fixed: a (n_params,) bool mask of parameters held at theta0. Returns the FitResult of
    :func:`tsssm.kalman.fit.fit_mle` (theta at the optimum, log-likelihood per batch entry).
    """
    if candidates is not None:
        theta0 = best_start(build, candidates, segments)
    free = None if fixed is None else ~fixed.to(torch.bool)
    base = theta0.detach().clone()
    if free is not None and not bool(free.any()):
        with torch.no_grad():
            ll = total_loglik(build, base, segments)
        _raise_if_not_finite(ll)
        return FitResult(base, ll, 0, True, [float(ll.sum())])
    var = (base if free is None else base[..., free]).clone().requires_grad_(True)

    def assemble(v: Tensor) -> Tensor:
        if free is None:
            return v
        full = base.clone()
        full[..., free] = v
        return full

    n_obs = count_observed(segments)

    def loss() -> Tensor | None:  # None: the trial step left the valid region
        try:
            value = -total_loglik(build, assemble(var), segments).sum() / n_obs
        except NumericalError:
            return None
        return value if bool(torch.isfinite(value)) else None

    n_iter, converged, history = lbfgs_fit(var, loss, n_obs, max_iter=max_iter, tol=tol)
    theta = assemble(var.detach())
    with torch.no_grad():
        ll = total_loglik(build, theta, segments)
    _raise_if_not_finite(ll)
    return FitResult(theta, ll, n_iter, converged, history)


@step_loop_threads()
def ct_standard_errors(build: Build, theta: Tensor, segments: Sequence[Segment], *,
                       fixed: Tensor | None = None, strict: bool = True
                       ) -> tuple[Tensor, Tensor]:
    """Asymptotic standard errors (..., n_params) and covariance (..., n_params, n_params) of
    the unconstrained parameters, from the observed information (the Hessian of the negative
    log-likelihood by double backpropagation; one backward pass per parameter serves every
    batch entry, since the likelihood separates over them). Fixed parameters get SE 0.
    Where the information is not positive definite (a parameter the data do not identify: fix
    it or drop the component) this raises NumericalError, or with ``strict=False`` gives that
    batch entry NaN standard errors and covariance (for a report that says so).
    """
    info = observed_information(lambda th: total_loglik(build, th, segments), theta)
    k = theta.shape[-1]
    free = torch.ones(k, dtype=torch.bool) if fixed is None else ~fixed.to(torch.bool)
    idx = free.nonzero().flatten().to(theta.device)
    sub = info.index_select(-1, idx).index_select(-2, idx)
    chol, bad = torch.linalg.cholesky_ex(sub)
    bad = bad != 0  # (...)
    if bool(bad.any()) and strict:
        raise NumericalError(
            "the observed information is not positive definite at the estimate: some parameter "
            "is not identified by the data (or the fit did not converge); fix it, drop its "
            "component, or give more data"
        )
    eye = torch.eye(len(idx), dtype=info.dtype, device=info.device)
    chol = torch.where(bad[..., None, None], eye, chol)
    cov_free = torch.cholesky_inverse(chol)
    cov = info.new_zeros(info.shape)
    cov[..., idx[:, None], idx[None, :]] = cov_free
    cov = torch.where(bad[..., None, None], torch.full_like(cov, float("nan")), cov)
    se = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    se = torch.where(bad[..., None], torch.full_like(se, float("nan")), se)
    return se.detach(), cov.detach()


def derived_standard_errors(derived: Callable[[Tensor], dict[str, Tensor]], theta: Tensor,
                            cov: Tensor) -> dict[str, Estimate]:
    """Delta-method standard errors of the quantities ``derived(theta)`` (each (...)):
    se(g) = sqrt(∇g' Σ ∇g) with Σ the covariance of theta (..., k, k)."""
    theta = theta.detach().clone().requires_grad_(True)
    values = derived(theta)
    out = {}
    for name, value in values.items():
        if not value.requires_grad:
            out[name] = Estimate(value.detach(), torch.zeros_like(value.detach()))
            continue
        (g,) = torch.autograd.grad(value.sum(), theta, retain_graph=True)  # (..., k)
        var = (g.unsqueeze(-2) @ cov @ g.unsqueeze(-1))[..., 0, 0]
        out[name] = Estimate(value.detach(), var.clamp_min(0).sqrt())
    return out
