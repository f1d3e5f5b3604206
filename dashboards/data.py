"""What the dashboard shows, computed from a run's records and artifacts; no Dash here.

Runs and artifacts come from ``tsssm.tracking.RunStore`` only. Frames follow the artifacts that
the commands log: ``scores/scores.parquet`` (stream, time, score, flag, label, split, optional
``contrib:<channel>``), ``forecasts/test_one_step.parquet`` (stream, time, channel, actual,
mean, std) and ``tables/compare.parquet`` (one row per method).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from threading import Lock
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from tsssm.anomaly.metrics import anomaly_metrics
from tsssm.errors import ModelError
from tsssm.tracking import RunRecord, RunStore

SCORES = "scores/scores.parquet"
FORECASTS = "forecasts/test_one_step.parquet"
COMPARE_TABLE = "tables/compare.parquet"
CONTRIB = "contrib:"
#: metrics shown in the runs table, in this order, where a run has them
HEADLINE = ("test/f1", "test/auc_pr", "test/far", "test/mar", "test/mae", "val/mae")
#: metrics the threshold slider recomputes
LIVE = ("precision", "recall", "f1", "far", "mar")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def when(ms: int | None) -> str:
    """Milliseconds since the epoch as local 'YYYY-MM-DD HH:MM:SS' ('' for None)."""
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone().strftime(
        "%Y-%m-%d %H:%M:%S")


def duration(run: RunRecord) -> str:
    if run.start_time is None:
        return ""
    if run.end_time is None:
        return "running"
    s = max(0, (run.end_time - run.start_time) // 1000)
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def runs_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The runs table: one row per run (the run column is a markdown link to its page)."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "id": r.run_id,
            "run": f"[{r.name}](/run/{r.run_id})",
            "experiment": r.experiment,
            "command": r.command,
            "dataset": r.tags.get("tsssm.data", r.params.get("data.name", "")),
            "model": r.tags.get("tsssm.model", r.params.get("model.name", "")),
            "task": r.params.get("task.name", ""),
            "status": r.status,
            "started": when(r.start_time),
            "duration": duration(r),
        }
        for key in HEADLINE:
            v = r.metrics.get(key)
            row[key] = round(v, 4) if v is not None and math.isfinite(v) else None
        rows.append(row)
    return rows


# -- artifacts, cached ---------------------------------------------------------------------------
class FrameCache:
    """Parquet artifacts read once per viewer (a few runs at a time): artifacts of finished
    runs never change; those of RUNNING runs are read again on every request."""

    def __init__(self, store: RunStore, size: int = 16) -> None:
        self.store = store
        self.size = size
        self._frames: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = Lock()

    def frame(self, run: RunRecord, path: str) -> pl.DataFrame | None:
        """The artifact as a frame, or None if the run has none."""
        key = (run.run_id, path)
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        try:
            local = self.store.fetch(run.run_id, path, refresh=run.status not in TERMINAL)
        except ModelError:
            return None
        frame = pl.read_parquet(local)
        if run.status in TERMINAL:
            self._keep(key, frame)
        return frame

    def score_stream(self, run: RunRecord, stream: str, split: str) -> Stream | None:
        """One stream of the run's scores (``score_stream``), kept between callbacks: a
        slider move or a zoom reuses it instead of filtering and sorting the frame again."""
        key = (run.run_id, f"{SCORES}#{stream}#{split}")
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        scores = self.frame(run, SCORES)
        if scores is None:
            return None
        found = score_stream(scores, stream, split)
        if run.status in TERMINAL:
            self._keep(key, found)
        return found

    def _keep(self, key: tuple[str, str], value: Any) -> None:
        with self._lock:
            self._frames[key] = value
            while len(self._frames) > self.size:
                self._frames.popitem(last=False)


# -- scores and the threshold --------------------------------------------------------------------
def contrib_channels(scores: pl.DataFrame) -> list[str]:
    """Channels with an attribution column ``contrib:<channel>``, in column order."""
    return [c[len(CONTRIB):] for c in scores.columns if c.startswith(CONTRIB)]


def evaluated_rows(scores: pl.DataFrame) -> pl.DataFrame:
    """The rows the run's test metrics are computed on: the test split where the frame has
    splits (train runs), else every row (score runs)."""
    if "split" in scores.columns:
        return scores.filter(pl.col("split") == "test")
    return scores


def fitted_threshold(run: RunRecord, scores: pl.DataFrame,
                     source: RunRecord | None = None) -> float | None:
    """The threshold the run used: its logged ``train/threshold`` (a score run: its source
    run's), else the one its flags imply (the largest unflagged score, as flags are score >
    threshold); None without either."""
    for r in (run, source):
        if r is not None and "train/threshold" in r.metrics:
            return float(r.metrics["train/threshold"])
    if "flag" not in scores.columns:
        return None
    unflagged = scores.filter(~pl.col("flag"))["score"]
    if unflagged.len():
        return float(unflagged.max())
    flagged = scores["score"]
    return float(flagged.min()) - 1e-12 if flagged.len() else None


def threshold_grid(scores: np.ndarray, fitted: float | None, steps: int = 200) -> list[float]:
    """Candidate thresholds for the slider: quantiles of the scores (fine where the scores
    are dense), the fitted threshold, and the maximum (nothing flagged)."""
    s = scores[np.isfinite(scores)]
    if not s.size:
        return [fitted] if fitted is not None else [0.0]
    grid = np.quantile(s, np.linspace(0.0, 1.0, steps + 1))
    if fitted is not None and math.isfinite(fitted):
        grid = np.append(grid, fitted)
    return [float(v) for v in np.unique(grid)]


def metrics_at(scores: pl.DataFrame, threshold: float) -> dict[str, float] | None:
    """Precision, recall, F1, FAR, MAR of flags ``score > threshold`` on the evaluated rows
    with labels (None without labels)."""
    rows = evaluated_rows(scores)
    if "label" not in rows.columns or rows.height == 0:
        return None
    labels = rows["label"].to_numpy().astype(int)
    flags = rows["score"].to_numpy() > threshold
    m = anomaly_metrics(labels, flags)
    return {k: m[k] for k in (*LIVE, "n_flagged", "n_positive", "n")}


class Stream(NamedTuple):
    time: np.ndarray  # (T,) datetime64 or numbers
    score: np.ndarray  # (T,)
    label: np.ndarray | None  # (T,) 0/1
    contrib: np.ndarray | None  # (T, C) per-channel shares of the score
    channels: list[str]


def stream_names(frame: pl.DataFrame) -> list[str]:
    return frame["stream"].unique(maintain_order=True).to_list()


def score_stream(scores: pl.DataFrame, stream: str, split: str = "test") -> Stream:
    """One stream's rows of the scores frame (``split``: 'test' or 'all')."""
    rows = scores.filter(pl.col("stream") == stream)
    if split != "all" and "split" in rows.columns:
        rows = rows.filter(pl.col("split") == split)
    if not rows["time"].is_sorted():  # the commands write each stream in time order
        rows = rows.sort("time")
    channels = contrib_channels(rows)
    contrib = (np.column_stack([rows[CONTRIB + c].to_numpy() for c in channels])
               if channels else None)
    return Stream(rows["time"].to_numpy(), rows["score"].to_numpy().astype(np.float64),
                  rows["label"].to_numpy() if "label" in rows.columns else None,
                  contrib, channels)


@dataclass
class Interval:
    first: int  # row index in the stream
    last: int
    start: Any  # time of the first row
    end: Any
    peak: float

    @property
    def label(self) -> str:
        return f"{_show_time(self.start)} - {_show_time(self.end)} ({self.last - self.first + 1}" \
               f" rows, peak {self.peak:.3g})"


def _show_time(t: Any) -> str:
    if isinstance(t, np.datetime64):
        return np.datetime_as_string(t, unit="s").replace("T", " ")
    return f"{t:g}" if isinstance(t, float | np.floating) else str(t)


def flagged_intervals(stream: Stream, threshold: float, merge_gap: int = 5,
                      limit: int = 200) -> list[Interval]:
    """Runs of flagged rows (``score > threshold``), runs closer than ``merge_gap`` rows merged,
    highest peak first (at most ``limit``)."""
    from tsssm.plots import runs_of

    runs = runs_of(stream.score > threshold)
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] <= merge_gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    out = [Interval(a, b, stream.time[a], stream.time[b], float(np.max(stream.score[a:b + 1])))
           for a, b in merged]
    out.sort(key=lambda iv: -iv.peak)
    return out[:limit]


def attribution(stream: Stream, interval: Interval) -> dict[str, float]:
    """{channel: summed contribution over the interval's rows}."""
    if stream.contrib is None:
        return {}
    part = stream.contrib[interval.first : interval.last + 1]
    return {c: float(np.nansum(part[:, j])) for j, c in enumerate(stream.channels)}


# -- forecasts ---------------------------------------------------------------------------------
class ForecastStream(NamedTuple):
    time: np.ndarray  # (T,)
    actual: np.ndarray  # (T, C)
    mean: np.ndarray  # (T, C)
    std: np.ndarray  # (T, C)
    channels: list[str]


def forecast_stream(forecasts: pl.DataFrame, stream: str,
                    channels: Sequence[str] | None = None) -> ForecastStream:
    """One stream of the long forecasts frame as (T, C) arrays, for ``channels`` (default all,
    in the frame's order)."""
    rows = forecasts.filter(pl.col("stream") == stream)
    every = rows["channel"].unique(maintain_order=True).to_list()
    chosen = [c for c in every if channels is None or c in channels] or every[:1]
    parts = {c: rows.filter(pl.col("channel") == c).sort("time") for c in chosen}
    time = parts[chosen[0]]["time"].to_numpy()
    stack = {k: np.column_stack([parts[c][k].to_numpy().astype(np.float64) for c in chosen])
             for k in ("actual", "mean", "std")}
    return ForecastStream(time, stack["actual"], stack["mean"], stack["std"], chosen)


def forecast_channels(forecasts: pl.DataFrame) -> list[str]:
    return forecasts["channel"].unique(maintain_order=True).to_list()


# -- comparison --------------------------------------------------------------------------------
def comparison_rows(runs: Sequence[RunRecord], cache: FrameCache) -> list[dict[str, Any]]:
    """One row per method: a train or score run is one (named by its model and run), a compare
    run contributes every row of its table (its models and the classical comparators)."""
    rows: list[dict[str, Any]] = []
    for r in runs:
        short = r.run_id[:8]
        if r.command == "compare":
            table = cache.frame(r, COMPARE_TABLE)
            if table is not None:
                for row in table.to_dicts():
                    rows.append({**row, "method": f"{row.get('method', '?')} ({short})",
                                 "run": r.run_id, "status": r.status})
                continue
        metrics = {k: v for k, v in r.metrics.items() if "/" in k and "." not in k}
        rows.append({"method": f"{r.tags.get('tsssm.model', r.command or 'run')} ({short})",
                     "kind": r.command, "run": r.run_id, "status": r.status, **metrics})
    return rows


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric keys present in ``rows`` (``split/metric``, and a compare table's ``h_*``
    horizon errors): test/ first, then val/, then the rest."""
    keys = {k for r in rows for k, v in r.items()
            if ("/" in k or k.startswith("h_")) and isinstance(v, int | float)
            and not isinstance(v, bool)}
    order = {"test": 0, "val": 1, "train": 2}
    return sorted(keys, key=lambda k: (order.get(k.split("/")[0], 3), k))


# -- benchmark results -------------------------------------------------------------------------
class BenchmarkTable(NamedTuple):
    name: str
    rows: list[dict[str, Any]]
    columns: list[str]
    modified: str


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        elif isinstance(v, list):
            out[key] = json.dumps(v) if len(json.dumps(v)) < 200 else f"[{len(v)} values]"
        else:
            out[key] = v
    return out


def benchmark_tables(folder: Path | None) -> list[BenchmarkTable]:
    """Every ``*.json`` under ``folder`` as a table: a list of records (or a dict holding one
    under 'records'/'results'/'rows') row per record, any other object one row."""
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out.append(BenchmarkTable(path.name, [{"error": f"cannot read {path}: {err}"}],
                                      ["error"], ""))
            continue
        if isinstance(data, dict):
            inner = next((data[k] for k in ("records", "results", "rows")
                          if isinstance(data.get(k), list)), None)
            data = inner if inner is not None else [data]
        if not isinstance(data, list):
            data = [{"value": data}]
        rows = [_flat(r) if isinstance(r, dict) else {"value": r} for r in data]
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        modified = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        out.append(BenchmarkTable(path.name, rows, columns, modified))
    return out


def default_benchmarks_dir() -> Path | None:
    """benchmarks/results under the working directory, else beside the tsssm sources."""
    import tsssm

    for root in (Path.cwd(), Path(tsssm.__file__).resolve().parents[1]):
        if (root / "benchmarks" / "results").is_dir():
            return root / "benchmarks" / "results"
    return None
