"""Shards of a dataset for several processes (DDP) in which every sample counts exactly once.

DDP needs every rank to take the same number of steps (each step all-reduces gradients, and
broadcasts the model's buffers on every forward, validation included); torch's
``DistributedSampler`` evens the shards out by repeating up to ``world_size - 1`` samples, so
that a loss or metric averaged over the shards counts those samples twice: with 3 streams on
2 ranks, one stream weighs double in the full-batch loss. :class:`EvenShards` deals the same
shards (and the same per-epoch shuffle), but marks the repeats, and :func:`without_repeats`
takes them out of a batch before its loss is computed: the ranks still step in lockstep, and
the epoch covers each sample once, as in one process.

A repeat is sample ``k`` drawn as index ``len(dataset) + k``; :class:`MarkRepeats` wraps the
dataset so that each item carries ``real`` (a bool scalar tensor, False for a repeat).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class MarkRepeats(Dataset):
    """``dataset`` whose items carry ``real``; index ``len(dataset) + k`` is item k, repeated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        n = len(self)
        item = dict(self.dataset[k % n])
        item["real"] = torch.tensor(k < n)
        return item


class EvenShards(DistributedSampler):
    """``DistributedSampler``'s shards of a :class:`MarkRepeats` dataset (rank r takes positions
    r, r + W, ... of the epoch's order, padded to a multiple of W by repeating its first
    samples) with the repeats drawn as ``len(dataset) + k``. Being a DistributedSampler,
    Lightning keeps it (and calls ``set_epoch``) instead of injecting its own."""

    def __init__(self, dataset: MarkRepeats, num_replicas: int, rank: int,
                 shuffle: bool = False, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if n == 0:
            return iter([])
        if self.shuffle:  # the order DistributedSampler draws for this epoch
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        order += [n + k for k in (order * math.ceil(pad / n))[:pad]]
        return iter(order[self.rank : self.total_size : self.num_replicas])


def without_repeats(batch: dict) -> tuple[dict, bool]:
    """(the batch without its repeated samples, whether any sample is real). A batch of
    repeats only comes back whole (its rank must still run a step; it then weighs 0).
    Batches without ``real`` (one process) come back as they are. Tensor batches hold (B, ...)
    entries; stream batches lists of (B_k, ...) entries, one per length."""
    real = batch.get("real")
    if real is None:
        return batch, True
    rest = {k: v for k, v in batch.items() if k != "real"}
    if isinstance(real, list):
        if all(bool(r.all()) for r in real):
            return rest, True
        if not any(bool(r.any()) for r in real):
            return rest, False
        keep = [i for i, r in enumerate(real) if bool(r.any())]
        return {k: [v[i][real[i]] for i in keep] for k, v in rest.items()}, True
    if bool(real.all()):
        return rest, True
    if not bool(real.any()):
        return rest, False
    return {k: v[real] for k, v in rest.items()}, True
