"""Input checks and training statistics shared by the classical baselines."""

from __future__ import annotations

from collections.abc import Sequence
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


def as_streams(y: Any, what: str) -> list[Tensor]:
    """Training data as a list of (1, T_i, C) float64 tensors, one per stream.

    y: a (B, T, C) tensor/array (B streams of one length) or a sequence of (T_i, C) (or
    (1, T_i, C)) arrays of different lengths: the real rows of each stream, no padding (a
    NaN-padded batch would read as missing data, and a forward-filled one as copies of each
    stream's last row)."""
    if isinstance(y, Sequence) and not isinstance(y, (str, bytes)) and not (
            len(y) and isinstance(y[0], (int, float))):
        out = []
        for i, a in enumerate(y):
            t = a if isinstance(a, Tensor) else torch.as_tensor(a)
            if t.dim() == 2:
                t = t.unsqueeze(0)
            out.append(as_series(t, f"{what} (stream {i})").to(torch.float64).cpu())
        if not out:
            raise DataError(f"{what}: no streams")
        channels = {t.shape[-1] for t in out}
        if len(channels) > 1:
            raise DataError(f"{what}: streams have different numbers of channels {channels}")
        return [t[b : b + 1] for t in out for b in range(t.shape[0])]
    t = as_series(y, what).to(torch.float64).cpu()
    return [t[b : b + 1] for b in range(t.shape[0])]


def concat_streams(streams: list[Tensor]) -> Tensor:
    """All rows of (1, T_i, C) streams as one (1, sum T_i, C) tensor (for moments only)."""
    return torch.cat(streams, dim=1)
