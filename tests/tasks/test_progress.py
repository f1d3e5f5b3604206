"""Progress you can trust: the training loss in the progress bar is the logged train/loss of
the same epoch, and L-BFGS shows its inner evaluations while an epoch's one step runs."""

from __future__ import annotations

import lightning as L
import torch

from tsssm.models.kalman import KalmanForecaster
from tsssm.tasks.callbacks import InnerIterations
from tsssm.tasks.forecast import ForecastTask


def _streams(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.cumsum(0.3 * torch.randn(2, 60, 2, generator=g), 1)
    y = y + 0.5 * torch.randn(y.shape, generator=g)  # (B, T, C): level + noise
    y[0, 40:45, 1] = float("nan")
    return {"y": [y], "mask": [torch.ones(2, 60, dtype=torch.bool)]}


class _Record(L.Callback):
    """At each epoch's end: the bar's loss and the epoch metric the tracker logs."""

    def __init__(self) -> None:
        self.bar, self.logged = [], []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.bar.append(float(trainer.progress_bar_metrics["loss"]))
        self.logged.append(float(trainer.callback_metrics["train/loss"]))


def _fit(batches: list[dict], optimizer: dict, epochs: int, progress: bool = False):
    torch.manual_seed(0)
    model = KalmanForecaster(2)
    model.initialize(batches[0]["y"][0])
    start = model.theta.detach().clone()
    task = ForecastTask(model, optimizer, horizon=4)
    record, inner = _Record(), InnerIterations()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, callbacks=[record, inner],
                        num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=loader)
    return task, record, inner, start


def test_bar_loss_is_the_logged_epoch_loss_with_lbfgs(capsys):
    lbfgs = {"name": "lbfgs", "lr": 0.5, "max_iter": 3}
    task, record, inner, start = _fit([_streams()], lbfgs, epochs=2, progress=True)
    assert len(record.logged) == 2
    for bar, logged in zip(record.bar, record.logged):
        assert abs(bar - logged) <= 1e-6 * abs(logged)
    # the epoch's loss is the batch's loss where its optimizer step starts (not the mean of
    # the line search's trial evaluations): epoch 0 is the initial parameters' loss
    probe = ForecastTask(KalmanForecaster(2), lbfgs, horizon=4)
    probe.model.load_state_dict(task.model.state_dict())
    with torch.no_grad():
        probe.model.theta.copy_(start)
        first = float(probe.losses(_streams())["loss"])
    assert abs(record.logged[0] - first) <= 1e-6 * abs(first)
    assert record.logged[1] < record.logged[0]  # and it is minimised
    # the bar showed the inner evaluations of the (single) step of each epoch
    assert inner.evaluations > 1
    out, err = capsys.readouterr()
    assert "lbfgs=2/3" in out + err and "f=" in out + err


def test_bar_loss_is_the_logged_epoch_mean_over_batches_with_adam():
    batches = [_streams(0), _streams(1)]
    adam = {"name": "adam", "lr": 0.05, "weight_decay": 0.0}
    _, record, inner, _ = _fit(batches, adam, epochs=2)
    for bar, logged in zip(record.bar, record.logged):
        assert abs(bar - logged) <= 1e-6 * abs(logged)
    assert record.logged[0] != record.logged[1]
    assert inner.evaluations == 0  # no inner iterations to show for Adam
