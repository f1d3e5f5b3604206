"""`tsssm train`: fit a forecaster on a dataset's training split, evaluate it, fit the anomaly
threshold, and record everything (and the model bundle) in one MLflow run."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from tsssm import checkpoints
from tsssm.bundle import Bundle, build_net, save_bundle
from tsssm.commands.common import (
    MAX_FIGURES,
    evaluation_options,
    figures_for_stream,
    forecast_frame,
    format_table,
    interval_frame,
    labelled_training_rows,
    save_figures,
    score_spec,
    seed_everything,
    staging,
    stream_frame,
    write_parquet,
)
from tsssm.config import flatten, option_value, to_plain
from tsssm.data.datamodule import SeriesDataModule
from tsssm.data.datasets import PreparedData, build_dataset
from tsssm.distributed import NullTracker, is_distributed, is_secondary, launch_workers_as
from tsssm.errors import ConfigError, ModelError
from tsssm.models.base import Exog, uses_exog
from tsssm.models.ensemble import ENSEMBLE_TARGET
from tsssm.tasks.calibrate import calibrate_horizon_variance
from tsssm.tasks.callbacks import (
    InnerIterations,
    InterruptWatch,
    RngState,
    StopWhenConverged,
    Throughput,
    TrackerCallback,
)
from tsssm.tasks.checkpoint_io import AtomicCheckpointIO
from tsssm.tasks.evaluate import Evaluation, evaluate
from tsssm.tasks.forecast import ForecastTask
from tsssm.tracking import Tracker

log = logging.getLogger("tsssm")


def _accelerator(name: str) -> str:
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu, but no CUDA device is visible; use trainer=cpu")
    return "gpu" if name == "cuda" else name


def net_config(cfg: DictConfig, data: PreparedData) -> dict:
    """The net's config as built and saved: with the number of inputs where the net takes
    inputs (``n_inputs``); a net that does not is told nothing and the inputs are unused."""
    net_cfg = to_plain(cfg.model.net)
    if "n_inputs" in net_cfg:
        net_cfg["n_inputs"] = len(data.inputs)
    elif data.inputs:
        log.warning("model=%s does not use inputs: data.inputs=%s are read but not given to it",
                    cfg.model.name, data.inputs)
    return net_cfg


def fits_itself(cfg: DictConfig) -> bool:
    """Whether the model fits by its own maximum likelihood (continuous-time Kalman), not
    through the Lightning loop."""
    return str(OmegaConf.select(cfg, "model.net._target_", default="")).endswith(
        "KalmanCTForecaster")


def _prepare_net(net, cfg: DictConfig, data: PreparedData) -> None:
    """Tell the net the data's scaling (physical models) and initialise it from the data."""
    if getattr(net, "physical", None) is not None:
        if option_value(cfg.data.scaler) == "per_stream":
            raise ConfigError("model.net.physical is in physical units and needs one scaling "
                              "for all streams: set data.scaler=pooled")
        sc, isc = data.scaler, data.input_scaler
        net.set_units(sc.mean, sc.std, None if isc is None else isc.mean,
                      None if isc is None else isc.std)
    if hasattr(net, "initialize"):
        if uses_exog(net):
            net.initialize(data.padded("train"), exog=Exog(*data.padded_exog("train")))
        else:
            net.initialize(data.padded("train"))


def fit_model(cfg: DictConfig, data: PreparedData, tracker: Tracker,
              resume: checkpoints.Resume | None = None,
              net_cfg: dict | None = None) -> torch.nn.Module:
    """Train the configured net through Lightning (from ``resume``'s checkpoint if given,
    checkpointing into this run's folder); returns it in eval mode."""
    net = build_net(net_cfg or net_config(cfg, data), len(data.channels))
    _prepare_net(net, cfg, data)
    if net.training_input == "streams" and cfg.trainer.accelerator == "cpu":
        # A filter over whole streams is a long sequence of tiny ops: a second thread only adds
        # synchronisation (10x slower per op where cores are shared).
        torch.set_num_threads(1)
    dm = SeriesDataModule(data, net.training_input, cfg.data.input_len, cfg.data.horizon,
                          cfg.data.stride, cfg.data.batch_size, cfg.data.num_workers,
                          eval_stride=cfg.data.eval_stride, exog=uses_exog(net),
                          seed=cfg.seed)
    if OmegaConf.select(cfg, "model.fit", default="mle") in ("em", "multistep"):
        return fit_by_em(cfg, net, dm, tracker)
    if hasattr(net, "identify"):
        return fit_by_identification(cfg, net, dm, tracker)
    optimizer = to_plain(cfg.model.optimizer)
    task = ForecastTask(net, optimizer, horizon=cfg.data.horizon,
                        one_step_weight=cfg.task.one_step_weight,
                        horizon_weight=cfg.task.horizon_weight,
                        variance_loss=cfg.task.variance_loss, monitor=cfg.task.monitor,
                        restore_best=cfg.task.restore_best,
                        future_inputs=option_value(cfg.data.future_inputs),
                        validate_start=cfg.task.validate_start)
    every_steps = cfg.trainer.checkpoint_every_n_steps
    watch = InterruptWatch()
    callbacks: list = [
        # one resumable checkpoint per run, overwritten (atomically) as training goes on; saved
        # at the end of the epoch, after validation and after the epoch's metrics are logged
        # (checkpoint callbacks run last), so a resumed run's copied history has no hole
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoints.checkpoint_dir(cfg.tracking.output_dir, tracker.run_id),
            filename=Path(checkpoints.LAST).stem, monitor=None, save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False, every_n_train_steps=every_steps,
            every_n_epochs=None if every_steps else cfg.trainer.checkpoint_every_n_epochs),
        TrackerCallback(tracker),
        Throughput(tracker),
        RngState(),
        InnerIterations(),
        StopWhenConverged(),
        watch,
    ]
    has_val = dm.has_val()
    # the starting weights are a candidate for the restored ones: a full validation pass (the
    # trainer's sanity check) before the first epoch scores them (a resumed run has its best
    # weights, the start included, in its checkpoint)
    validate_start = bool(cfg.task.validate_start and cfg.task.restore_best and has_val
                          and resume is None)
    if cfg.trainer.early_stopping_patience and has_val:
        callbacks.append(L.pytorch.callbacks.EarlyStopping(
            task.monitor, patience=cfg.trainer.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs or cfg.model.epochs,
        accelerator=_accelerator(cfg.trainer.accelerator),
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        gradient_clip_val=None if optimizer["name"] == "lbfgs" else cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
        default_root_dir=str(Path(cfg.tracking.output_dir)),
        limit_train_batches=cfg.trainer.limit_train_batches,
        max_time=None if cfg.trainer.max_time is None else timedelta(
            seconds=float(cfg.trainer.max_time)),
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=-1 if validate_start else 0,
        plugins=[AtomicCheckpointIO()],
    )
    ckpt = None if resume is None else str(resume.path)
    try:
        # rank 0 of a DDP fit launches the other ranks as `tsssm _ddp-worker` (tsssm.distributed)
        with launch_workers_as(cfg, tracker.run_id, ckpt) if is_distributed(cfg.trainer) \
                else nullcontext():
            # weights_only: resuming unpickles nothing but tensors and plain containers
            trainer.fit(task, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    except SystemExit:
        if watch.interrupted:  # Lightning's sys.exit(1) for Ctrl-C / SIGTERM
            raise KeyboardInterrupt from None
        raise
    except MisconfigurationException as err:
        # e.g. trainer.limit_train_batches=0.2 of a model trained on whole streams (one batch
        # an epoch): Lightning's own words, as a configuration error instead of an internal one
        if "limit_train_batches" in str(err):
            raise ConfigError(
                f"trainer.limit_train_batches={cfg.trainer.limit_train_batches} leaves no "
                "training batch (a model trained on whole streams has one batch an epoch); "
                "give a fraction that keeps at least one batch, a count, or leave it unset"
            ) from None
        raise ConfigError(f"trainer: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        if resume is not None and "state_dict" in str(err):
            raise ModelError(f"trainer.resume: {resume.path} does not fit this model "
                             f"({str(err).splitlines()[0]})") from err
        raise
    if task.start_metrics:  # the starting weights' validation (validate_start)
        tracker.log_metrics({f"val/start_{k.split('/', 1)[1]}": v
                             for k, v in task.start_metrics.items()})
    if task.best_epoch is not None:  # -1: the starting weights were kept
        tracker.log_metrics({"val/best_epoch": float(task.best_epoch)})
        log.info("restored the weights of %s (%s %.4f)", "the start (before training)"
                 if task.best_epoch < 0 else f"epoch {task.best_epoch}", task.monitor,
                 task.best_score)
    # Lightning hands the model back on the CPU; evaluate on the training device (the bundle
    # is saved from CPU copies of the weights).
    net = task.model.to(trainer.strategy.root_device).eval()
    calibrate(cfg, net, data, tracker)
    return net


def calibrate(cfg: DictConfig, net, data: PreparedData, tracker: Tracker) -> None:
    """Fit the horizon-variance factors on the validation windows (task.calibration)."""
    method = option_value(cfg.task.calibration)
    if method == "none":
        return
    scale = calibrate_horizon_variance(net, data, cfg.data.input_len,
                                       cfg.data.horizon, cfg.data.eval_stride, method,
                                       option_value(cfg.data.future_inputs))
    if scale is not None:
        tracker.log_metrics({"val/variance_scale_first": float(scale[0]),
                             "val/variance_scale_last": float(scale[-1])})


def fit_by_em(cfg: DictConfig, net, dm: SeriesDataModule, tracker: Tracker):
    """model.fit=em / multistep: closed-form EM on the training streams (no gradients, no
    Lightning loop), optionally polished by L-BFGS, then (multistep) the multi-step criterion
    and (model.calibrate) the forecast-variance calibration, all on the training split. The
    log-likelihood of every EM iteration is logged as train/loglik, the criterion of every
    multi-step evaluation as train/multistep_mse, the fitting time as train/fit_s."""
    from tsssm.models.kalman import KalmanForecaster, fit_forecaster

    m = cfg.model
    if not isinstance(net, KalmanForecaster):
        raise ConfigError(f"model.fit={m.fit} needs the Kalman model (model=kalman...)")
    streams = next(iter(dm.train_dataloader()))["y"]  # [(B_k, T_k, C)]
    report = fit_forecaster(
        net, streams, fit=m.fit, em_iters=m.em_iters, em_segment=m.em_segment,
        em_prior=m.em_prior, em_polish=m.em_polish, multistep_iters=m.multistep_iters,
        calibrate=m.calibrate, context=cfg.data.input_len,
        horizon=cfg.data.horizon)
    for i, loglik in enumerate(report.loglik):
        tracker.log_metrics({"train/loglik": loglik}, step=i)
    for i, value in enumerate(report.multistep_mse):
        tracker.log_metrics({"train/multistep_mse": value}, step=i)
    tracker.log_metrics({"train/fit_s": report.seconds})
    log.info("EM: %d steps, log-likelihood %.2f -> %.2f", len(report.loglik) - 1,
             report.loglik[0], report.loglik[-1])
    if report.multistep_mse:
        log.info("multi-step criterion: %.4f -> %.4f", report.multistep_mse[0],
                 report.multistep_mse[-1])
    log.info("fitted in %.1f s", report.seconds)
    return net.eval()


def training_streams(dm: SeriesDataModule) -> list[tuple[torch.Tensor, Exog | None]]:
    """The whole training streams as [(y (B_k, T_k, C), Exog)] (one entry per length)."""
    batch = next(iter(dm.train_dataloader()))
    us, dts = batch.get("u"), batch.get("dt")
    return [(y, Exog(None if us is None else us[i], None if dts is None else dts[i]))
            for i, y in enumerate(batch["y"])]


def fit_by_identification(cfg: DictConfig, net, dm: SeriesDataModule, tracker: Tracker):
    """Models that fit themselves by maximum likelihood on the whole training streams
    (continuous-time Kalman): L-BFGS to convergence; train/loglik per evaluation, train/loss
    the final negative log-likelihood per observation."""
    streams = training_streams(dm)
    history = net.identify(streams, max_iter=cfg.model.optimizer.max_iter)
    for i, loglik in enumerate(history):
        tracker.log_metrics({"train/loglik": loglik}, step=i)
    n_obs = sum(int((~torch.isnan(y)).sum()) for y, _ in streams)
    if history:
        tracker.log_metrics({"train/loss": -history[-1] / max(n_obs, 1)})
        log.info("maximum likelihood: %d evaluations, log-likelihood %.2f -> %.2f",
                 len(history), history[0], history[-1])
    return net.eval()


def log_parameters(net, data: PreparedData, dm_streams, tracker: Tracker, folder: Path
                   ) -> list[dict]:
    """The fitted parameters with standard errors: metrics fit/<channel>.<parameter>[_se],
    a table (tables/parameters.md and .parquet), and the rows for the summary."""
    rows = net.parameter_report(dm_streams, channels=data.channels, inputs=data.inputs)
    metrics = {}
    for r in rows:
        key = f"fit/{r['channel']}.{r['parameter']}"
        metrics[key] = r["estimate"]
        if r["se"] == r["se"]:  # no metric for an unidentified one (NaN)
            metrics[key + "_se"] = r["se"]
    tracker.log_metrics(metrics)
    table = format_table(rows, ["channel", "parameter", "estimate", "se"])
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    (folder / "tables" / "parameters.md").write_text(
        "# fitted parameters (maximum likelihood; se: asymptotic standard error)\n\n"
        f"```\n{table}\n```\n")
    write_parquet(pl.DataFrame(rows), folder / "tables" / "parameters.parquet")
    return rows


def log_evaluation(cfg: DictConfig, net, data: PreparedData, tracker: Tracker, folder: Path,
                   title: str) -> Evaluation:
    """Evaluate on every split, log the metrics, and stage scores, forecasts and figures."""
    ev = evaluate(net, data, context=cfg.data.input_len, horizon=cfg.data.horizon,
                  eval_stride=cfg.data.eval_stride, chunk_size=cfg.score.chunk_size,
                  future_inputs=option_value(cfg.data.future_inputs),
                  exclude_labelled=cfg.task.exclude_labelled_train,
                  **evaluation_options(cfg.task))
    tracker.log_metrics(ev.metrics)
    for name, curve in ev.by_lead.items():  # step = lead time 1..H
        tracker.log_series(name, curve, first_step=1)
    frames, fc_frames, intervals, figures = [], [], [], []
    scored = [(p, pr, t, f) for p, pr, t, f in zip(data.parts, ev.preds, ev.thresholds, ev.flags)
              if p.split is not None]
    for i, (p, pr, threshold, flags) in enumerate(scored):
        rows = (p.rows("train")[0], p.rows("test")[1])
        frames.append(stream_frame(p, pr, flags, rows, threshold).with_columns(
            pl.Series("split", _split_names(p, rows))))
        intervals.append(interval_frame(p, pr, flags, p.rows("test")))
        fc_frames.append(forecast_frame(p, pr, p.rows("test")))
        if i < MAX_FIGURES:
            figures += figures_for_stream(p, pr, threshold, flags, p.rows("test"), title)
    save_figures(figures, folder / "figures", f"{title}: test split")
    if frames:
        write_parquet(pl.concat(frames), folder / "scores" / "scores.parquet")
        write_parquet(pl.concat(intervals), folder / "scores" / "intervals.parquet")
        write_parquet(pl.concat(fc_frames), folder / "forecasts" / "test_one_step.parquet")
    return ev


def _split_names(part, rows) -> list[str]:
    names = np.empty(rows[1] - rows[0], dtype=object)
    for split in ("train", "val", "test"):
        a, b = part.rows(split)
        names[a - rows[0] : b - rows[0]] = split
    return names.tolist()


def train(cfg: DictConfig, overrides: list[str] | None = None) -> str:
    """Run `tsssm train`; returns the MLflow run id. ``overrides``: the command line's (an
    ensemble composes its members' trainings from them)."""
    if is_ensemble(cfg):
        from tsssm.commands.ensemble import train_ensemble

        return train_ensemble(cfg, overrides)
    seed_everything(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    if is_secondary():  # a rank > 0 started by an external launcher: its part of the fit only
        dataset = build_dataset(cfg.data)
        files = [*dataset.files(), *dataset.extra_train_files()]
        resume = checkpoints.find_resume(cfg.trainer.resume, cfg.tracking.output_dir,
                                         checkpoints.fingerprint(cfg, files))
        fit_model(cfg, dataset.load(), NullTracker(), resume)
        return ""
    tracker = Tracker.from_config(cfg.tracking)
    with tracker.start(*run_identity(cfg)) as run:
        log.info("tsssm train: MLflow run %s (%s)", run.run_id, tracker.uri)
        dataset = build_dataset(cfg.data)
        data = dataset.load()
        resume = start_checkpoints(cfg, dataset, tracker)
        for note in data.gap_notes:
            log.info(note)
        net_cfg = net_config(cfg, data)
        # normal rows only: the labelled anomalies of the training rows become missing values,
        # which every model skips (the Kalman filter) or masks (Mamba)
        fit_data = data.without_labelled() if labelled_training_rows(cfg.task, data) else data
        try:
            net = fit_model(cfg, fit_data, tracker, resume, net_cfg)
        except KeyboardInterrupt as err:
            # tells the CLI whether `trainer.resume=last` has something to continue from
            ckpt = checkpoints.checkpoint_dir(cfg.tracking.output_dir, run.run_id) / "last.ckpt"
            err.tsssm_checkpoint = ckpt if ckpt.exists() else None  # type: ignore[attr-defined]
            raise
        with staging(cfg.tracking.output_dir, run.run_id) as folder:
            params = None
            if hasattr(net, "parameter_report"):
                dm = SeriesDataModule(data, net.training_input, cfg.data.input_len,
                                      cfg.data.horizon, cfg.data.stride, cfg.data.batch_size,
                                      exog=uses_exog(net))
                params = log_parameters(net, data, training_streams(dm), tracker, folder)
            ev = log_evaluation(cfg, net, data, tracker, folder,
                                f"{cfg.model.name} on {cfg.data.name}")
            model_dir = publish(cfg, net, net_cfg, data, ev, tracker, folder)
        print_summary(cfg, run.run_id, ev.metrics, model_dir, tracker, params,
                      inputs=list(data.inputs) if uses_exog(net) else [])
        return run.run_id


def is_ensemble(cfg: DictConfig) -> bool:
    """Whether the configured model is a combination of trained members (model=ensemble)."""
    return OmegaConf.select(cfg, "model.net._target_", default="") == ENSEMBLE_TARGET


def run_identity(cfg: DictConfig) -> tuple[str, str, dict, dict]:
    """(run name, command, params, tags) of a train run; a member of an ensemble is tagged
    with its parent run, which nests it under that run in MLflow."""
    params = flatten(to_plain(cfg))
    name = cfg.run_name or f"train-{cfg.model.name}-{cfg.data.name}"
    tags = {"tsssm.model": cfg.model.name, "tsssm.data": cfg.data.name}
    if cfg.parent_run:
        tags.update({"mlflow.parentRunId": cfg.parent_run, "tsssm.parent": cfg.parent_run})
    return name, "train", params, tags


def publish(cfg: DictConfig, net, net_cfg: dict, data: PreparedData, ev: Evaluation,
            tracker: Tracker, folder: Path) -> Path:
    """Save the bundle, log the staged artifacts, and publish the bundle to
    ``<output_dir>/models/<run id>`` (last, in one rename: a run that fails leaves no bundle
    behind). Returns the published folder."""
    bundle = Bundle(
        model=net, net_config=net_cfg, model_name=cfg.model.name,
        channels=data.channels, scaler=data.scaler,
        per_stream_scaling=cfg.data.scaler == "per_stream", threshold=ev.threshold,
        score_kind=option_value(cfg.task.score),
        data_config=to_plain(cfg.data),
        score=score_spec(cfg.task).to_dict(),
        threshold_scope=cfg.task.threshold.scope,
        inputs=list(data.inputs), input_scaler=data.input_scaler,
    )
    staged = save_bundle(bundle, folder / "model")
    for sub in ("scores", "forecasts", "figures", "tables"):
        if (folder / sub).exists():
            tracker.log_dir(folder / sub, sub)
    tracker.log_dir(staged, "model")
    model_dir = Path(cfg.tracking.output_dir) / "models" / tracker.run_id
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, model_dir)
    return model_dir


#: fitted parameters shown in the summary (all of them are in tables/parameters.md)
MAX_PARAMETER_LINES = 12


def headline_keys(task: str, horizon: int) -> list[str]:
    """The metrics a run is judged by, most important first: the benchmark's own."""
    h = f"test/h{horizon}_"
    forecast = [h + k for k in ("mse", "mae", "crps", "coverage95")]
    detection = ["test/f1", "test/far", "test/mar", "test/auc_pr", "test/vus_pr",
                 "test/nab_standard"]
    return forecast + detection if task == "forecast" else detection + forecast


def start_checkpoints(cfg: DictConfig, dataset, tracker: Tracker) -> checkpoints.Resume | None:
    """Fingerprint this training into its run's checkpoint folder and find the checkpoint
    ``trainer.resume`` asks for; a resumed run is tagged with the run it continues and gets
    that run's per-epoch metrics up to the checkpoint."""
    if cfg.trainer.resume is not None and OmegaConf.select(cfg, "model.fit") == "em":
        raise ConfigError("trainer.resume: model.fit=em trains without checkpoints; run it "
                          "again without trainer.resume")
    if cfg.trainer.resume is not None and fits_itself(cfg):
        raise ConfigError(f"trainer.resume: model={cfg.model.name} fits by maximum likelihood "
                          "in one pass, without checkpoints; run it again without "
                          "trainer.resume")
    files = [*dataset.files(), *dataset.extra_train_files()]
    fp = checkpoints.fingerprint(cfg, files)
    resume = checkpoints.find_resume(cfg.trainer.resume, cfg.tracking.output_dir, fp)
    checkpoints.write_fingerprint(
        checkpoints.checkpoint_dir(cfg.tracking.output_dir, tracker.run_id), fp, tracker.run_id)
    if resume is not None:
        tracker.set_tags({"tsssm.resumed_from": resume.run_id,
                          "tsssm.resumed_checkpoint": str(resume.path),
                          "tsssm.resumed_after_epoch": str(resume.epoch)})
        tracker.copy_history(resume.run_id, ("train/", "val/"), resume.epoch)
        log.info("resuming run %s after epoch %d from %s", resume.run_id, resume.epoch,
                 resume.path)
    return resume


def print_summary(cfg, run_id, metrics, model_dir, tracker, params: list[dict] | None = None,
                  inputs: list[str] | None = None) -> None:
    keys = [k for k in headline_keys(cfg.task.name, cfg.data.horizon) if k in metrics]
    shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
    print(f"trained {cfg.model.name} on {cfg.data.name} (input {cfg.data.input_len}, horizon "
          f"{cfg.data.horizon}): {shown}")
    if inputs:
        known = option_value(cfg.data.future_inputs) == "known"
        print(f"  inputs {inputs}: horizon forecasts " + (
            "use the known future inputs (data.future_inputs=known)" if known else
            "hold the last input: future inputs unknown (data.future_inputs=unknown)"))
    if params:
        print("  fitted parameters (estimate +- standard error):")
        for r in params[:MAX_PARAMETER_LINES]:
            se = f" +- {r['se']:.4g}" if r["se"] == r["se"] else " (not identified)"
            print(f"    {r['channel']}.{r['parameter']} = {r['estimate']:.6g}{se}")
        if len(params) > MAX_PARAMETER_LINES:
            print(f"    ... {len(params) - MAX_PARAMETER_LINES} more in the run's "
                  "tables/parameters.md")
    print(f"  model bundle: {model_dir}")
    print(f"  MLflow run {run_id} in {tracker.uri} (experiment '{tracker.experiment}')")
