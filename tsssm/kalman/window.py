"""The Kalman filter of many short windows of a time-invariant model, in a few batched ops.

For a time-invariant model without controls or intercepts (``x_t = F x_{t-1} + w_t``,
``y_t = h' x_t + v_t``, one observed channel) and windows without missing values, the
covariances, gains and innovation variances do not depend on the data. The sequential filter
still walks the T steps one at a time (a dozen small ops per step, forward and backward); a
GPU running it is bound by the launches, not the arithmetic. Here both halves of the filter
are O(1) or O(log T) batched ops:

1. Covariances (:func:`tsssm.kalman.parallel.invariant_filtered_covariances`): the filtering
   covariance of step t is the prefix combination ``e_0 * e^t`` of the associative elements of
   Särkkä & García-Fernández (2021), the element ``e`` of every step t >= 1 being the same;
   its powers come from ceil(log2 T) doublings. On the model's batch only (one model per
   channel, shared by every window). Predicted covariances, gains and innovation variances
   follow for all steps at once.
2. Means, in innovations form: with ``a_t`` the predicted state and ``v_t`` the innovation,
   ``a_t = F^t m0 + sum_{s<t} F^(t-s) K_s v_s``, so
   ``y_t - h' F^t m0 = v_t + sum_{s<t} W[t, s] v_s`` with ``W[t, s] = h' F^(t-s) K_s``: the
   innovations of all windows solve one unit lower triangular (T x T) system per model (a
   single triangular solve, the windows as its right-hand sides), and the filtered means are
   ``m_t = F^t m0 + sum_{s<=t} F^(t-s) K_s v_s`` (one matrix product).

Everything else (predicted means, the log-likelihood, NIS) comes from the filtered means and
covariances as in every other method (:func:`tsssm.kalman.filter.finish`), so the results are
those of the sequential filter to rounding, gradients included (plain torch ops throughout).

Cost: O(T^2 n) memory per model and O(T^2) work per window: meant for windows of tens to
hundreds of steps, not for long streams. :func:`window_applies` says when it is used;
``kalman_filter(..., method="window")`` gives everything else (long sequences, missing values,
time-varying models, controls, intercepts, several observed channels) to the sequential filter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tsssm.kalman.filter import (
    LOG_2PI,
    FilterResult,
    _check_cholesky,
    _check_loglik,
    finish,
    is_time_invariant_plain,
    prepare,
)
from tsssm.kalman.forecast import transition_powers
from tsssm.kalman.parallel import invariant_filtered_covariances
from tsssm.kalman.ssm import LinearGaussianSSM, obs_dim, state_dim, symmetrize, validate

#: Longer sequences go to the sequential filter (memory grows as T^2 per model).
WINDOW_MAX_STEPS = 512


def window_applies(ssm: LinearGaussianSSM, y: Tensor, u: Tensor | None = None) -> bool:
    """Whether :func:`window_filter` computes ``kalman_filter(ssm, y, u)``: a time-invariant
    model without controls or intercepts, one observed channel, 1 <= T <= WINDOW_MAX_STEPS and
    every value of y finite (with missing values the gains depend on each window's mask; an
    infinite value is the sequential filter's error to report)."""
    return (u is None and isinstance(y, Tensor) and y.ndim >= 2
            and is_time_invariant_plain(ssm) and obs_dim(ssm) == 1
            and 1 <= y.shape[-2] <= WINDOW_MAX_STEPS and bool(torch.isfinite(y).all()))


def _fold(batch: torch.Size, model_batch: torch.Size) -> tuple[list[int], list[int]]:
    """Axes of the broadcast ``batch`` kept as batch axes of the per-model products, and the
    axes along which only the data varies (the model is shared): those are folded into the
    columns of one product per model."""
    nd = len(batch)
    mb = (1,) * (nd - len(model_batch)) + tuple(model_batch)
    free = [i for i in range(nd) if mb[i] == 1 and batch[i] > 1]
    return [i for i in range(nd) if i not in free], free


def _to_columns(x: Tensor, batch: torch.Size, keep: list[int], free: list[int]) -> Tensor:
    """(*batch, T) -> (*batch[keep], T, N): the series of the free axes as N columns."""
    nd = len(batch)
    x = x.expand(*batch, x.shape[-1]).permute(*keep, nd, *free)
    return x.reshape(*[batch[i] for i in keep], x.shape[len(keep)], -1)


def _from_columns(x: Tensor, batch: torch.Size, keep: list[int], free: list[int],
                  core: tuple[int, ...]) -> Tensor:
    """(*batch[keep], prod(core), N) -> (*batch, *core): the inverse of :func:`_to_columns`."""
    nd, nk = len(batch), len(keep)
    x = x.reshape(*[batch[i] for i in keep], *core, *[batch[i] for i in free])
    order = [0] * nd
    for j, i in enumerate(keep):
        order[i] = j
    for j, i in enumerate(free):
        order[i] = nk + len(core) + j
    return x.permute(*order, *range(nk, nk + len(core)))


def _model_rows(M: Tensor, model_batch: torch.Size, keep: list[int], nd: int,
                core: int) -> Tensor:
    """A per-model tensor (*model_batch, *core axes) with its batch aligned to the kept axes."""
    mb = (1,) * (nd - len(model_batch)) + tuple(model_batch)
    core_shape = M.shape[M.ndim - core:]
    M = M.expand(*model_batch, *core_shape)
    return M.reshape(*[mb[i] for i in keep], *core_shape)


class WindowGains(NamedTuple):
    """The data-free half of the filter of T steps (model batch ``mb``; ``fb``: F's)."""

    predicted_cov: Tensor  # (mb.., T, n, n)
    filtered_cov: Tensor  # (mb.., T, n, n)
    obs_var: Tensor  # (mb.., T)              S_t = h' P_t|t-1 h + r
    gain: Tensor  # (mb.., T, n)              K_t = P_t|t-1 h / S_t
    powers: Tensor  # (fb.., T, n, n)         F^0 .. F^(T-1)
    coupling: Tensor  # (mb.., T, T)          W[t, s] = h' F^(t-s) K_s for s < t (else 0)


class WindowResult(NamedTuple):
    """What a forecaster needs from the filter of its windows (batch ``...``)."""

    predicted_obs_mean: Tensor  # (..., T)    E[y_t | y_0..y_t-1]
    predicted_obs_var: Tensor  # (mb.., T)    its variance (shared by the model's windows)
    innovation: Tensor  # (..., T)
    filtered_mean: Tensor  # (..., n)         after the last step
    filtered_cov: Tensor  # (mb.., n, n)      after the last step
    loglik: Tensor  # (...)


def _model_batch(ssm: LinearGaussianSSM) -> torch.Size:
    return torch.broadcast_shapes(ssm.F.shape[:-2], ssm.H.shape[:-2], ssm.Q.shape[:-2],
                                  ssm.R.shape[:-2], ssm.P0.shape[:-2])


def window_gains(ssm: LinearGaussianSSM, T: int) -> WindowGains:
    """Covariances, gains and the innovations' coupling of T fully observed steps of a
    time-invariant model with one observed channel (see the module docstring)."""
    F, H, R, n = ssm.F, ssm.H, ssm.R, state_dim(ssm)
    mb = _model_batch(ssm)
    P_filt, info = invariant_filtered_covariances(ssm, T)  # (mb.., T, n, n), (mb..)
    P_pred = torch.cat([ssm.P0.expand(*mb, n, n).unsqueeze(-3),
                        symmetrize(F.unsqueeze(-3) @ P_filt[..., :-1, :, :] @ F.mT.unsqueeze(-3)
                                   + ssm.Q.unsqueeze(-3))], dim=-3)
    h = H[..., 0, :].unsqueeze(-2)  # (mb.., 1, n)
    PHt = (P_pred @ h.unsqueeze(-1))[..., 0]  # (mb.., T, n)
    S = (PHt * h).sum(-1) + R[..., 0, 0].unsqueeze(-1)  # (mb.., T)
    # one read of the device for every check of the covariance half
    _check_cholesky((info.unsqueeze(-1) != 0) | ~(S > 0), "the innovation variance")
    K = PHt / S.unsqueeze(-1)  # (mb.., T, n)
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    powers = eye.expand(*F.shape[:-2], 1, n, n)
    if T > 1:
        powers = torch.cat([powers, transition_powers(F, T - 1)], dim=-3)  # (fb.., T, n, n)
    hF = (h.unsqueeze(-3) @ powers)[..., 0, :]  # (mb.., T, n): h' F^k
    hFK = hF @ K.mT  # (mb.., T_k, T_s): h' F^k K_s
    idx = torch.arange(T, device=F.device)
    lag = idx[:, None] - idx[None, :]  # (T, T): t - s
    W = hFK[..., lag.clamp(min=0), idx[None, :]] * (lag > 0).to(hFK.dtype)
    return WindowGains(P_pred, P_filt, S, K, powers, W)


def _prior_part(ssm: LinearGaussianSSM, gains: WindowGains) -> tuple[Tensor, Tensor]:
    """F^t m0 (..., T, n) and what it predicts, h' F^t m0 (..., T)."""
    Fm0 = (gains.powers @ ssm.m0.unsqueeze(-2).unsqueeze(-1))[..., 0]
    return Fm0, (Fm0 * ssm.H[..., 0, :].unsqueeze(-2)).sum(-1)


def _innovations(W: Tensor, r: Tensor, batch: torch.Size, model_batch: torch.Size
                 ) -> tuple[Tensor, list[int], list[int]]:
    """v with (I + W) v = r for every window: one unit lower triangular solve per model, the
    windows that share it as columns. W (mb.., T, T), r (*batch, T) -> v (keep.., T, N)."""
    keep, free = _fold(batch, model_batch)
    Wk = _model_rows(W, model_batch, keep, len(batch), 2)
    v = torch.linalg.solve_triangular(Wk, _to_columns(r, batch, keep, free), upper=False,
                                      unitriangular=True)
    return v, keep, free


def window_predictions(ssm: LinearGaussianSSM, y: Tensor) -> WindowResult:
    """The one-step predictions of every step of y (..., T, 1), the filtered state after the
    last step and the log-likelihood, for a model and data for which :func:`window_applies`
    (checked by the caller): what ``kalman_filter(ssm, y, covariances="last")`` gives, without
    the per-step state means (O(T^2) per window, no (..., T, n) tensors)."""
    # window_applies has checked the values (all finite): shapes, dtypes and devices only
    batch, mb = validate(ssm, y, scan_values=False), _model_batch(ssm)
    T = y.shape[-2]
    gains = window_gains(ssm, T)
    Fm0, prior_obs = _prior_part(ssm, gains)
    yv = y[..., 0].expand(*batch, T)
    v, keep, free = _innovations(gains.coupling, yv - prior_obs, batch, mb)
    v_full = _from_columns(v, batch, keep, free, (T,))  # (*batch, T)
    # the last filtered mean: F^(T-1) m0 + sum_s F^(T-1-s) K_s v_s
    M = (gains.powers.flip(-3) @ gains.gain.unsqueeze(-1))[..., 0]  # (mb.., T, n)
    Mk = _model_rows(M.mT, mb, keep, len(batch), 2)  # (keep.., n, T)
    last = _from_columns(Mk @ v, batch, keep, free, (state_dim(ssm),)) + Fm0[..., -1, :]
    S = gains.obs_var
    log_liks = -0.5 * (LOG_2PI + torch.log(S) + v_full.square() / S)
    loglik = log_liks.sum(-1)
    _check_loglik(loglik.detach())
    return WindowResult(yv - v_full, S, v_full, last, gains.filtered_cov[..., -1, :, :],
                        loglik)


def window_filter(ssm: LinearGaussianSSM, y: Tensor, *, covariances: str = "all"
                  ) -> FilterResult:
    """``kalman_filter(ssm, y)`` for a model and data for which :func:`window_applies`
    (checked by the caller), by the covariance doubling and one triangular solve (see the
    module docstring). y (..., T, 1); ``covariances="last"``: the state covariances of the
    last step only, as in :func:`tsssm.kalman.filter.kalman_filter`."""
    prep = prepare(ssm, y)
    T, n, batch, mb = prep.T, state_dim(ssm), prep.batch, _model_batch(ssm)
    gains = window_gains(ssm, T)
    Fm0, prior_obs = _prior_part(ssm, gains)
    v, keep, free = _innovations(gains.coupling, prep.y[..., 0] - prior_obs, batch, mb)
    # filtered means m_t = F^t m0 + sum_{s <= t} F^(t-s) K_s v_s
    idx = torch.arange(T, device=y.device)
    lag = idx[:, None] - idx[None, :]  # (T, T): t - s
    FK = torch.einsum("...kij,...sj->...ksi", gains.powers, gains.gain)  # (mb.., T_k, T_s, n)
    Z = FK[..., lag.clamp(min=0), idx[None, :], :] * (lag >= 0).to(FK.dtype)[..., None]
    Zk = _model_rows(Z.movedim(-1, -2).reshape(*Z.shape[:-3], T * n, T), mb, keep,
                     len(batch), 2)
    m_filt = _from_columns(Zk @ v, batch, keep, free, (T, n)) + Fm0
    S = gains.obs_var
    chol = S.sqrt()[..., None, None]  # (mb.., T, 1, 1)
    P_pred, P_filt = gains.predicted_cov, gains.filtered_cov
    if covariances == "last":
        P_pred, P_filt = P_pred[..., -1:, :, :], P_filt[..., -1:, :, :]
    return finish(ssm, prep, m_filt, P_pred, P_filt, chol, S[..., None, None])
