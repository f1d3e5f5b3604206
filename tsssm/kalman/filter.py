"""The Kalman filter: predicted and filtered states, innovations, log-likelihood, NIS.

Conventions (model, indexing, time-varying matrices): see :mod:`tsssm.kalman.ssm`.

Missing values: ``y`` holds NaN where a channel is not observed (a whole step or single channels).
A missing channel contributes no update and no likelihood. Implementation: at every step the rows
of ``H`` of missing channels are zeroed, the matching rows/columns of ``R`` are replaced by those of
the identity and the innovation is set to 0 there; this is algebraically identical to selecting the
observed rows (what statsmodels does), so the log-likelihood and states are the same.

Numerics: Joseph-form covariance update (for a scalar observation evaluated as the expanded,
algebraically identical P - K a' - a K' + S K K', O(n^2)), covariances symmetrised after every
step, Cholesky solves (no explicit inverse). Gradients flow through everything (plain torch ops).

Methods (``kalman_filter(..., method=...)``), all exact (same results up to rounding):

- ``"sequential"`` (default): the covariance recursion runs step by step; it does not depend on
  the observed values, only on which are missing, so it runs once for all series that share a
  model and, for a time-invariant model, stops computing inside every run of steps with an
  unchanged missing pattern once the Riccati recursion has reached its fixed point (detected to
  64 ulps). The means then follow step by step with all series as the columns of one small
  matrix product (many series), or as a linear recurrence solved by a prefix scan / chunked
  products (few long series); innovations and log-likelihood are computed for all steps at once.
  Runs single-threaded (see :func:`tsssm.kalman.ssm.step_loop_threads`): its ops are small,
  and on shared cores waiting for intra-op workers costs more than they save.
- ``"auto"``: ``"parallel"`` for long sequences of few series whose covariance recursion cannot
  stop early (time-varying model, or missing values scattered through the sequence), else
  ``"sequential"``. Never picks ``"fused"``.
- ``"loop"``: the textbook filter, one step at a time; the readable specification.
- ``"sqrt"``: the square-root filter (propagates Cholesky factors; see :mod:`tsssm.kalman.sqrt`).
- ``"parallel"``: Särkkä & García-Fernández (2021) associative elements combined by a parallel
  prefix scan, O(log T) depth (see :mod:`tsssm.kalman.parallel`). On CUDA, for a
  time-invariant model without controls (n, p <= 4) and when no gradient is needed, the scan
  runs as three Triton kernels (a chunked scan, :mod:`tsssm.kalman.parallel_triton`); otherwise
  as batched torch ops (differentiable).
- ``"fused"``: Triton kernel for many series on CUDA (``tsssm.kalman.fused_triton``), called as
  ``fused_kalman_filter(ssm, y, u, outputs="all") -> FilterResult`` (not differentiable).
- ``"window"``: many short windows of a time-invariant model with one observed channel and
  nothing missing (training windows): covariances by O(log T) doublings of the associative
  elements on the model's batch, the innovations of all windows by one triangular solve
  (:mod:`tsssm.kalman.window`; a few dozen batched ops instead of a dozen per step, for
  launch-bound GPUs). Anything else (missing values, long sequences, time-varying models,
  controls, intercepts) runs ``"sequential"``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from tsssm.errors import DataError, ModelError, NumericalError
from tsssm.kalman.scan import linear_recurrence
from tsssm.kalman.ssm import (
    INF_MESSAGE,
    LinearGaussianSSM,
    batch_shape_of,
    is_time_varying,
    obs_dim,
    per_step,
    stacked,
    state_dim,
    step_loop_threads,
    symmetrize,
    transition_offset,
    validate,
)

Method = Literal["sequential", "auto", "loop", "sqrt", "parallel", "fused", "window"]
METHODS = ("sequential", "auto", "loop", "sqrt", "parallel", "fused", "window")
LOG_2PI = math.log(2.0 * math.pi)


class FilterResult(NamedTuple):
    """Everything the filter computes, for every step t = 0..T-1.

    Covariances shared by several series (same model, same missing pattern) may be returned as
    expanded views (stride 0 on the batch axes); call ``.contiguous()`` before writing into them.
    """

    predicted_mean: Tensor  # (..., T, n)     E[x_t | y_0..y_{t-1}]   (t = 0: m0)
    predicted_cov: Tensor  # (..., T, n, n)   Cov[x_t | y_0..y_{t-1}] (t = 0: P0)
    filtered_mean: Tensor  # (..., T, n)      E[x_t | y_0..y_t]
    filtered_cov: Tensor  # (..., T, n, n)    Cov[x_t | y_0..y_t]
    predicted_obs_mean: Tensor  # (..., T, p) E[y_t | y_0..y_{t-1}] = H_t m_pred + d_t
    predicted_obs_cov: Tensor  # (..., T, p, p) H_t P_pred H_t' + R_t, all channels
    innovation: Tensor  # (..., T, p)         y_t - predicted_obs_mean; 0 where missing
    log_liks: Tensor  # (..., T)              log p(observed part of y_t | past); 0 if none
    loglik: Tensor  # (...)                   sum of log_liks over t
    nis: Tensor  # (..., T)                   normalised innovation squared over observed channels
    observed: Tensor  # (..., T, p) bool      which entries of y were observed


class _Prepared(NamedTuple):
    """Data-side inputs shared by all methods."""

    y: Tensor  # (..., T, p) original (NaN where missing), broadcast to the full batch
    y0: Tensor  # (..., T, p) NaN replaced by 0
    observed: Tensor  # (..., T, p) bool
    any_missing: bool
    batch: torch.Size  # full broadcast batch shape
    T: int
    offset: Tensor | None  # (..., T, n) c_t + B_t u_t, or None


def prepare(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None) -> _Prepared:
    """Validate and broadcast the inputs (used by every filter method)."""
    batch = validate(ssm, y, u)
    T, p = y.shape[-2], y.shape[-1]
    if T == 0:
        raise ModelError("y has no time steps (T = 0); give at least one step")
    y = y.expand(*batch, T, p)
    observed = ~torch.isnan(y)
    any_missing = not bool(observed.all())
    y0 = torch.where(observed, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return _Prepared(y, y0, observed, any_missing, batch, T, transition_offset(ssm, u, T))


def masked_observation(
    ssm: LinearGaussianSSM, observed: Tensor | None, T: int
) -> tuple[Tensor, Tensor]:
    """H and R of every step with missing channels decoupled: (..., T, p, n), (..., T, p, p).

    Rows of H of missing channels are zero; rows and columns of R of missing channels are those of
    the identity. With ``observed=None`` (nothing missing) H and R are returned unmasked (views).
    """
    H, R = stacked(ssm, "H", T), stacked(ssm, "R", T)
    if observed is None:
        return H, R
    o = observed.to(H.dtype)
    Hm = H * o.unsqueeze(-1)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    Rm = R * (o.unsqueeze(-1) * o.unsqueeze(-2)) + eye * (1.0 - o).unsqueeze(-1)
    return Hm, Rm


def kalman_filter(
    ssm: LinearGaussianSSM,
    y: Tensor,
    u: Tensor | None = None,
    *,
    method: Method = "sequential",
    steady_state: bool = True,
    covariances: Literal["all", "last"] = "all",
) -> FilterResult:
    """Run the Kalman filter over ``y`` (..., T, p) with NaN for missing entries.

    u: controls (..., T, k) when the model has ``B``. ``steady_state``: let the ``"sequential"``
    method stop the covariance recursion at its fixed point (exact to a few ulps; off forces every
    step to be computed). ``covariances="last"``: predicted_cov and filtered_cov hold the last
    step only, (..., 1, n, n) (enough to continue filtering or to forecast; saves memory and
    time for large state dimensions; the smoother needs "all"). Raises NumericalError when a
    predicted observation covariance is not positive definite or the likelihood is not finite.
    """
    if covariances not in ("all", "last"):
        raise ModelError(f"covariances must be 'all' or 'last', got {covariances!r}")
    if method == "auto":
        method = choose_method(ssm, y)
    if method == "window":
        from tsssm.kalman.window import window_applies, window_filter

        if window_applies(ssm, y, u):
            return window_filter(ssm, y, covariances=covariances)
        method = "sequential"
    if method == "sequential":
        return _filter_two_pass(ssm, y, u, steady_state=steady_state, covariances=covariances)
    res = _dispatch(ssm, y, u, method, steady_state)
    if covariances == "last":
        res = res._replace(predicted_cov=res.predicted_cov[..., -1:, :, :],
                           filtered_cov=res.filtered_cov[..., -1:, :, :])
    return res


def _dispatch(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None, method: str,
              steady_state: bool) -> FilterResult:
    if method == "loop":
        return _filter_loop(ssm, y, u)
    if method == "sqrt":
        from tsssm.kalman.sqrt import sqrt_kalman_filter

        return sqrt_kalman_filter(ssm, y, u)
    if method == "parallel":
        from tsssm.kalman.parallel import parallel_kalman_filter

        return parallel_kalman_filter(ssm, y, u)
    if method == "fused":
        if not (isinstance(y, Tensor) and y.is_cuda and ssm.F.is_cuda):
            raise ModelError(
                "method='fused' runs a Triton kernel on CUDA tensors; move the model and y to a "
                "GPU (.cuda()) or use method='sequential' or 'parallel' on the CPU"
            )
        try:
            from tsssm.kalman.fused_triton import fused_kalman_filter
        except ImportError as err:  # Triton is the gpu extra
            raise ModelError("method='fused' needs Triton: pip install 'tsssm[gpu]' (or "
                             "use method='sequential' or 'parallel')") from err

        # Every field, as the other methods give; call fused_kalman_filter directly with its
        # default outputs for memory-bandwidth speed when only likelihoods and means are needed.
        return fused_kalman_filter(ssm, y, u, outputs="all")
    raise ModelError(f"unknown filter method {method!r}; choose one of {', '.join(METHODS)}")


#: "auto" considers the parallel filter from this many steps on.
AUTO_PARALLEL_MIN_STEPS = 2048


def choose_method(ssm: LinearGaussianSSM, y: Tensor) -> str:
    """What ``method="auto"`` runs: see the module docstring."""
    if not isinstance(y, Tensor) or y.ndim < 2:
        return "sequential"
    T = y.shape[-2]
    width = math.prod(torch.broadcast_shapes(y.shape[:-2], ssm.F.shape[:-2])) * state_dim(ssm)
    if T < AUTO_PARALLEL_MIN_STEPS or width >= LOOP_MIN_WIDTH:
        return "sequential"
    if any(is_time_varying(ssm, name) for name in ("F", "Q", "H", "R")):
        return "parallel"
    observed = ~torch.isnan(y)
    changes = int((observed[..., 1:, :] != observed[..., :-1, :]).any(-1).sum())
    # every run of an unchanged mask costs ~100 stepwise updates before it can be skipped
    return "parallel" if changes * 100 > T else "sequential"


# --------------------------------------------------------------------------------------------
# shared pieces


def _check_cholesky(info: Tensor, what: str, time_axis: bool = True) -> None:
    """Raise NumericalError naming the series (and step) whose matrix was not positive definite.

    info: (..., T) nonzero where the factorisation failed (or (...) with ``time_axis=False``).
    """
    bad = info != 0
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        where = (f"series {tuple(idx[:-1])} (batch index) at step {idx[-1]}" if time_axis
                 else f"series {tuple(idx)} (batch index)")
        raise NumericalError(
            f"{what} is not positive definite for {where}; check that R is positive definite "
            f"and the model's parameters and the data are finite"
        )


def _check_loglik(loglik: Tensor) -> None:
    """No NaN passes: a non-finite log-likelihood names its series."""
    bad = ~torch.isfinite(loglik)
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise NumericalError(
            f"the log-likelihood is not finite for series {idx} (batch index); check the "
            f"model's parameters (finite, positive definite covariances) and the data's scale"
        )


def update_gain(P: Tensor, Hm: Tensor, Rm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gain for one step: (K (..., n, p), Cholesky factor of S (..., p, p), cholesky info).

    S = Hm P Hm' + Rm, K = P Hm' S^-1 by a Cholesky solve (a division when p = 1).
    """
    PHt = P @ Hm.mT  # (..., n, p)
    S = symmetrize(Hm @ PHt + Rm)  # (..., p, p)
    if S.shape[-1] == 1:
        info = (~(S[..., 0, 0] > 0)).to(torch.int32)
        chol = S.clamp_min(torch.finfo(S.dtype).tiny).sqrt()
        return PHt / (chol * chol), chol, info
    chol, info = torch.linalg.cholesky_ex(S)
    K = torch.cholesky_solve(PHt.mT, chol).mT
    return K, chol, info


def joseph_update(P: Tensor, K: Tensor, Hm: Tensor, Rm: Tensor) -> Tensor:
    """(I - K H) P (I - K H)' + K R K', symmetrised."""
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    IKH = eye - K @ Hm
    return symmetrize(IKH @ P @ IKH.mT + K @ Rm @ K.mT)


def rows_times(v: Tensor, M: Tensor) -> Tensor:
    """``v @ M.mT`` for v (vb.., T, b) and a matrix M (mb.., a, b) with broadcast batch axes,
    without materialising M for the axes along which only v varies: those axes are folded
    into the rows of one GEMM per distinct matrix (e.g. one model per channel applied to
    thousands of windows: C products of (windows * T, b) x (b, a), not windows * C copies of
    M). Returns (broadcast batch.., T, a)."""
    nd = max(v.ndim, M.ndim) - 2
    vb = (1,) * (nd - (v.ndim - 2)) + tuple(v.shape[:-2])
    mb = (1,) * (nd - (M.ndim - 2)) + tuple(M.shape[:-2])
    free = [i for i in range(nd) if mb[i] == 1 and vb[i] > 1]
    if not free or M.ndim == 2:
        if M.ndim == 2:  # one matrix for everything: a single flat GEMM
            return (v.reshape(-1, v.shape[-1]) @ M.mT).reshape(*v.shape[:-1], M.shape[-2])
        return v @ M.mT
    keep = [i for i in range(nd) if i not in free]
    T, b, a = v.shape[-2], v.shape[-1], M.shape[-2]
    vp = v.reshape(*vb, T, b).permute(*keep, *free, nd, nd + 1)
    rows = vp.reshape(*[vb[i] for i in keep], -1, b)  # (keep.., free * T, b)
    Mk = M.reshape(*[mb[i] for i in keep], a, b)
    out = rows @ Mk.mT  # (keep (broadcast).., free * T, a)
    kept = tuple(out.shape[:-2])
    out = out.reshape(*kept, *[vb[i] for i in free], T, a)
    order = [0] * nd
    for j, i in enumerate(keep + free):
        order[i] = j
    return out.permute(*order, nd, nd + 1)


def apply_steps(ssm: LinearGaussianSSM, name: str, v: Tensor, start: int = 0) -> Tensor:
    """M_t v_t for t = start .. T-1 with M the matrix field ``name``; v (..., T - start, b).

    A time-invariant M is applied as one matrix product over all steps (a GEMM per model, not
    one tiny product per step, see :func:`rows_times`); a time-varying one elementwise.
    """
    M = getattr(ssm, name)
    if is_time_varying(ssm, name):
        M = M.narrow(-3, start, M.shape[-3] - start)
        return (M * v.unsqueeze(-2)).sum(-1)
    return rows_times(v, M)


def finish(
    ssm: LinearGaussianSSM,
    prep: _Prepared,
    filtered_mean: Tensor,
    predicted_cov: Tensor,
    filtered_cov: Tensor,
    chol_S: Tensor | None = None,
    obs_cov: Tensor | None = None,
) -> FilterResult:
    """Everything else from the filtered means and the covariances, for all steps at once.

    filtered_mean (..., T, n); predicted_cov, filtered_cov (..., T, n, n); chol_S (..., T, p, p)
    Cholesky factors of the masked innovation covariances (computed here when None);
    obs_cov (..., T, p, p) the predictive observation covariances when the state covariances
    are given for the last step only (then chol_S is required).
    """
    T = prep.T
    n, p = state_dim(ssm), obs_dim(ssm)
    full = (*prep.batch, T)
    Tc = predicted_cov.shape[-3]  # T, or 1 when only the last step's covariances are kept
    # predicted means: m_pred_t = F_t m_{t-1} + c_t + B_t u_t (t >= 1), m0 at t = 0
    if is_time_varying(ssm, "F"):
        prev = apply_steps(ssm, "F", filtered_mean[..., :-1, :], start=1)
    else:  # on the contiguous whole, then drop the last step
        prev = apply_steps(ssm, "F", filtered_mean)[..., :-1, :]
    if prep.offset is not None:
        prev = prev + prep.offset[..., 1:, :]
    predicted_mean = torch.cat(
        [ssm.m0.expand(*prep.batch, n).unsqueeze(-2), prev.expand(*prep.batch, T - 1, n)], dim=-2
    )
    obs_mean = apply_steps(ssm, "H", predicted_mean)
    if ssm.d is not None:
        obs_mean = obs_mean + stacked(ssm, "d", T)
    if obs_cov is None:
        H = stacked(ssm, "H", T)
        obs_cov = symmetrize(H @ predicted_cov @ H.mT + stacked(ssm, "R", T))
    if prep.any_missing:
        innovation = torch.where(prep.observed, prep.y0 - obs_mean, torch.zeros_like(obs_mean))
    else:
        innovation = prep.y - obs_mean
    if chol_S is None:
        Hm, Rm = masked_observation(ssm, prep.observed if prep.any_missing else None, T)
        S = symmetrize(Hm @ predicted_cov @ Hm.mT + Rm)
        if p == 1:
            _check_cholesky((~(S[..., 0, 0] > 0)).to(torch.int32), "the innovation variance")
            chol_S = S.sqrt()
        else:
            chol_S, info = torch.linalg.cholesky_ex(S)
            _check_cholesky(info, "the innovation covariance")
    if p == 1:
        w = innovation / chol_S[..., 0]
        logdet = 2.0 * torch.log(chol_S[..., 0, 0])
    else:
        chol_full = chol_S.expand(*full, p, p)
        w = torch.linalg.solve_triangular(chol_full, innovation.unsqueeze(-1), upper=False)
        w = w.squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(chol_S, dim1=-2, dim2=-1)).sum(-1)
    nis = (w * w).sum(-1)
    if prep.any_missing:
        log_liks = -0.5 * (prep.observed.sum(-1).to(nis.dtype) * LOG_2PI + logdet + nis)
    else:
        log_liks = -0.5 * (nis + (logdet + p * LOG_2PI))
    loglik = log_liks.sum(-1)
    _check_loglik(loglik.detach())
    return FilterResult(
        predicted_mean=predicted_mean,
        predicted_cov=predicted_cov.expand(*prep.batch, Tc, n, n),
        filtered_mean=filtered_mean.expand(*full, n),
        filtered_cov=filtered_cov.expand(*prep.batch, Tc, n, n),
        predicted_obs_mean=obs_mean.expand(*full, p),
        predicted_obs_cov=obs_cov.expand(*full, p, p),
        innovation=innovation,
        log_liks=log_liks.expand(*full),
        loglik=loglik.expand(prep.batch),
        nis=nis.expand(*full),
        observed=prep.observed,
    )


# --------------------------------------------------------------------------------------------
# the textbook filter (the specification)


@step_loop_threads()
def _filter_loop(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None) -> FilterResult:
    """One step at a time: predict, update (Joseph form), store."""
    prep = prepare(ssm, y, u)
    T, n = prep.T, state_dim(ssm)
    Hm_all, Rm_all = masked_observation(ssm, prep.observed, T)
    ym_all = prep.y0
    if ssm.d is not None:
        ym_all = ym_all - prep.observed.to(y.dtype) * stacked(ssm, "d", T)
    m = ssm.m0.expand(*prep.batch, n)
    P = ssm.P0
    # per-step views, unbound once (indexing inside the loop would make backward O(T^2))
    Fs, Qs = per_step(ssm, "F", T), per_step(ssm, "Q", T)
    Hms, Rms, yms = Hm_all.unbind(-3), Rm_all.unbind(-3), ym_all.unbind(-2)
    offs = prep.offset.unbind(-2) if prep.offset is not None else None
    m_pred, P_pred, m_filt, P_filt, chols, infos = [], [], [], [], [], []
    for t in range(T):
        if t > 0:
            F, Q = Fs[t], Qs[t]
            m = (F @ m.unsqueeze(-1)).squeeze(-1)
            if offs is not None:
                m = m + offs[t]
            P = symmetrize(F @ P @ F.mT + Q)
        m_pred.append(m)
        P_pred.append(P)
        Hm, Rm = Hms[t], Rms[t]
        K, chol, info = update_gain(P, Hm, Rm)
        v = yms[t] - (Hm @ m.unsqueeze(-1)).squeeze(-1)  # 0 where missing
        m = m + (K @ v.unsqueeze(-1)).squeeze(-1)
        P = joseph_update(P, K, Hm, Rm)
        m_filt.append(m)
        P_filt.append(P)
        chols.append(chol)
        infos.append(info)
    _check_cholesky(torch.stack(torch.broadcast_tensors(*infos), -1), "the innovation covariance")
    P_pred_t = torch.stack(torch.broadcast_tensors(*P_pred), dim=-3)
    P_filt_t = torch.stack(torch.broadcast_tensors(*P_filt), dim=-3)
    chol_t = torch.stack(torch.broadcast_tensors(*chols), dim=-3)
    return finish(ssm, prep, torch.stack(m_filt, dim=-2), P_pred_t, P_filt_t, chol_t)


# --------------------------------------------------------------------------------------------
# the fast sequential filter: covariance recursion, then means by a scan


class CovariancePass(NamedTuple):
    """Output of the data-independent covariance recursion (batch: the model's and the mask's)."""

    predicted_cov: Tensor  # (..., T, n, n)
    filtered_cov: Tensor  # (..., T, n, n)
    gain: Tensor  # (..., T, n, p)
    chol_S: Tensor  # (..., T, p, p)  # noqa: N815
    obs_cov: Tensor | None  # (..., T, p, p) H P_pred H' + R (unmasked), or None: = chol_S^2
    n_computed: int  # steps actually computed (the others repeat a fixed point)
    steady_from: int | None  # from this step to the end every step is the same (None: not so)


def _steady_tolerance(dtype: torch.dtype) -> float:
    return 64.0 * torch.finfo(dtype).eps


def _flat_steps(x: Tensor, batch: torch.Size, T: int, time_varying: bool) -> list[Tensor]:
    """Per-step (N, a, b) tensors of a matrix field, batch flattened to one axis N.

    Unbinding once (rather than indexing in the loop) keeps the backward pass O(T)."""
    N = math.prod(batch)
    if time_varying:
        x = x.expand(*batch, T, *x.shape[-2:]).reshape(N, T, *x.shape[-2:])
        return list(x.unbind(1))
    return [x.expand(*batch, *x.shape[-2:]).reshape(N, *x.shape[-2:])] * T


@step_loop_threads()
def covariance_pass(
    ssm: LinearGaussianSSM,
    Hm_all: Tensor,
    Rm_all: Tensor,
    T: int,
    observed: Tensor | None,
    steady_state: bool,
    keep: str = "all",
) -> CovariancePass:
    """The Riccati recursion with Joseph updates, over the model's batch (and the mask's).

    Hm_all (..., T, p, n), Rm_all (..., T, p, p): masked observation matrices; observed: the
    mask (..., T, p) or None when nothing is missing. With ``steady_state`` and a
    time-invariant model, a run of steps with an unchanged mask stops being computed once the
    predicted covariance repeats (to 64 ulps relative): every later step of the run applies
    the same map to the same matrix. The batch is flattened so every op is one bmm call.
    keep="last": the state covariances of the last step only (predicted_cov, filtered_cov are
    (..., 1, n, n)); the unmasked predictive observation covariances are kept for every step.
    """
    n, p = state_dim(ssm), Hm_all.shape[-2]
    Fb, Qb = batch_shape_of(ssm, "F"), batch_shape_of(ssm, "Q")
    batch = torch.broadcast_shapes(Fb, Qb, ssm.P0.shape[:-2], Hm_all.shape[:-3],
                                   Rm_all.shape[:-3])
    N = math.prod(batch)
    dtype, device = Hm_all.dtype, Hm_all.device
    invariant = not any(is_time_varying(ssm, name) for name in ("F", "Q", "H", "R"))
    tv_obs = observed is not None or is_time_varying(ssm, "H") or is_time_varying(ssm, "R")
    Fs = _flat_steps(ssm.F, batch, T, is_time_varying(ssm, "F"))
    Qs = _flat_steps(ssm.Q, batch, T, is_time_varying(ssm, "Q"))
    Hms = _flat_steps(Hm_all if tv_obs else Hm_all[..., 0, :, :], batch, T, tv_obs)
    HmTs = _flat_steps(Hm_all.mT if tv_obs else Hm_all[..., 0, :, :].mT, batch, T, tv_obs)
    Rms = _flat_steps(Rm_all if tv_obs else Rm_all[..., 0, :, :], batch, T, tv_obs)
    eye = torch.eye(n, dtype=dtype, device=device).expand(N, n, n)

    # runs of steps over which every series keeps its mask (skipping is only valid inside one)
    if steady_state and invariant:
        if observed is None:
            run_end = [T] * T
        else:
            flat_obs = observed.expand(*batch, T, p).reshape(N, T, p)
            change = (flat_obs[:, 1:] != flat_obs[:, :-1]).any(-1).any(0).tolist()
            run_end, end = [T] * T, T
            for t in range(T - 1, -1, -1):
                run_end[t] = end
                if t > 0 and change[t - 1]:
                    end = t
    else:
        run_end = None
    tol = _steady_tolerance(dtype)

    keys = ["K", "S"] + (["P_pred", "P_filt"] if keep == "all" else [])
    if keep != "all" and observed is not None:
        keys.append("O")  # predictive covariance of all channels (S is masked)
        Hs = _flat_steps(ssm.H, batch, T, is_time_varying(ssm, "H"))
        Rs = _flat_steps(ssm.R, batch, T, is_time_varying(ssm, "R"))
    P = ssm.P0.expand(*batch, n, n).reshape(N, n, n)
    last_pred = last_filt = P
    # results as pieces (N, k, a, b): runs of computed steps, and repeats of a fixed point
    pieces: dict[str, list[Tensor]] = {key: [] for key in keys}
    run: dict[str, list[Tensor]] = {key: [] for key in keys}
    prev_pred = None

    def flush() -> None:
        for key, xs in run.items():
            if xs:
                pieces[key].append(torch.stack(xs, dim=1))
                run[key] = []

    computed = 0
    steady_from = None
    t = 0
    while t < T:
        if t > 0:
            P = torch.baddbmm(Qs[t], torch.bmm(Fs[t], P), Fs[t].mT)
            P = 0.5 * (P + P.mT)
        # the update is the previous step's when P_pred and the mask repeat: skip to run end
        if (run_end is not None and t >= 2 and run_end[t] - t > 2
                and run_end[t - 1] == run_end[t] and len(run["K"]) >= 2
                and computed % 2 == 0):
            prev = prev_pred
            scale = prev.abs().amax((-2, -1), keepdim=True)
            if bool(((P - prev).abs() <= tol * scale).all()):
                k = run_end[t] - t  # steps t .. run_end-1 repeat step t-1
                last = {key: xs[-1] for key, xs in run.items()}
                flush()
                for key, x in last.items():
                    pieces[key].append(x.unsqueeze(1).expand(N, k, *x.shape[1:]))
                if run_end[t] == T:
                    steady_from = t - 1
                t += k
                P = last_filt
                last_pred = prev
                continue
        if "P_pred" in run:
            run["P_pred"].append(P)
        if "O" in run:
            run["O"].append(torch.baddbmm(Rs[t], torch.bmm(Hs[t], P), Hs[t].mT))
        prev_pred = last_pred = P
        Hm, HmT, Rm = Hms[t], HmTs[t], Rms[t]
        PHt = torch.bmm(P, HmT)  # (N, n, p)
        S = torch.baddbmm(Rm, Hm, PHt)  # (N, p, p)
        if p == 1:
            K = PHt / S
            # Joseph form (I - K h')P(I - K h')' + r K K' expanded for a scalar observation:
            # P - K a' - a K' + S K K' with a = P h. The same function of K (valid for any
            # gain, errors in K enter to second order) in O(n^2) instead of O(n^3).
            G = torch.bmm(K, PHt.mT)
            P = torch.baddbmm(P - G - G.mT, K * S, K.mT)
        else:
            S = 0.5 * (S + S.mT)
            chol, _ = torch.linalg.cholesky_ex(S)
            K = torch.cholesky_solve(PHt.mT, chol).mT
            # Joseph form: (I - K H) P (I - K H)' + K R K'
            IKH = torch.baddbmm(eye, K, Hm, alpha=-1.0)
            P = torch.baddbmm(torch.bmm(K, Rm) @ K.mT, torch.bmm(IKH, P), IKH.mT)
        P = 0.5 * (P + P.mT)
        last_filt = P
        if "P_filt" in run:
            run["P_filt"].append(P)
        run["K"].append(K)
        run["S"].append(S)
        computed += 1
        t += 1
    flush()

    def stack(key: str) -> Tensor:
        xs = pieces[key]
        out = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)  # (N, T, a, b)
        return out.reshape(*batch, T, *out.shape[-2:])

    if keep == "all":
        P_pred_all, P_filt_all = stack("P_pred"), stack("P_filt")
    else:
        P_pred_all = last_pred.reshape(*batch, 1, n, n)
        P_filt_all = last_filt.reshape(*batch, 1, n, n)
    S_all = stack("S")
    if p == 1:
        _check_cholesky((~(S_all[..., 0, 0] > 0)).to(torch.int32), "the innovation variance")
        chol_all = S_all.sqrt()
    else:
        chol_all, info = torch.linalg.cholesky_ex(S_all)
        _check_cholesky(info, "the innovation covariance")
    obs_cov = stack("O") if "O" in pieces else None
    return CovariancePass(P_pred_all, P_filt_all, stack("K"), chol_all, obs_cov, computed,
                          steady_from)


@step_loop_threads()
def _filter_two_pass(
    ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None, *, steady_state: bool,
    covariances: str = "all",
) -> FilterResult:
    fast = _filter_compiled(ssm, y, u, steady_state, covariances)
    if fast is not None:
        return fast
    prep = prepare(ssm, y, u)
    T, n = prep.T, state_dim(ssm)
    observed = prep.observed if prep.any_missing else None
    Hm_all, Rm_all = masked_observation(ssm, observed, T)
    cov = covariance_pass(ssm, Hm_all, Rm_all, T, observed, steady_state, covariances)

    ym = prep.y0
    if ssm.d is not None:
        ym = ym - prep.observed.to(y.dtype) * stacked(ssm, "d", T)
    if math.prod(prep.batch) * n >= LOOP_MIN_WIDTH or T <= LOOP_MAX_STEPS:
        m_filt = _mean_loop(ssm, prep, cov.gain, Hm_all, ym)
    else:
        m_filt = _mean_scan(ssm, prep, cov, Hm_all, ym)
    if covariances == "all":
        return finish(ssm, prep, m_filt, cov.predicted_cov, cov.filtered_cov, cov.chol_S)
    obs_cov = cov.obs_cov if cov.obs_cov is not None else cov.chol_S @ cov.chol_S.mT
    return finish(ssm, prep, m_filt, cov.predicted_cov, cov.filtered_cov, cov.chol_S, obs_cov)


def kalman_loglik(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None, *,
                  method: Method = "sequential", steady_state: bool = True) -> Tensor:
    """The log-likelihood (...) of y (..., T, p) alone: ``kalman_filter(...).loglik``, without
    the per-step outputs where that saves work (the compiled CPU path writes nothing but the
    log-likelihood of each series)."""
    if method in ("sequential", "auto"):
        fast = _filter_compiled(ssm, y, u, steady_state, "last", outputs=False)
        if fast is not None:
            return fast
    return kalman_filter(ssm, y, u, method=method, steady_state=steady_state,
                         covariances="last").loglik


def _filter_compiled(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None, steady_state: bool,
                     covariances: str, outputs: bool = True) -> FilterResult | Tensor | None:
    """The sequential filter by the compiled CPU kernel (:mod:`tsssm.kalman.cpu_kernel`) when
    it applies (CPU, no gradient needed, p = 1, nothing missing, time-invariant, no controls
    or intercepts); None otherwise. ``outputs=False``: the log-likelihood (...) only."""
    from tsssm.kalman import cpu_kernel

    fields = [getattr(ssm, name) for name in ("F", "H", "Q", "R", "m0", "P0")]
    if (u is not None or not is_time_invariant_plain(ssm) or not isinstance(y, Tensor)
            or y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64)
            or obs_dim(ssm) != 1 or y.ndim < 2 or y.shape[-2] == 0
            or state_dim(ssm) > cpu_kernel.MAX_STATES
            or any(x.device.type != "cpu" for x in fields)
            or (torch.is_grad_enabled() and any(x.requires_grad for x in [y, *fields]))):
        return None
    if cpu_kernel.library(y.dtype) is None:
        return None
    batch = validate(ssm, y, None, scan_values=False)  # the kernel checks the values
    T, n = y.shape[-2], state_dim(ssm)
    mb = torch.broadcast_shapes(batch_shape_of(ssm, "F"), batch_shape_of(ssm, "Q"),
                                batch_shape_of(ssm, "P0"), batch_shape_of(ssm, "H"),
                                batch_shape_of(ssm, "R"))
    nm = math.prod(mb)

    def per_model(x: Tensor, core: tuple[int, ...]) -> Tensor:
        return x.expand(*mb, *core).reshape(nm, *core).contiguous()

    F, Q, P0 = (per_model(x, (n, n)) for x in (ssm.F, ssm.Q, ssm.P0))
    H = per_model(ssm.H, (1, n)).reshape(nm, n)
    R = per_model(ssm.R, (1, 1)).reshape(nm)
    out = cpu_kernel.riccati(F, H, Q, R, P0, T, _steady_tolerance(y.dtype), steady_state)
    if isinstance(out, int):
        raise NumericalError(
            f"the innovation variance is not positive definite at step {out} (of a model of "
            f"the batch); check that R is positive definite and the model's parameters and "
            f"the data are finite"
        )
    cov = out
    ns = math.prod(batch)
    pad = (1,) * (len(batch) - len(mb))
    midx = torch.arange(nm).reshape((*pad, *mb)).expand(batch).reshape(ns).contiguous()
    ys = y.expand(*batch, T, 1).reshape(ns, T).contiguous()
    m0 = ssm.m0.expand(*batch, n).reshape(ns, n).contiguous()
    out = cpu_kernel.means(F, H, cov, m0, ys, midx, outputs)
    if isinstance(out, int):  # a value that is not finite
        if math.isnan(float(ys.view(-1)[out])):
            return None  # missing values: the torch path handles them
        raise DataError(INF_MESSAGE)
    mpred, mfilt, yhat, v, ll, nis, loglik = out
    loglik = loglik.reshape(batch)
    _check_loglik(loglik)
    if not outputs:
        return loglik
    full = (*batch, T)
    if covariances == "last":
        Ppred = cov.last(cov.predicted_cov).reshape(*mb, 1, n, n)
        Pfilt = cov.last(cov.filtered_cov).reshape(*mb, 1, n, n)
    else:
        Ppred = cov.full(cov.predicted_cov, T).reshape(*mb, T, n, n)
        Pfilt = cov.full(cov.filtered_cov, T).reshape(*mb, T, n, n)
    S = cov.full(cov.innovation_var, T)
    Tc = Ppred.shape[-3]
    return FilterResult(
        predicted_mean=mpred.reshape(*full, n),
        predicted_cov=Ppred.expand(*batch, Tc, n, n),
        filtered_mean=mfilt.reshape(*full, n),
        filtered_cov=Pfilt.expand(*batch, Tc, n, n),
        predicted_obs_mean=yhat.reshape(*full, 1),
        predicted_obs_cov=S.reshape(*mb, T, 1, 1).expand(*full, 1, 1),
        innovation=v.reshape(*full, 1),
        log_liks=ll.reshape(full),
        loglik=loglik,
        nis=nis.reshape(full),
        observed=torch.ones((), dtype=torch.bool).expand(*full, 1),
    )


#: The means are computed step by step (a few batched products per step, all series at once)
#: when the series axis is wide enough to amortise the per-step overhead, or the sequence is
#: short; otherwise by a prefix scan / chunked products over all steps at once.
LOOP_MIN_WIDTH = 256
LOOP_MAX_STEPS = 64


@step_loop_threads()
def _mean_loop(ssm: LinearGaussianSSM, prep: _Prepared, K: Tensor, Hm_all: Tensor, ym: Tensor
               ) -> Tensor:
    """Filtered means step by step: m_pred = F m + off, m = m_pred + K (ym - Hm m_pred).

    Series that share the step's matrices (the batch axes on which K, H, F and the offsets are
    broadcast) ride along as the columns of one matrix product, so one model for many series
    costs one small GEMM per step.  K (kb.., T, n, p), Hm_all (hb.., T, p, n), ym (..., T, p).
    """
    T, n = prep.T, state_dim(ssm)
    batch, nd = prep.batch, len(prep.batch)

    def pad(shape: torch.Size) -> tuple[int, ...]:
        return (1,) * (nd - len(shape)) + tuple(shape)

    shared = [pad(K.shape[:-3]), pad(Hm_all.shape[:-3]), pad(batch_shape_of(ssm, "F"))]
    if prep.offset is not None:
        shared.append(pad(prep.offset.shape[:-2]))
    col = [i for i in range(nd) if batch[i] > 1 and all(sh[i] == 1 for sh in shared)]
    row = [i for i in range(nd) if i not in col]
    Nr = math.prod(batch[i] for i in row)
    Nc = math.prod(batch[i] for i in col)
    row_only = [batch[i] if i in row else 1 for i in range(nd)]

    def data_steps(x: Tensor) -> tuple[Tensor, ...]:  # (*batch, T, k) -> T x (Nr, k, Nc)
        x = x.expand(*batch, T, x.shape[-1]).permute(*row, nd, nd + 1, *col)
        return x.reshape(Nr, T, -1, Nc).movedim(1, 0).contiguous().unbind(0)

    def matrix_steps(x: Tensor) -> tuple[Tensor, ...]:  # (*xb, T, a, b) -> T x (Nr, a, b)
        x = x.reshape(*pad(x.shape[:-3]), *x.shape[-3:]).expand(*row_only, *x.shape[-3:])
        x = x.permute(*row, *col, nd, nd + 1, nd + 2).reshape(Nr, T, *x.shape[-2:])
        return x.unbind(1)

    Ks, Hms, yms = matrix_steps(K), matrix_steps(Hm_all), data_steps(ym)
    if is_time_varying(ssm, "F"):
        Fs = matrix_steps(ssm.F)
    else:
        F = ssm.F.reshape(*pad(ssm.F.shape[:-2]), n, n).expand(*row_only, n, n)
        Fs = [F.permute(*row, *col, nd, nd + 1).reshape(Nr, n, n)] * T
    offs = None
    if prep.offset is not None:
        off = prep.offset.reshape(*pad(prep.offset.shape[:-2]), T, n).expand(*row_only, T, n)
        offs = off.permute(*row, *col, nd, nd + 1).reshape(Nr, T, n, 1).unbind(1)
    m = ssm.m0.expand(*batch, n).permute(*row, nd, *col).reshape(Nr, n, Nc)
    out = []
    for t in range(T):
        if t > 0:
            m = torch.bmm(Fs[t], m)
            if offs is not None:
                m = m + offs[t]
        v = torch.baddbmm(yms[t], Hms[t], m, alpha=-1.0)  # innovation (0 where missing)
        m = torch.baddbmm(m, Ks[t], v)
        out.append(m)
    x = torch.stack(out, dim=1)  # (Nr, T, n, Nc)
    x = x.reshape(*[batch[i] for i in row], T, n, *[batch[i] for i in col])
    order = [row.index(i) if i in row else len(row) + 2 + col.index(i) for i in range(nd)]
    return x.permute(*order, len(row), len(row) + 1)


def _mean_scan(ssm: LinearGaussianSSM, prep: _Prepared, cov: CovariancePass, Hm_all: Tensor,
               ym: Tensor) -> Tensor:
    """Filtered means as one linear recurrence solved over all steps at once:

    m_t = (I - K_t Hm_t)(F_t m_{t-1} + off_t) + K_t ym_t (t >= 1),
    m_0 = (I - K_0 Hm_0) m0 + K_0 ym_0.
    """
    T, n = prep.T, state_dim(ssm)
    eye = torch.eye(n, dtype=ym.dtype, device=ym.device)
    K = cov.gain  # (cov batch, T, n, p): shared by the series of one model
    IKH = eye - K @ Hm_all  # (cov batch, T, n, n)
    # elementwise (broadcasting K over the series), not one tiny matrix product per series
    b = K[..., 0] * ym if K.shape[-1] == 1 else (K * ym.unsqueeze(-2)).sum(-1)  # (..., T, n)
    if prep.offset is not None:
        off = torch.cat([torch.zeros_like(prep.offset[..., :1, :]), prep.offset[..., 1:, :]], -2)
        b = b + (IKH * off.unsqueeze(-2)).sum(-1)
    b = b.expand(*prep.batch, T, n)
    m0_filt = (IKH[..., 0, :, :] @ ssm.m0.unsqueeze(-1)).squeeze(-1) + b[..., 0, :]
    F = stacked(ssm, "F", T)
    A = IKH[..., 1:, :, :] @ F[..., 1:, :, :]  # (cov batch, T-1, n, n): A[j] leads into step j+1
    return _mean_recurrence(A, b[..., 1:, :], m0_filt, cov.steady_from)


def _mean_recurrence(A: Tensor, b: Tensor, m_first: Tensor, steady_from: int | None = None
                     ) -> Tensor:
    """[m_first, m_1, ..., m_{T-1}] with m_t = A_{t-1} m_{t-1} + b_{t-1} (A, b indexed from
    step 1).  A (..., T-1, n, n), b (..., T-1, n), m_first (..., n).

    steady_from: A is the same matrix for all steps from this one on (chunked solve there).
    """
    T, n = b.shape[-2] + 1, b.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-3], b.shape[:-2], m_first.shape[:-1])
    first = m_first.expand(*batch, n)
    if T == 1:
        return first.unsqueeze(-2)
    s = steady_from
    if s is not None and s >= 1 and T - s > LOOP_MAX_STEPS:
        head = _mean_recurrence(A[..., :s, :, :], b[..., :s, :], m_first)  # steps 0..s
        tail = linear_recurrence(A[..., s, :, :], b[..., s:, :], head[..., -1, :],
                                 constant_A=True)
        return torch.cat([head.expand(*batch, s + 1, n), tail], dim=-2)
    rest = linear_recurrence(A, b, m_first)
    return torch.cat([first.unsqueeze(-2), rest], dim=-2)


@step_loop_threads()
def filtered_last(ssm: LinearGaussianSSM, y: Tensor, *, steady_state: bool = True
                  ) -> tuple[Tensor, Tensor]:
    """The filtered state after the last step of y (..., T, p): (mean (..., n), cov (..., n, n)),
    what ``kalman_filter(ssm, y)`` gives as ``filtered_mean[..., -1, :]`` and
    ``filtered_cov[..., -1, :, :]`` (to rounding), e.g. to forecast from many short contexts.

    With nothing missing in y and a time-invariant model without controls or intercepts the
    gains do not depend on the data, so the filter is linear in y:
    ``m_{T-1} = Phi m0 + sum_t W_t y_t`` with ``W_t = A_{T-1} ... A_{t+1} K_t``,
    ``A_t = (I - K_t H) F``. Phi and W are built once per model (a backward product over the T
    steps of the covariance pass, on the model's batch only) and applied to all series in one
    matrix product. Otherwise this is ``kalman_filter(..., covariances="last")``.
    """
    batch = validate(ssm, y, None)
    linear = (is_time_invariant_plain(ssm) and y.shape[-2] > 0
              and not bool(torch.isnan(y).any()))
    if not linear:
        res = kalman_filter(ssm, y, method="sequential", steady_state=steady_state,
                            covariances="last")
        return res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :]
    T, n, p = y.shape[-2], state_dim(ssm), obs_dim(ssm)
    Hm_all, Rm_all = masked_observation(ssm, None, T)
    cov = covariance_pass(ssm, Hm_all, Rm_all, T, None, steady_state, keep="last")
    K = cov.gain  # (mb.., T, n, p)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    IKH = eye - K @ ssm.H.unsqueeze(-3)  # (mb.., T, n, n)
    A = IKH @ ssm.F.unsqueeze(-3)
    Ks, As, IKHs = K.unbind(-3), A.unbind(-3), IKH.unbind(-3)
    M = eye.expand(*IKH.shape[:-3], n, n)
    W = [None] * T
    for t in range(T - 1, -1, -1):
        W[t] = M @ Ks[t]
        M = M @ (As[t] if t > 0 else IKHs[0])
    Wt = torch.stack(W, dim=-3)  # (mb.., T, n, p)
    Wflat = Wt.movedim(-3, -2).reshape(*Wt.shape[:-3], n, T * p)  # (mb.., n, T p)
    mean = rows_times(y.reshape(*y.shape[:-2], 1, T * p), Wflat)[..., 0, :]
    mean = mean + (M @ ssm.m0.unsqueeze(-1)).squeeze(-1)
    P = cov.filtered_cov[..., -1, :, :]
    return mean.expand(*batch, n), P.expand(*batch, n, n)


def is_time_invariant_plain(ssm: LinearGaussianSSM) -> bool:
    """No time-varying field, no controls, no intercepts: x_t = F x_{t-1} + w, y = H x + v."""
    return not ssm.time_varying and ssm.B is None and ssm.c is None and ssm.d is None
