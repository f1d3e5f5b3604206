"""ForecastTask's recipe options: detached variance loss, predict_window, learning-rate decay,
restore the best-validated weights."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tsssm.models.base import Gaussian
from tsssm.tasks.forecast import ForecastTask

H = 4


class Toy(nn.Module):
    """Forecasts a learned mean and variance per lead; one-step predictions of zeros."""

    training_input = "windows"

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(H))
        self.log_var = nn.Parameter(torch.zeros(H))

    def one_step(self, y, state=None):
        return Gaussian(torch.zeros_like(y) * self.mean.sum(), torch.ones_like(y)), None

    def forecast(self, context, horizon, state=None):
        b, _, c = context.shape
        mean = self.mean.view(1, H, 1).expand(b, H, c)
        return Gaussian(mean, self.log_var.exp().view(1, H, 1).expand(b, H, c))


def _batch(seed=0):
    y = torch.randn(8, 10, 2, generator=torch.Generator().manual_seed(seed)) + 3.0
    return {"y": y, "mask": torch.ones(8, 10, dtype=torch.bool)}


def test_detached_variance_loss_trains_the_mean_by_squared_error():
    batch = _batch()
    target = batch["y"][:, -H:]
    for kind in ("joint", "detached"):
        model = Toy()
        with torch.no_grad():
            model.log_var.fill_(2.0)  # a wide variance: NLL would damp the mean's gradient
        task = ForecastTask(model, {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, H,
                            one_step_weight=0.0, variance_loss=kind)
        task.losses(batch)["loss"].backward()
        mse_grad = -2 * (target - 0.0).mean(dim=(0, 2)) / H
        if kind == "detached":
            torch.testing.assert_close(model.mean.grad, mse_grad)
        else:
            torch.testing.assert_close(model.mean.grad, mse_grad / (2 * torch.e**2))
        assert model.log_var.grad.abs().sum() > 0


def test_predict_window_gives_both_losses_from_one_pass():
    class Shared(Toy):
        calls = 0

        def predict_window(self, context, horizon):
            Shared.calls += 1
            return (Gaussian(torch.zeros_like(context), torch.ones_like(context)),
                    self.forecast(context, horizon))

        def one_step(self, y, state=None):  # pragma: no cover - must not be called
            raise AssertionError("one_step called beside predict_window")

    task = ForecastTask(Shared(), {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, H)
    out = task.losses(_batch())
    assert Shared.calls == 1 and torch.isfinite(out["loss"])
    context = _batch()["y"][:, :-H]
    expected = 0.5 * (torch.log(torch.tensor(2 * torch.pi)) + context.square().mean())
    torch.testing.assert_close(out["nll_one_step"], expected)


def test_lr_decay_schedules_per_epoch():
    task = ForecastTask(Toy(), {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                "lr_decay": 0.5}, H)
    conf = task.configure_optimizers()
    sched = conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "epoch" and sched.gamma == 0.5
    assert isinstance(ForecastTask(Toy(), {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                                   H).configure_optimizers(), torch.optim.Adam)


def test_restore_best_puts_back_the_best_validated_weights():
    model = Toy()
    task = ForecastTask(model, {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, H,
                        monitor="val/mse_horizon", restore_best=True)
    metrics: dict = {}
    task._trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics)
    for epoch, score in enumerate([0.9, 0.5, 0.7]):
        with torch.no_grad():
            model.mean.fill_(float(epoch))
        metrics["val/mse_horizon"] = torch.tensor(score)
        task.on_validation_epoch_end()
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    task.on_fit_end()
    assert torch.equal(model.mean, torch.ones(H))  # epoch 1 had the best score
    resumed = ForecastTask(Toy(), {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, H,
                           restore_best=True)
    resumed.on_load_checkpoint(ckpt)
    resumed.on_fit_end()
    assert torch.equal(resumed.model.mean, torch.ones(H))


def test_stream_models_are_monitored_on_their_loss():
    model = Toy()
    model.training_input = "streams"
    task = ForecastTask(model, {"name": "lbfgs", "lr": 1.0, "max_iter": 2}, H,
                        monitor="val/mse_horizon")
    assert task.monitor == "val/loss"
