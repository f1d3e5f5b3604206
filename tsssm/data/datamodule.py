"""The LightningDataModule over prepared data: windows for neural models, whole streams for
models fitted on full sequences (the Kalman filter).

Under DDP (the trainer has several ranks) each rank loads its shard through
:class:`tsssm.data.sharding.EvenShards`: the shards Lightning's DistributedSampler would deal,
with the samples it repeats to even them out marked, so that the task leaves them out of its
losses and metrics (every window or stream counts once per epoch, as in one process).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from tsssm.data.datasets import PreparedData
from tsssm.data.sharding import EvenShards, MarkRepeats
from tsssm.data.windows import StreamDataset, WindowDataset, list_collate


class SeriesDataModule(L.LightningDataModule):
    def __init__(self, data: PreparedData, training_input: str, input_len: int, horizon: int,
                 stride: int, batch_size: int, num_workers: int = 0,
                 eval_stride: int | None = None, exog: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.data = data
        #: batches carry "u" (inputs) and "dt" (time steps) for models that use them
        self.exog = exog
        self.training_input = training_input
        self.input_len = input_len
        #: a training window: the context and the horizon after it
        self.window = input_len + horizon
        self.stride = stride
        #: stride of validation windows (default: every window)
        self.eval_stride = eval_stride or 1
        self.batch_size = batch_size
        self.num_workers = num_workers
        #: the seed of the training windows' per-epoch shuffle under DDP (the same on every rank)
        self.seed = seed

    def _side(self, rows: list[tuple]) -> tuple[list | None, list | None]:
        """The inputs and time steps of the parts' rows, when the model uses them."""
        if not self.exog:
            return None, None
        pairs = [part.exog(begin, stop) for part, begin, stop in rows]
        inputs = [u for u, _ in pairs] if pairs and pairs[0][0] is not None else None
        steps = [dt for _, dt in pairs] if pairs and pairs[0][1] is not None else None
        return inputs, steps

    def _streams(self, split: str) -> StreamDataset:
        arrays, ranges, rows = [], [], []
        for part in self.data.parts:
            start, stop = part.rows(split)
            if stop > start:
                # Validation keeps the history before its rows so the filter state is warm.
                begin = 0 if split == "val" else start
                arrays.append(part.stream.values[begin:stop])
                ranges.append((start - begin, stop - begin))
                rows.append((part, begin, stop))
        return StreamDataset(arrays, ranges, *self._side(rows))

    def _windows(self, split: str) -> WindowDataset:
        arrays, rows = [], []
        for part in self.data.parts:
            start, stop = part.rows(split)
            if stop > start:
                # A validation window's context may reach back before the border; its horizon
                # lies inside the split (ETT's protocol: val starts input_len rows early).
                begin = max(0, start - self.input_len) if split == "val" else start
                if stop - begin >= self.window:
                    arrays.append(part.stream.values[begin:stop])
                    rows.append((part, begin, stop))
        stride = self.stride if split == "train" else self.eval_stride
        return WindowDataset(arrays, self.window, stride, *self._side(rows))

    def _ranks(self) -> tuple[int, int]:
        """(world size, this rank) of the trainer this module serves; (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, ds: Dataset, shuffle: bool, **kwargs) -> DataLoader:
        world, rank = self._ranks()
        if world == 1:
            return DataLoader(ds, shuffle=shuffle, **kwargs)
        marked = MarkRepeats(ds)
        return DataLoader(marked, sampler=EvenShards(marked, world, rank, shuffle=shuffle,
                                                     seed=self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.training_input == "streams":
            ds = self._streams("train")
            # full batch: each rank its whole shard at once
            return self._loader(ds, False, batch_size=max(len(ds), 1), collate_fn=list_collate)
        return self._loader(self._windows("train"), True, batch_size=self.batch_size,
                            num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        if self.training_input == "streams":
            ds = self._streams("val")
            return self._loader(ds, False, batch_size=max(len(ds), 1), collate_fn=list_collate)
        return self._loader(self._windows("val"), False, batch_size=self.batch_size,
                            num_workers=self.num_workers)

    def has_val(self) -> bool:
        ds = self._streams("val") if self.training_input == "streams" else self._windows("val")
        return len(ds) > 0
