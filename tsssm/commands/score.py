"""`tsssm score`: per-timestep anomaly scores and flags from a trained model.

Scores either one file (``data.path=...``: every row) or the test split of the configured
dataset, with the model's own scaling and fitted threshold. Writes a Parquet file of scores
(and logs it, with figures and metrics where labels exist, to one MLflow run)."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
from omegaconf import DictConfig

from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.thresholds import threshold_from_dict
from tsssm.bundle import Bundle
from tsssm.commands.common import (
    MAX_FIGURES,
    figures_for_stream,
    interval_frame,
    resolve_bundle,
    save_figures,
    scored_parts,
    staging,
    stream_frame,
    write_parquet,
)
from tsssm.config import flatten, option_value, to_plain
from tsssm.data.datasets import (
    Part,
    PreparedData,
    build_dataset,
    check_scaled,
    prepare_stream,
    resolve_path,
)
from tsssm.data.io import time_steps
from tsssm.data.scaling import StandardScaler
from tsssm.data.splits import Split
from tsssm.errors import ConfigError, DataError
from tsssm.tasks.evaluate import detection_metrics, predict_stream, range_metrics
from tsssm.tracking import Tracker, writable_dir

log = logging.getLogger("tsssm")


def file_channels(cfg_data, bundle: Bundle, source: str) -> tuple[list[str], str]:
    """The columns to read as the model's channels: ``data.channels`` mapped in order onto
    them when set (a file whose columns are named otherwise), else the model's own names.
    Returns (columns, advice for a missing column)."""
    expected = ", ".join(bundle.channels)
    advice = (f"the model from {source} expects {len(bundle.channels)} channel(s) [{expected}]; "
              "map this file's columns onto them, in order, with data.channels=[...]")
    wanted = list(cfg_data.channels) or list(bundle.channels)
    if len(wanted) != len(bundle.channels):
        raise ConfigError(f"data.channels names {len(wanted)} columns [{', '.join(wanted)}], "
                          f"but {advice.split('; ')[0]}; give exactly {len(bundle.channels)}, in "
                          "the model's order")
    return wanted, advice


def with_training_preprocessing(cfg_data, bundle: Bundle):
    """The data config with what the model was trained on: its inputs (data.inputs) and, for a
    model of real time steps (trained with data.gaps=time), the same time steps."""
    cfg = copy.deepcopy(cfg_data)
    if list(cfg.inputs) != list(bundle.inputs):
        if cfg.inputs:
            log.warning("data.inputs=%s, but the model was trained with inputs %s; using those",
                        list(cfg.inputs), bundle.inputs)
        cfg.inputs = list(bundle.inputs)
    if bundle.data_config.get("gaps") == "time" and option_value(cfg.gaps) != "time":
        log.info("the model was trained on the real time steps: scoring with data.gaps=time")
        cfg.gaps = "time"
    return cfg


def load_file(cfg_data, bundle: Bundle, source: str = "the bundle") -> PreparedData:
    """One file to score whole, read with the model's channels (``data.channels`` mapped in
    order onto them) and scaled as in training."""
    path = resolve_path(cfg_data.path, "data.path")
    columns, advice = file_channels(cfg_data, bundle, source)
    stream, _ = prepare_stream(path, cfg_data, channels=columns, channel_advice=advice)
    stream.channels = list(bundle.channels)
    scaler, input_scaler = bundle.scaler, bundle.input_scaler
    train_rows = bundle.data_config.get("train_rows", 0)
    if bundle.per_stream_scaling:
        if len(stream) > train_rows:
            # SKAB's protocol: each stream is scaled by its own first rows, assumed normal.
            scaler = StandardScaler.fit([stream.values[:train_rows]], bundle.channels)
            if stream.inputs is not None:
                input_scaler = StandardScaler.fit([stream.inputs[:train_rows]], bundle.inputs)
        else:
            log.warning("%s has %d rows, fewer than the %d the model scales each stream by; "
                        "using the training scaler", path, len(stream), train_rows)
    raw = stream.values
    with np.errstate(over="ignore"):
        stream.values = scaler.transform(raw)
    check_scaled(stream, raw, scaler)
    if stream.inputs is not None:
        stream.inputs = input_scaler.transform(stream.inputs)
    n = len(stream)
    part = Part(stream, Split((0, 0), (0, 0), (0, n)), scaler, input_scaler,
                time_steps(stream.time, option_value(cfg_data.gaps) == "time"))
    return PreparedData(stream.name, bundle.channels, [part], bundle.scaler,
                        stream.labels is not None, inputs=list(bundle.inputs),
                        input_scaler=bundle.input_scaler)


def score(cfg: DictConfig) -> str:
    """Run `tsssm score`; returns the MLflow run id."""
    tracker = Tracker.from_config(cfg.tracking)
    params = flatten(to_plain(cfg))
    target = cfg.data.path or cfg.data.name
    name = cfg.run_name or f"score-{Path(str(target)).stem}"
    with tracker.start(name, "score", params, {"tsssm.data": cfg.data.name}) as run:
        output = Path(cfg.score.output or Path(cfg.tracking.output_dir) / "scores"
                      / f"{run.run_id}.parquet")
        # before any scoring: a run must not log scores it then cannot write
        writable_dir(output.parent, "score.output", cfg.score.output)
        bundle, source_run, source = resolve_bundle(cfg.model, tracker)
        tracker.set_tags({"tsssm.model": bundle.model_name,
                          "tsssm.source_run": source_run or source})
        if bundle.threshold is None:
            raise DataError(f"the model from {source} has no fitted threshold")
        cfg_data = with_training_preprocessing(cfg.data, bundle)
        if cfg.data.path:
            data = load_file(cfg_data, bundle, source)
        else:
            columns, _ = file_channels(cfg_data, bundle, source)
            read_cfg = cfg_data.copy()
            read_cfg.channels = columns
            pooled = not bundle.per_stream_scaling
            data = build_dataset(read_cfg).load(
                scaler=bundle.scaler if pooled else None,
                input_scaler=bundle.input_scaler if pooled else None)
            data.channels = list(bundle.channels)
            for part in data.parts:
                part.stream.channels = list(bundle.channels)
        started = time.perf_counter()
        spec = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
        train_rows = int(bundle.data_config.get("train_rows", 0))
        frames, interval_frames, labels, scores, flags_all, cps, times = [], [], [], [], [], [], []
        figures = []
        metrics: dict[str, float] = {}
        with staging(cfg.tracking.output_dir, run.run_id) as folder:
            for i, part in enumerate(scored_parts(data)):
                rows = part.rows("test")
                # The rows before the test split are history: they warm the state up.
                pred = predict_stream(bundle.model, part.stream.values[: rows[1]], spec,
                                      cfg.score.chunk_size, progress=True,
                                      desc=f"scoring {part.stream.name}",
                                      exog=part.exog(0, rows[1]))
                threshold = stream_threshold(bundle, pred.score, train_rows, part.stream.name)
                flags = threshold.flags(pred.score)
                frames.append(stream_frame(part, pred, flags, rows, threshold))
                interval_frames.append(interval_frame(part, pred, flags, rows))
                if part.stream.labels is not None:
                    labels.append(part.stream.labels[slice(*rows)])
                    scores.append(pred.score[slice(*rows)])
                    flags_all.append(flags[slice(*rows)])
                    times.append(part.stream.time[slice(*rows)])
                    if part.stream.changepoints is not None:
                        cps.append(part.stream.changepoints[slice(*rows)])
                if cfg.score.figures and i < MAX_FIGURES:
                    figures += figures_for_stream(part, pred, threshold, flags, rows,
                                                  f"{bundle.model_name} ({source})")
            save_figures(figures, folder / "figures", f"{bundle.model_name} ({source}): "
                         f"scores of {target}")
            table = pl.concat(frames)
            intervals = pl.concat(interval_frames)
            elapsed = time.perf_counter() - started
            metrics["test/rows"] = float(table.height)
            metrics["test/flagged"] = float(table["flag"].sum())
            metrics["test/intervals"] = float(intervals.height)
            metrics["test/rows_per_s"] = table.height / max(elapsed, 1e-9)
            if labels:
                metrics.update({f"test/{k}": v for k, v in detection_metrics(
                    np.concatenate(labels), np.concatenate(scores),
                    np.concatenate(flags_all)).items()})
                metrics.update({f"test/{k}": v for k, v in range_metrics(
                    labels, scores, flags_all, cps if len(cps) == len(labels) else None,
                    times if len(cps) == len(labels) else None,
                    float(cfg.task.nab_window), int(cfg.task.vus_max_buffer)).items()})
            tracker.log_metrics(metrics)
            write_parquet(table, folder / "scores" / "scores.parquet")
            write_parquet(intervals, folder / "scores" / "intervals.parquet")
            tracker.log_dir(folder / "scores", "scores")
            if (folder / "figures").exists():
                tracker.log_dir(folder / "figures", "figures")
            write_parquet(table, output)
            write_parquet(intervals, output.with_name(f"{output.stem}.intervals.parquet"))
        shown = ", ".join(f"{k.split('/')[1]}={metrics[k]:.4f}" for k in
                          ("test/f1", "test/far", "test/mar", "test/auc_pr", "test/vus_pr",
                           "test/nab_standard") if k in metrics)
        print(f"scored {table.height} rows of {target} with {bundle.model_name} ({source}): "
              f"{int(metrics['test/flagged'])} flagged in {intervals.height} intervals "
              f"(threshold {bundle.threshold.value:.3g}"
              f"{', per stream' if bundle.threshold_scope == 'per_stream' else ''})"
              + (f"; {shown}" if shown else ""))
        print_intervals(intervals)
        print(f"  scores: {output}")
        print(f"  flagged intervals: {output.with_name(f'{output.stem}.intervals.parquet')}")
        print(f"  MLflow run {run.run_id} in {tracker.uri}")
        return run.run_id


#: flagged intervals printed by `tsssm score` (all are in the intervals Parquet)
MAX_PRINTED_INTERVALS = 20


def print_intervals(intervals: pl.DataFrame) -> None:
    """The flagged intervals, longest first, each with the sensors that caused it."""
    if intervals.height == 0:
        return
    shown = intervals.sort("rows", descending=True).head(MAX_PRINTED_INTERVALS)
    more = intervals.height - shown.height
    print(f"  flagged intervals (longest {shown.height}"
          f"{f' of {intervals.height}' if more else ''}; which sensors caused each):")
    for r in shown.sort(["stream", "start"]).iter_rows(named=True):
        print(f"    {r['stream']}  {r['start']} .. {r['end']}  ({r['rows']} rows, peak "
              f"{r['peak_score']:.3g}): {r['top'] or 'no attribution'}")


def stream_threshold(bundle: Bundle, scores: np.ndarray, train_rows: int, name: str):
    """The bundle's threshold, or with per-stream scope the same rule refitted on this stream's
    own first ``train_rows`` rows (assumed normal, as its scaler; never on labels)."""
    if bundle.threshold_scope != "per_stream":
        return bundle.threshold
    if len(scores) <= train_rows:
        log.warning("%s has %d rows, not more than the %d its own threshold is fitted on; using "
                    "the pooled training threshold", name, len(scores), train_rows)
        return bundle.threshold
    rule = bundle.threshold.to_dict()
    return threshold_from_dict({"name": rule["name"], "params": rule["params"]}).fit(
        scores[:train_rows])
