"""Lightning callbacks that report training to the tracker (which owns MLflow)."""

from __future__ import annotations

import lightning as L


class TrackerCallback(L.Callback):
    """Logs every ``split/metric`` Lightning collected at the end of each epoch, step = epoch."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def _log(self, trainer: L.Trainer, prefix: str) -> None:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and v.numel() == 1
        }
        if metrics and not trainer.sanity_checking:
            self.tracker.log_metrics(metrics, step=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "train/")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "val/")


class Throughput(L.Callback):
    """Training throughput of each epoch over every rank, logged as ``train/samples_per_s``
    (training examples - windows, or whole streams - per second), ``train/rows_per_s`` (their
    time steps) and ``train/epoch_seconds`` (the epoch's training time: validation excluded,
    the GPU's queued work included). An L-BFGS step evaluates its batch several times; a
    batch counts once."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self._started = self._val_started = self._val_seconds = 0.0
        self._samples = self._rows = 0

    @staticmethod
    def _clock(pl_module: L.LightningModule) -> float:
        import time

        import torch

        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples = self._rows = 0
        self._val_seconds = 0.0
        self._started = self._clock(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        from tsssm.data.sharding import without_repeats

        batch, real = without_repeats(batch)  # DDP: a sample its sampler repeats counts once
        if not real:
            return
        ys = batch["y"] if isinstance(batch["y"], list) else [batch["y"]]  # (B, T, C) each
        self._samples += sum(int(y.shape[0]) for y in ys)
        self._rows += sum(int(y.shape[0]) * int(y.shape[1]) for y in ys)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_started = self._clock(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_seconds += self._clock(pl_module) - self._val_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        seconds = self._clock(pl_module) - self._started - self._val_seconds
        counts = torch.tensor([self._samples, self._rows], dtype=torch.float64,
                              device=pl_module.device)
        if trainer.world_size > 1:  # every rank's share (the slowest rank sets the pace)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            seconds = float(trainer.strategy.reduce(
                torch.tensor(seconds, dtype=torch.float64, device=pl_module.device),
                reduce_op="max"))
        if seconds <= 0 or not self._samples:
            return
        samples, rows = (float(v) for v in counts.cpu())
        self.tracker.log_metrics({"train/samples_per_s": samples / seconds,
                                  "train/rows_per_s": rows / seconds,
                                  "train/epoch_seconds": seconds}, step=trainer.current_epoch)


class RngState(L.Callback):
    """Saves the Python, NumPy and torch random states in each checkpoint and restores them on
    resume, so a resumed training draws the same shuffles (and dropout) as an uninterrupted one.
    Stored as plain lists and tensors, loadable with ``torch.load(weights_only=True)``."""

    def state_dict(self) -> dict:
        import random

        import numpy as np
        import torch

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        import random

        import numpy as np
        import torch

        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])


class InterruptWatch(L.Callback):
    """Remembers whether training ended by Ctrl-C or SIGTERM: Lightning turns that into
    ``sys.exit(1)``, and the caller must turn it back into an interrupt."""

    def __init__(self) -> None:
        self.interrupted = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True


class InnerIterations(L.Callback):
    """Shows the inner iterations of an optimizer that evaluates the loss many times per batch
    (L-BFGS: one epoch on whole streams is one optimizer step of up to ``max_eval`` loss and
    gradient evaluations): the progress bar's postfix gets ``lbfgs=<evaluations>/<at most>``
    and ``f=`` the objective of the latest evaluation, refreshed at each of them. Lightning
    calls ``on_before_backward`` once per closure evaluation."""

    def __init__(self) -> None:
        self.evaluations = 0  # of the current optimizer step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self.evaluations = 0

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss) -> None:
        import torch

        optimizers = trainer.optimizers
        if not optimizers or not isinstance(optimizers[0], torch.optim.LBFGS):
            return
        self.evaluations += 1
        bar = trainer.progress_bar_callback
        tqdm_bar = getattr(bar, "train_progress_bar", None) if bar is not None else None
        if tqdm_bar is None or not hasattr(bar, "get_metrics"):
            return
        most = optimizers[0].defaults["max_eval"]
        postfix = dict(bar.get_metrics(trainer, pl_module))
        postfix.update(lbfgs=f"{self.evaluations}/{most}", f=f"{float(loss.detach()):.4g}")
        postfix.pop("v_num", None)
        tqdm_bar.set_postfix(postfix, refresh=True)


class StopWhenConverged(L.Callback):
    """Ends training once an L-BFGS fit has converged: when an epoch's optimizer step (one
    L-BFGS step of up to ``max_iter`` iterations over whole streams) no longer lowers the
    objective by more than ``rtol`` of it. Without it, a fixed epoch count stops L-BFGS
    part-way, where the weights depend on rounding (the CPU's BLAS kernels): var_kalman on SKAB
    after 4 epochs had a training NLL of 1.0132 against the optimum's 0.97865 and its POT
    threshold moved 1% between two CPUs; at the optimum the fit is the same to the tolerance.
    Other optimizers are left alone."""

    def __init__(self, rtol: float = 1e-10) -> None:
        self.rtol = rtol
        self.first: float | None = None  # the objective at the step's first evaluation
        self.best: float | None = None  # ... and the lowest of its evaluations

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self.first = self.best = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss) -> None:
        import torch

        optimizers = trainer.optimizers
        if not optimizers or not isinstance(optimizers[0], torch.optim.LBFGS):
            return  # reading the loss waits for the device: only where it is used
        value = float(loss.detach())
        if self.first is None:
            self.first = self.best = value
        self.best = min(self.best, value)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first is None or trainer.num_training_batches != 1:
            return  # not L-BFGS, or not one step an epoch over whole streams
        # the lowest evaluation, not the last: the line search's last trial point need not be
        # the one it accepts, so the last value could hide a step's progress
        if self.first - self.best <= self.rtol * max(1.0, abs(self.first)):
            trainer.should_stop = True
