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

from tsssm.bundle import Bundle
from tsssm.commands.common import (
    MAX_FIGURES,
    figures_for_stream,
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
from tsssm.tasks.evaluate import detection_metrics, predict_stream
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
        frames, labels, scores, flags_all, figures = [], [], [], [], []
        metrics: dict[str, float] = {}
        with staging(cfg.tracking.output_dir, run.run_id) as folder:
            for i, part in enumerate(scored_parts(data)):
                rows = part.rows("test")
                # The rows before the test split are history: they warm the state up.
                pred = predict_stream(bundle.model, part.stream.values[: rows[1]],
                                      bundle.score_kind, cfg.score.chunk_size, progress=True,
                                      desc=f"scoring {part.stream.name}",
                                      exog=part.exog(0, rows[1]))
                flags = bundle.threshold.flags(pred.score)
                frames.append(stream_frame(part, pred, flags, rows))
                if part.stream.labels is not None:
                    labels.append(part.stream.labels[slice(*rows)])
                    scores.append(pred.score[slice(*rows)])
                    flags_all.append(flags[slice(*rows)])
                if cfg.score.figures and i < MAX_FIGURES:
                    figures += figures_for_stream(part, pred, bundle.threshold, flags, rows,
                                                  f"{bundle.model_name} ({source})")
            save_figures(figures, folder / "figures", f"{bundle.model_name} ({source}): "
                         f"scores of {target}")
            table = pl.concat(frames)
            elapsed = time.perf_counter() - started
            metrics["test/rows"] = float(table.height)
            metrics["test/flagged"] = float(table["flag"].sum())
            metrics["test/rows_per_s"] = table.height / max(elapsed, 1e-9)
            if labels:
                metrics.update({f"test/{k}": v for k, v in detection_metrics(
                    np.concatenate(labels), np.concatenate(scores),
                    np.concatenate(flags_all)).items()})
            tracker.log_metrics(metrics)
            write_parquet(table, folder / "scores" / "scores.parquet")
            tracker.log_dir(folder / "scores", "scores")
            if (folder / "figures").exists():
                tracker.log_dir(folder / "figures", "figures")
            write_parquet(table, output)
        shown = ", ".join(f"{k.split('/')[1]}={metrics[k]:.4f}" for k in
                          ("test/f1", "test/far", "test/mar", "test/auc_pr") if k in metrics)
        print(f"scored {table.height} rows of {target} with {bundle.model_name} ({source}): "
              f"{int(metrics['test/flagged'])} flagged (threshold {bundle.threshold.value:.3g})"
              + (f"; {shown}" if shown else ""))
        print(f"  scores: {output}")
        print(f"  MLflow run {run.run_id} in {tracker.uri}")
        return run.run_id
