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
