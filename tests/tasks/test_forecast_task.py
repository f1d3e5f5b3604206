"""ForecastTask's recipe options: detached variance loss, predict_window, learning-rate decay,
restore the best-validated weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tsssm.errors import ConfigError
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
    task._trainer = SimpleNamespace(sanity_checking=False, callback_metrics=metrics,
                                    current_epoch=0)
    for epoch, score in enumerate([0.9, 0.5, 0.7]):
        with torch.no_grad():
            model.mean.fill_(float(epoch))
        metrics["val/mse_horizon"] = torch.tensor(score)
        task._trainer.current_epoch = epoch
        task.on_validation_epoch_end()
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    task.on_fit_end()
    assert torch.equal(model.mean, torch.ones(H))  # epoch 1 had the best score
    assert task.best_epoch == 1
    resumed = ForecastTask(Toy(), {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, H,
                           restore_best=True)
    resumed.on_load_checkpoint(ckpt)
    resumed.on_fit_end()
    assert torch.equal(resumed.model.mean, torch.ones(H)) and resumed.best_epoch == 1


def test_stream_models_are_monitored_on_their_loss():
    model = Toy()
    model.training_input = "streams"
    task = ForecastTask(model, {"name": "lbfgs", "lr": 1.0, "max_iter": 2}, H,
                        monitor="val/mse_horizon")
    assert task.monitor == "val/loss"


# ------------------------------------------------------- the start as a candidate (validate_start)


def _loaders(seed=0):
    """Windows of 10 rows around 3.0 (train 64, validation 32), batches of 16."""
    from torch.utils.data import DataLoader

    def windows(n, s):
        y = torch.randn(n, 10, 2, generator=torch.Generator().manual_seed(s)) * 0.1 + 3.0
        return [{"y": w, "mask": torch.ones(10, dtype=torch.bool)} for w in y]

    return (DataLoader(windows(64, seed), batch_size=16, shuffle=True),
            DataLoader(windows(32, seed + 1), batch_size=16))


def _fit(start: float, lr: float, validate_start: bool = True, epochs: int = 2):
    import lightning as L

    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        model.mean.fill_(start)
        model.log_var.fill_(-4.0)
    task = ForecastTask(model, {"name": "adam", "lr": lr, "weight_decay": 0.0}, H,
                        one_step_weight=0.0, variance_loss="detached",
                        monitor="val/mse_horizon", restore_best=True,
                        validate_start=validate_start)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False,
                        num_sanity_val_steps=-1 if validate_start else 0)
    train, val = _loaders()
    trainer.fit(task, train, val)
    return task, val


def _val_mse(model, val) -> float:
    """The validation windows' horizon MSE, computed here from the model directly."""
    errs = [(model.forecast(b["y"][:, :-H], H).mean - b["y"][:, -H:]).square()
            for b in val]
    return float(torch.cat(errs).mean())


def test_the_starting_weights_are_a_candidate_and_can_be_kept():
    """A model that starts at the optimum (the validation mean) and is pushed away by a far too
    large learning rate: the validation pass before training scores the start, no epoch beats
    it, and the restored weights are the starting ones (best_epoch -1), number for number."""
    task, val = _fit(start=3.0, lr=1.0)
    assert task.best_epoch == -1
    assert torch.equal(task.model.mean.detach(), torch.full((H,), 3.0))
    with torch.no_grad():
        expected = _val_mse(task.model, val)
    assert task.start_metrics["val/mse_horizon"] == pytest.approx(expected, rel=1e-5)
    assert task.best_score == pytest.approx(expected, rel=1e-5)
    # without it the best epoch is restored, worse than the start on validation
    task, val = _fit(start=3.0, lr=1.0, validate_start=False)
    assert task.best_epoch >= 0 and not task.start_metrics
    with torch.no_grad():
        assert _val_mse(task.model, val) > expected


def test_an_epoch_that_beats_the_start_is_restored():
    task, val = _fit(start=0.0, lr=0.5, epochs=3)
    assert task.best_epoch >= 0
    assert task.best_score < task.start_metrics["val/mse_horizon"]
    with torch.no_grad():
        assert _val_mse(task.model, val) == pytest.approx(task.best_score, rel=1e-5)


class Part(Toy):
    """A Toy whose ``mean`` plays a hybrid's Kalman part."""

    def kalman_parameters(self):
        return [self.mean]


def test_kalman_lr_scales_or_freezes_the_kalman_part():
    cfg = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    groups = ForecastTask(Part(), {**cfg, "kalman_lr": 0.1}, H).configure_optimizers()
    groups = groups.param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert groups[1]["params"][0] is not groups[0]["params"][0]
    model = Part()
    opt = ForecastTask(model, {**cfg, "kalman_lr": 0.0}, H).configure_optimizers()
    assert not model.mean.requires_grad  # frozen: no gradient, not in the optimizer
    assert [len(g["params"]) for g in opt.param_groups] == [1]
    assert opt.param_groups[0]["params"][0] is model.log_var
    with pytest.raises(ConfigError, match="kalman_lr"):
        ForecastTask(Part(), {**cfg, "kalman_lr": -1.0}, H)
