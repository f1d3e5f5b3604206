"""Evaluation shared by `train`, `score` and `compare`: one-step predictions over whole streams
(chunked, state carried), horizon forecasts from rolling origins, anomaly scores and metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from tsssm.anomaly.metrics import anomaly_metrics, forecast_metrics
from tsssm.anomaly.scores import anomaly_scores
from tsssm.anomaly.thresholds import Threshold
from tsssm.models.base import Gaussian


@dataclass
class StreamPrediction:
    """One-step predictions and scores for every row of a stream."""

    mean: np.ndarray  # (T, C)
    var: np.ndarray  # (T, C)
    score: np.ndarray  # (T,)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def predict_stream(model, values: np.ndarray, score_kind: str, chunk_size: int = 100_000,
                   progress: bool = False, desc: str = "scoring") -> StreamPrediction:
    """Run ``model.one_step`` over a whole stream in chunks, carrying the state.  values (T, C)."""
    device = _device_of(model)
    state = None
    means, variances, scores = [], [], []
    starts = range(0, len(values), chunk_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, unit="chunk"):
        y = torch.from_numpy(np.ascontiguousarray(values[start : start + chunk_size]))
        y = y.to(device=device, dtype=torch.float32).unsqueeze(0)  # (1, T, C)
        pred, state = model.one_step(y, state)
        score = anomaly_scores(y, pred, kind=score_kind)  # (1, T)
        means.append(pred.mean[0].float().cpu().numpy())
        variances.append(pred.var[0].float().cpu().numpy())
        scores.append(score[0].float().cpu().numpy())
    return StreamPrediction(np.concatenate(means), np.concatenate(variances),
                            np.concatenate(scores))


@torch.no_grad()
def forecast_origins(model, values: np.ndarray, rows: tuple[int, int], context: int,
                     horizon: int, stride: int, batch_size: int = 256
                     ) -> tuple[Gaussian, np.ndarray, np.ndarray] | None:
    """Horizon forecasts from origins inside ``rows``: each uses the ``context`` rows before it
    (which may reach into the previous split, as in ETT) and predicts the next ``horizon`` rows,
    all inside ``rows``. Returns (Gaussian (N, H, C), targets (N, H, C), origins (N,))."""
    start, stop = rows
    first = max(start, context)
    origins = np.arange(first, stop - horizon + 1, stride)
    if len(origins) == 0:
        return None
    device = _device_of(model)
    series = torch.from_numpy(np.ascontiguousarray(values)).float()
    means, variances = [], []
    for i in range(0, len(origins), batch_size):
        idx = origins[i : i + batch_size]
        ctx = torch.stack([series[o - context : o] for o in idx]).to(device)  # (b, L, C)
        pred = model.forecast(ctx, horizon)
        means.append(pred.mean.float().cpu())
        variances.append(pred.var.float().cpu())
    targets = np.stack([values[o : o + horizon] for o in origins])
    return (Gaussian(torch.cat(means), torch.cat(variances)), targets, origins)


def detection_metrics(labels: np.ndarray, scores: np.ndarray, flags: np.ndarray) -> dict:
    return anomaly_metrics(labels.astype(int), flags.astype(bool), scores)


@dataclass
class Evaluation:
    preds: list[StreamPrediction]  # one per part of the data
    threshold: Threshold
    metrics: dict[str, float]  # "split/metric"


def predict_detector(detector, values: np.ndarray) -> StreamPrediction:
    """Scores of a detector that forecasts nothing (e.g. IsolationForest)."""
    score = np.asarray(detector.score(torch.from_numpy(values[None])), dtype=np.float64)[0]
    nan = np.full_like(values, np.nan)
    return StreamPrediction(nan, nan, score)


def evaluate(model, data, *, score_kind: str, context: int, horizon: int, eval_stride: int,
             chunk_size: int, make_threshold: Callable[[np.ndarray], Threshold],
             threshold: Threshold | None = None) -> Evaluation:
    """Score every stream from its start, fit the threshold on the training rows (unless one
    is given), and compute forecast and detection metrics per split (pooled over streams)."""
    forecaster = hasattr(model, "one_step")
    preds = [
        predict_stream(model, p.stream.values, score_kind, chunk_size) if forecaster
        else predict_detector(model, p.stream.values)
        for p in data.parts
    ]
    if threshold is None:
        train_scores = np.concatenate(
            [pr.score[slice(*p.rows("train"))] for p, pr in zip(data.parts, preds)])
        threshold = make_threshold(train_scores)
    metrics: dict[str, float] = {"train/threshold": threshold.value}
    for split in ("train", "val", "test"):
        rows = [(p, pr, p.rows(split)) for p, pr in zip(data.parts, preds)
                if p.rows(split)[1] > p.rows(split)[0]]
        if not rows:
            continue
        if forecaster:
            values = np.concatenate([p.stream.values[slice(*r)] for p, _, r in rows])
            means = np.concatenate([pr.mean[slice(*r)] for _, pr, r in rows])
            metrics.update({f"{split}/{k}": v for k, v in forecast_metrics(values, means).items()})
        if forecaster and split != "train":
            found = [forecast_origins(model, p.stream.values, r, context, horizon, eval_stride)
                     for p, _, r in rows]
            found = [x for x in found if x is not None]
            if found:
                pm = np.concatenate([x[0].mean.numpy() for x in found])
                tg = np.concatenate([x[1] for x in found])
                metrics.update({f"{split}/h{horizon}_{k}": v
                                for k, v in forecast_metrics(tg, pm).items()})
        labelled = [(p, pr, r) for p, pr, r in rows if p.stream.labels is not None]
        if split == "test" and labelled:
            labels = np.concatenate([p.stream.labels[slice(*r)] for p, _, r in labelled])
            scores = np.concatenate([pr.score[slice(*r)] for _, pr, r in labelled])
            m = detection_metrics(labels, scores, threshold.flags(scores))
            metrics.update({f"test/{k}": v for k, v in m.items()})
    return Evaluation(preds, threshold, metrics)
