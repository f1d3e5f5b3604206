"""`tsssm score`: per-timestep anomaly scores and flags from a trained model.

What it scores:

- ``data.path=<file>``: one CSV/Parquet file of any length, read in batches with the model's
  state carried and the scores written as they come (tsssm.scoring.files): memory stays flat in
  the stream's length, and the output appears only once complete;
- ``data.path=<folder or glob>``: every file in it, in parallel (``score.workers`` processes, or
  ``score.engine=dask`` on a Dask cluster), one Parquet per input under ``score.output``; a
  failing file is named and the others are still written;
- ``data.path=-`` (standard input) or ``score.follow=true`` (a growing CSV file): live, one
  line ``time,score,flag`` per row on standard output as the rows arrive;
- no ``data.path``: the test split of the configured dataset (history before it warms up the
  state).

The model knows how its data looked: the time column, its format, the label column, the
separator, gap and duplicate handling and the scaling come from the bundle unless set on the
command line (``tsssm score data.path=new.parquet model.run_id=<id>`` is enough); the channels
are the model's, or ``data.channels=[...]`` mapped in order onto them."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Sequence
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
    read_spec,
    resolve_path,
)
from tsssm.data.io import ReadSpec, Stream, time_steps
from tsssm.data.scaling import StandardScaler
from tsssm.data.splits import Split
from tsssm.errors import ConfigError, DataError
from tsssm.tasks.evaluate import (
    StreamPrediction,
    detection_metrics,
    flag_stream,
    range_metrics,
)
from tsssm.tracking import Tracker, writable_dir

log = logging.getLogger("tsssm")

#: data keys a bundle supplies for reading new files, unless the command line sets them
MODEL_KEYS = ("time_column", "time_format", "label_column", "ignore_columns", "separator",
              "gaps", "gap_factor", "fill", "duplicates", "sort")


def explicit_keys(overrides: Sequence[str] | None) -> set[str]:
    """The ``data.*`` keys the command line sets (``data.time_column=ts`` -> ``time_column``)."""
    keys = set()
    for item in overrides or ():
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            keys.add(key[len("data."):].split(".")[0])
    return keys


def model_data(cfg_data: DictConfig, bundle: Bundle, explicit: set[str]) -> DictConfig:
    """How to read a new file for this model: the bundle's reading keys (MODEL_KEYS), except
    those given on the command line, and the model's channels unless data.channels is given."""
    data = cfg_data.copy()
    for key in MODEL_KEYS:
        if key not in explicit and key in bundle.data_config:
            data[key] = bundle.data_config[key]
    if "channels" not in explicit:
        data.channels = []
    return data


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


def file_spec(cfg_data, bundle: Bundle, source: str) -> ReadSpec:
    """The ReadSpec of a file to score: the model's channels (or data.channels onto them)."""
    columns, advice = file_channels(cfg_data, bundle, source)
    spec = read_spec(cfg_data)
    return ReadSpec(**{**spec.__dict__, "channels": tuple(columns), "channel_advice": advice})


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
    """One file read whole, with the model's channels (``data.channels`` mapped in order onto
    them) and scaled as in training (the in-memory path; ``tsssm score`` streams instead)."""
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


def scorer_options(cfg_data: DictConfig, bundle: Bundle, explicit: set[str]) -> dict:
    """Scaling overrides from the command line: data.scaler, data.train_rows."""
    options: dict = {}
    if "scaler" in explicit:
        options["per_stream_scaling"] = option_value(cfg_data.scaler) == "per_stream"
    if "train_rows" in explicit:
        options["calibration_rows"] = int(cfg_data.train_rows)
    return options


def _summary(metrics: dict) -> str:
    shown = ", ".join(f"{k.split('/')[1]}={metrics[k]:.4f}" for k in
                      ("test/f1", "test/far", "test/mar", "test/auc_pr") if k in metrics)
    return f"; {shown}" if shown else ""


def score(cfg: DictConfig, overrides: Sequence[str] | None = None) -> str:
    """Run `tsssm score`; returns the MLflow run id. ``overrides``: the command line's, to tell
    the keys a user set from the defaults the bundle replaces."""
    from tsssm.scoring.many import is_many

    tracker = Tracker.from_config(cfg.tracking)
    params = flatten(to_plain(cfg))
    target = cfg.data.path or cfg.data.name
    live = cfg.data.path == "-" or cfg.score.follow
    many = bool(cfg.data.path) and not live and is_many(str(cfg.data.path))
    name = cfg.run_name or f"score-{Path(str(target)).stem or 'stdin'}"
    with tracker.start(name, "score", params, {"tsssm.data": cfg.data.name}) as run:
        default = Path(cfg.tracking.output_dir) / "scores" / (
            run.run_id if many else f"{run.run_id}.parquet")
        output = Path(cfg.score.output or default)
        if not live:  # before any scoring: a run must not log scores it then cannot write
            writable_dir(output if many else output.parent, "score.output", cfg.score.output)
        bundle, source_run, source = resolve_bundle(cfg.model, tracker)
        tracker.set_tags({"tsssm.model": bundle.model_name,
                          "tsssm.source_run": source_run or source})
        if bundle.threshold is None:
            raise DataError(f"the model from {source} has no fitted threshold")
        explicit = explicit_keys(overrides)
        cfg_data = with_training_preprocessing(cfg.data, bundle)
        if cfg.data.path:
            data_cfg = model_data(cfg_data, bundle, explicit)
            whole = why_read_whole(data_cfg, bundle)
            if whole is not None:
                if live or many:
                    raise ConfigError(
                        f"the model from {source} {whole}: it scores one file at a time, read "
                        "whole; live and many-file scoring need a model without that")
                log.info("the model from %s %s: %s is read whole", source, whole,
                         cfg.data.path)
                return _score_in_memory(cfg, data_cfg, bundle, output, tracker, source)
            spec = file_spec(data_cfg, bundle, source)
            options = scorer_options(cfg.data, bundle, explicit)
            if live:
                return _score_live(cfg, data_cfg, spec, bundle, options, tracker, source)
            if many:
                return _score_many(cfg, data_cfg, spec, bundle, options, output, tracker,
                                   source)
            return _score_one(cfg, data_cfg, spec, bundle, options, output, tracker, source)
        return _score_in_memory(cfg, cfg_data, bundle, output, tracker, source)


def streams_in_batches(data_cfg, bundle: Bundle) -> bool:
    """Whether a file can be scored in batches (tsssm.scoring), or must be read whole, as in
    training: see :func:`why_read_whole`."""
    return why_read_whole(data_cfg, bundle) is None


def why_read_whole(data_cfg, bundle: Bundle) -> str | None:
    """Why a file is read whole rather than in batches (None: it streams). The batch scorer
    covers every score (one-step, windowed, joint Mahalanobis, with contributions) and every
    threshold (pooled, streaming, per stream); models that take inputs or real time steps are
    scored by the in-memory path."""
    from tsssm.models.base import needs_exog

    if bundle.inputs or needs_exog(bundle.model) or option_value(data_cfg.gaps) == "time":
        return "takes inputs (data.inputs) or real time steps (data.gaps=time)"
    return None


def _read_options(data_cfg: DictConfig) -> dict:
    return {"gaps": option_value(data_cfg.gaps), "gap_factor": float(data_cfg.gap_factor),
            "fill": option_value(data_cfg.fill)}


def _log_scores(tracker: Tracker, folder: Path, files: list[Path], rows: int,
                limit: int, intervals: list[Path] | None = None) -> None:
    """The scores as the run's ``scores/`` artifact when there are at most ``limit`` rows;
    longer ones stay where they were written, named by a tag (no second copy of 10^8 rows).
    ``intervals``: the flagged intervals files (logged beside them, as intervals.parquet)."""
    if rows > limit:
        tracker.set_tags({"tsssm.scores": str(files[0].parent if len(files) > 1 else files[0])})
        log.info("%d scored rows: the scores stay at %s (score.artifact_max_rows=%d)", rows,
                 files[0] if len(files) == 1 else files[0].parent, limit)
        return
    (folder / "scores").mkdir(parents=True, exist_ok=True)
    named = [(f, "scores.parquet" if len(files) == 1 else f"{i:05d}_{f.name}")
             for i, f in enumerate(files)]
    intervals = intervals or []
    named += [(f, "intervals.parquet" if len(intervals) == 1 else f"{i:05d}_{f.name}")
              for i, f in enumerate(intervals)]
    for f, name in named:
        dest = folder / "scores" / name
        try:
            os.link(f, dest)
        except OSError:
            shutil.copyfile(f, dest)
    tracker.log_dir(folder / "scores", "scores")


def _score_one(cfg, data_cfg, spec, bundle, options, output, tracker, source) -> str:
    from tsssm.scoring.files import detection_summary, score_file
    from tsssm.scoring.scorer import Scorer

    path = resolve_path(cfg.data.path, "data.path")
    scorer = Scorer(bundle, device=cfg.score.device, **options)
    result = score_file(path, scorer, spec, output, **_read_options(data_cfg),
                        batch_rows=cfg.score.chunk_size, progress=True,
                        figures=bool(cfg.score.figures),
                        contributions=bool(cfg.score.contributions))
    metrics = {"test/rows": float(result.rows), "test/flagged": float(result.flagged),
               "test/intervals": float(result.intervals), "test/rows_per_s": result.rows_per_s}
    metrics.update({f"test/{k}": v for k, v in detection_summary([result]).items()})
    tracker.log_metrics(metrics)
    if result.gap_note:
        log.info(result.gap_note)
    with staging(cfg.tracking.output_dir, tracker.run_id) as folder:
        if result.figure is not None:
            _figures(folder / "figures", result, bundle, f"{bundle.model_name} ({source})",
                     f"scores of {cfg.data.path}")
            tracker.log_dir(folder / "figures", "figures")
        _log_scores(tracker, folder, [output], result.rows, cfg.score.artifact_max_rows,
                    [Path(result.intervals_output)] if result.intervals_output else [])
    print(f"scored {result.rows} rows of {cfg.data.path} with {bundle.model_name} ({source}): "
          f"{result.flagged} flagged in {result.intervals} intervals ({result.threshold_note}), "
          f"{result.rows_per_s:,.0f} rows/s" + _summary(metrics))
    print_intervals(longest_frame([result]), total=result.intervals)
    print(f"  scores: {output}")
    if result.intervals_output:
        print(f"  flagged intervals: {result.intervals_output}")
    print(f"  MLflow run {tracker.run_id} in {tracker.uri}")
    return tracker.run_id


def longest_frame(results: list) -> pl.DataFrame:
    """The longest flagged intervals the FileResults kept, as rows of the intervals Parquet."""
    rows = [r for result in results for r in result.longest]
    rows.sort(key=lambda r: -r["rows"])
    return pl.DataFrame(rows[:MAX_PRINTED_INTERVALS]) if rows else pl.DataFrame()


def _figures(folder: Path, result, bundle: Bundle, title: str, what: str) -> None:
    """The forecast and anomaly figures of one scored stream (FileResult.figure)."""
    f = result.figure
    stream = Stream(result.name, result.path, f["time"], f["scaled"], list(bundle.channels),
                    f["label"])
    n = len(f["time"])
    part = Part(stream, Split((0, 0), (0, 0), (0, n)), f["scaler"])
    pred = StreamPrediction(f["mean"], f["var"], f["score"])
    figures = figures_for_stream(part, pred, bundle.threshold, f["flag"], (0, n), title)
    save_figures(figures, folder, f"{title}: {what}")


def _score_many(cfg, data_cfg, spec, bundle, options, out_dir, tracker, source) -> str:
    from tsssm.scoring.files import detection_summary
    from tsssm.scoring.many import expand_inputs, plan, run_tasks

    if options:
        bundle = _with_scaling(bundle, options)
    files, root = expand_inputs(str(Path(str(cfg.data.path)).expanduser()))
    tasks = plan(files, root, out_dir, spec, **_read_options(data_cfg),
                 batch_rows=cfg.score.chunk_size, contributions=bool(cfg.score.contributions))
    started = time.perf_counter()
    results = run_tasks(tasks, bundle, engine=cfg.score.engine, workers=cfg.score.workers,
                        address=cfg.score.address, device=cfg.score.device)
    elapsed = time.perf_counter() - started
    done = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    rows = sum(r.rows for r in done)
    n_intervals = sum(r.intervals for r in done)
    metrics = {"test/files": float(len(results)), "test/files_failed": float(len(failed)),
               "test/rows": float(rows), "test/flagged": float(sum(r.flagged for r in done)),
               "test/intervals": float(n_intervals),
               "test/rows_per_s": rows / max(elapsed, 1e-9)}
    metrics.update({f"test/{k}": v for k, v in detection_summary(done).items()})
    tracker.log_metrics(metrics)
    with staging(cfg.tracking.output_dir, tracker.run_id) as folder:
        if done:
            _log_scores(tracker, folder, [Path(r.output) for r in done], rows,
                        cfg.score.artifact_max_rows,
                        [Path(r.intervals_output) for r in done if r.intervals_output])
    scope = ("per-stream thresholds: the model's rule refitted on each file's first "
             f"{int(bundle.data_config.get('train_rows', 0))} scores"
             if bundle.threshold_scope == "per_stream" else
             f"threshold {bundle.threshold.value:.3g}")
    print(f"scored {len(done)} of {len(results)} files ({rows} rows) of {cfg.data.path} with "
          f"{bundle.model_name} ({source}) on {cfg.score.engine}: "
          f"{int(metrics['test/flagged'])} flagged in {n_intervals} intervals ({scope}), "
          f"{metrics['test/rows_per_s']:,.0f} rows/s" + _summary(metrics))
    print_intervals(longest_frame(done), total=n_intervals)
    print(f"  scores: {out_dir}/")
    print(f"  MLflow run {tracker.run_id} in {tracker.uri}")
    if failed:
        names = "; ".join(r.error for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise DataError(f"{len(failed)} of {len(results)} files failed: {names}{more}; the "
                        f"other files' scores are in {out_dir}")
    return tracker.run_id


def _with_scaling(bundle: Bundle, options: dict) -> Bundle:
    """The bundle with the command line's scaling (workers build their Scorer from it)."""
    from dataclasses import replace

    changes: dict = {}
    if "per_stream_scaling" in options:
        changes["per_stream_scaling"] = options["per_stream_scaling"]
    if "calibration_rows" in options:
        changes["data_config"] = {**bundle.data_config,
                                  "train_rows": options["calibration_rows"]}
    return replace(bundle, **changes)


def _score_live(cfg, data_cfg, spec, bundle, options, tracker, source) -> str:
    from tsssm.scoring.live import follow_lines, score_lines, stdin_lines
    from tsssm.scoring.scorer import Scorer

    scorer = Scorer(bundle, device=cfg.score.device, **options)
    if scorer.spec.window > 1 and scorer.spec.align == "centered":
        log.info("the model scores centered %d-row windows: each row's line comes %d rows "
                 "later, once the rows after it have arrived", scorer.spec.window,
                 scorer.spec.window // 2)
    if cfg.data.path == "-":
        lines, where = stdin_lines(), "standard input"
    else:
        path = resolve_path(cfg.data.path, "data.path")
        lines, where = follow_lines(path, cfg.score.follow_interval), str(path)
    import sys

    summary = score_lines(lines, scorer, spec, where, sys.stdout)
    tracker.log_metrics({"test/rows": float(summary.rows),
                         "test/flagged": float(summary.flagged)})
    print(f"scored {summary.rows} rows from {where} with {bundle.model_name} ({source}): "
          f"{summary.flagged} flagged ({scorer.threshold_note})", file=sys.stderr)
    return tracker.run_id


def _score_in_memory(cfg, cfg_data, bundle, output, tracker, source) -> str:
    """One file read whole (a model with inputs or real time steps), or the test split of the
    configured dataset (benchmark datasets are small): the history before the test split
    warms the state up."""
    target = cfg.data.path or cfg.data.name
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
    with staging(cfg.tracking.output_dir, tracker.run_id) as folder:
        for i, part in enumerate(scored_parts(data)):
            rows = part.rows("test")
            # The rows before the test split are history: they warm the state up.
            pred, threshold = flag_stream(
                bundle.model, part.stream.values[: rows[1]], spec,
                lambda s, name=part.stream.name: stream_threshold(bundle, s, train_rows, name),
                cfg.score.chunk_size, progress=True, desc=f"scoring {part.stream.name}",
                exog=part.exog(0, rows[1]))
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
    print(f"  MLflow run {tracker.run_id} in {tracker.uri}")
    return tracker.run_id




#: flagged intervals printed by `tsssm score` (all are in the intervals Parquet)
MAX_PRINTED_INTERVALS = 20


def print_intervals(intervals: pl.DataFrame, total: int | None = None) -> None:
    """The flagged intervals, longest first, each with the sensors that caused it (``total``:
    how many there are, when ``intervals`` holds only the longest of them)."""
    if intervals.height == 0:
        return
    shown = intervals.sort("rows", descending=True).head(MAX_PRINTED_INTERVALS)
    total = intervals.height if total is None else total
    more = total - shown.height
    print(f"  flagged intervals (longest {shown.height}"
          f"{f' of {total}' if more else ''}; which sensors caused each):")
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
