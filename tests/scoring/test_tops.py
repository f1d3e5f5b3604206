"""The intervals Parquet's ``top`` column, built column-wise, reads as FlaggedInterval.describe()
of every interval (ties, shares below 5%, fewer channels than 3, intervals without attribution)."""

from __future__ import annotations

import numpy as np
import pytest

from tsssm.anomaly.attribution import FlaggedInterval
from tsssm.scoring.files import _tops


def described(shares: np.ndarray, channels: list[str]) -> list[str]:
    out = []
    for row in shares:
        if np.isnan(row[0]):
            out.append("")
            continue
        order = np.argsort(-row, kind="stable")
        out.append(FlaggedInterval(0, 0, 0.0, {channels[j]: float(row[j])
                                               for j in order}).describe())
    return out


@pytest.mark.parametrize("C", [1, 2, 3, 8])
def test_tops_reads_as_describe(C):
    rng = np.random.default_rng(C)
    raw = rng.exponential(size=(500, C)) ** 3
    raw[::7] = rng.integers(0, 3, size=(len(raw[::7]), C))  # ties, and zeros
    raw[::7, 0] = np.maximum(raw[::7, 0], 1)
    shares = raw / raw.sum(1, keepdims=True)
    shares[[3, 50, 499]] = np.nan  # no attribution
    shares[10] = np.full(C, 1.0 / C)
    shares[11, :] = 0.0
    shares[11, 0] = 0.995  # rounds to 100 (half to even below)
    shares[12] = np.r_[0.125, 0.875, np.zeros(C - 2)][:C] if C >= 2 else 1.0
    channels = [f"sensor {j}" for j in range(C)]
    assert _tops(shares, channels).to_pylist() == described(shares, channels)
    assert _tops(shares[:0], channels).to_pylist() == []
