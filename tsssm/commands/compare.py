"""`tsssm compare`: trained models side by side with classical comparators on the same split,
in one table (printed, logged as Parquet/Markdown and as a figure) and as metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import polars as pl
from omegaconf import DictConfig

from tsssm.anomaly.scores import ScoreSpec
from tsssm.baselines import build_baseline
from tsssm.commands.common import (
    evaluation_options,
    format_table,
    labelled_training_rows,
    load_trained,
    staging,
    write_parquet,
)
from tsssm.config import flatten, option_value, to_plain
from tsssm.data.datasets import PreparedData, build_dataset
from tsssm.errors import ConfigError, ModelError
from tsssm.models.base import uses_exog
from tsssm.tasks.evaluate import evaluate
from tsssm.tracking import Tracker

log = logging.getLogger("tsssm")

COLUMNS = ["method", "kind", "test/mae", "test/mse", "h_mae", "h_mse", "test/precision",
           "test/recall", "test/f1", "test/far", "test/mar", "test/auc_pr", "test/vus_pr",
           "test/event_f1", "test/nab_standard"]


def _trained(cfg: DictConfig, tracker: Tracker) -> list[tuple[str, object]]:
    """(label, Bundle) for every trained model to compare."""
    sources = list(cfg.compare.runs)
    if not sources:
        latest = tracker.latest_runs_per_model("train", cfg.data.name)
        sources = [latest[m] for m in sorted(latest)]
    out = []
    for source in sources:
        bundle, run_id = load_trained(source, tracker, key="compare.runs")
        label = bundle.model_name if run_id else f"{bundle.model_name} ({Path(source).name})"
        out.append((label, bundle))
    return out


def _baselines(cfg: DictConfig, data: PreparedData) -> tuple[list[tuple[str, object]],
                                                               list[str]]:
    """Every comparator fitted on the real training rows of every stream (no padding: the
    same rows the models are trained on), and a note for each one skipped."""
    out, notes = [], []
    y_train = data.split_arrays("train")  # [(T_i, C)]
    for name in cfg.task.baselines:
        kwargs = {}
        if name == "seasonal_naive":
            if not cfg.data.seasonal_period:
                note = ("seasonal_naive skipped: data.seasonal_period is not set (this data has "
                        "no known seasonal period; set it in rows to compare a seasonal random "
                        "walk)")
                print(f"compare: {note}", flush=True)
                notes.append(note)
                continue
            kwargs["period"] = cfg.data.seasonal_period
        if name.endswith("_file"):
            kwargs["train_rows"] = per_stream_train_rows(data)
        baseline = build_baseline(name, **kwargs)
        baseline.fit(y_train)
        out.append((name, baseline))
    return out, notes


def per_stream_train_rows(data: PreparedData) -> int:
    """Rows a per-file comparator fits each stream on: the training split of the scored streams
    (SKAB: 320, its first 400 rows less the validation rows), so that a threshold fitted on
    validation rows sees held-out scores for it as for every other method."""
    rows = {p.rows("train")[1] - p.rows("train")[0] for p in data.parts if p.split is not None}
    if len(rows) != 1:
        raise ConfigError(f"per-file comparators need one training length for every stream; the "
                          f"streams have {sorted(rows)}")
    return rows.pop()


def _data_for(bundle, data: PreparedData, gaps: str) -> PreparedData:
    """The data with the time steps the model was trained with (keep and time differ only in
    them, so both kinds of model compare on the same rows)."""
    trained = None if bundle is None else bundle.data_config.get("gaps")
    if gaps in ("keep", "time") and trained in ("keep", "time") and trained != gaps:
        return data.with_time_steps(real=trained == "time")
    return data


def compare(cfg: DictConfig) -> str:
    """Run `tsssm compare`; returns the MLflow run id."""
    tracker = Tracker.from_config(cfg.tracking)
    params = flatten(to_plain(cfg))
    name = cfg.run_name or f"compare-{cfg.data.name}"
    with tracker.start(name, "compare", params, {"tsssm.data": cfg.data.name}) as run:
        trained = _trained(cfg, tracker)
        if not trained and not cfg.task.baselines:
            raise ConfigError("nothing to compare: no trained model and task.baselines is empty")
        pooled = [b for _, b in trained if not b.per_stream_scaling]
        data = build_dataset(cfg.data).load(
            scaler=pooled[0].scaler if pooled else None,
            input_scaler=pooled[0].input_scaler if pooled else None)
        horizon = cfg.data.horizon
        common = dict(context=cfg.data.input_len, horizon=horizon,
                      eval_stride=cfg.data.eval_stride, chunk_size=cfg.score.chunk_size,
                      **evaluation_options(cfg.task))
        rows = []
        methods = [(label, b.model, "model", b) for label, b in trained]
        fitted, notes = _baselines(cfg, data)
        methods += [(label, m, "baseline", None) for label, m in fitted]
        exclude = labelled_training_rows(cfg.task, data)
        for i, (label, model, kind, bundle) in enumerate(methods, 1):
            if bundle is not None and bundle.channels != data.channels:
                raise ModelError(f"{label} was trained on channels {bundle.channels}, "
                                 f"data={cfg.data.name} has {data.channels}")
            if bundle is not None and uses_exog(model) and bundle.inputs != data.inputs:
                raise ModelError(f"{label} was trained with inputs {bundle.inputs}; set "
                                 f"data.inputs=[{','.join(bundle.inputs)}]")
            started = time.perf_counter()
            # a trained model is scored as it was trained (its own score spec and threshold
            # scope); the comparators with the task's
            options = dict(common)
            if bundle is not None and bundle.score:
                options["score_kind"] = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
                options["scope"] = bundle.threshold_scope
            ev = evaluate(model, _data_for(bundle, data, option_value(cfg.data.gaps)),
                          future_inputs=option_value(cfg.data.future_inputs),
                          exclude_labelled=exclude,
                          progress=f"compare [{i}/{len(methods)}] {label}", **options)
            print(f"compare [{i}/{len(methods)}] {label}: evaluated in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            row = {"method": label, "kind": kind, **ev.metrics}
            row["h_mae"] = ev.metrics.get(f"test/h{horizon}_mae", float("nan"))
            row["h_mse"] = ev.metrics.get(f"test/h{horizon}_mse", float("nan"))
            rows.append(row)
            tracker.log_metrics({f"{k}.{label.split(' ')[0]}": v for k, v in ev.metrics.items()
                                 if k.startswith("test/")})
        columns = [c for c in COLUMNS if any(c in r for r in rows)]
        table = format_table(rows, columns)
        with staging(cfg.tracking.output_dir, run.run_id) as folder:
            frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows])
            write_parquet(frame, folder / "tables" / "compare.parquet")
            notes_md = "".join(f"\n- {n}" for n in notes)
            (folder / "tables" / "compare.md").write_text(
                f"# {cfg.data.name}: test split (h = {horizon})\n\n```\n{table}\n```\n"
                + (f"\nNot compared:{notes_md}\n" if notes else ""))
            from tsssm import plots

            figure = plots.comparison_figure(
                rows, metrics=("test/f1", "test/auc_pr", "test/mae", "h_mae"),
                title=f"{cfg.data.name}: test split (h = {horizon})")
            plots.save_report([("method comparison", figure)], folder / "figures" / "report.html",
                              title=f"tsssm compare: {cfg.data.name}")
            tracker.log_dir(folder / "tables", "tables")
            tracker.log_dir(folder / "figures", "figures")
        print(f"\n{cfg.data.name}, test split; forecast errors on the normalised scale, "
              f"h_* over horizon {horizon}:")
        print(table)
        for note in notes:
            print(f"  {note}")
        print(f"\n  MLflow run {run.run_id} in {tracker.uri}")
        return run.run_id
