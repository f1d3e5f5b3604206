"""Evaluation shared by `train`, `score` and `compare`: one-step predictions over whole streams
(chunked, state carried), horizon forecasts from rolling origins, anomaly scores (windowed, with
per-channel contributions), thresholds and metrics.

No threshold, score normaliser or model choice here looks at a label: thresholds are fitted on
the scores of training (or validation) rows, which SKAB's protocol assumes normal; labels enter
only the test metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from tsssm.anomaly.events import event_metrics, nab_score, vus_pr
from tsssm.anomaly.metrics import anomaly_metrics, forecast_metrics
from tsssm.anomaly.scores import ScoreSpec, StepTerms, step_terms, window_scores
from tsssm.anomaly.thresholds import Threshold
from tsssm.errors import DataError
from tsssm.models.base import Exog, Gaussian, call_forecast, call_one_step, uses_exog
from tsssm.tasks.adaptive_calibration import AdaptiveCalibration
from tsssm.tasks.forecast_metrics import HorizonAccumulator

log = logging.getLogger("tsssm")

#: a stream's inputs (T, K) and time steps (T,) as arrays, either None (see Part.exog)
ExogArrays = tuple[np.ndarray | None, np.ndarray | None]


@dataclass
class StreamPrediction:
    """One-step predictions and scores for every row of a stream."""

    mean: np.ndarray  # (T, C)
    var: np.ndarray  # (T, C)
    score: np.ndarray  # (T,)
    #: (T, C) each channel's additive share of the score (sums to it), when the scorer gives one
    contrib: np.ndarray | None = None


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def as_spec(score: ScoreSpec | str) -> ScoreSpec:
    return score if isinstance(score, ScoreSpec) else ScoreSpec(kind=str(score)).check()


def exog_tensors(exog: ExogArrays | None, rows: list[slice], device: torch.device
                 ) -> Exog | None:
    """Exog (b, n, K) / (b, n) of the given row slices of one stream's arrays (None if none)."""
    if exog is None or (exog[0] is None and exog[1] is None):
        return None
    u, dt = exog

    def stack(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
        if a is None:
            return None
        return torch.from_numpy(np.stack([a[r] for r in rows])).to(device=device, dtype=dtype)

    return Exog(stack(u, torch.float32), stack(dt, torch.float64))


@torch.no_grad()
def predict_stream(model, values: np.ndarray, score_kind: ScoreSpec | str,
                   chunk_size: int = 100_000, progress: bool = False,
                   desc: str = "scoring", exog: ExogArrays | None = None) -> StreamPrediction:
    """Run ``model.one_step`` over a whole stream in chunks, carrying the state, and score it.

    values (T, C). score_kind: a ScoreSpec (kind, window, window kind, align) or a score kind
    (the one-step score). The window runs over the whole stream, across chunk borders.
    exog: the stream's inputs and time steps, passed to models that use them.
    """
    spec = as_spec(score_kind)
    mean, var, terms = stream_terms(model, values, spec.kind, chunk_size, progress, desc, exog)
    return window_prediction(mean, var, terms, spec)


def window_prediction(mean: np.ndarray, var: np.ndarray, terms: StepTerms,
                      spec: ScoreSpec) -> StreamPrediction:
    """The StreamPrediction of a stream's step terms (``stream_terms``) under a score window:
    one filter pass serves every window of the same score kind."""
    score, contrib = window_scores(terms, spec.window, spec.window_kind, spec.align)
    return StreamPrediction(mean, var, score, contrib)


def flag_stream(model, values: np.ndarray, score_kind: ScoreSpec | str,
                threshold_of: Callable[[np.ndarray], Threshold], chunk_size: int = 100_000,
                progress: bool = False, desc: str = "scoring",
                exog: ExogArrays | None = None) -> tuple[StreamPrediction, Threshold]:
    """:func:`predict_stream`, then the threshold ``threshold_of(plain scores)`` (the bundle's,
    or its rule refitted on the stream's first rows), then, with ``spec.reanchor``, the
    re-anchored score around it (:func:`reanchored_prediction`): what ``tsssm score`` and the
    API flag a whole stream with. Returns (prediction, threshold)."""
    spec = as_spec(score_kind)
    mean, var, terms = stream_terms(model, values, spec.kind, chunk_size, progress, desc, exog)
    pred = window_prediction(mean, var, terms, spec)
    threshold = threshold_of(pred.score)
    if spec.reanchor is not None:
        pred = reanchored_prediction(pred, terms, spec, threshold)
    return pred, threshold


def reanchored_prediction(pred: StreamPrediction, terms: StepTerms, spec: ScoreSpec,
                          threshold: Threshold) -> StreamPrediction:
    """``pred`` with the score and contributions of the re-anchored shift score
    (``spec.reanchor``; tsssm.anomaly.reanchor) of the stream's step terms, around the
    threshold that flags it (a fixed value: fitted on the plain score)."""
    from tsssm.anomaly.reanchor import reanchored_shift_scores, require_fixed_threshold

    require_fixed_threshold(threshold)
    score, contrib = reanchored_shift_scores(np.asarray(terms.whitened),
                                             np.asarray(terms.observed), float(threshold.value),
                                             spec.window, spec.reanchor)
    return StreamPrediction(pred.mean, pred.var, score, contrib)


@torch.no_grad()
def stream_terms(model, values: np.ndarray, kind: str, chunk_size: int = 100_000,
                 progress: bool = False, desc: str = "scoring",
                 exog: ExogArrays | None = None) -> tuple[np.ndarray, np.ndarray, StepTerms]:
    """One-step means (T, C), variances (T, C) and step terms (numpy, (T, C) each) of a whole
    stream under ``model.one_step``, in chunks with the state carried (see predict_stream)."""
    device = _device_of(model)
    exog = exog if uses_exog(model) else None
    state = None
    means, variances, contribs, whitened, observed = [], [], [], [], []
    # rows/s and the ETA for streams of 10^4 rows or more
    bar = tqdm(total=len(values), desc=desc, unit="rows", unit_scale=True, leave=False,
               disable=not progress or len(values) < 10_000)
    for start in range(0, len(values), chunk_size):
        rows = slice(start, start + chunk_size)
        y = torch.from_numpy(np.ascontiguousarray(values[rows]))
        y = y.to(device=device, dtype=torch.float32).unsqueeze(0)  # (1, T, C)
        pred, state = call_one_step(model, y, state, exog_tensors(exog, [rows], device))
        terms = step_terms(y, pred, kind)  # each (1, T, C)
        means.append(pred.mean[0].float().cpu().numpy())
        variances.append(pred.var[0].float().cpu().numpy())
        contribs.append(terms.contrib[0].double().cpu().numpy())
        whitened.append(terms.whitened[0].double().cpu().numpy())
        observed.append(terms.observed[0].cpu().numpy())
        bar.update(y.shape[1])
    bar.close()
    terms = StepTerms(np.concatenate(contribs), np.concatenate(whitened), np.concatenate(observed))
    return np.concatenate(means), np.concatenate(variances), terms


def forecast_origin_rows(rows: tuple[int, int], context: int, horizon: int,
                         stride: int) -> np.ndarray:
    """Origins of the horizon windows inside ``rows``: each uses the ``context`` rows before it
    (which may reach into the previous split, as in ETT) and predicts the ``horizon`` rows from
    it, all inside ``rows``. With stride 1 these are exactly Time-Series-Library's windows: a
    split of n rows (plus its context) holds n - horizon + 1 of them.  -> (N,) row indices"""
    start, stop = rows
    return np.arange(max(start, context), stop - horizon + 1, stride)


@torch.no_grad()
def iter_forecasts(model, values: np.ndarray, origins: np.ndarray, context: int, horizon: int,
                   batch_size: int = 256, exog: ExogArrays | None = None,
                   future_inputs: str = "known") -> Iterator[tuple[Gaussian, np.ndarray]]:
    """Horizon forecasts from ``origins`` in batches: (Gaussian (b, H, C) on the CPU, targets
    (b, H, C)). exog: the stream's inputs and time steps for models that use them; the time
    steps of the forecast rows are always given (forecasts are for those times), their inputs
    only with ``future_inputs="known"``."""
    device = _device_of(model)
    exog = exog if uses_exog(model) else None
    series = torch.from_numpy(np.ascontiguousarray(values)).float()
    for i in range(0, len(origins), batch_size):
        idx = origins[i : i + batch_size]
        ctx = torch.stack([series[o - context : o] for o in idx]).to(device)  # (b, L, C)
        ex = exog_tensors(exog, [slice(o - context, o + horizon) for o in idx], device)
        if ex is not None and ex.u is not None and future_inputs != "known":
            ex = ex._replace(u=ex.u[:, :context])
        pred = call_forecast(model, ctx, horizon, None, ex)
        targets = np.stack([values[o : o + horizon] for o in idx])
        yield Gaussian(pred.mean.float().cpu(), pred.var.float().cpu()), targets


def forecast_origins(model, values: np.ndarray, rows: tuple[int, int], context: int,
                     horizon: int, stride: int, batch_size: int = 256,
                     exog: ExogArrays | None = None, future_inputs: str = "known"
                     ) -> tuple[Gaussian, np.ndarray, np.ndarray] | None:
    """All horizon forecasts of ``rows`` at once (see ``forecast_origin_rows``).
    Returns (Gaussian (N, H, C), targets (N, H, C), origins (N,)), or None without windows."""
    origins = forecast_origin_rows(rows, context, horizon, stride)
    if len(origins) == 0:
        return None
    batches = list(iter_forecasts(model, values, origins, context, horizon, batch_size, exog,
                                  future_inputs))
    return (Gaussian(torch.cat([b[0].mean for b in batches]),
                     torch.cat([b[0].var for b in batches])),
            np.concatenate([b[1] for b in batches]), origins)


def horizon_metrics(model, parts_rows: list[tuple], context: int, horizon: int, stride: int,
                    future_inputs: str = "known",
                    on_stream: Callable[[], object] | None = None,
                    adaptive: list[AdaptiveCalibration] | None = None,
                    static: HorizonAccumulator | None = None) -> HorizonAccumulator:
    """Horizon-forecast metrics pooled over the windows of several streams' rows.
    parts_rows: (values (T, C), rows) or (values, rows, exog arrays) per stream; ``on_stream``
    is called after each stream (progress). ``adaptive``: one AdaptiveCalibration per stream
    (carried over from its earlier rows, e.g. validation before test): the metrics are those of
    the adapted variances, and ``static`` (if given) accumulates the unadapted ones."""
    acc = HorizonAccumulator(horizon)
    for i, (values, rows, *exog) in enumerate(parts_rows):
        origins = forecast_origin_rows(rows, context, horizon, stride)
        done = 0
        for pred, targets in iter_forecasts(model, values, origins, context, horizon,
                                            exog=exog[0] if exog else None,
                                            future_inputs=future_inputs):
            mean, var = pred.mean.numpy(), pred.var.numpy()
            if adaptive is not None:
                if static is not None:
                    static.add(targets, mean, var)
                batch = origins[done : done + len(targets)]
                var = adaptive[i].adapt(batch, targets, mean, var)
            done += len(targets)
            acc.add(targets, mean, var)
        if on_stream is not None:
            on_stream()
    return acc


def static_metrics(static: HorizonAccumulator, prefix: str) -> dict[str, float]:
    """``{prefix}{crps,nll,coverage95}_static``: the probabilistic metrics of the unadapted
    variances that :func:`horizon_metrics` accumulated beside the adaptive band's."""
    fixed = static.result()
    return {f"{prefix}{k}_static": fixed[k] for k in ("crps", "nll", "coverage95") if k in fixed}


def detection_metrics(labels: np.ndarray, scores: np.ndarray, flags: np.ndarray) -> dict:
    return anomaly_metrics(labels.astype(int), flags.astype(bool), scores)


def range_metrics(labels: list[np.ndarray], scores: list[np.ndarray], flags: list[np.ndarray],
                  changepoints: list[np.ndarray] | None = None,
                  times: list[np.ndarray] | None = None, nab_window: float = 60.0,
                  vus_max_buffer: int = 60) -> dict[str, float]:
    """Per-stream range metrics: event recall/precision/delay, VUS-PR and (with change-point
    labels) SKAB's NAB scores; one array per stream (test rows)."""
    out = dict(event_metrics(labels, flags))
    out["vus_pr"] = vus_pr(labels, scores, vus_max_buffer)
    if changepoints is not None and times is not None:
        out.update(nab_score(changepoints, flags, times, nab_window))
    return out


@dataclass
class Evaluation:
    preds: list[StreamPrediction]  # one per part of the data
    threshold: Threshold  # the pooled threshold (fitted on every part's fitting rows)
    metrics: dict[str, float]  # "split/metric"
    #: per-lead-time curves, e.g. "test/h96_mse_by_lead": (H,) for lead times 1..H
    by_lead: dict[str, np.ndarray] = field(default_factory=dict)
    #: the threshold each part is flagged with (the pooled one, or the part's own)
    thresholds: list[Threshold] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)  # (T,) per part


def predict_detector(detector, values: np.ndarray) -> StreamPrediction:
    """Scores of a detector that forecasts nothing (e.g. IsolationForest), with its per-channel
    contributions when it gives them (``contributions(y) -> (B, T, C)``)."""
    y = torch.from_numpy(values[None])
    score = np.asarray(detector.score(y), dtype=np.float64)[0]
    contrib = None
    if hasattr(detector, "contributions"):
        contrib = np.asarray(detector.contributions(y), dtype=np.float64)[0]
    nan = np.full_like(values, np.nan)
    return StreamPrediction(nan, nan, score, contrib)


#: which rows' scores fit a threshold: task.threshold.fit_on
FIT_ROWS = ("train", "val", "train_val")


def fit_rows(part, fit_on: str) -> tuple[int, int]:
    """The row range of ``part`` whose scores fit the threshold (rows assumed normal)."""
    if fit_on == "train_val":
        return (0, part.pre_test_rows())
    return part.rows(fit_on)


def fit_thresholds(data, preds: list[StreamPrediction],
                   make_threshold: Callable[[np.ndarray], Threshold], scope: str = "pooled",
                   fit_on: str = "train", exclude_labelled: bool = False
                   ) -> tuple[Threshold, list[Threshold]]:
    """The pooled threshold and the one each part is flagged with (pooled, or per stream: fitted
    on that stream's own rows; parts without a test split keep the pooled one). Only scores of
    the ``fit_on`` rows enter, never a test row; ``exclude_labelled`` (task.exclude_labelled_train):
    only those of them not labelled as anomalies."""
    if fit_on not in FIT_ROWS:
        raise DataError(f"task.threshold.fit_on must be one of {FIT_ROWS}; got {fit_on!r}")
    if fit_on == "val" and not any(p.rows("val")[1] > p.rows("val")[0] for p in data.parts):
        log.warning("task.threshold.fit_on=val, but the data has no validation rows: the "
                    "threshold is fitted on the training rows")
        fit_on = "train"
    def scores_of(part, pred: StreamPrediction) -> np.ndarray:
        rows = slice(*fit_rows(part, fit_on))
        score = pred.score[rows]
        if exclude_labelled and part.stream.labels is not None:
            score = score[part.stream.labels[rows] != 1]
        return score

    chunks = [scores_of(p, pr) for p, pr in zip(data.parts, preds)]
    chunks = [c for c in chunks if c.size]
    if not chunks and exclude_labelled:
        raise DataError(f"every {fit_on} row is labelled as an anomaly: there is nothing to fit "
                        "the threshold on (task.exclude_labelled_train=true)")
    if not chunks:
        raise DataError(f"no {fit_on} rows to fit the anomaly threshold on "
                        f"(task.threshold.fit_on={fit_on}); use task.threshold.fit_on=train")
    pooled = make_threshold(np.concatenate(chunks))
    if scope == "pooled":
        return pooled, [pooled] * len(preds)
    if scope != "per_stream":
        raise DataError(f"task.threshold.scope must be pooled or per_stream; got {scope!r}")
    own = []
    for p, pr in zip(data.parts, preds):
        score = scores_of(p, pr)
        own.append(make_threshold(score) if p.split is not None and score.size else pooled)
    return pooled, own


def evaluate(model, data, *, score_kind: ScoreSpec | str, context: int, horizon: int,
             eval_stride: int, chunk_size: int, make_threshold: Callable[[np.ndarray], Threshold],
             threshold: Threshold | None = None, scope: str = "pooled", fit_on: str = "train",
             nab_window: float = 60.0, vus_max_buffer: int = 60,
             future_inputs: str = "known", exclude_labelled: bool = False,
             adaptive_calibration: float = 0.0, progress: str | None = None) -> Evaluation:
    """Score every stream from its start, fit the threshold on the ``fit_on`` rows (unless one
    is given; pooled or per stream; ``exclude_labelled``: on those not labelled as anomalies),
    and compute forecast and detection metrics per split (pooled over streams; range metrics
    per stream). Models that use exogenous data get each stream's inputs and time steps.
    ``adaptive_calibration`` > 0: the horizon metrics' variances are adapted causally
    (tsssm.tasks.adaptive_calibration, that rate), each stream's calibration carried from its
    validation windows into its test windows; ``{split}/h{H}_{crps,nll,coverage95}_static``
    are then the unadapted ones. ``progress``: show a bar with this description over the
    streams' scoring and horizon forecasts."""
    forecaster = hasattr(model, "one_step")
    # one unit per stream scored, and per stream's horizon forecasts of the val and test rows
    units = len(data.parts) + (sum(p.rows(split)[1] > p.rows(split)[0] for p in data.parts
                                   for split in ("val", "test")) if forecaster else 0)
    bar = tqdm(total=units, desc=progress, disable=progress is None, unit="step",
               leave=False)
    spec = as_spec(score_kind)
    reanchor = forecaster and spec.reanchor is not None
    preds, step = [], []
    for p in data.parts:
        if forecaster:  # predict_stream, keeping the step terms for the re-anchored score below
            mean, var, terms = stream_terms(model, p.stream.values, spec.kind, chunk_size,
                                            exog=p.exog())
            preds.append(window_prediction(mean, var, terms, spec))
            if reanchor:
                step.append(terms)
        else:
            preds.append(predict_detector(model, p.stream.values))
        bar.update()
    if threshold is None:
        threshold, thresholds = fit_thresholds(data, preds, make_threshold, scope, fit_on,
                                               exclude_labelled)
    else:
        thresholds = [threshold] * len(preds)
    if reanchor:
        # the threshold is fitted on the plain score (above; no label read), where the
        # reference has not moved; the stream is then scored around the moving reference
        preds = [reanchored_prediction(pr, terms, spec, t)
                 for pr, terms, t in zip(preds, step, thresholds)]
    flags = [t.flags(pr.score) for t, pr in zip(thresholds, preds)]
    metrics: dict[str, float] = {"train/threshold": threshold.value}
    by_lead: dict[str, np.ndarray] = {}
    # one causal calibration per stream, run over its validation windows, then its test ones
    adapters = ([AdaptiveCalibration(horizon, adaptive_calibration) for _ in data.parts]
                if adaptive_calibration > 0 else None)
    for split in ("train", "val", "test"):
        present = [i for i, p in enumerate(data.parts) if p.rows(split)[1] > p.rows(split)[0]]
        rows = [(data.parts[i], preds[i], data.parts[i].rows(split)) for i in present]
        if not rows:
            continue
        if forecaster:
            values = np.concatenate([p.stream.values[slice(*r)] for p, _, r in rows])
            means = np.concatenate([pr.mean[slice(*r)] for _, pr, r in rows])
            metrics.update({f"{split}/{k}": v for k, v in forecast_metrics(values, means).items()})
        if forecaster and split != "train":
            static = HorizonAccumulator(horizon) if adapters else None
            acc = horizon_metrics(model, [(p.stream.values, r, p.exog()) for p, _, r in rows],
                                  context, horizon, eval_stride, future_inputs,
                                  on_stream=bar.update,
                                  adaptive=[adapters[i] for i in present] if adapters
                                  else None, static=static)
            if acc.windows:
                prefix = f"{split}/h{horizon}_"
                metrics.update({prefix + k: v for k, v in acc.result().items()})
                if static is not None:
                    metrics.update(static_metrics(static, prefix))
                by_lead.update({f"{prefix}{k}_by_lead": v for k, v in acc.by_lead().items()})
        labelled = [(i, p, r) for i, (p, pr) in enumerate(zip(data.parts, preds))
                    for r in [p.rows(split)] if r[1] > r[0] and p.stream.labels is not None]
        if split == "test" and labelled:
            lab = [data.parts[i].stream.labels[slice(*r)] for i, _, r in labelled]
            sco = [preds[i].score[slice(*r)] for i, _, r in labelled]
            flg = [flags[i][slice(*r)] for i, _, r in labelled]
            m = detection_metrics(np.concatenate(lab), np.concatenate(sco), np.concatenate(flg))
            have_cp = all(p.stream.changepoints is not None for _, p, _ in labelled)
            m.update(range_metrics(
                lab, sco, flg,
                [p.stream.changepoints[slice(*r)] for _, p, r in labelled] if have_cp else None,
                [p.stream.time[slice(*r)] for _, p, r in labelled] if have_cp else None,
                nab_window, vus_max_buffer))
            metrics.update({f"test/{k}": v for k, v in m.items()})
    bar.close()
    return Evaluation(preds, threshold, metrics, by_lead, thresholds, flags)
