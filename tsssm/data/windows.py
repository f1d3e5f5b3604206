"""Windows and whole streams as training batches.

A batch is a dict: ``y`` (B, T, C) float32 with NaN for missing, and ``mask`` (B, T) bool, the
positions whose predictions count in the loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class WindowDataset(Dataset):
    """Sliding windows of ``length`` rows with ``stride`` over several arrays."""

    def __init__(self, arrays: list[np.ndarray], length: int, stride: int) -> None:
        self.arrays = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
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
        return {"y": y, "mask": torch.ones(self.length, dtype=torch.bool)}


class StreamDataset(Dataset):
    """Whole streams, each with the row range whose predictions count (history before it)."""

    def __init__(self, arrays: list[np.ndarray], ranges: list[tuple[int, int]]) -> None:
        self.arrays = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
        self.ranges = ranges

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        y = self.arrays[k]
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[self.ranges[k][0] : self.ranges[k][1]] = True
        return {"y": y, "mask": mask}


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack streams of different lengths, padding ``y`` with NaN (missing) and mask with False."""
    length = max(len(it["y"]) for it in items)
    channels = items[0]["y"].shape[-1]
    y = torch.full((len(items), length, channels), float("nan"))
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["y"])
        y[b, :n] = it["y"]
        mask[b, :n] = it["mask"]
    return {"y": y, "mask": mask}
