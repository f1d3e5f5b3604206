"""Pieces every command shares: seeding, the tracker, artifacts written whole, summaries."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tsssm.anomaly.attribution import flagged_intervals
from tsssm.anomaly.reanchor import ReanchorSpec
from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.thresholds import Threshold, build_threshold
from tsssm.bundle import Bundle, load_bundle
from tsssm.config import option_value
from tsssm.data.datasets import Part, PreparedData
from tsssm.errors import ModelError
from tsssm.tasks.evaluate import StreamPrediction

log = logging.getLogger("tsssm")

#: streams drawn in a run's figure report (figures/report.html, one copy of plotly.js)
MAX_FIGURES = 3


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def staging(output_dir: str, run_id: str) -> Iterator[Path]:
    """A private folder for a run's artifacts; removed after they are logged, so nothing
    half-written is ever left where a result is expected."""
    root = Path(output_dir) / "staging"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_parquet(frame: pl.DataFrame, path: Path) -> Path:
    """Write via a temporary name and rename, so a crash leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def labelled_training_rows(cfg_task, data) -> bool:
    """Say (one line) how many training rows are labelled as anomalies, and what is done with
    them; returns whether they are left out of the fits (task.exclude_labelled_train)."""
    n_train, n_val = data.labelled_rows("train"), data.labelled_rows("val")
    if n_train + n_val == 0:
        return False
    where = f"{n_train} training rows" + (f" and {n_val} validation rows" if n_val else "")
    if cfg_task.exclude_labelled_train:
        log.info("task.exclude_labelled_train: %s labelled as anomalies are left out of the "
                 "threshold and model fits (as missing values)", where)
        return True
    log.warning("%s are labelled as anomalies and the threshold and model are fitted on them "
                "too; task.exclude_labelled_train=true fits on normal rows only", where)
    return False


def threshold_rule(cfg_task) -> Threshold:
    """The unfitted threshold ``task.threshold`` describes (pot/spot/dspot: the risk knob)."""
    t = cfg_task.threshold
    pot = {"q": t.risk, "level": t.level}
    kwargs = {"quantile": {"q": t.q}, "max": {"factor": t.factor}, "pot": pot, "spot": pot,
              "dspot": {**pot, "depth": t.depth}}[t.name]
    return build_threshold(t.name, **kwargs)


def fit_threshold(cfg_task, train_scores: np.ndarray) -> Threshold:
    """Fit ``task.threshold`` on scores of rows assumed normal (never on labels)."""
    return threshold_rule(cfg_task).fit(train_scores)


def score_spec(cfg_task) -> ScoreSpec:
    """The anomaly score ``task.score`` and ``task.window`` describe."""
    w = cfg_task.window
    ra = w.get("reanchor") if hasattr(w, "get") else getattr(w, "reanchor", None)
    reanchor = None
    if ra is not None:
        spec = ReanchorSpec(float(ra.alpha), float(ra.gamma), float(ra.rho), int(ra.hold))
        reanchor = spec if spec.active else None  # off: the plain shift score; checked below
    return ScoreSpec(option_value(cfg_task.score), int(w.size), option_value(w.kind),
                     option_value(w.align), reanchor).check()


def evaluation_options(cfg_task) -> dict:
    """Keyword arguments of tsssm.tasks.evaluate.evaluate from the task config."""
    return dict(score_kind=score_spec(cfg_task), scope=cfg_task.threshold.scope,
                fit_on=cfg_task.threshold.fit_on, nab_window=cfg_task.nab_window,
                vus_max_buffer=cfg_task.vus_max_buffer,
                adaptive_calibration=cfg_task.adaptive_calibration,
                make_threshold=lambda s: fit_threshold(cfg_task, s))


def stream_frame(part: Part, pred: StreamPrediction, flags: np.ndarray | None,
                 rows: tuple[int, int], threshold: Threshold | None = None) -> pl.DataFrame:
    """Per-timestep scores (and flags, labels, the threshold in force and each channel's
    additive contribution ``contrib:<channel>``) of one stream's rows."""
    start, stop = rows
    s = part.stream
    cols = {
        "stream": [s.name] * (stop - start),
        "time": s.time[start:stop],
        "score": pred.score[start:stop],
    }
    if flags is not None:
        cols["flag"] = flags[start:stop].astype(bool)
    if threshold is not None:
        cols["threshold"] = threshold.levels(pred.score)[start:stop]
    if s.labels is not None:
        cols["label"] = s.labels[start:stop].astype(np.int8)
    if pred.contrib is not None:
        for j, name in enumerate(s.channels):
            cols[f"contrib:{name}"] = pred.contrib[start:stop, j]
    return pl.DataFrame(cols)


def interval_frame(part: Part, pred: StreamPrediction, flags: np.ndarray,
                   rows: tuple[int, int]) -> pl.DataFrame:
    """One row per flagged interval of a stream's rows: where, how long, its peak score and
    which sensors caused it (``top``: the largest shares; ``share:<channel>``: every share)."""
    start, stop = rows
    s = part.stream
    found = flagged_intervals(flags[start:stop], pred.score[start:stop],
                              None if pred.contrib is None else pred.contrib[start:stop],
                              s.channels)
    first = np.asarray([start + iv.start for iv in found], dtype=np.int64)
    last = np.asarray([start + iv.stop - 1 for iv in found], dtype=np.int64)
    return pl.DataFrame([
        pl.Series("stream", [s.name] * len(found), dtype=pl.String),
        pl.Series("start", s.time[first]),
        pl.Series("end", s.time[last]),
        pl.Series("rows", [iv.stop - iv.start for iv in found], dtype=pl.Int64),
        pl.Series("peak_score", [iv.peak for iv in found], dtype=pl.Float64),
        pl.Series("top", [iv.describe() for iv in found], dtype=pl.String),
        *[pl.Series(f"share:{c}", [iv.shares.get(c, float("nan")) for iv in found],
                    dtype=pl.Float64) for c in s.channels],
    ])


def forecast_frame(part: Part, pred: StreamPrediction, rows: tuple[int, int]) -> pl.DataFrame:
    """One-step forecasts in long form (stream, time, channel, actual, mean, std), in the
    stream's original units."""
    start, stop = rows
    s = part.stream
    scaler = part.scaler
    actual = scaler.inverse_mean(s.values[start:stop])
    mean = scaler.inverse_mean(pred.mean[start:stop])
    std = scaler.inverse_std(np.sqrt(pred.var[start:stop]))
    n, c = actual.shape
    return pl.DataFrame({
        "stream": [s.name] * (n * c),
        "time": np.repeat(s.time[start:stop], c),
        "channel": np.tile(np.asarray(s.channels), n),
        "actual": actual.reshape(-1),
        "mean": mean.reshape(-1),
        "std": std.reshape(-1),
    })


def figures_for_stream(part: Part, pred: StreamPrediction, threshold: Threshold | None,
                       flags: np.ndarray | None, rows: tuple[int, int],
                       title: str) -> list[tuple[str, object]]:
    """[(name, figure)]: the one-step forecast and the anomaly score of one stream's rows."""
    from tsssm import plots

    start, stop = rows
    s = part.stream
    scaler = part.scaler
    out: list[tuple[str, object]] = []
    if np.isfinite(pred.mean[start:stop]).any():  # detectors forecast nothing
        out.append((f"forecast {s.name}", plots.forecast_figure(
            s.time[start:stop],
            scaler.inverse_mean(s.values[start:stop]),
            scaler.inverse_mean(pred.mean[start:stop]),
            scaler.inverse_std(np.sqrt(pred.var[start:stop])),
            s.channels,
            title=f"{title}: one-step forecast, {s.name}",
        )))
    anomaly = plots.anomaly_figure(
        s.time[start:stop],
        pred.score[start:stop],
        threshold.value if threshold is not None else None,
        None if s.labels is None else s.labels[start:stop],
        None if flags is None else flags[start:stop],
        title=f"{title}: anomaly score, {s.name}",
        contributions=None if pred.contrib is None else pred.contrib[start:stop],
        channel_names=s.channels,
    )
    out.append((f"anomaly score {s.name}", anomaly))
    return out


def save_figures(figures: list[tuple[str, object]], folder: Path, title: str) -> None:
    """A run's figures as one report (one copy of plotly.js): ``folder/report.html``."""
    from tsssm import plots

    if figures:
        plots.save_report(figures, folder / "report.html", title=title)


def scored_parts(data: PreparedData) -> list[Part]:
    """Parts that have a test split (extra training files have none)."""
    return [p for p in data.parts if p.split is not None]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table: the first column left-aligned, numbers to 4 decimals."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4f}"
        return str(v)

    body = [[cell(r.get(c, float("nan"))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)])


def load_trained(source: str, tracker, key: str = "model.run_id") -> tuple[Bundle, str | None]:
    """A trained model from a bundle folder (or a file in it) or an MLflow train run id;
    ``key`` is the config key that named it. Returns (Bundle, run id or None)."""
    if Path(source).expanduser().exists():
        return load_bundle(Path(source).expanduser()), None
    folder = tracker.download(source, "model", key=key)
    try:
        return load_bundle(folder), source
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def resolve_bundle(model_cfg, tracker, model_name: str | None = None):
    """The trained model a command should use: ``model.checkpoint`` (a bundle folder),
    ``model.run_id`` (an MLflow train run), or else the newest finished train run.
    Returns (Bundle, run id or None, description)."""
    if model_cfg.checkpoint:
        if not Path(model_cfg.checkpoint).expanduser().exists():
            raise ModelError(f"model.checkpoint={model_cfg.checkpoint}: no such file or folder")
        bundle, _ = load_trained(model_cfg.checkpoint, tracker)
        return bundle, None, str(model_cfg.checkpoint)
    run_id = model_cfg.run_id or tracker.latest_run("train", model_name)
    bundle, _ = load_trained(run_id, tracker)
    return bundle, run_id, f"run {run_id}"
