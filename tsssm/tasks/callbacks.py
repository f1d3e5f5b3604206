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
