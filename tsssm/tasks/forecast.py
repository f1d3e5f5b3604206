"""The training task for every probabilistic forecaster: loss, optimizer, logged metrics.

The loss is the Gaussian negative log predictive density of the one-step predictions over all
positions that count (for a Kalman model with independent channels this *is* its exact negative
log-likelihood per observation), plus, for window-trained models, the same density of the
horizon forecast made from the window's context.

``variance_loss="detached"`` trains the horizon forecast's mean and variance apart: the mean by
the squared error (the benchmark's metric; the Gaussian NLL would weight each error by the
model's own confidence in it), the variance by the NLL around the mean with the mean's
gradient stopped, so the variance learns the size of the errors the mean makes.

Optimiser: AdamW/Adam (or L-BFGS for full-stream filters); ``lr_decay`` multiplies the learning
rate after every epoch (TSLib's recipe halves it: 0.5). ``restore_best`` keeps a copy of the
weights of the epoch with the best ``monitor`` value on validation and puts them back when
training ends (the model that is evaluated and saved is the best-validated one, as in TSLib); a
horizon metric (``val/mse_horizon``) falls back to ``val/loss`` for models trained on whole
streams, which have no horizon loss. With ``validate_start`` the weights training starts from
are a candidate too: the trainer runs a full validation pass before the first epoch (its
sanity check, ``num_sanity_val_steps=-1``), whose ``monitor`` value is the score to beat, so a
model that starts as a fitted baseline (a hybrid at its Kalman part) ends no worse than that
baseline on validation (``best_epoch`` -1: the start was kept; ``start_metrics``: that pass's
means).

``kalman_lr`` (optimizer key): a hybrid's Kalman part (``model.kalman_parameters()``) learns at
lr times this factor; 0 freezes it (no gradient is computed for it): the part stays as fitted
before training while the corrections learn.

Window models may offer ``predict_window(context, horizon) -> (one-step Gaussian over the
context, horizon Gaussian)``; the task then takes both losses from that one pass (a filter runs
once per window, not once per loss term) and the one-step loss covers the context.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import Tensor

from tsssm.anomaly.scores import gaussian_nll
from tsssm.data.sharding import without_repeats
from tsssm.distributed import global_means, replicas_differ
from tsssm.errors import ConfigError, NumericalError
from tsssm.models.base import Exog, call_forecast, call_one_step, call_predict_window

VARIANCE_LOSSES = ("joint", "detached")


def hide_unscored(y: Tensor, mask: Tensor) -> Tensor:
    """NaN out the positions whose predictions do not count.  y (B, T, C), mask (B, T)."""
    return y.masked_fill(~mask.unsqueeze(-1), float("nan"))


def batch_exog(batch: dict, i: int | None = None) -> Exog | None:
    """The batch's inputs and time steps (entry i of list batches), or None without them."""
    u, dt = batch.get("u"), batch.get("dt")
    if i is not None:
        u = None if u is None else u[i]
        dt = None if dt is None else dt[i]
    return None if u is None and dt is None else Exog(u, dt)


class ForecastTask(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: dict, horizon: int,
                 one_step_weight: float = 1.0, horizon_weight: float = 1.0,
                 variance_loss: str = "joint", monitor: str = "val/loss",
                 restore_best: bool = False, future_inputs: str = "known",
                 validate_start: bool = False) -> None:
        super().__init__()
        if variance_loss not in VARIANCE_LOSSES:
            raise ValueError(f"variance_loss must be one of {VARIANCE_LOSSES}, got "
                             f"{variance_loss!r}")
        self.model = model
        #: "known": horizon forecasts see the inputs of the forecast rows; "unknown": not
        self.future_inputs = future_inputs
        self.optimizer_cfg = dict(optimizer)
        self.horizon = horizon
        self.one_step_weight = one_step_weight
        self.horizon_weight = horizon_weight if model.training_input == "windows" else 0.0
        self.variance_loss = variance_loss
        # a model fitted on whole streams has no horizon loss: it is monitored on its own loss
        self.monitor = monitor if self.horizon_weight > 0 or "horizon" not in monitor \
            else "val/loss"
        factor = float(self.optimizer_cfg.get("kalman_lr", 1.0))
        if not factor >= 0:
            raise ConfigError(f"model.optimizer.kalman_lr must be a number >= 0, got "
                              f"{factor!r}")
        if factor == 0.0:  # frozen before any wrapper (DDP) registers the parameters
            for p in self._kalman_parameters():
                p.requires_grad_(False)
        self.restore_best = restore_best
        self.validate_start = bool(validate_start)
        self.best_score: float | None = None
        self.best_state: dict[str, Tensor] | None = None
        #: the epoch whose weights best_state holds (-1: the weights training started from)
        self.best_epoch: int | None = None
        #: validate_start: the means of the validation pass before training ({"val/...": x})
        self.start_metrics: dict[str, float] = {}
        #: the sanity pass's sums of value x weight and the weights, per metric
        self._start_sums: dict[str, tuple[float, float]] = {}
        self.save_hyperparameters(ignore=["model"])
        #: (global step, batch index) of the last logged training batch
        self._logged_step: tuple[int, int] | None = None
        #: this epoch's (sum of batch losses x batch size, sum of batch sizes)
        self._epoch_loss = (0.0, 0)

    def horizon_exog(self, exog: Exog | None) -> Exog | None:
        """A window's exog as its horizon forecast may see it: without the inputs of the
        forecast rows when they are not known ahead (``future_inputs="unknown"``)."""
        if exog is not None and self.future_inputs != "known" and exog.u is not None:
            return exog._replace(u=exog.u[:, : -self.horizon])
        return exog

    def one_step_nll(self, ys: list[Tensor], masks: list[Tensor],
                     exogs: list[Exog | None] | None = None) -> Tensor:
        """Mean NLL over every scored entry of several (1, T_i, C) streams or one (B, T, C)."""
        total, count = 0.0, 0
        for i, (y, mask) in enumerate(zip(ys, masks)):
            pred, _ = call_one_step(self.model, y, None, None if exogs is None else exogs[i])
            target = hide_unscored(y, mask)
            total = total + gaussian_nll(target, pred, reduction="sum")
            count += int((~torch.isnan(target)).sum())
        return total / max(count, 1)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        y, mask = batch["y"], batch["mask"]  # (B, T, C), (B, T) or lists of (1, T_i, ...)
        out: dict[str, Tensor] = {}
        streams = isinstance(y, list)
        exogs = ([batch_exog(batch, i) for i in range(len(y))] if streams
                 else [batch_exog(batch)])
        shared = (self.horizon_weight > 0 and not streams
                  and hasattr(self.model, "predict_window"))
        if shared:
            # One pass gives the one-step predictions over the context and the forecast after
            # it (a filter run once, not once per loss term); the one-step loss then covers
            # the context.
            context, target = y[:, : -self.horizon], y[:, -self.horizon :]
            one, fpred = call_predict_window(self.model, context, self.horizon,
                                             self.horizon_exog(exogs[0]))
            scored = hide_unscored(context, mask[:, : -self.horizon])
            out["nll_one_step"] = gaussian_nll(scored, one)
            loss = self.one_step_weight * out["nll_one_step"]
        elif self.one_step_weight > 0 or self.horizon_weight == 0:
            out["nll_one_step"] = self.one_step_nll(y if streams else [y],
                                                    mask if streams else [mask], exogs)
            loss = self.one_step_weight * out["nll_one_step"]
        else:  # one_step_weight=0: the one-step pass would only cost time
            loss = y.new_zeros(())
        if self.horizon_weight > 0 and not streams:
            if not shared:
                context, target = y[:, : -self.horizon], y[:, -self.horizon :]
                fpred = call_forecast(self.model, context, self.horizon, None,
                                      self.horizon_exog(exogs[0]))
            out["nll_horizon"] = gaussian_nll(target, fpred)
            out["mse_horizon"] = torch.nanmean((fpred.mean - target).square())
            if self.variance_loss == "detached":
                var_nll = gaussian_nll(target, fpred._replace(mean=fpred.mean.detach()))
                loss = loss + self.horizon_weight * (out["mse_horizon"] + var_nll)
            else:
                loss = loss + self.horizon_weight * out["nll_horizon"]
        out["loss"] = loss
        return out

    def _weight(self, batch: dict) -> float:
        """What this rank's loss averages: scored entries (streams) or windows (a batch)."""
        if isinstance(batch["y"], list):
            return float(sum(int((~torch.isnan(hide_unscored(y, m))).sum())
                             for y, m in zip(batch["y"], batch["mask"])))
        return float(len(batch["y"]))

    def _reduced(self, batch: dict) -> tuple[dict[str, Tensor], int]:
        """The batch's losses and the weight to log them with. In one process: the batch's
        own, weighted by its windows (1 for a stream batch, an epoch's only batch). Under DDP:
        the means over every rank's batch of this step (each without the samples its sampler
        repeats; a batch of repeats only weighs 0), the same on every rank, weighted by their
        global windows or scored entries - so Lightning's epoch mean is the mean over the
        epoch's samples, each counted once, and needs no averaging over ranks."""
        batch, real = without_repeats(batch)
        out = self.losses(batch)
        if self.trainer.world_size == 1:
            return out, 1 if isinstance(batch["y"], list) else len(batch["y"])
        out, total = global_means(out, self._weight(batch) if real else 0.0)
        return out, max(int(round(total)), 1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out, weight = self._reduced(batch)
        if not torch.isfinite(out["loss"]):
            raise NumericalError(
                f"the training loss became {out['loss'].item()} at epoch {self.current_epoch}; "
                "lower model.optimizer.lr, or check the data for extreme values"
            )
        # An optimizer such as L-BFGS calls this step several times per batch (every closure
        # evaluation, line-search trials included); the batch's loss is the first of them, the
        # loss at the parameters the optimizer step starts from (what ``optimizer.step``
        # returns), so that train/loss means the same for every optimizer.
        key = (self.global_step, batch_idx)
        if key == self._logged_step:
            return out["loss"]
        self._logged_step = key
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False,
                      on_step=False, on_epoch=True, batch_size=weight)
        # the bar shows the running mean of the epoch's batch losses (weighted as Lightning
        # weighs train/loss's epoch mean): at the end of an epoch it is that epoch's train/loss
        self._epoch_loss = (self._epoch_loss[0] + float(out["loss"].detach()) * weight,
                            self._epoch_loss[1] + weight)
        self.log("loss", self._epoch_loss[0] / self._epoch_loss[1], prog_bar=True,
                 on_step=True, on_epoch=False, batch_size=weight, logger=False)
        return out["loss"]

    def on_train_epoch_start(self) -> None:
        self._epoch_loss = (0.0, 0)

    def on_train_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            # DDP keeps the ranks' copies equal only if every rank takes the same steps; a copy
            # that drifted would make every later loss a mean over different models
            gap = replicas_differ([p for p in self.model.parameters() if p.requires_grad])
            if gap > 0:
                raise NumericalError(
                    f"after epoch {self.current_epoch} the ranks' copies of the model differ "
                    f"(by up to {gap:.3g}): DDP training went out of step; train on one "
                    "device (trainer.devices=1) and report this as a bug")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out, weight = self._reduced(batch)
        if self.trainer.sanity_checking:
            # the start's pass: its means are kept here (Lightning drops a sanity check's
            # metrics); weighted as Lightning weighs an epoch's mean
            for k, v in out.items():
                total, n = self._start_sums.get(f"val/{k}", (0.0, 0.0))
                self._start_sums[f"val/{k}"] = (total + float(v) * weight, n + weight)
            return
        self.log_dict({f"val/{k}": v for k, v in out.items()}, prog_bar=True, on_epoch=True,
                      batch_size=weight)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._keep_start()
            return
        if not self.restore_best:
            return
        value = self.trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(f"restore_best: no validation metric {self.monitor!r}; choose one of "
                             f"{sorted(k for k in self.trainer.callback_metrics if 'val/' in k)}")
        self._candidate(float(value), self.current_epoch)

    def _candidate(self, value: float, epoch: int) -> None:
        """Keep the current weights if ``value`` (of ``monitor``) is the best so far."""
        if value == value and (self.best_score is None or value < self.best_score):
            self.best_score, self.best_epoch = value, epoch
            self.best_state = {k: v.detach().clone()
                               for k, v in self.model.state_dict().items()}

    def _keep_start(self) -> None:
        """After the validation pass before training (validate_start): the start's metrics,
        and its weights as the first candidate (unless a resumed run restored a best one)."""
        sums, self._start_sums = self._start_sums, {}
        if not self.validate_start or not sums:
            return
        self.start_metrics = {k: total / max(n, 1e-300) for k, (total, n) in sums.items()}
        if not self.restore_best or self.best_state is not None:
            return
        if self.monitor not in self.start_metrics:
            raise ValueError(f"restore_best: no validation metric {self.monitor!r}; choose one "
                             f"of {sorted(self.start_metrics)}")
        self._candidate(self.start_metrics[self.monitor], -1)

    def on_fit_end(self) -> None:
        if self.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.best_state is not None:  # a resumed run still restores the best epoch
            checkpoint["tsssm_best"] = {"score": self.best_score, "epoch": self.best_epoch,
                                        "state": copy.copy(self.best_state)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = checkpoint.get("tsssm_best")
        if best is not None:
            self.best_score, self.best_state = best["score"], best["state"]
            self.best_epoch = best.get("epoch")

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        name = cfg["name"]
        if name == "lbfgs":
            params = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.LBFGS(params, lr=cfg["lr"], max_iter=cfg["max_iter"],
                                     line_search_fn="strong_wolfe")
        params = self._param_groups(cfg)
        if name == "adam":
            opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        decay = cfg.get("lr_decay", 1.0)
        if decay == 1.0:
            return opt
        schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def _param_groups(self, cfg: dict) -> list[dict]:
        """The optimizer's parameter groups: everything at lr, a hybrid's Kalman part at
        lr * kalman_lr (kalman_lr 0: frozen, left out of the optimizer and of backward)."""
        factor = float(cfg.get("kalman_lr", 1.0))
        kalman = self._kalman_parameters() if factor != 1.0 else []
        ids = {id(p) for p in kalman}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        trained = [p for p in kalman if p.requires_grad]
        if trained and factor > 0:
            groups.append({"params": trained, "lr": cfg["lr"] * factor})
        return groups

    def _kalman_parameters(self) -> list[Tensor]:
        part = getattr(self.model, "kalman_parameters", None)
        return list(part()) if callable(part) else []
