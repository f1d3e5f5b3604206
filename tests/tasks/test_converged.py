"""An L-BFGS fit on whole streams stops when it has converged, at the optimum (not at a fixed
epoch count part-way, where the weights would depend on rounding); other optimizers and
unconverged fits run their epochs."""

from __future__ import annotations

import lightning as L
import torch

from tsssm.models.kalman import KalmanForecaster
from tsssm.tasks.callbacks import StopWhenConverged
from tsssm.tasks.forecast import ForecastTask


def _streams() -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.cumsum(0.3 * torch.randn(2, 80, 2, generator=g, dtype=torch.float64), 1)
    y = y + 0.5 * torch.randn(y.shape, generator=g, dtype=torch.float64)  # (B, T, C)
    return {"y": [y], "mask": [torch.ones(2, 80, dtype=torch.bool)]}


class _Epochs(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit(batches: list[dict], optimizer: dict, epochs: int, stop: bool):
    torch.manual_seed(0)
    model = KalmanForecaster(2)  # float64 by default
    model.initialize(batches[0]["y"][0])
    task = ForecastTask(model, optimizer, horizon=4)
    seen = _Epochs()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[seen, *([StopWhenConverged()] if stop else [])])
    trainer.fit(task, train_dataloaders=loader)
    return task, seen


def test_lbfgs_stops_at_the_optimum():
    lbfgs = {"name": "lbfgs", "lr": 1.0, "max_iter": 5}
    task, seen = _fit([_streams()], lbfgs, epochs=60, stop=True)
    assert 2 <= len(seen.losses) < 60  # stopped early, after some progress
    full, _ = _fit([_streams()], lbfgs, epochs=60, stop=False)  # the same fit run to the end
    got = task.model.state_dict()
    for name, ref in full.model.state_dict().items():
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=1e-8)


def test_an_unconverged_lbfgs_fit_runs_its_epochs():
    lbfgs = {"name": "lbfgs", "lr": 1.0, "max_iter": 1}  # one iteration a step: progress each
    _, seen = _fit([_streams()], lbfgs, epochs=3, stop=True)
    assert len(seen.losses) == 3 and seen.losses[2] < seen.losses[0]


def test_other_optimizers_are_left_alone():
    adam = {"name": "adam", "lr": 1e-9, "weight_decay": 0.0}  # no progress, yet no stop
    _, seen = _fit([_streams()], adam, epochs=3, stop=True)
    assert len(seen.losses) == 3
