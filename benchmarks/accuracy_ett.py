"""The ETT suite of benchmarks/accuracy.py: long-horizon forecasting under the published protocol.

Protocol (``experiment=ett``, Informer / Time-Series-Library): each channel z-scored on the
training months (12/4/4 months of 30 days), input length 96, horizons 96/192/336/720, every
training and test window at stride 1, MSE and MAE over all 7 channels and every lead time on the
normalised scale. Hyperparameters and early stopping see the validation months only. One run per
figure, seed 0 unless ``--seed`` says otherwise (``seed=`` in the record's command and its
``seed`` field).
"""

from __future__ import annotations

import concurrent.futures as cf
import fnmatch
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from records import commit, device_name, merge_records

DATASETS = ["ett_h1", "ett_h2", "ett_m1", "ett_m2"]
HORIZONS = [96, 192, 336, 720]
#: trained through `tsssm train` (conf/model/<name>.yaml)
TRAINED = ["kalman", "mamba", "hybrid_residual", "hybrid_dssm"]
#: evaluated in process: no training beyond their closed-form fit
BASELINES = ["last_value", "seasonal_naive"]
KEY = ("dataset", "task", "horizon", "model")
REPO = Path(__file__).resolve().parents[1]

#: per-model overrides that the benchmark adds to `tsssm train` (visible in each record's
#: command); a model's ETT settings belong in its config, these are only what differs
MODEL_OVERRIDES: dict[str, list[str]] = {
    # the members (conf/model/ensemble.yaml: kalman_ett, mamba, hybrid_residual) train at
    # once, each in its own process, as separate trainings of the other models do
    "ensemble": ["model.jobs=3"],
}
#: --small: one dataset, one horizon, a short training (a smoke run, not a benchmark figure)
SMALL = ["trainer.max_epochs=1", "trainer.limit_train_batches=0.1"]

#: Published results at input length 96 under this protocol, MSE / MAE for H = 96, 192, 336,
#: 720, from the original papers as compiled in OLinear's input-96 comparison (Yue et al. 2025,
#: Table 15): iTransformer (Liu et al., ICLR 2024), PatchTST (Nie et al., ICLR 2023; its input-96
#: figures are iTransformer's re-run), DLinear (Zeng et al., AAAI 2023), TimesNet (Wu et al.,
#: ICLR 2023), TimeMixer (Wang et al., ICLR 2024). S-Mamba (Wang et al. 2024, "Is Mamba effective
#: for time series forecasting?") reports ETTm1 0.398 and ETTh1 0.455 on average.
PUBLISHED: dict[str, dict[str, list[tuple[float, float]]]] = {
    "ett_h1": {
        "TimeMixer": [(0.375, 0.400), (0.429, 0.421), (0.484, 0.458), (0.498, 0.482)],
        "iTransformer": [(0.386, 0.405), (0.441, 0.436), (0.487, 0.458), (0.503, 0.491)],
        "DLinear": [(0.386, 0.400), (0.437, 0.432), (0.481, 0.459), (0.519, 0.516)],
        "TimesNet": [(0.384, 0.402), (0.436, 0.429), (0.491, 0.469), (0.521, 0.500)],
        "PatchTST": [(0.414, 0.419), (0.460, 0.445), (0.501, 0.466), (0.500, 0.488)],
    },
    "ett_h2": {
        "TimeMixer": [(0.289, 0.341), (0.372, 0.392), (0.386, 0.414), (0.412, 0.434)],
        "iTransformer": [(0.297, 0.349), (0.380, 0.400), (0.428, 0.432), (0.427, 0.445)],
        "PatchTST": [(0.292, 0.342), (0.387, 0.400), (0.426, 0.433), (0.431, 0.446)],
        "TimesNet": [(0.340, 0.374), (0.402, 0.414), (0.452, 0.452), (0.462, 0.468)],
        "DLinear": [(0.333, 0.387), (0.477, 0.476), (0.594, 0.541), (0.831, 0.657)],
    },
    "ett_m1": {
        "TimeMixer": [(0.320, 0.357), (0.361, 0.381), (0.390, 0.404), (0.454, 0.441)],
        "PatchTST": [(0.329, 0.367), (0.367, 0.385), (0.399, 0.410), (0.454, 0.439)],
        "TimesNet": [(0.338, 0.375), (0.374, 0.387), (0.410, 0.411), (0.478, 0.450)],
        "DLinear": [(0.345, 0.372), (0.380, 0.389), (0.413, 0.413), (0.474, 0.453)],
        "iTransformer": [(0.334, 0.368), (0.377, 0.391), (0.426, 0.420), (0.491, 0.459)],
    },
    "ett_m2": {
        "TimeMixer": [(0.175, 0.258), (0.237, 0.299), (0.298, 0.340), (0.391, 0.396)],
        "PatchTST": [(0.175, 0.259), (0.241, 0.302), (0.305, 0.343), (0.402, 0.400)],
        "iTransformer": [(0.180, 0.264), (0.250, 0.309), (0.311, 0.348), (0.412, 0.407)],
        "TimesNet": [(0.187, 0.267), (0.249, 0.309), (0.321, 0.351), (0.408, 0.403)],
        "DLinear": [(0.193, 0.292), (0.284, 0.362), (0.369, 0.427), (0.554, 0.522)],
    },
}


def _metrics_record(m: dict[str, float], dataset: str, horizon: int) -> dict:
    h = f"h{horizon}_"
    get = lambda k: m.get(k, math.nan)  # noqa: E731
    return {
        "dataset": dataset, "task": "forecast", "horizon": horizon,
        "mse": get(f"test/{h}mse"), "mae": get(f"test/{h}mae"), "crps": get(f"test/{h}crps"),
        "coverage95": get(f"test/{h}coverage95"), "nll": get(f"test/{h}nll"),
        "val_mse": get(f"val/{h}mse"), "windows": get(f"test/{h}windows"),
        # the fitted factor alone, without the adaptive band (task.adaptive_calibration)
        **{f"{k}_static": m[f"test/{h}{k}_static"] for k in ("coverage95", "crps")
           if f"test/{h}{k}_static" in m},
    }


def _store_uri(args, job_dir: Path) -> str:
    """Each training's own tracking store: SQLite, or MLflow's file store where SQLAlchemy is
    not installed (--store file; MLflow then needs MLFLOW_ALLOW_FILE_STORE=true)."""
    if getattr(args, "store", "sqlite") == "file":
        return (job_dir / "mlruns").resolve().as_uri()
    return f"sqlite:///{job_dir.resolve()}/mlflow.db"


#: the file of each dataset (its data config's ``files``), by --data-format
FILES = {"ett_h1": "ETTh1", "ett_h2": "ETTh2", "ett_m1": "ETTm1", "ett_m2": "ETTm2"}


def data_overrides(args, dataset: str) -> list[str]:
    """The dataset, its folder and (for --data-format parquet) its Parquet copy."""
    out = [f"data={dataset}", f"data.root={Path(args.root).resolve()}"]
    fmt = getattr(args, "data_format", "csv")
    if fmt != "csv":
        out.append(f"data.files=[{FILES[dataset]}.{fmt}]")
    return out


def extra_overrides(args, dataset: str) -> list[str]:
    """--set entries: ``KEY=VALUE`` for every dataset, ``GLOB:KEY=VALUE`` for the datasets
    whose config name matches GLOB."""
    out = []
    for item in args.set:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if fnmatch.fnmatch(dataset, head):
                out.append(rest)
        else:
            out.append(item)
    return out


def train_command(args, dataset: str, horizon: int, model: str, job_dir: Path) -> list[str]:
    overrides = [
        "experiment=ett", *data_overrides(args, dataset),
        f"data.horizon={horizon}", f"model={model}", f"trainer={args.accelerator}",
        f"seed={getattr(args, 'seed', 0)}",
        f"tracking.uri={_store_uri(args, job_dir)}",
        f"tracking.artifact_root={job_dir}/artifacts", f"tracking.output_dir={job_dir}",
        "trainer.enable_progress_bar=false",
        *MODEL_OVERRIDES.get(model, []), *(SMALL if args.small else []),
        *extra_overrides(args, dataset),
    ]
    return ["tsssm", "train", *overrides]


def _selection(metrics: dict[str, float]) -> dict:
    """Which weights early stopping restored (``best_epoch``; -1: the untrained start, e.g. a
    hybrid at its fitted Kalman part) and the start's validation horizon MSE, where logged."""
    out = {}
    if "val/best_epoch" in metrics:
        out["best_epoch"] = int(metrics["val/best_epoch"])
    if "val/start_mse_horizon" in metrics:
        out["val_start_mse"] = metrics["val/start_mse_horizon"]
    return out


class TimeLimitError(RuntimeError):
    """A training stopped, or never started, because --time-limit ran out."""


def _run_trained(args, dataset: str, horizon: int, model: str, deadline: float | None = None
                 ) -> dict:
    from tsssm.tracking import Tracker

    if deadline is not None and time.monotonic() >= deadline:
        raise TimeLimitError(f"{dataset} h{horizon} {model}: not started (--time-limit)")
    logs = Path(args.logs) if args.logs else Path(tempfile.gettempdir()) / "tsssm-accuracy"
    job_dir = logs / f"{dataset}-{horizon}-{model}"
    job_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(args, dataset, horizon, model, job_dir)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    with open(job_dir / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tsssm.cli", *command[1:]], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise TimeLimitError(f"{dataset} h{horizon} {model}: stopped by --time-limit after "
                            f"{time.perf_counter() - started:.0f} s (log: {job_dir / 'log.txt'})"
                            ) from None
    elapsed = time.perf_counter() - started
    lines = (job_dir / "log.txt").read_text().strip().splitlines()
    tail = lines[-3:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {' | '.join(tail)}")
    tracker = Tracker(_store_uri(args, job_dir), "tsssm")
    run_id = tracker.latest_run("train", model)  # an ensemble's store also has its members
    metrics = tracker.run_metrics(run_id)
    # epochs trained (early stopping, trainer.max_time): one epoch_seconds entry per epoch;
    # none for the models that fit themselves outside the Lightning loop
    epochs = len(tracker.client.get_metric_history(run_id, "train/epoch_seconds"))
    # the summary line (an ensemble prints its weights after it)
    shown = next((x for x in reversed(lines) if x.startswith("trained ")),
                 tail[-3] if len(tail) >= 3 else tail)
    print(f"  {dataset} h{horizon} {model}: {shown}", flush=True)
    return {**_metrics_record(metrics, dataset, horizon), "model": model,
            "train_s": round(elapsed, 1), **({"epochs": epochs} if epochs else {}),
            **_selection(metrics), **_ensemble_fields(tracker, run_id, metrics, horizon),
            "command": " ".join(command)}


def _ensemble_fields(tracker, run_id: str, metrics: dict[str, float], horizon: int) -> dict:
    """For an ensemble: its fitted scheme, and each member's test metrics and epochs (their
    runs are nested under the ensemble's), with the weights at the first and last lead."""
    tags = tracker.client.get_run(run_id).data.tags
    if "tsssm.ensemble.scheme" not in tags:
        return {}
    members = {}
    for name in tags["tsssm.ensemble.members"].split(","):
        member_run = tags.get(f"tsssm.member.{name}")
        m = tracker.run_metrics(member_run) if member_run else {}
        epochs = len(tracker.client.get_metric_history(member_run, "train/epoch_seconds")
                     ) if member_run else 0
        members[name] = {
            "mse": m.get(f"test/h{horizon}_mse", math.nan),
            "mae": m.get(f"test/h{horizon}_mae", math.nan),
            "coverage95": m.get(f"test/h{horizon}_coverage95", math.nan),
            "coverage95_static": m.get(f"test/h{horizon}_coverage95_static", math.nan),
            "val_mse": m.get(f"val/h{horizon}_mse", math.nan),
            **({"epochs": epochs} if epochs else {}),
            "weight_first": metrics.get(f"ensemble/weight_{name}_first", math.nan),
            "weight_last": metrics.get(f"ensemble/weight_{name}_last", math.nan),
        }
    holdout = {k.removeprefix("val/ensemble_holdout_mse_"): v for k, v in metrics.items()
               if k.startswith("val/ensemble_holdout_mse_")}
    return {"scheme": tags["tsssm.ensemble.scheme"], "members": members,
            "holdout_mse": holdout}


def _run_baseline(args, dataset: str, horizon: int, name: str) -> dict:
    import numpy as np
    import torch

    from tsssm.baselines import build_baseline
    from tsssm.cli import compose
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.adaptive_calibration import AdaptiveCalibration
    from tsssm.tasks.evaluate import horizon_metrics, static_metrics
    from tsssm.tasks.forecast_metrics import HorizonAccumulator

    cfg = compose(["experiment=ett", *data_overrides(args, dataset), f"data.horizon={horizon}"])
    started = time.perf_counter()
    data = build_dataset(cfg.data).load()
    kwargs = {"period": cfg.data.seasonal_period} if name == "seasonal_naive" else {}
    model = build_baseline(name, **kwargs)
    model.fit(torch.from_numpy(np.stack(data.split_arrays("train"))))  # (1, T_train, C)
    metrics = {}
    # the task's adaptive band, as for the trained models: carried from val into test
    rate = cfg.task.adaptive_calibration
    adapters = [AdaptiveCalibration(horizon, rate) for _ in data.parts] if rate > 0 else None
    for split in ("val", "test"):
        static = HorizonAccumulator(horizon) if adapters else None
        acc = horizon_metrics(model, [(p.stream.values, p.rows(split)) for p in data.parts],
                              cfg.data.input_len, horizon, cfg.data.eval_stride,
                              adaptive=adapters, static=static)
        metrics.update({f"{split}/h{horizon}_{k}": v for k, v in acc.result().items()})
        if static is not None:
            metrics.update(static_metrics(static, f"{split}/h{horizon}_"))
    fmt = getattr(args, "data_format", "csv")
    command = (f"python benchmarks/accuracy.py --suite ett --root {args.root} --datasets "
               f"{dataset} --horizons {horizon} --models {name}"
               + (f" --data-format {fmt}" if fmt != "csv" else ""))
    return {**_metrics_record(metrics, dataset, horizon), "model": name,
            "train_s": round(time.perf_counter() - started, 1), "command": command}


#: relative cost of a training (rows of the dataset's file): the longest start first
ROWS = {"ett_h1": 1, "ett_h2": 1, "ett_m1": 4, "ett_m2": 4}


def job_order(datasets: list[str], horizons: list[int], models: list[str]
              ) -> list[tuple[str, int, str]]:
    """Trainings in the order they start: model by model in the order given (so that a time
    limit leaves whole tables of the first models), and within a model the longest first
    (ETTm before ETTh, long horizons first) so the last wave is short."""
    jobs = [(d, h, m) for d in datasets for h in horizons for m in models if m not in BASELINES]
    return sorted(jobs, key=lambda j: (models.index(j[2]), -ROWS.get(j[0], 1), -j[1]))


def run(args) -> list[dict]:
    datasets = args.datasets or (DATASETS[:1] if args.small else DATASETS)
    horizons = args.horizons or (HORIZONS[:1] if args.small else HORIZONS)
    models = args.models or (TRAINED + BASELINES)
    limit = getattr(args, "time_limit", None)
    deadline = None if limit is None else time.monotonic() + limit
    common = {"device": device_name(args.accelerator), "commit": commit(), "runs": 1,
              "seed": getattr(args, "seed", 0)}
    records: list[dict] = []
    lock = threading.Lock()

    def keep(record: dict) -> None:
        """Every record goes to --out as soon as its run ends (a killed session keeps them)."""
        with lock:
            records.append(record)
            merge_records(args.out, [record], KEY)

    failures = []
    jobs = job_order(datasets, horizons, models)
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_trained, args, *job, deadline): job for job in jobs}
        # baselines: cheap, in this process, while the trainings run
        for dataset in datasets:
            for horizon in horizons:
                for name in (m for m in models if m in BASELINES):
                    keep({**_run_baseline(args, dataset, horizon, name), **common,
                          "device": device_name("cpu")})
                    print(f"  {dataset} h{horizon} {name}: mse {records[-1]['mse']:.4f}",
                          flush=True)
        for fut in cf.as_completed(futures):
            try:
                keep({**fut.result(), **common})
            except RuntimeError as err:
                failures.append(str(err))
                print(f"  FAILED {futures[fut]}: {err}", flush=True)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return records


def _coverage_cell(r: dict) -> str:
    """`` (95%)``: the record's band coverage; `` (95% \\| 98%)`` with the adaptive band (the
    adapted coverage, then the fitted factor's alone); empty without a coverage."""
    cov, static = r.get("coverage95"), r.get("coverage95_static")
    if cov is None or cov != cov:
        return ""
    if static is None or static != static:
        return f" ({cov:.0%})"
    return f" ({cov:.0%} \\| {static:.0%})"


def table(path: Path, only: list[dict] | None = None) -> str:
    """Markdown: per dataset, MSE / MAE per horizon and their average, one column per model,
    the published averages beside."""
    import json

    records = only if only is not None else (json.loads(Path(path).read_text())
                                             if Path(path).exists() else [])
    records = [r for r in records if r.get("task") == "forecast"]
    out = []
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        models = sorted({r["model"] for r in rows}, key=lambda m: (m in BASELINES, m))
        horizons = sorted({r["horizon"] for r in rows})
        cell = {(r["model"], r["horizon"]): r for r in rows}
        out.append(f"\n#### {dataset} (MSE / MAE, normalised; test coverage of the 95% band: "
                   "adaptive, then the fitted factor alone)\n")
        published = PUBLISHED.get(dataset, {})
        out.append("| H | " + " | ".join(models) + " | " +
                   " | ".join(f"{k} (published)" for k in published) + " |")
        out.append("|---|" + "---|" * (len(models) + len(published)))
        for h in horizons:
            cells = []
            for m in models:
                r = cell.get((m, h))
                cells.append("–" if r is None else f"{r['mse']:.3f} / {r['mae']:.3f}"
                             + _coverage_cell(r))
            pub = [f"{v[HORIZONS.index(h)][0]:.3f} / {v[HORIZONS.index(h)][1]:.3f}"
                   if h in HORIZONS else "–" for v in published.values()]
            out.append(f"| {h} | " + " | ".join(cells + pub) + " |")
        if len(horizons) == 4:
            avg = []
            for m in models:
                got = [cell[(m, h)] for h in horizons if (m, h) in cell]
                avg.append("–" if len(got) < 4 else
                           f"**{sum(r['mse'] for r in got) / 4:.3f} / "
                           f"{sum(r['mae'] for r in got) / 4:.3f}**")
            pub = [f"{sum(x[0] for x in v) / 4:.3f} / {sum(x[1] for x in v) / 4:.3f}"
                   for v in published.values()]
            out.append("| avg | " + " | ".join(avg + pub) + " |")
    return "\n".join(out)
