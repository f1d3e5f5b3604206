"""Output heads: map encoder features to predictive distributions.

Variances are ``softplus(raw) * scale² + min_var``: softplus keeps them positive with a gradient
everywhere, and the floor ``min_var`` (in the units of the series, which the pipeline has already
scaled to unit variance) bounds the Gaussian NLL from below, so one confidently wrong step cannot
blow training up. The floor is added *after* any de-normalisation, so an instance normalisation
with a near-constant context cannot shrink it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from tsssm.models.base import Gaussian

#: softplus⁻¹(1): starts the predicted variance at one, the variance of the scaled data.
_RAW_UNIT_VARIANCE = math.log(math.e - 1.0)


def positive_variance(raw: Tensor, min_var: float, scale: Tensor | None = None) -> Tensor:
    """softplus(raw) * scale² + min_var (strictly positive for finite raw)."""
    var = softplus(raw)
    if scale is not None:
        var = var * scale.square()
    return var + min_var


def denormalise(mean: Tensor, loc: Tensor | None, scale: Tensor | None) -> Tensor:
    """Undo an instance normalisation on a predicted mean: mean * scale + loc."""
    if scale is not None:
        mean = mean * scale
    if loc is not None:
        mean = mean + loc
    return mean


class GaussianHead(nn.Module):
    """Linear map to ``n_out`` means and ``n_out`` variances: (..., d_in) -> Gaussian (..., n_out).

    ``loc``/``scale`` (broadcastable to (..., n_out)) de-normalise the output: the head predicts in
    normalised units and the Gaussian comes back in data units.
    """

    def __init__(self, d_in: int, n_out: int, min_var: float = 1e-4) -> None:
        super().__init__()
        if min_var <= 0:
            raise ValueError(f"min_var must be positive, got {min_var}")
        self.n_out = n_out
        self.min_var = min_var
        self.proj = nn.Linear(d_in, 2 * n_out)
        # Start calibrated for unit-variance data: mean 0, variance ~1, not a random guess.
        nn.init.zeros_(self.proj.bias[:n_out])
        nn.init.constant_(self.proj.bias[n_out:], _RAW_UNIT_VARIANCE)

    def forward(
        self, h: Tensor, loc: Tensor | None = None, scale: Tensor | None = None
    ) -> Gaussian:
        mean, raw_var = self.proj(h).split(self.n_out, dim=-1)  # (..., n_out) each
        return Gaussian(
            denormalise(mean, loc, scale), positive_variance(raw_var, self.min_var, scale)
        )


def gaussian_nll(dist: Gaussian, target: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood over the observed (non-NaN) entries of ``target``.

    Returns 0 (with a graph) when nothing is observed, never NaN.
    """
    observed = ~target.isnan()
    safe_target = target.nan_to_num(0.0)
    nll = 0.5 * (
        math.log(2 * math.pi) + dist.var.log() + (safe_target - dist.mean).square() / dist.var
    )
    nll = nll * observed
    return nll.sum() / observed.sum().clamp(min=1)


class HorizonVarianceScale(nn.Module):
    """A fitted factor per lead time on forecast variances: var (B, h, C) -> var * s[:h] + floor.

    ``scale`` (horizon,) is a buffer (saved with the model), 1 until fitted: the variance a model
    learns on its training windows is typically too small on new data (it has fitted them), and
    a factor per lead time, fitted on validation windows after training, brings the predictive
    variance to the size of the errors actually made there (the maximum-likelihood factor of a
    Gaussian scale family is the mean squared standardised error; see
    :func:`tsssm.tasks.calibrate.calibrate_horizon_variance`).
    """

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(horizon))

    def forward(self, var: Tensor, floor: float = 0.0) -> Tensor:
        h = var.shape[1]
        s = self.scale[:h].to(var.dtype)
        return var * s.view(1, h, *([1] * (var.ndim - 2))) + floor

    @torch.no_grad()
    def set(self, scale: Tensor) -> None:
        """Install fitted factors (horizon,) (finite, positive)."""
        scale = torch.as_tensor(scale, dtype=self.scale.dtype, device=self.scale.device)
        if scale.shape != self.scale.shape or not bool(torch.isfinite(scale).all()) or bool(
            (scale <= 0).any()
        ):
            raise ValueError(
                f"variance scale must be {tuple(self.scale.shape)} finite positive values, got "
                f"shape {tuple(scale.shape)}"
            )
        self.scale.copy_(scale)
