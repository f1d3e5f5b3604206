"""Windows and whole streams as training batches.

A batch is a dict: ``y`` (B, T, C) float32 with NaN for missing, and ``mask`` (B, T) bool, the
positions whose predictions count in the loss; for whole streams of different lengths, lists of
(1, T_i, C) and (1, T_i) tensors. With exogenous data, also ``u`` (B, T, K) float32 inputs and
``dt`` (B, T) float64 time steps, aligned with ``y`` (see tsssm.models.base.Exog).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def _side(arrays: list[np.ndarray] | None, dtype) -> list[torch.Tensor] | None:
    if arrays is None:
        return None
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a in arrays]


def _with_exog(item: dict[str, torch.Tensor], inputs, steps, i: int, rows: slice
               ) -> dict[str, torch.Tensor]:
    if inputs is not None:
        item["u"] = inputs[i][rows]
    if steps is not None:
        item["dt"] = steps[i][rows]
    return item


class WindowDataset(Dataset):
    """Sliding windows of ``length`` rows with ``stride`` over several arrays (and their inputs
    (T_i, K) and time steps (T_i,), when given)."""

    def __init__(self, arrays: list[np.ndarray], length: int, stride: int,
                 inputs: list[np.ndarray] | None = None,
                 steps: list[np.ndarray] | None = None) -> None:
        self.arrays = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
        self.inputs = _side(inputs, np.float32)
        self.steps = _side(steps, np.float64)
        self.index = [
            (i, s)
            for i, a in enumerate(arrays)
            for s in range(0, len(a) - length + 1, stride)
        ]
        self.length = length

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, s = self.index[k]
        y = self.arrays[i][s : s + self.length]  # (L, C)
        item = {"y": y, "mask": torch.ones(self.length, dtype=torch.bool)}
        return _with_exog(item, self.inputs, self.steps, i, slice(s, s + self.length))


class StreamDataset(Dataset):
    """Whole streams, each with the row range whose predictions count (history before it)."""

    def __init__(self, arrays: list[np.ndarray], ranges: list[tuple[int, int]],
                 inputs: list[np.ndarray] | None = None,
                 steps: list[np.ndarray] | None = None) -> None:
        self.arrays = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
        self.ranges = ranges
        self.inputs = _side(inputs, np.float32)
        self.steps = _side(steps, np.float64)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        y = self.arrays[k]
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[self.ranges[k][0] : self.ranges[k][1]] = True
        return _with_exog({"y": y, "mask": mask}, self.inputs, self.steps, k, slice(None))


def list_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Streams of different lengths as lists of (B_k, T_k, C) / (B_k, T_k), one entry per
    distinct length: no padding, since a NaN-padded tail would read as missing data (and take
    the filter's slow path); streams of equal length share one batched call."""
    by_length: dict[int, list[dict[str, torch.Tensor]]] = {}
    for it in items:
        by_length.setdefault(len(it["y"]), []).append(it)
    groups = list(by_length.values())
    return {key: [torch.stack([it[key] for it in g]) for g in groups] for key in items[0]}
