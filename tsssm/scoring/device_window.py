"""Trailing window scores computed where the model ran (the GPU), with the window's tail carried.

:func:`tsssm.anomaly.streaming.window_update` computes a stream's window scores in numpy from the
step terms, so a GPU model's terms of every row and channel (three (n, C) arrays, two of them
float64) would cross to the host only to be summed there. :class:`DeviceWindow` does the same
sums on the terms' device, in float64 as the numpy path, with the same formulas (``window_inputs``
/ ``window_values``), and hands back what the scores Parquet needs: the score (n,) float64 (the
threshold compares it, as on the host path) and, with contributions, (n, C) float32. Only trailing
windows (a row's score comes with the row; the default anomaly task's); a centered window keeps
the numpy path. The result equals the numpy path up to the summation order of a cumulative sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsssm.anomaly.scores import WINDOW_KINDS, StepTerms
from tsssm.errors import ConfigError


class DeviceWindow:
    """One stream's trailing ``window``-row scores of ``kind`` ("mean" or "shift"), fed step
    terms of consecutive rows; the last ``window - 1`` rows' window inputs are carried."""

    def __init__(self, window: int, kind: str, n_channels: int, device: torch.device,
                 fill: float = 0.0) -> None:
        if kind not in WINDOW_KINDS:
            raise ConfigError(f"score window kind must be one of {WINDOW_KINDS}; got {kind!r}")
        self.window, self.kind, self.fill = int(window), kind, float(fill)
        self.width = n_channels + 1 if kind == "mean" else 2 * n_channels
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.tail = torch.zeros((0, self.width), dtype=torch.float64, device=self.device)

    def inputs(self, terms: StepTerms) -> Tensor:
        """``window_inputs`` of one stream's terms (n, C): (n, K) float64."""
        contrib, whitened, observed = terms
        if self.kind == "mean":
            return torch.cat([contrib.double(), observed.any(-1, keepdim=True).double()], -1)
        return torch.cat([whitened.double(), observed.double()], -1)

    def values(self, sums: Tensor) -> tuple[Tensor, Tensor]:
        """``window_values``: (score (n,) float64, contributions (n, C) float64)."""
        if self.kind == "mean":
            count = sums[:, -1:]
            out = sums[:, :-1] / count.clamp_min(1.0)
            has = count[:, 0] > 0
        else:
            C = sums.shape[-1] // 2
            s, n = sums[:, :C], sums[:, C:]
            out = s * s
            out /= n.clamp_min(1.0)
            n_channels = (n > 0).sum(-1, keepdim=True)
            out /= n_channels.clamp_min(1)
            has = n_channels[:, 0] > 0
        score = out.sum(-1)
        score = torch.where(has, score, torch.full_like(score, self.fill))
        return score, out

    def update(self, terms: StepTerms) -> tuple[Tensor, Tensor]:
        """Window scores of the next rows from their step terms (n, C) (one stream: no batch
        axis). Returns (score (n,) float64, contrib (n, C) float64) on the device."""
        x = torch.cat([self.tail, self.inputs(terms)], 0)  # (k + n, K): the tail, then the rows
        k, n, w = len(self.tail), len(x) - len(self.tail), self.window
        # the cumulative sums along time as the rows of a (K, k + n + 1) array: a scan along a
        # tensor's last axis is one parallel kernel, along its first (k + n rows of K = 9..16
        # columns) it ran one thread per column down 2^20 rows (~0.4 s a call on an H200)
        xt = x.T.contiguous()  # (K, k + n)
        cs = torch.zeros((self.width, len(x) + 1), dtype=torch.float64, device=self.device)
        cs[:, 1:] = torch.cumsum(xt, 1)
        base = self.received - k  # stream row of x[0]
        first = self.received
        if first + 1 - w >= 0:  # every window whole: sums of consecutive rows, by slices
            lo = first + 1 - w - base
            sums = cs[:, lo + w : lo + w + n] - cs[:, lo : lo + n]
        else:  # windows cut at the stream's start
            t = torch.arange(first, first + n, device=self.device)
            stop = t + 1
            start = (stop - w).clamp_min(0)
            sums = cs[:, stop - base] - cs[:, start - base]
        self.received += n
        keep = max(0, self.received + 1 - w)  # rows a later row's window still reaches
        self.tail = x[keep - base :].clone()
        return self.values(sums.T)  # (n, K)
