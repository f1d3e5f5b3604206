"""Per-timestep anomaly scores and the Gaussian loss, from one-step predictive distributions.

Every forecaster returns, for each time step, an independent Gaussian ``N(mean, var)`` over the
``C`` channels of the next observation (tsssm.models.base.Gaussian). Training minimises its
negative log density (``gaussian_nll``); anomaly scoring measures how surprising each observation
is under it (``anomaly_scores``). Both use the same per-entry terms (``_entry_terms``), so the loss
a model is trained on and the score it is judged by cannot drift apart.

Missing observations are ``NaN`` in ``y`` and are skipped: they contribute nothing to the loss or
the score, and neither their value nor their gradient is ever NaN (the NaN is replaced *before*
any arithmetic, because ``torch.where`` after the fact would still send NaN gradients back).

Convention for time steps where *no* channel is observed: the score is ``fill`` (0.0 by default).
With ``kind="nis"`` 0 is the smallest possible score, so such a step is never flagged. Use
``observed_steps(y)`` to exclude those steps explicitly, e.g. when fitting a threshold or
computing metrics (with ``kind="nll"`` the score can be negative, so 0 is not neutral there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsssm.errors import ConfigError, ModelError, NumericalError
from tsssm.models.base import Gaussian

SCORE_KINDS = ("nis", "nll")
REDUCTIONS = ("mean", "sum", "none")

#: Variances are floored here before dividing: a model may report var == 0 through underflow.
MIN_VAR = 1e-12

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def observed_mask(y: Tensor) -> Tensor:
    """Boolean mask of observed entries: ``~isnan(y)``, same shape as ``y``."""
    return ~torch.isnan(y)


def observed_steps(y: Tensor) -> Tensor:
    """(B, T) boolean: True where at least one channel of ``y`` (B, T, C) is observed."""
    return observed_mask(y).any(dim=-1)


def _check_shapes(y: Tensor, pred: Gaussian) -> None:
    if y.dim() != 3:
        raise ModelError(
            f"observations must be (batch, time, channels); got shape {tuple(y.shape)}"
        )
    if tuple(pred.mean.shape) != tuple(y.shape) or tuple(pred.var.shape) != tuple(y.shape):
        raise ModelError(
            f"predictive distribution of shape mean {tuple(pred.mean.shape)}, var "
            f"{tuple(pred.var.shape)} does not match the observations {tuple(y.shape)}; "
            "the model must be used on data with the channels it was trained on"
        )


def _entry_terms(y: Tensor, pred: Gaussian) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry squared standardised error and log-variance, with missing entries zeroed.

    Returns (z2 (B,T,C), log_var (B,T,C), observed (B,T,C) bool). ``z2 = (y-mean)^2/var``.
    Half-precision inputs are computed in float32: a squared error over a tiny var overflows fp16.
    """
    observed = observed_mask(y)
    dtype = torch.promote_types(pred.mean.dtype, torch.float32)
    mean = pred.mean.to(dtype)
    var = pred.var.to(dtype).clamp_min(MIN_VAR)
    # Replace NaN targets by the mean so the difference (and its gradient) is exactly 0 there.
    y_filled = torch.where(observed, y.to(dtype), mean.detach())
    z2 = (y_filled - mean).square() / var
    zero = torch.zeros((), dtype=dtype, device=y.device)
    z2 = torch.where(observed, z2, zero)
    log_var = torch.where(observed, var.log(), zero)
    return z2, log_var, observed


def gaussian_nll(y: Tensor, pred: Gaussian, reduction: str = "mean") -> Tensor:
    """Gaussian negative log predictive density of the observed entries of ``y``.

    y: (B, T, C), NaN = missing. pred: Gaussian with mean/var (B, T, C).
    reduction: "mean" (scalar, averaged over observed entries; 0.0 if none is observed),
    "sum" (scalar) or "none" ((B, T, C), 0.0 at missing entries).
    The constant 0.5*log(2*pi) is included, so values are true log densities.

    This is the training loss; it does not check for non-finite model outputs (that would force a
    device sync every step); ``anomaly_scores`` does.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"gaussian_nll reduction must be one of {REDUCTIONS}; got {reduction!r}")
    _check_shapes(y, pred)
    z2, log_var, observed = _entry_terms(y, pred)
    nll = torch.where(observed, 0.5 * (z2 + log_var) + _HALF_LOG_2PI, torch.zeros_like(z2))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    count = observed.sum().clamp_min(1)
    return nll.sum() / count


def anomaly_scores(y: Tensor, pred: Gaussian, kind: str = "nis", fill: float = 0.0) -> Tensor:
    """Per-timestep anomaly score (B, T) from the one-step predictive distribution.

    y: (B, T, C) observations, NaN = missing. pred: one-step Gaussian (B, T, C) for ``y``.
    kind:
      - "nis": normalised innovation squared averaged over the observed channels,
        ``sum_c (y-mean)^2/var / n_observed``. For a calibrated model its mean is 1
        (a chi-square with n_observed degrees of freedom divided by n_observed).
      - "nll": Gaussian negative log predictive density averaged over the observed channels.
    Steps with no observed channel get ``fill`` (see the module docstring).
    Raises NumericalError if the model produced a non-finite score (NaN never leaves here).
    """
    if kind not in SCORE_KINDS:
        raise ConfigError(f"anomaly score kind must be one of {SCORE_KINDS}; got {kind!r}")
    _check_shapes(y, pred)
    with torch.no_grad():
        z2, log_var, observed = _entry_terms(y, pred)
        per_entry = z2 if kind == "nis" else 0.5 * (z2 + log_var) + _HALF_LOG_2PI
        per_entry = torch.where(observed, per_entry, torch.zeros_like(per_entry))
        n_obs = observed.sum(dim=-1)  # (B, T)
        score = per_entry.sum(dim=-1) / n_obs.clamp_min(1)
        score = torch.where(n_obs > 0, score, torch.full_like(score, fill))
        if not bool(torch.isfinite(score).all()):
            bad = int((~torch.isfinite(score)).sum())
            raise NumericalError(
                f"{bad} anomaly scores are not finite: the model's predictive mean or variance, or "
                "the data, is NaN/inf at those steps (check the input for inf values, the "
                "input scaling, and the model's parameters)"
            )
    return score


def score_contributions(y: Tensor, pred: Gaussian, kind: str = "nis") -> Tensor:
    """Each channel's additive share of :func:`anomaly_scores` (B, T, C).

    The score of a step is a mean over its observed channels of per-entry terms, so channel
    ``c``'s share is its term divided by the number of observed channels: the shares of a step
    sum to its score (up to float rounding), a missing channel's share is 0, and a step with no
    observed channel has all shares 0 (its score is the ``fill`` 0.0).
    """
    if kind not in SCORE_KINDS:
        raise ConfigError(f"anomaly score kind must be one of {SCORE_KINDS}; got {kind!r}")
    _check_shapes(y, pred)
    with torch.no_grad():
        z2, log_var, observed = _entry_terms(y, pred)
        per_entry = z2 if kind == "nis" else 0.5 * (z2 + log_var) + _HALF_LOG_2PI
        per_entry = torch.where(observed, per_entry, torch.zeros_like(per_entry))
        n_obs = observed.sum(dim=-1, keepdim=True).clamp_min(1)  # (B, T, 1)
        return per_entry / n_obs
