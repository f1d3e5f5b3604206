"""Input checks and training statistics shared by the classical baselines."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tsssm.errors import DataError, ModelError

#: Floor on every fitted variance (normalised scale): a constant channel must not give var 0.
MIN_VAR = 1e-8


def as_series(y: Any, what: str, n_channels: int | None = None) -> Tensor:
    """Return ``y`` as a floating (B, T, C) tensor, or raise DataError naming what is wrong."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"{what} must be a numeric array of shape (B, T, C): {err}") from None
    if y.dim() != 3:
        raise DataError(f"{what} must have shape (batch, time, channels); got {tuple(y.shape)}")
    if not y.is_floating_point():
        y = y.to(torch.float64)
    if n_channels is not None and y.shape[-1] != n_channels:
        raise DataError(
            f"{what} has {y.shape[-1]} channels but the model was fitted on {n_channels}"
        )
    if bool(torch.isinf(y).any()):
        raise DataError(f"{what} contains infinite values; use NaN for missing observations")
    return y


def require_fitted(model: Any) -> None:
    if not getattr(model, "fitted", False):
        raise ModelError(f"{type(model).__name__} is not fitted: call fit(y_train) first")


def channel_moments(y: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance (float64, (C,)) over the observed entries of ``y``."""
    y64 = y.detach().to(torch.float64).cpu()
    observed = ~torch.isnan(y64)
    count = observed.sum(dim=(0, 1))  # (C,)
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"{what}: channels {empty} have no observed value")
    filled = torch.where(observed, y64, torch.zeros_like(y64))
    mean = filled.sum(dim=(0, 1)) / count
    centred = torch.where(observed, y64 - mean, torch.zeros_like(y64))
    var = centred.square().sum(dim=(0, 1)) / count
    return mean, var.clamp_min(MIN_VAR)
