"""Per-channel standardisation fitted on training rows only, saved with the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tsssm.errors import DataError

log = logging.getLogger(__name__)

#: a channel whose training std is below this is treated as constant (scaled by 1, not by ~0)
MIN_STD = 1e-8


@dataclass
class StandardScaler:
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    channels: list[str]

    @classmethod
    def fit(cls, arrays: list[np.ndarray], channels: list[str]) -> StandardScaler:
        """Fit on the training rows of every stream (NaN ignored).  arrays: [(T_i, C)]"""
        stacked = np.concatenate(arrays, axis=0).astype(np.float64)
        observed = (~np.isnan(stacked)).sum(axis=0)
        for name, count in zip(channels, observed):
            if count < 2:
                raise DataError(
                    f"channel '{name}' has {count} observed training values; it cannot be "
                    "scaled - leave it out of data.channels"
                )
        mean = np.nanmean(stacked, axis=0)
        std = np.nanstd(stacked, axis=0)
        constant = std < MIN_STD
        for name in np.asarray(channels)[constant]:
            log.warning("channel '%s' is constant on the training rows; it is centred only", name)
        std = np.where(constant, 1.0, std)
        return cls(mean.astype(np.float32), std.astype(np.float32), list(channels))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale raw values (..., C) channel by channel: ``(values - mean) / std``, float32."""
        out = values - self.mean
        out /= self.std  # in place: the same rounding as (values - mean) / std, one buffer
        return out.astype(np.float32, copy=False)

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        """Scaled values (or predictive means) (..., C) back to the original units."""
        return values * self.std + self.mean

    def inverse_mean(self, values: np.ndarray) -> np.ndarray:
        """The same as :meth:`inverse_transform` (its older name)."""
        return self.inverse_transform(values)

    def inverse_std(self, std: np.ndarray) -> np.ndarray:
        """Standard deviations on the scaled axis (..., C) back to the original units."""
        return std * self.std

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> StandardScaler:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32),
                   list(d["channels"]))
