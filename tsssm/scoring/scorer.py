"""Score one stream incrementally with a trained model: a chunk of rows, or a single sample.

A :class:`Scorer` holds a loaded model bundle (tsssm.bundle), the scaler it applies, the fitted
threshold, and the model's recurrent state, so a stream fed in pieces of any size - a file read in
row batches, or a live sensor sample by sample - gets exactly the scores and flags of the whole
stream scored at once (``tsssm score``). Work and memory per row are constant: nothing about the
stream's past is kept but the model's state.

It works with any forecaster of the tsssm.models.base.Forecaster protocol (``one_step(y, state)``
with chunked calls equal to one call). For the Kalman forecaster on the CPU it runs the filter in
numpy (tsssm.scoring.kalman_steady): a single live sample then costs a few microseconds instead
of the ~100 torch ops of a torch step.

Per-stream scaling (SKAB's protocol, ``bundle.per_stream_scaling``): a stream is scaled by its own
first ``train_rows`` rows, as in training. Those rows are held until the stream has more rows than
that (as batch scoring requires), then scored together; a stream that ends first is scaled by the
training scaler (:meth:`Scorer.finish`), again as in batch scoring.

Any score the bundle was trained with streams (tsssm.scoring.stream_scores): the one-step NIS/NLL,
the joint Mahalanobis score with the model's full predictive covariance, windowed scores
(``task.window``: a trailing window's score comes with its row; a centered window's
``window // 2`` rows later, from :meth:`Scorer.update_many` - :meth:`Scorer.update` is causal
and refuses it), per-channel contributions (``contributions=True``), streaming thresholds (SPOT)
and per-stream thresholds (the bundle's rule refitted on the stream's own first ``train_rows``
scores, which are held until then, as per-stream scaling holds its rows).

    scorer = Scorer.load("tsssm_runs/models/<run id>")   # or an MLflow run id
    score, flag = scorer.update([0.1, 2.3, 4.5])        # one sample, the model's channel order
    batch = scorer.update_many(rows)                     # (n, C) rows -> ScoredRows

On a CUDA device :meth:`Scorer.submit` queues a batch's work on the GPU (copy in, scaling, model,
scores, copy back) and returns at once; its ``result()`` waits. A caller that submits batch k + 1
before it collects batch k (``tsssm.scoring.files.score_file``) keeps the GPU busy while the host
prepares the next batch and writes the last one. The finiteness checks are then made on the
scores that come back (a non-finite input or model output makes its row's score non-finite),
with the same messages, naming the row.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsssm.anomaly.scores import (
    MIN_VAR,
    SCORE_KINDS,
    ScoreSpec,
    StepTerms,
    anomaly_scores,
    check_finite,
    step_terms,
)
from tsssm.bundle import Bundle
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ConfigError, DataError, ModelError, NumericalError
from tsssm.models.base import Gaussian
from tsssm.scoring.stream_scores import ScoredRows, StreamScores, concat_rows, empty_rows

log = logging.getLogger("tsssm")

#: rows per model call: longer chunks are split (bounds the model's working memory)
MAX_ROWS_PER_CALL = 65_536
#: rows per model call on a GPU (the per-call overhead is large, the memory too)
GPU_ROWS_PER_CALL = 1 << 20
#: rows per call of the numpy Kalman engine: its temporaries then stay in the CPU's cache
#: (measured on 8 channels: 4096 rows ~1.7x faster a row than 65536 or 8192)
NUMPY_ROWS_PER_CALL = 4096

_HALF_LOG_2PI = np.float32(0.5 * math.log(2.0 * math.pi))
#: a small array's sum without ndarray.sum's Python wrapper (the live path's checks)
_SUM = np.add.reduce


class PendingRows:
    """The scores of rows given to :meth:`Scorer.submit`: ``result()`` returns them (the
    ScoredRows that :meth:`Scorer.update_many` would have), waiting for the device if needed.
    Results are made in submission order: collecting a later one first collects the earlier."""

    __slots__ = ("_scorer", "_rows", "pieces", "event")

    def __init__(self, scorer: Scorer | None = None, rows: ScoredRows | None = None) -> None:
        self._scorer, self._rows = scorer, rows
        #: per model call: (raw rows (n, C) pinned, score (n,) pinned, contrib (n, C) pinned or
        #: None, stream row of the first raw row, its row through the model)
        self.pieces: list[tuple] = []
        self.event: torch.cuda.Event | None = None

    @property
    def done(self) -> bool:
        return self._rows is not None

    def result(self) -> ScoredRows:
        if self._rows is None:
            self._scorer._collect(self)
        return self._rows


def numpy_scores(y: np.ndarray, mean: np.ndarray, var: np.ndarray, kind: str) -> np.ndarray:
    """:func:`tsssm.anomaly.scores.anomaly_scores` in numpy, float32: (n, C) -> (n,) (var may
    be (C,), one for every row).

    The mean over the observed channels of ``(y - mean)^2 / var`` ("nis") or of the Gaussian
    negative log density ("nll"); 0 where no channel is observed; NumericalError if not finite.
    """
    var = np.maximum(var, np.float32(MIN_VAR))
    if not np.isnan(y).any():  # the common case: every channel observed, no masking
        z2 = y - mean
        z2 *= z2
        z2 /= var
        if kind == "nll":
            z2 += np.log(var)
            z2 *= np.float32(0.5)
            z2 += _HALF_LOG_2PI
        score = np.einsum("ij->i", z2) / np.float32(y.shape[1])
    else:
        observed = ~np.isnan(y)
        d = np.where(observed, y - mean, np.float32(0.0))
        z2 = d * d / var
        if kind == "nll":
            z2 = np.float32(0.5) * (z2 + np.log(var)) + _HALF_LOG_2PI
            z2 = np.where(observed, z2, np.float32(0.0))
        n_obs = observed.sum(-1).astype(np.float32)
        score = np.einsum("ij->i", z2) / np.maximum(n_obs, np.float32(1.0))
        score = np.where(n_obs > 0, score, np.float32(0.0))
    score = score.astype(np.float32, copy=False)
    if not np.isfinite(score).all():
        _not_finite(int((~np.isfinite(score)).sum()))
    return score


def _not_finite(bad: int) -> None:
    raise NumericalError(
        f"{bad} anomaly scores are not finite: the model's predictive mean or variance, or the "
        "data, is NaN/inf at those steps (check the input scaling and the model's parameters)")


def numpy_terms(y: np.ndarray, mean: np.ndarray, var: np.ndarray, kind: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tsssm.anomaly.scores.step_terms` of independent channels in numpy, float32:
    (contrib, whitened, observed), each (n, C), 0 at missing entries (var may be (C,))."""
    var = np.maximum(var, np.float32(MIN_VAR))
    observed = ~np.isnan(y)
    d = np.where(observed, y - mean, np.float32(0.0))
    z2 = d * d / var
    whitened = np.sqrt(z2) * np.sign(d)
    per = np.float32(0.5) * (z2 + np.log(var)) + _HALF_LOG_2PI if kind == "nll" else z2
    per = np.where(observed, per, np.float32(0.0))
    n_obs = np.maximum(observed.sum(-1, keepdims=True), 1).astype(np.float32)
    contrib = per / n_obs
    if not (np.isfinite(contrib).all() and np.isfinite(whitened).all()):
        _not_finite(int((~np.isfinite(contrib)).sum()))
    return contrib, whitened, observed


class Scorer:
    """Scores and flags of one stream, fed in any pieces, with a trained model's bundle.

    ``engine``: "auto" (numpy for a float64 Kalman forecaster on the CPU, torch otherwise),
    "numpy" or "torch". ``device``: where a torch model runs ("cpu", "cuda", ...; default: the
    CPU). ``per_stream_scaling``, ``calibration_rows``: override the bundle's scaling (None:
    the bundle's; a per-stream scaler is fitted on a stream's first ``calibration_rows`` rows).
    ``moments``: also return the scaled rows and the predictive mean and variance (for figures).
    ``contributions``: also return each channel's additive share of the score (ScoredRows.contrib).
    ``device_window``: a torch model's trailing window scores summed on its device
    (tsssm.scoring.device_window; only the scores and contributions cross to the host); None:
    when the device is not the CPU.
    """

    def __init__(self, bundle: Bundle, *, device: str | torch.device | None = None,
                 engine: str = "auto", per_stream_scaling: bool | None = None,
                 calibration_rows: int | None = None, moments: bool = False,
                 contributions: bool = False, device_window: bool | None = None) -> None:
        if bundle.threshold is None:
            raise ModelError(f"the {bundle.model_name} model has no fitted threshold; train it "
                             "with task=anomaly to score streams")
        if bundle.score_kind not in SCORE_KINDS:
            raise ModelError(f"the bundle's score kind {bundle.score_kind!r} is not one of "
                             f"{', '.join(SCORE_KINDS)}")
        self.spec = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
        if engine not in ("auto", "numpy", "torch"):
            raise ConfigError(f"score engine must be auto, numpy or torch, got {engine!r}")
        self.bundle = bundle
        self.device = torch.device(device or "cpu")
        self.model = bundle.model.to(self.device).eval()
        self.channels: list[str] = list(bundle.channels)
        self.threshold = bundle.threshold
        self.score_kind = bundle.score_kind
        per_stream = bundle.per_stream_scaling if per_stream_scaling is None else per_stream_scaling
        rows = bundle.data_config.get("train_rows", 0) if calibration_rows is None \
            else calibration_rows
        #: rows a per-stream scaler is fitted on (0: the bundle's training scaler is used)
        self.calibration_rows = int(rows) if per_stream else 0
        #: scores a per-stream threshold is fitted on (0: the bundle's threshold flags)
        self.threshold_rows = int(rows) if bundle.threshold_scope == "per_stream" else 0
        if bundle.threshold_scope == "per_stream" and self.threshold_rows <= 0:
            raise ConfigError("the model fits a threshold per stream on each stream's first "
                              "data.train_rows rows, but data.train_rows is 0; set "
                              "data.train_rows=N (N > 0)")
        self.post = StreamScores(self.spec, self.threshold, len(self.channels),
                                 threshold_rows=self.threshold_rows,
                                 contributions=contributions)
        self._threshold_value = float(self.threshold.value)
        self._moments = moments
        self._fast = self._fast_path()
        self._kalman = self._numpy_engine(engine)
        self._steady_var32: np.ndarray | None = None
        self._all_observed = np.ones(len(self.channels), bool)
        self.engine = "numpy" if self._kalman is not None else "torch"
        self._device_window_on = (self.device.type != "cpu") if device_window is None \
            else bool(device_window)
        self._pinned: torch.Tensor | None = None  # host staging rows for the device (pinned)
        # the model's own input checks wait for the GPU; the queued path checks the scores
        self._one_step_kwargs = {"validate": False} if \
            "validate" in inspect.signature(self.model.one_step).parameters else {}
        self._scaler_on_device: tuple | None = None  # (scaler, mean (C,), std (C,)) there
        self._pending: deque[PendingRows] = deque()
        self.reset()

    def _numpy_engine(self, engine: str):
        from tsssm.models.kalman import KalmanForecaster
        from tsssm.scoring.kalman_steady import KalmanSteadyFilter

        fits = (isinstance(self.model, KalmanForecaster) and self.device.type == "cpu"
                and self.model.compute_dtype == torch.float64)
        if engine == "numpy" and not fits:
            raise ConfigError("score engine=numpy runs the float64 Kalman forecaster on the CPU "
                              f"only; this model is {type(self.model).__name__} on {self.device}")
        if engine == "torch" or not fits:
            return None
        with _one_blas_thread():  # the Riccati solve: tiny matrices
            return KalmanSteadyFilter.from_forecaster(self.model)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, source: str | Path | Bundle, *, tracking_uri: str | None = None,
             experiment: str = "tsssm", **kwargs: Any) -> Scorer:
        """A scorer from a bundle folder (``tsssm_runs/models/<run id>``), a Bundle, or the
        run id of a ``tsssm train`` run in MLflow (``tracking_uri``, default the local store
        ``sqlite:///tsssm_runs/mlflow.db``). Keyword arguments go to :class:`Scorer`."""
        if isinstance(source, Bundle):
            return cls(source, **kwargs)
        from tsssm.bundle import load_bundle

        path = Path(source).expanduser()
        if path.exists():
            return cls(load_bundle(path), **kwargs)
        from tsssm.commands.common import load_trained
        from tsssm.tracking import Tracker

        tracker = Tracker(tracking_uri or "sqlite:///tsssm_runs/mlflow.db", experiment)
        bundle, _ = load_trained(str(source), tracker)
        return cls(bundle, **kwargs)

    # ------------------------------------------------------------------ state
    def reset(self, source: str = "the stream") -> None:
        """Start a new stream (``source``: what messages call it, e.g. its file): the model's
        prior state, no rows seen."""
        self.source = source
        self._pending = deque()  # a new stream: what was queued for the last one is dropped
        self._state: Any = None
        if self._kalman is not None:
            self._kalman.reset()
        self._rows_in = 0  # rows received
        self._rows_out = 0  # rows scored
        self._rows_model = 0  # rows through the model
        self._held: list[np.ndarray] = []  # raw rows waiting for the per-stream scaler
        self._n_held = 0
        self.scaler: StandardScaler | None = None if self.calibration_rows else self.bundle.scaler
        self.post.reset(source)
        #: this stream's window on the model's device: None until its first rows are scored
        #: (then a DeviceWindow, or False: the numpy window), fixed for the stream
        self._device_win: Any = None

    @property
    def rows_scored(self) -> int:
        return self._rows_out

    @property
    def calibrating(self) -> bool:
        """True while rows are held: to fit the stream's own scaler or threshold, or (a
        centered window) until the rows after them arrive (see the module docstring)."""
        return self.scaler is None or (not self._fast and self.post.pending > 0)

    @property
    def immediate(self) -> bool:
        """Whether every row's score comes out with it (no per-stream scaler or threshold to
        fit first, no centered window): then :meth:`update` returns each sample's own score."""
        spec = self.spec
        return (not self.calibration_rows and not self.threshold_rows
                and not (spec.window > 1 and spec.align == "centered"))

    @property
    def contributions(self) -> bool:
        """Whether ScoredRows carry each channel's share of the score (``contrib``)."""
        return self.post.contributions

    @contributions.setter
    def contributions(self, on: bool) -> None:
        self._drain()
        self.post.contributions = bool(on)
        self._fast = self._fast_path()

    @property
    def moments(self) -> bool:
        return self._moments

    @moments.setter
    def moments(self, on: bool) -> None:
        self._drain()
        self._moments = bool(on)
        self._fast = self._fast_path()

    def _fast_path(self) -> bool:
        """Scores without windows, contributions, streaming or per-stream thresholds: computed
        straight from the model's moments (numpy_scores), no step terms."""
        spec = self.spec
        return (spec.window == 1 and spec.kind in ("nis", "nll") and not self.contributions
                and not self.threshold_rows and not self.threshold.follows_stream
                and spec.reanchor is None)

    @property
    def threshold_note(self) -> str:
        """Which threshold flags the current stream, in words."""
        return self.post.threshold_note

    # ------------------------------------------------------------------ scoring
    def update(self, sample: Sequence[float] | np.ndarray | Mapping[str, float]
               ) -> tuple[float, bool] | None:
        """Score one sample (C values in the model's channel order, or {channel: value}; NaN or
        None = missing). Returns (score, flag), or None while the scorer is calibrating (the held
        rows' scores then come out of :meth:`update_many` or :meth:`finish`)."""
        row = self._row(sample)
        self._drain()
        if self.spec.window > 1 and self.spec.align == "centered":
            raise ModelError(
                f"the {self.bundle.model_name} model scores centered {self.spec.window}-row "
                f"windows: a row's score needs the {self.spec.window // 2} rows after it, so "
                "update() (one score per sample, now) cannot give it; feed update_many (scores "
                "come out late, ScoredRows.start says which) or train with "
                "task.window.align=trailing")
        if self.scaler is not None and self._kalman is not None and not self._fast \
                and not self.moments:
            done = self._update_window(row)
            if done is not None:
                return done
        if self.scaler is None or self._kalman is None or self.moments or not self._fast:
            out = self.update_many(row[None])
            if len(out) == 0:
                return None
            return float(out.score[-1]), bool(out.flag[-1])
        # the hot path: one Kalman step in numpy on (C,) arrays, a few microseconds
        y = (row - self.scaler.mean) / self.scaler.std  # float32, as .transform does
        if np.isfinite(y).all() and self.score_kind == "nis":
            mean, var = self._kalman.step(y, observed=True)
            var32 = self._var32(var)
            d = y - mean.astype(np.float32)
            d *= d
            d /= var32
            value = float(d.sum(dtype=np.float32) / np.float32(len(d)))
            if not math.isfinite(value):
                numpy_scores(y[None], mean.astype(np.float32)[None], var32[None], "nis")
        else:
            if np.isinf(y).any():  # a reading far outside the scaler's range
                self._overflow(row[None], y[None], self._rows_model)
            mean, var = self._kalman.step(y.astype(np.float64))
            value = float(numpy_scores(y[None], mean.astype(np.float32)[None],
                                       np.asarray(var, np.float32)[None], self.score_kind)[0])
        self._rows_in += 1
        self._rows_out += 1
        self._rows_model += 1
        return value, value > self._threshold_value

    def _update_window(self, row: np.ndarray) -> tuple[float, bool] | None:
        """A live sample through the numpy Kalman engine and the score's window in O(window)
        array work (StreamScores.push_one); None: not this path (update_many it)."""
        y = (row - self.scaler.mean) / self.scaler.std  # float32, as .transform does
        # one sum tells that every value is finite (a sum that overflows: checked one by one)
        if not math.isfinite(float(_SUM(y))) and not np.isfinite(y).all():
            return None
        post = self.post
        if not post.can_push_one():
            return None
        mean, var = self._kalman.step(y, observed=True)
        if self.spec.kind == "nll":
            terms = numpy_terms(y[None], mean.astype(np.float32)[None], self._var32(var)[None],
                                "nll")
            contrib, whitened, observed = (t[0] for t in terms)
        else:  # every channel observed: numpy_terms' formulas without the masking
            d = y - mean.astype(np.float32)
            z2 = d * d
            z2 /= self._var32(var)
            if not math.isfinite(float(_SUM(z2))) and not np.isfinite(z2).all():
                numpy_terms(y[None], mean.astype(np.float32)[None], self._var32(var)[None],
                            "nis")  # raises the NumericalError
            whitened = np.sqrt(z2)
            whitened *= np.sign(d)
            # a shift window sums the whitened innovations only; a mean window the shares
            contrib = z2 / np.float32(len(z2)) if self.spec.window_kind == "mean" else z2
            observed = self._all_observed
        score, flag, _ = post.push_one(contrib, whitened, observed)
        self._rows_in += 1
        self._rows_out += 1
        self._rows_model += 1
        return score, flag

    def _var32(self, var: np.ndarray) -> np.ndarray:
        """var as float32, floored as the scores floor it; the fixed point's is cached."""
        steady = self._kalman.steady
        if steady is not None and var is steady.S:
            if self._steady_var32 is None:
                self._steady_var32 = np.maximum(var.astype(np.float32), np.float32(MIN_VAR))
            return self._steady_var32
        return np.maximum(var.astype(np.float32), np.float32(MIN_VAR))

    def update_many(self, rows: np.ndarray | Sequence[Sequence[float]]) -> ScoredRows:
        """Score rows (n, C) (raw units, the model's channel order, NaN = missing), continuing
        the stream. Returns the scores of every row that became ready: normally exactly these
        rows; while calibrating none, then the held rows together with these (with a centered
        window, the rows up to ``window // 2`` before the last)."""
        return self.submit(rows).result()

    @property
    def defers(self) -> bool:
        """Whether :meth:`submit` can queue work and return before it is done (a torch model
        on a CUDA device): then a caller gains by submitting the next rows before collecting."""
        return self.device.type == "cuda" and self._kalman is None

    def submit(self, rows: np.ndarray | Sequence[Sequence[float]]) -> PendingRows:
        """:meth:`update_many` in two halves: the rows' work is started now (on a CUDA device
        queued there; the rows are copied, the caller may reuse its buffer), and the returned
        PendingRows' ``result()`` gives what update_many returns. Results come in submission
        order; a bad row raises from ``submit`` or from ``result``, with the same message."""
        values = np.asarray(rows, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != len(self.channels):
            raise DataError(f"rows must be (n, {len(self.channels)}) for the channels "
                            f"{self.channels}; got shape {values.shape}")
        first = self._rows_in
        # on the device path the scores tell (_collect)
        if (self.scaler is None or not self._deferrable()) and np.isinf(values).any():
            self._infinite(values, first)
        self._rows_in += len(values)
        if self.scaler is None:
            self._held.append(values.copy())  # the caller may reuse its buffer
            self._n_held += len(values)
            if self._n_held <= self.calibration_rows:
                return PendingRows(rows=self._empty())
            held = np.concatenate(self._held)
            self._held, self._n_held = [], 0
            self.scaler = StandardScaler.fit([held[: self.calibration_rows]], self.channels)
            values, first = held, self._rows_in - len(held)
        if self._deferrable():
            return self._submit_device(values, first)
        self._drain()
        return PendingRows(rows=self._score(values))

    def _infinite(self, values: np.ndarray, first: int) -> None:
        row, col = np.argwhere(np.isinf(values))[0]
        raise DataError(f"row {first + row + 1}, channel '{self.channels[col]}' is "
                        "infinite; send NaN for a missing reading")

    def _deferrable(self) -> bool:
        """Whether this stream's rows take the queued device path (:meth:`_submit_device`):
        a torch model on a CUDA device, one-step scores or a device window, a float32 scaler
        (scaled there with the host's arithmetic), no moments kept for figures."""
        scaler = self.scaler
        return (self.defers and not self.moments and scaler is not None
                and scaler.mean.dtype == np.float32 and scaler.std.dtype == np.float32
                and (self._fast or bool(self._device_window())))

    def _submit_device(self, values: np.ndarray, first: int) -> PendingRows:
        """Queue raw rows (n, C) on the GPU: pinned copy in, scaling, the model, the scores (and
        window sums) and the copy back, in calls of GPU_ROWS_PER_CALL rows; nothing waits."""
        pending = PendingRows(self)
        scaler = self.scaler
        if self._scaler_on_device is None or self._scaler_on_device[0] is not scaler:
            self._scaler_on_device = (scaler, torch.from_numpy(scaler.mean).to(self.device),
                                      torch.from_numpy(scaler.std).to(self.device))
        _, mean, std = self._scaler_on_device
        window = None if self._fast else self._device_window()
        pin = self.device.type == "cuda"  # elsewhere (tests) the same steps, done at once
        for a in range(0, len(values), GPU_ROWS_PER_CALL):
            raw = values[a : a + GPU_ROWS_PER_CALL]
            # pinned blocks come from torch's caching host allocator, which keeps a block
            # until the copies queued on it are done
            host = torch.empty(raw.shape, dtype=torch.float32, pin_memory=pin)
            np.copyto(host.numpy(), raw)
            t = host.to(self.device, non_blocking=pin)
            t = ((t - mean) / std).unsqueeze(0)  # (1, n, C): StandardScaler.transform's ops
            with torch.no_grad():
                pred, self._state = self.model.one_step(t, self._state, **self._one_step_kwargs)
                if window is None:
                    pred = Gaussian(pred.mean.float(), pred.var.float())
                    score = anomaly_scores(t, pred, kind=self.score_kind, check=False)[0]
                    contrib = None
                else:
                    st = step_terms(t, pred, self.spec.kind, check=False)  # each (1, n, C)
                    score, contrib = window.update(StepTerms(st.contrib[0], st.whitened[0],
                                                             st.observed[0]))
                    # channel-major (C, n) on the way back: each contrib:<channel> column of
                    # the scores Parquet is then a contiguous array (no strided copy a column)
                    contrib = contrib.float().T.contiguous() if self.contributions else None
            pending.pieces.append((host, _to_host(score, pin), _to_host(contrib, pin),
                                   first + a, self._rows_model))
            self._rows_model += len(raw)
        if pin:
            pending.event = torch.cuda.Event()
            pending.event.record()
        self._pending.append(pending)
        return pending

    def _collect(self, target: PendingRows) -> None:
        """Finish queued batches, oldest first, up to ``target`` (in order: thresholds and
        windows carry state from batch to batch)."""
        while not target.done:
            if not self._pending:
                raise ModelError("these rows were queued for an earlier stream (the scorer "
                                 "was reset since); submit them again")
            pending = self._pending.popleft()
            try:
                if pending.event is not None:
                    pending.event.synchronize()
                pending._rows = self._finish(pending)
            except BaseException:
                self._pending.clear()  # the stream cannot go on: its state is past the error
                raise

    def _finish(self, pending: PendingRows) -> ScoredRows:
        start = self._rows_out
        parts = []
        for host, score, contrib, first, first_model in pending.pieces:
            score = score.numpy()
            if not np.isfinite(score).all():
                self._not_finite_rows(host.numpy(), score, first, first_model)
            if self._fast:
                out = ScoredRows(self._rows_out, score, score > self._threshold_value)
            else:
                out = self.post.push_scores(score, None if contrib is None else contrib.numpy().T)
            self._rows_out += len(out)
            parts.append(out)
        return concat_rows(parts, start, len(self.channels), self.contributions)

    def _not_finite_rows(self, raw: np.ndarray, score: np.ndarray, first: int,
                         first_model: int) -> None:
        """Why queued rows' scores are not finite, raised as the synchronous checks would: an
        infinite reading, one that overflows once scaled, or else the model's numbers."""
        if np.isinf(raw).any():
            self._infinite(raw, first)
        with np.errstate(over="ignore"):
            scaled = self.scaler.transform(raw)
        if np.isinf(scaled).any():
            self._overflow(raw, scaled, first_model)
        check_finite(torch.from_numpy(score))

    def _drain(self) -> None:
        """Collect every queued batch (each keeps its result for its PendingRows)."""
        if self._pending:
            self._collect(self._pending[-1])

    def finish(self) -> ScoredRows:
        """End of the stream: score rows still held for calibration (the stream was not longer
        than the calibration rows: they are scaled by the training scaler, as batch scoring
        does, with a warning). Afterwards the scorer can take a new stream (``reset``). Rows
        submitted and not yet collected are finished first (their PendingRows hold them)."""
        self._drain()
        parts = []
        if self.scaler is None and self._held:
            held = np.concatenate(self._held)
            self._held, self._n_held = [], 0
            log.warning("%s has %d rows, not more than the %d the model scales each stream "
                        "by; using the training scaler", self.source, len(held),
                        self.calibration_rows)
            self.scaler = self.bundle.scaler
            parts.append(self._score(held))
        if not self._fast:
            out = self.post.finish()
            self._rows_out += len(out)
            parts.append(out)
        return concat_rows(parts, self._rows_out, len(self.channels), self.contributions)

    # ------------------------------------------------------------------ internals
    def _empty(self) -> ScoredRows:
        return empty_rows(self._rows_out, len(self.channels), self.contributions)

    def _row(self, sample) -> np.ndarray:
        if isinstance(sample, Mapping):
            unknown = set(sample) - set(self.channels)
            if unknown:
                raise DataError(f"unknown channel {sorted(unknown)[0]!r}; the model's channels "
                                f"are {', '.join(self.channels)}")
            sample = [sample.get(c) for c in self.channels]
        if isinstance(sample, np.ndarray):
            row = sample.astype(np.float32, copy=False)
        else:
            row = np.array([np.nan if v is None else v for v in sample], dtype=np.float32)
        if row.shape != (len(self.channels),):
            raise DataError(f"a sample needs {len(self.channels)} values for the channels "
                            f"{self.channels}; got {row.shape[0] if row.ndim else 1}")
        if np.isinf(row).any():
            col = int(np.flatnonzero(np.isinf(row))[0])
            raise DataError(f"row {self._rows_in + 1}, channel '{self.channels[col]}' is "
                            "infinite; send NaN for a missing reading")
        return row

    def _score(self, values: np.ndarray) -> ScoredRows:
        """Scale and score raw rows (n, C) from the current state; returns the rows whose
        scores are ready (all of them, unless the window or a per-stream threshold waits)."""
        start = self._rows_out
        step = (NUMPY_ROWS_PER_CALL if self._kalman is not None else
                MAX_ROWS_PER_CALL if self.device.type == "cpu" else GPU_ROWS_PER_CALL)
        if not self._fast:
            parts = []
            window = self._device_window()
            for a in range(0, len(values), step):  # chunks small enough to stay in cache
                if window:
                    t = self._scaled_input(values[a : a + step])
                    out = self.post.push_scores(*self._window_scores(t, window))
                    self._rows_out += len(out)
                    parts.append(out)
                    continue
                chunk = self._scale(values[a : a + step])
                terms, mean, var = self._terms_scaled(chunk)
                extras = {"scaled": chunk, "mean": mean, "var": var} if self.moments else None
                out = self.post.push(terms, extras)
                self._rows_out += len(out)
                parts.append(out)
            return concat_rows(parts, start, len(self.channels), self.contributions)
        scores = np.empty(len(values), np.float32)
        scaled, means, variances = [], [], []
        for a in range(0, len(values), step):
            if self._kalman is None and not self.moments:  # scaled into the device's input
                t = self._scaled_input(values[a : a + step])
                scores[a : a + t.shape[1]] = self._score_tensor(t)
                continue
            chunk = self._scale(values[a : a + step])
            scores[a : a + len(chunk)], mean, var = self._score_scaled(chunk)
            if self.moments:
                scaled.append(chunk)
                means.append(mean)
                variances.append(var)
        self._rows_out += len(values)
        if self.moments:
            return ScoredRows(start, scores, scores > self._threshold_value,
                              np.concatenate(scaled), np.concatenate(means),
                              np.concatenate(variances))
        return ScoredRows(start, scores, scores > self._threshold_value)

    def _device_window(self):
        """This stream's DeviceWindow, or False (the numpy window of StreamScores)."""
        if self._device_win is None:
            spec = self.spec
            on = (self._device_window_on and self._kalman is None and not self.moments
                  and (spec.window == 1 or spec.align == "trailing") and spec.reanchor is None)
            self._device_win = False
            if on:
                from tsssm.scoring.device_window import DeviceWindow

                self._device_win = DeviceWindow(spec.window, spec.window_kind,
                                                len(self.channels), self.device)
        return self._device_win

    def _to_device(self, y: np.ndarray) -> torch.Tensor:
        """Scaled rows (n, C) as a (1, n, C) tensor on the model's device; to a GPU through a
        pinned staging buffer and an asynchronous copy (the buffer is reused: the previous
        call's results were copied back, so its copy in is done)."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(y)).to(self.device).unsqueeze(0)
        n = len(y)
        if self._pinned is None or len(self._pinned) < n:
            self._pinned = torch.empty((max(n, 1), y.shape[1]), dtype=torch.float32,
                                       pin_memory=True)
        host = self._pinned[:n]
        np.copyto(host.numpy(), y)
        return host.to(self.device, non_blocking=True).unsqueeze(0)

    def _scaled_input(self, raw: np.ndarray) -> torch.Tensor:
        """Raw rows (n, C) float32 scaled as :meth:`_scale` scales them, but written straight
        into the model's input: on a GPU the pinned staging buffer, sent with an asynchronous
        copy (no scaled copy on the host, no second pass); (1, n, C) on the device."""
        mean, std = self.scaler.mean, self.scaler.std
        if raw.dtype != np.float32 or mean.dtype != np.float32 or std.dtype != np.float32:
            return self._to_device(self._scale(raw))  # the scaler's own arithmetic
        n, C = raw.shape
        if self.device.type == "cuda":
            if self._pinned is None or len(self._pinned) < n:
                self._pinned = torch.empty((max(n, 1), C), dtype=torch.float32, pin_memory=True)
            host = self._pinned[:n]
            y = host.numpy()
        else:
            y = np.empty((n, C), np.float32)
        with np.errstate(over="ignore"):  # StandardScaler.transform's operations, in place
            np.subtract(raw, mean, out=y)
            np.divide(y, std, out=y)
        if np.isinf(y).any():
            self._overflow(raw, y, self._rows_model)
        self._rows_model += n
        if self.device.type == "cuda":
            return host.to(self.device, non_blocking=True).unsqueeze(0)
        return torch.from_numpy(y).to(self.device).unsqueeze(0)

    def _score_tensor(self, t: torch.Tensor) -> np.ndarray:
        """One-step scores (n,) float32 of scaled rows t (1, n, C) on the model's device."""
        with torch.no_grad(), _few_torch_threads(t.shape[1]):
            pred, self._state = self.model.one_step(t, self._state)
            pred = Gaussian(pred.mean.float(), pred.var.float())
            return anomaly_scores(t, pred, kind=self.score_kind)[0].cpu().numpy()

    def _window_scores(self, t: torch.Tensor, window) -> tuple[np.ndarray, np.ndarray | None]:
        """Trailing window scores (n,) float64 and contributions (n, C) float32 (None without
        contributions) of scaled rows t (1, n, C), summed on the model's device."""
        with torch.no_grad(), _few_torch_threads(t.shape[1]):
            pred, self._state = self.model.one_step(t, self._state)
            st = step_terms(t, pred, self.spec.kind)  # each (1, n, C), checked finite
            score, contrib = window.update(StepTerms(st.contrib[0], st.whitened[0],
                                                     st.observed[0]))
            contrib = contrib.float().cpu().numpy() if self.contributions else None
            return score.cpu().numpy(), contrib

    def _scale(self, raw: np.ndarray) -> np.ndarray:
        """Raw rows (n, C) in the scaler's units, float32; the next rows of the model."""
        with np.errstate(over="ignore"):
            chunk = self.scaler.transform(raw)  # (n, C) float32
        if np.isinf(chunk).any():
            self._overflow(raw, chunk, self._rows_model)
        self._rows_model += len(chunk)
        return chunk

    def _overflow(self, raw: np.ndarray, scaled: np.ndarray, first: int) -> None:
        """A reading far outside the scaler's range overflows float32 (as check_scaled)."""
        i, col = (int(k[0]) for k in np.nonzero(np.isinf(scaled)))
        raise DataError(
            f"{self.source}: column '{self.channels[col]}' row {first + i + 1} holds "
            f"{raw[i, col]:g}, which overflows float32 once scaled by the training rows "
            f"(mean {self.scaler.mean[col]:g}, std {self.scaler.std[col]:g}); blank or fix the "
            "reading, or leave the column out of data.channels"
        )

    def _score_scaled(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (n,), mean (n, C), var (n, C)) of scaled rows y (n, C) float32, advancing
        the model's state."""
        if self._kalman is not None:
            with _one_blas_thread():
                mean, var = self._kalman.filter(y)
            mean = mean.astype(np.float32)
            if var.strides[0] == 0 and not self.moments:  # one variance for every row
                return numpy_scores(y, mean, var[0].astype(np.float32), self.score_kind), \
                    mean, None
            var = var.astype(np.float32)
            return numpy_scores(y, mean, var, self.score_kind), mean, var
        with torch.no_grad(), _few_torch_threads(len(y)):
            t = self._to_device(y)
            pred, self._state = self.model.one_step(t, self._state)
            pred = Gaussian(pred.mean.float(), pred.var.float())
            score = anomaly_scores(t, pred, kind=self.score_kind)[0].cpu().numpy()
            if not self.moments:
                return score, None, None
            return score, pred.mean[0].cpu().numpy(), pred.var[0].cpu().numpy()


    def _terms_scaled(self, y: np.ndarray) -> tuple[tuple, np.ndarray, np.ndarray]:
        """Step terms (contrib, whitened, observed) (n, C) of scaled rows y (n, C), and the
        predictive mean and variance (n, C), advancing the model's state."""
        kind = self.spec.kind
        if self._kalman is not None:  # independent channels: mahalanobis is the NIS
            with _one_blas_thread():
                mean, var = self._kalman.filter(y)
            mean = mean.astype(np.float32)
            var = var[0] if var.strides[0] == 0 else var  # one variance for every row
            var = var.astype(np.float32)
            terms = numpy_terms(y, mean, var, kind)
            if self.moments and var.ndim == 1:
                var = np.broadcast_to(var, mean.shape).copy()
            return terms, mean, var
        with torch.no_grad(), _few_torch_threads(len(y)):
            t = self._to_device(y)
            pred, self._state = self.model.one_step(t, self._state)
            st = step_terms(t, pred, kind)  # as tsssm.tasks.evaluate.predict_stream
            terms = (st.contrib[0].double().cpu().numpy(), st.whitened[0].double().cpu().numpy(),
                     st.observed[0].cpu().numpy())
            if not self.moments:
                return terms, None, None
            return terms, pred.mean[0].float().cpu().numpy(), pred.var[0].float().cpu().numpy()


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    """Small matrix products: more BLAS threads only wait on each other (on shared cores a
    (C, nb, 32) x (C, 32, 32) product with two threads measured ~10x slower than with one)."""
    return _blas_controller().limit(limits=1, user_api="blas")


#: below this many rows a torch call runs single-threaded (its ops take microseconds)
FEW_ROWS = 4096


def _few_torch_threads(rows: int):
    from contextlib import nullcontext

    from tsssm.kalman.ssm import step_loop_threads

    return step_loop_threads() if rows < FEW_ROWS else nullcontext()


def _to_host(t: torch.Tensor | None, pin: bool) -> torch.Tensor | None:
    """A device tensor's copy in host memory: with ``pin``, pinned and queued (no wait)."""
    if t is None:
        return None
    if not pin:
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
