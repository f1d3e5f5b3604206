"""Typed schemas for every config group, registered with Hydra's ConfigStore.

Each YAML file in ``conf/`` names its schema in its defaults list, so Hydra rejects unknown keys
and wrongly typed values while composing; ``validate`` then checks ranges and cross-field rules
and raises :class:`tsssm.errors.ConfigError` naming the key and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from tsssm.errors import ConfigError


class Gaps(str, Enum):
    keep = "keep"  # report gaps, leave the rows as they are
    mask = "mask"  # insert the missing timestamps as NaN rows (models skip them)
    fill = "fill"  # insert the missing timestamps and forward-fill them
    time = "time"  # leave the rows as they are and give models the real time steps (dt)


class FutureInputs(str, Enum):
    known = "known"  # horizon forecasts get the inputs of the forecast rows (setpoints)
    unknown = "unknown"  # they get the context's inputs only: models hold the last one


class Fill(str, Enum):
    none = "none"  # missing values stay NaN (Kalman skips them, neural models mask them)
    forward = "forward"
    zero = "zero"


class Duplicates(str, Enum):
    error = "error"  # refuse a file with repeated timestamps
    first = "first"  # keep the first row of each timestamp
    last = "last"  # keep the last row of each timestamp
    mean = "mean"  # average the rows of each timestamp (a label is 1 if any row's is)


class Scaling(str, Enum):
    pooled = "pooled"  # one scaler fitted on the pooled training rows of every stream
    per_stream = "per_stream"  # each stream by its own training rows (SKAB's protocol)


class Protocol(str, Enum):
    skab = "skab"  # per file: first `train_rows` rows train, rest test
    ett = "ett"  # Informer's 12/4/4-month split
    fractions = "fractions"  # chronological train/val/test fractions


@dataclass
class DataConfig:
    _target_: str = MISSING
    name: str = MISSING
    #: directory holding the dataset's files (relative paths resolve against the working dir)
    root: str | None = None
    #: one file: the whole dataset for `data=csv`; for `tsssm score`, the stream to score
    path: str | None = None
    #: files under `root` (glob patterns allowed); empty means the dataset's default set
    files: list[str] = field(default_factory=list)
    #: files under `root` used only as extra (normal) training data
    extra_train_files: list[str] = field(default_factory=list)
    separator: str = ","
    time_column: str = "datetime"
    time_format: str | None = None
    #: channel columns; empty means every column except time and labels
    channels: list[str] = field(default_factory=list)
    label_column: str | None = None
    #: an optional 0/1 column of change points (SKAB's ``changepoint``): scored with NAB
    changepoint_column: str | None = None
    #: columns present in the files that are neither channels nor the label
    ignore_columns: list[str] = field(default_factory=list)
    protocol: Protocol = Protocol.fractions
    train_rows: int = 400
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    #: ETT: rows per hour (1 for ETTh, 4 for ETTm)
    rows_per_hour: int = 1
    scaler: Scaling = Scaling.pooled
    gaps: Gaps = Gaps.keep
    #: a step longer than this many median steps counts as a gap
    gap_factor: float = 3.0
    fill: Fill = Fill.none
    #: rows sharing a timestamp (e.g. the repeated hour of a daylight-saving change)
    duplicates: Duplicates = Duplicates.error
    #: sort rows by time instead of refusing a file whose rows are out of order
    sort: bool = False
    #: input columns (the u of dx/dt = A x + B u: setpoints, drive signals): models that use
    #: inputs get them (scaled like the channels, held between changes); others ignore them
    inputs: list[str] = field(default_factory=list)
    #: whether horizon forecasts may use the inputs of the rows they forecast
    future_inputs: FutureInputs = FutureInputs.known
    #: the data's seasonal period in rows (e.g. a day), for seasonal models and baselines
    seasonal_period: int | None = None
    #: context length: the rows a forecast sees before its origin (a training window is
    #: input_len + horizon rows)
    input_len: int = 96
    #: forecast horizon in rows
    horizon: int = 24
    #: stride of training windows
    stride: int = 1
    batch_size: int = 32
    #: stride of forecast-evaluation origins over val/test (1 = every window, the benchmarks'
    #: protocol)
    eval_stride: int = 1
    num_workers: int = 0


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | lbfgs
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: L-BFGS iterations per optimizer step (one step per epoch on full streams)
    max_iter: int = 20
    #: the learning rate is multiplied by this after every epoch (TSLib halves it: 0.5)
    lr_decay: float = 1.0
    #: hybrids: the learning rate of the Kalman part is lr times this (0: the Kalman part
    #: stays as fitted before training and gets no gradient)
    kalman_lr: float = 1.0


@dataclass
class ModelConfig:
    name: str = MISSING
    #: the nn.Module to build; n_channels is added from the data
    net: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    epochs: int = 10
    #: load a trained model instead of training: a checkpoint/bundle path or an MLflow run id
    checkpoint: str | None = None
    run_id: str | None = None


@dataclass
class KalmanNet:
    _target_: str = "tsssm.models.kalman.KalmanForecaster"
    components: list[str] = field(default_factory=lambda: ["level", "trend"])
    seasonal_period: int | None = None
    seasonal_kind: str = "trig"
    seasonal_harmonics: int | None = None
    ar_order: int = 1
    method: str = "sequential"
    dtype: str = "float64"
    #: a (practically) infinite prior variance on the level: forecasts shift with the context
    #: instead of being drawn toward the training level (used with a fitted prior)
    diffuse_level: bool = False


@dataclass
class KalmanModelConfig(ModelConfig):
    net: KalmanNet = field(default_factory=KalmanNet)
    #: mle: maximum likelihood by L-BFGS through the filter (Lightning); em: expectation-
    #: maximisation from smoother statistics (then em_polish L-BFGS evaluations);
    #: multistep: EM (em_iters) as the start, then the parameters and prior that minimise the
    #: mean squared forecast error over data.horizon steps from contexts of the input length
    #: on the training windows (exponential smoothing's "amse" criterion)
    fit: str = "mle"
    em_iters: int = 50
    #: EM / multistep: cut the training streams into segments of this many steps (each
    #: filtered from the prior; the E-step then costs the same however long the data); null:
    #: whole streams
    em_segment: int | None = None
    #: EM / multistep: also fit the prior (mean and covariance of the first state)
    em_prior: bool = False
    #: EM: L-BFGS evaluations of the exact likelihood after the EM iterations (0: none)
    em_polish: int = 0
    #: multistep: L-BFGS evaluations of the criterion
    multistep_iters: int = 200
    #: scale the forecast variance per channel and lead so that it equals the mean squared
    #: error of the training windows' forecasts (data.horizon leads)
    calibrate: bool = False


@dataclass
class VARKalmanNet:
    _target_: str = "tsssm.models.var_kalman.VARKalmanForecaster"
    #: VAR order p (lags of every channel in the state)
    order: int = 1
    #: white observation noise on top of the VAR (a VARMA(p, p)-like process)
    obs_noise: bool = True
    method: str = "sequential"
    dtype: str = "float64"


@dataclass
class PhysicalConfig:
    """A continuous-time model written out: matrices as lists of rows whose entries are numbers
    or expressions of the named parameters (see tsssm.kalman.physical). Used when A is set
    (then C, Qc, R and params are required)."""

    A: Any = None  # (n, n) drift
    C: Any = None  # (p, n) observation
    Qc: Any = None  # (n, n) diffusion of the state noise
    R: Any = None  # (p, p) observation noise covariance
    B: Any = None  # (n, k) how the inputs drive the states
    D: Any = None  # (p, k) feedthrough
    a: Any = None  # (n,) constant drift
    d: Any = None  # (p,) observation offset
    m0: Any = None  # (n,) prior mean of the first state (default: stationary or 0)
    P0: Any = None  # (n, n) its covariance (default: stationary or diffuse)
    #: name -> {init: x, positive: bool} (fitted) or {value: x} / a number (fixed)
    params: dict[str, Any] = field(default_factory=dict)
    #: name -> expression of the parameters, reported with a standard error (e.g. k/m)
    derived: dict[str, str] = field(default_factory=dict)


@dataclass
class KalmanCTNet:
    _target_: str = "tsssm.models.kalman_ct.KalmanCTForecaster"
    #: per-channel continuous-time components: level, trend, oscillator, ou
    components: list[str] = field(default_factory=lambda: ["level"])
    #: set by `tsssm train` from data.inputs
    n_inputs: int = 0
    #: components the inputs drive (default: oscillator and ou if present, else the level)
    inputs_drive: list[str] | None = None
    #: a direct gain from each input to the output as well
    feedthrough: bool = False
    #: a physical model instead of the components (one model over all channels; set its A)
    physical: PhysicalConfig = field(default_factory=PhysicalConfig)
    #: starting frequencies tried for an oscillator (its likelihood is multimodal)
    n_starts: int = 9
    prior_scale: float = 10.0
    dtype: str = "float64"


@dataclass
class VARKalmanModelConfig(ModelConfig):
    net: VARKalmanNet = field(default_factory=VARKalmanNet)


@dataclass
class KalmanCTModelConfig(ModelConfig):
    net: KalmanCTNet = field(default_factory=KalmanCTNet)
    #: mle: maximum likelihood by L-BFGS on the whole training streams, to convergence
    #: (model.optimizer.max_iter iterations at most), then standard errors
    fit: str = "mle"


@dataclass
class MambaNet:
    _target_: str = "tsssm.models.mamba_forecaster.MambaForecaster"
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    horizon: int = 24
    channel_mode: str = "mixing"
    patch_len: int = 1
    revin: bool = True
    dropout: float = 0.0
    scan_backend: str = "auto"
    #: horizon head: "last" (from the last encoder output) or "flatten" (from every patch of
    #: the last input_len context steps, PatchTST's head)
    head: str = "last"
    #: context steps the flatten head and the linear skip read
    input_len: int = 96
    #: RLinear's linear map from the normalised context to the horizon (needs head=flatten)
    linear_skip: bool = False
    head_dropout: float = 0.0
    #: steps per patch token of the flatten head's encoder
    forecast_patch_len: int = 16
    #: number of input channels (covariates); set by `tsssm train` from data.inputs
    n_inputs: int = 0


@dataclass
class MambaModelConfig(ModelConfig):
    net: MambaNet = field(default_factory=MambaNet)


@dataclass
class KalmanPart:
    """The structural Kalman model inside a hybrid (per channel; see KalmanNet)."""

    #: "seasonal" is used only when seasonal_period is set (the data's period)
    components: list[str] = field(default_factory=lambda: ["level", "seasonal"])
    seasonal_period: int | None = None
    seasonal_kind: str = "trig"
    seasonal_harmonics: int | None = 4
    ar_order: int = 1
    #: window: training windows (nothing missing, time-invariant part) filtered by a few
    #: batched ops (covariance doubling + one triangular solve), anything else sequentially;
    #: sequential: always step by step (same results)
    method: str = "window"
    dtype: str = "float64"
    #: a (practically) infinite prior variance on the level (with a fitted prior: forecasts
    #: shift with the context instead of being drawn toward the training level)
    diffuse_level: bool = False
    prior_scale: float = 10.0


@dataclass
class KalmanPartFit:
    """How a hybrid fits its Kalman part before training (on the training split; see
    KalmanModelConfig: the same fits as model.fit=em / multistep, contexts of input_len steps,
    the model's horizon, no variance calibration)."""

    #: none: moment estimates (then em_iters EM iterations on whole streams); em; multistep
    fit: str = "none"
    em_iters: int = 50
    #: cut the training streams into segments of this many steps (null: whole streams)
    em_segment: int | None = None
    #: also fit the prior (mean and covariance of the first state)
    em_prior: bool = False
    #: L-BFGS evaluations of the exact likelihood after EM
    em_polish: int = 0
    #: multistep: L-BFGS evaluations of the multi-step criterion
    multistep_iters: int = 200


@dataclass
class HybridNet:
    _target_: str = MISSING
    horizon: int = 24
    input_len: int = 96
    kalman: KalmanPart = field(default_factory=KalmanPart)
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    #: patch length of the horizon head's tokens
    patch_len: int = 16
    #: steps per token of the causal one-step encoder (1: terms for every step)
    step_patch_len: int = 1
    dropout: float = 0.0
    head_dropout: float = 0.0
    linear_skip: bool = True
    scan_backend: str = "auto"
    #: EM iterations fitting the Kalman part on the training streams before training (used
    #: when kalman_fit.fit is none)
    em_iters: int = 0
    #: fit the Kalman part before training as the Kalman model fits itself
    kalman_fit: KalmanPartFit = field(default_factory=KalmanPartFit)
    #: number of input channels (covariates); set by `tsssm train` from data.inputs
    n_inputs: int = 0


@dataclass
class ResidualNet(HybridNet):
    _target_: str = "tsssm.models.hybrid.KalmanMambaResidual"


@dataclass
class DeepSSMNet(HybridNet):
    _target_: str = "tsssm.models.hybrid.MambaKalmanFilter"


@dataclass
class HybridResidualModelConfig(ModelConfig):
    net: ResidualNet = field(default_factory=ResidualNet)


@dataclass
class HybridDSSMModelConfig(ModelConfig):
    net: DeepSSMNet = field(default_factory=DeepSSMNet)


@dataclass
class EnsembleNet:
    """Built by `tsssm train` once the members are trained (their net configs added)."""

    _target_: str = "tsssm.models.ensemble.Ensemble"
    #: the longest forecast the combination weights cover
    horizon: int = 24
    #: the members' net configs are built by the ensemble itself, not by Hydra
    _recursive_: bool = False
    _convert_: str = "all"


class EnsembleWeights(str, Enum):
    auto = "auto"  # chosen among the three on held-out validation windows
    one = "one"  # one weight vector for every lead time
    per_lead = "per_lead"  # one vector per lead time
    blocks = "blocks"  # one vector per block of lead times (model.blocks blocks)


@dataclass
class EnsembleModelConfig(ModelConfig):
    net: EnsembleNet = field(default_factory=EnsembleNet)
    #: the model configs combined (conf/model names); each is trained as
    #: `tsssm train <this command's overrides> model=<member>`, with its own config, optimiser
    #: and epochs, as an MLflow run nested under the ensemble's
    members: list[str] = field(
        default_factory=lambda: ["kalman_ett", "mamba", "hybrid_residual"])
    #: extra overrides of one member's training, each "MEMBER:KEY=VALUE", e.g.
    #: '["mamba:model.epochs=20", "mamba:trainer.max_time=600"]' (data keys stay the ensemble's)
    member_overrides: list[str] = field(default_factory=list)
    #: members trained at once (each in its own process when > 1)
    jobs: int = 1
    #: combination weights, fitted on the validation windows only: auto, one, per_lead, blocks
    weights: EnsembleWeights = EnsembleWeights.auto
    #: weights=blocks (and the blocks candidate of auto): blocks of lead times
    blocks: int = 8
    #: weights=auto: the share of the validation windows (the latest) held out to choose the
    #: scheme
    holdout: float = 0.3


class ScoreKind(str, Enum):
    nis = "nis"  # per-channel normalised innovation squared, averaged over channels
    nll = "nll"  # negative log predictive density per channel
    mahalanobis = "mahalanobis"  # joint: e' cov^-1 e / C with the model's full covariance


class WindowKind(str, Enum):
    mean = "mean"  # mean of the step scores over the window
    shift = "shift"  # squared norm of the window's summed whitened innovations (mean shifts)


class WindowAlign(str, Enum):
    trailing = "trailing"  # rows t-w+1..t: causal, as a live stream
    centered = "centered"  # rows around t: batch scoring only


@dataclass
class ReanchorConfig:
    """The trailing shift score's guarded moving reference (tsssm/anomaly/reanchor.py); off by
    default (alpha = rho = 0: the reference stays at the training rows' operating point)."""

    #: drift: on a row scored below gamma x the threshold the reference moves this fraction of
    #: the way towards the row's innovation (time constant 1 / alpha rows); 0: never drifts
    alpha: float = 0.0
    #: "clearly normal" rows for the drift: score below gamma x the threshold
    gamma: float = 0.5
    #: re-anchor once an alarm's score has stayed below rho x its peak for `hold` rows: the
    #: reference jumps to those rows' mean innovation; 0: never
    rho: float = 0.0
    hold: int = 20


@dataclass
class WindowConfig:
    #: rows per score window (1: the one-step score)
    size: int = 1
    kind: WindowKind = WindowKind.mean
    align: WindowAlign = WindowAlign.trailing
    #: kind=shift, align=trailing only: a reference that re-anchors after a fault (off by
    #: default); the threshold is fitted on the plain score, saved with the bundle
    reanchor: ReanchorConfig = field(default_factory=ReanchorConfig)


@dataclass
class ThresholdConfig:
    name: str = "quantile"  # quantile | max | pot | spot | dspot
    #: quantile rule: the q-quantile of the training scores
    q: float = 0.99
    #: max rule: this factor times the largest training score
    factor: float = 1.0
    #: pot/spot/dspot: the risk, the probability that a normal score exceeds the threshold
    risk: float = 1e-3
    #: pot/spot/dspot: the initial threshold (quantile of the training scores) above which the
    #: tail is fitted
    level: float = 0.98
    #: dspot: the number of preceding scores whose mean is subtracted (drift)
    depth: int = 10
    #: pooled: one threshold for every stream; per_stream: each stream's own, fitted on its own
    #: rows before the test split (SKAB's per-file protocol; for a new file, its first
    #: data.train_rows rows)
    scope: str = "pooled"
    #: which rows' scores fit it: train, val or train_val (the rows before the test split)
    fit_on: str = "train"


@dataclass
class TaskConfig:
    name: str = MISSING  # forecast | anomaly
    score: ScoreKind = ScoreKind.nis
    window: WindowConfig = field(default_factory=WindowConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    #: weight of the one-step NLL over every position (the rest is the horizon NLL)
    one_step_weight: float = 1.0
    horizon_weight: float = 1.0
    #: fit on normal rows only: the training rows labelled as anomalies (data.label_column) are
    #: left out of the threshold's fit and, as missing values, out of the model's fit
    #: (training and validation rows alike); false: every training row counts (a warning says
    #: how many are labelled)
    exclude_labelled_train: bool = False
    #: horizon loss: "joint" (Gaussian NLL) or "detached" (squared error for the mean, NLL with
    #: the mean's gradient stopped for the variance)
    variance_loss: str = "joint"
    #: validation metric for early stopping and restore_best (lower is better)
    monitor: str = "val/loss"
    #: evaluate and save the weights of the best-validated epoch, not the last
    restore_best: bool = False
    #: with restore_best: validate the weights training starts from too (a full validation
    #: pass before the first epoch), so the restored weights may be the starting ones
    validate_start: bool = True
    #: per-lead-time variance factor fitted on validation windows after training: "coverage"
    #: (the ±1.96 sd band covers 95% there), "nll" (maximum likelihood) or "none"
    calibration: str = "coverage"
    #: adaptive calibration of the horizon band in evaluation (tsssm.tasks.adaptive_calibration):
    #: each lead time's variance factor moves causally with the misses of the forecasts
    #: already resolved (online quantile tracking; the value is its step size gamma in the
    #: units of adaptive conformal inference, 0.005 in Gibbs & Candes 2021), carried from a
    #: stream's validation windows into its test windows; the unadapted metrics are logged as
    #: {split}/h{H}_*_static. 0: off
    adaptive_calibration: float = 0.0
    #: SKAB's change-point task: detection window (seconds; rows for integer time) to the right
    #: of each change point, for the NAB score
    nab_window: float = 60.0
    #: VUS-PR: the largest buffer (rows) of the range-based PR surface
    vus_max_buffer: int = 60
    #: classical comparators for `tsssm compare`
    baselines: list[str] = field(
        default_factory=lambda: ["last_value", "seasonal_naive", "ewma", "isolation_forest",
                                 "pca_t2q", "mset"]
    )


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    #: Lightning strategy: auto (one device), ddp (one process per device, see trainer=ddp)
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    #: overrides the model's `epochs` when set
    max_epochs: int | None = None
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    #: resume an interrupted training: "last" (the newest checkpoint of this same config and
    #: data) or a checkpoint path; a new MLflow run records which run it resumed
    resume: str | None = None
    #: write the resumable checkpoint every this many epochs
    checkpoint_every_n_epochs: int = 1
    #: ... or every this many optimizer steps instead (for long epochs)
    checkpoint_every_n_steps: int | None = None
    early_stopping_patience: int | None = None
    limit_train_batches: float | None = None
    #: stop training after this many seconds (then, as after the last epoch, the best-validated
    #: weights are restored, calibrated and evaluated); null: no limit
    max_time: float | None = None
    #: CPU threads torch splits each op over, for training and evaluation (null: torch's
    #: default, one per core). A small model's ops are too short to split: on a shared or
    #: 2-core machine 1 thread costs 3-5x fewer CPU-seconds per training step
    threads: int | None = None


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///tsssm_runs/mlflow.db"
    artifact_root: str = "tsssm_runs/artifacts"
    experiment: str = "tsssm"
    #: where scores, checkpoints and the model bundle are written before they are logged
    output_dir: str = "tsssm_runs"


@dataclass
class ScoreConfig:
    #: rows per batch when scoring (read, scored with the state carried, written)
    chunk_size: int = 100_000
    #: where the scores Parquet goes; default tsssm_runs/scores/<run id>.parquet (a folder,
    #: tsssm_runs/scores/<run id>/, when data.path is a folder or glob)
    output: str | None = None
    #: many files: local (worker processes) or dask (a Dask cluster; pip install tsssm[cluster])
    engine: str = "local"
    #: worker processes (local) or LocalCluster workers (dask); 0: one per CPU core; with
    #: score.device=cuda the GPUs the files are sharded over (0: every visible GPU)
    workers: int = 0
    #: a running Dask scheduler, e.g. tcp://host:8786 (default: a local cluster for the command)
    address: str | None = None
    #: where the model runs: cpu (default) or cuda
    device: str | None = None
    #: live: follow data.path (a CSV file that keeps growing) and print one line per new row
    #: until Ctrl-C (data.path=- reads standard input instead)
    follow: bool = False
    #: seconds between looks at a followed file
    follow_interval: float = 0.2
    #: scores with at most this many rows are also logged to MLflow (scores/); longer ones
    #: stay at score.output, named by the run's tsssm.scores tag
    artifact_max_rows: int = 5_000_000
    #: log the scored streams' figures (`tsssm run` turns it off: its train step has logged
    #: the same test split's figures already)
    figures: bool = True
    #: write each channel's additive share of the score (contrib:<channel> columns) beside
    #: the scores of a file scored in batches; false: the score alone (a smaller file)
    contributions: bool = True


@dataclass
class CompareConfig:
    #: trained models to compare: MLflow run ids or bundle folders; empty means the newest
    #: finished train run of each model on this dataset
    runs: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    #: models trained by `tsssm run` (names of conf/model options)
    models: list[str] = field(default_factory=lambda: ["kalman", "mamba"])


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    score: ScoreConfig = field(default_factory=ScoreConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    run_name: str | None = None
    #: the MLflow run this training is part of (set by model=ensemble for its members: their
    #: runs are nested under it)
    parent_run: str | None = None
    verbose: bool = False


def register_schemas() -> None:
    """Register the schemas the YAML files in conf/ extend, and the ``${tsssm_data:NAME}``
    resolver (a fetched dataset's folder in the cache, see tsssm.data.fetch)."""
    from tsssm.data.fetch import default_root

    OmegaConf.register_new_resolver("tsssm_data", default_root, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="model", name="kalman_schema", node=KalmanModelConfig)
    cs.store(group="model", name="mamba_schema", node=MambaModelConfig)
    cs.store(group="model", name="hybrid_residual_schema", node=HybridResidualModelConfig)
    cs.store(group="model", name="hybrid_dssm_schema", node=HybridDSSMModelConfig)
    cs.store(group="model", name="var_kalman_schema", node=VARKalmanModelConfig)
    cs.store(group="model", name="kalman_ct_schema", node=KalmanCTModelConfig)
    cs.store(group="model", name="ensemble_schema", node=EnsembleModelConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)


def _check(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {problem}")


_CHOICES = {
    "model.optimizer.name": ("adamw", "adam", "lbfgs"),
    "task.name": ("forecast", "anomaly"),
    "task.threshold.name": ("quantile", "max", "pot", "spot", "dspot"),
    "task.threshold.scope": ("pooled", "per_stream"),
    "task.threshold.fit_on": ("train", "val", "train_val"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "auto"),
    "task.variance_loss": ("joint", "detached"),
    "task.calibration": ("coverage", "nll", "none"),
}


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-field rules the type system cannot express."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _check(value in allowed, key, f"is {value!r}; use one of {', '.join(allowed)}")
    d = cfg.data
    for key in ("input_len", "horizon", "stride", "batch_size", "eval_stride", "train_rows"):
        _check(d[key] >= 1, f"data.{key}", f"must be a positive integer, got {d[key]}")
    _check(0 < d.train_fraction < 1, "data.train_fraction", "must lie in (0, 1)")
    _check(0 <= d.val_fraction < 1 - d.train_fraction + 1e-12 or d.protocol != "fractions",
           "data.val_fraction", "must be >= 0 and leave room for a test part")
    _check(d.gap_factor > 1, "data.gap_factor", "must exceed 1")
    _check(len(d.separator) == 1, "data.separator", f"must be one character, got {d.separator!r}"
           + ("; a ';' or '|' must be quoted for the shell and Hydra: 'data.separator=\";\"'"
              if not d.separator else ""))
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    inputs = list(OmegaConf.select(cfg, "data.inputs", default=[]) or [])
    _check(len(set(inputs)) == len(inputs), "data.inputs", f"names a column twice: {inputs}")
    both = sorted(set(inputs) & set(d.channels))
    _check(not both, "data.inputs", f"and data.channels both name {both}; a column is an "
           "output (channel) or an input, not both")
    m = cfg.model
    _check(m.epochs >= 1, "model.epochs", "must be >= 1")
    fit = OmegaConf.select(cfg, "model.fit", default="mle")
    _check(fit in ("mle", "em", "multistep"), "model.fit",
           f"is {fit!r}; use mle, em or multistep")
    continuous = str(OmegaConf.select(cfg, "model.net._target_", default="")).endswith(
        "KalmanCTForecaster")
    _check(not (continuous and fit != "mle"), "model.fit",
           f"is {fit!r}; the continuous-time model fits by maximum likelihood: use mle")
    _check(OmegaConf.select(cfg, "model.em_iters", default=1) >= 1, "model.em_iters",
           "must be >= 1")
    seg = OmegaConf.select(cfg, "model.em_segment", default=None)
    _check(seg is None or seg >= 2, "model.em_segment", f"must be >= 2 or null, got {seg}")
    for key in ("model.em_polish", "model.multistep_iters"):
        value = OmegaConf.select(cfg, key, default=0)
        _check(value >= 0, key, f"must be >= 0, got {value}")
    _check(m.optimizer.lr > 0, "model.optimizer.lr", "must be > 0")
    _check(0 < m.optimizer.lr_decay <= 1, "model.optimizer.lr_decay", "must lie in (0, 1]")
    _check(m.optimizer.kalman_lr >= 0, "model.optimizer.kalman_lr",
           f"must be >= 0 (0: the Kalman part is frozen), got {m.optimizer.kalman_lr}")
    part_fit = OmegaConf.select(cfg, "model.net.kalman_fit.fit", default="none")
    _check(part_fit in ("none", "em", "multistep"), "model.net.kalman_fit.fit",
           f"is {part_fit!r}; use none, em or multistep")
    if OmegaConf.select(cfg, "model.members") is not None:
        _check_ensemble(m)
    t = cfg.task
    _check(0 < t.threshold.q < 1, "task.threshold.q", "must lie in (0, 1)")
    _check(t.threshold.factor > 0, "task.threshold.factor", "must be > 0")
    _check(0 < t.threshold.level < 1, "task.threshold.level", "must lie in (0, 1)")
    _check(0 < t.threshold.risk < 1 - t.threshold.level or t.threshold.name not in
           ("pot", "spot", "dspot"), "task.threshold.risk",
           f"must lie in (0, 1 - task.threshold.level) = (0, {1 - t.threshold.level:g})")
    _check(t.threshold.depth >= 1, "task.threshold.depth", "must be >= 1")
    _check(t.window.size >= 1, "task.window.size", "must be >= 1")
    _check(0 <= t.adaptive_calibration < 1, "task.adaptive_calibration",
           "must lie in [0, 1): the step size of the adaptive band (0.005 as in Gibbs & Candes "
           f"2021; 0 turns it off), got {t.adaptive_calibration}")
    ra = t.window.reanchor
    from tsssm.anomaly.reanchor import ReanchorSpec  # its bounds, stated once

    bad = ReanchorSpec(ra.alpha, ra.gamma, ra.rho, ra.hold).problem()
    if bad is not None:
        _check(False, f"task.window.reanchor.{bad[0]}", f"{bad[1]}, got {getattr(ra, bad[0])}")
    if ra.alpha > 0 or ra.rho > 0:
        _check(option_value(t.window.kind) == "shift" and option_value(t.window.align)
               == "trailing", "task.window.reanchor",
               "moves the reference of the trailing shift score: it needs "
               "task.window.kind=shift and task.window.align=trailing")
        _check(t.threshold.name not in ("spot", "dspot"), "task.window.reanchor",
               f"needs a fixed threshold (quantile, max or pot); task.threshold.name is "
               f"{t.threshold.name!r}, which moves with the stream")
    _check(t.one_step_weight >= 0 and t.horizon_weight >= 0, "task.one_step_weight",
           "and task.horizon_weight must be >= 0")
    tr = cfg.trainer
    _check(tr.max_epochs is None or tr.max_epochs >= 1, "trainer.max_epochs", "must be >= 1")
    _check(tr.max_time is None or tr.max_time > 0, "trainer.max_time", "must be > 0 seconds")
    _check(tr.threads is None or tr.threads >= 1, "trainer.threads",
           "must be >= 1 (or null: torch's default)")
    _check(tr.devices >= 1, "trainer.devices", "must be >= 1")
    _check(tr.checkpoint_every_n_epochs >= 1, "trainer.checkpoint_every_n_epochs", "must be >= 1")
    _check(tr.checkpoint_every_n_steps is None or tr.checkpoint_every_n_steps >= 1,
           "trainer.checkpoint_every_n_steps", "must be >= 1 (or null: every n epochs)")
    _check(tr.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
    _check(tr.strategy in ("auto", "ddp", "ddp_find_unused_parameters_true"), "trainer.strategy",
           f"is {tr.strategy!r}; use auto or ddp")
    _check(cfg.score.chunk_size >= 1, "score.chunk_size", "must be >= 1")
    _check(cfg.score.engine in ("local", "dask"), "score.engine",
           f"is {cfg.score.engine!r}; use local or dask")
    _check(cfg.score.workers >= 0, "score.workers", "must be >= 0 (0: one per CPU core)")
    _check(cfg.score.follow_interval > 0, "score.follow_interval", "must be > 0")
    _check(cfg.score.device in (None, "cpu", "cuda") or str(cfg.score.device).startswith(
        "cuda:"), "score.device", f"is {cfg.score.device!r}; use cpu or cuda")


def conf_dir() -> Path:
    """The packaged config folder (conf/ groups)."""
    return Path(__file__).resolve().parent / "conf"


def model_options() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def _check_ensemble(m: DictConfig) -> None:
    members = list(m.members)
    options = [o for o in model_options() if o != m.name]
    _check(bool(members), "model.members", "is empty; list the model configs to combine, e.g. "
           "model.members=[kalman_ett,mamba]")
    for name in members:
        _check(name in options, "model.members",
               f"names {name!r}, which is not a model config; choose from: {', '.join(options)}")
    _check(len(set(members)) == len(members), "model.members", f"names a model twice: {members}")
    for item in m.member_overrides:
        name, sep, o = str(item).partition(":")
        _check(bool(sep) and name in members, "model.member_overrides",
               f"has {item!r}; write MEMBER:KEY=VALUE with MEMBER one of {members}")
        key = o.lstrip("+~").split("=")[0]
        _check("=" in o and not key.startswith("data.") and
               key not in ("data", "experiment", "parent_run", "model"),
               "model.member_overrides",
               f"has {item!r}; give KEY=VALUE overrides of the member's own training (its "
               "model, trainer, task keys): every member reads the ensemble's data")
    _check(1 <= m.jobs <= 32, "model.jobs", f"must lie in 1..32, got {m.jobs}")
    _check(m.blocks >= 1, "model.blocks", f"must be >= 1, got {m.blocks}")
    _check(0 <= m.holdout < 1, "model.holdout", f"must lie in [0, 1), got {m.holdout}")


def option_value(option: Any) -> str:
    """An enum-typed config value (or a plain string) as its string."""
    return str(getattr(option, "value", option))


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (enums as their values)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif is_dataclass(value):
            out.update(flatten({f.name: getattr(value, f.name) for f in fields(value)}, name + "."))
        else:
            out[name] = value
    return out
