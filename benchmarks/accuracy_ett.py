"""The ETT suite of benchmarks/accuracy.py: long-horizon forecasting under the published protocol.

Protocol (``experiment=ett``, Informer / Time-Series-Library): each channel z-scored on the
training months (12/4/4 months of 30 days), input length 96, horizons 96/192/336/720, every
training and test window at stride 1, MSE and MAE over all 7 channels and every lead time on the
normalised scale. Hyperparameters and early stopping see the validation months only. One run per
figure, seed 0 (``seed=`` in the record's command).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from records import commit, device_name, merge_records

DATASETS = ["ett_h1", "ett_h2", "ett_m1", "ett_m2"]
HORIZONS = [96, 192, 336, 720]
#: trained through `tsssm train` (conf/model/<name>.yaml)
TRAINED = ["kalman", "mamba"]
#: evaluated in process: no training beyond their closed-form fit
BASELINES = ["last_value", "seasonal_naive"]
KEY = ("dataset", "task", "horizon", "model")
REPO = Path(__file__).resolve().parents[1]

#: per-model overrides that the benchmark adds to `tsssm train` (visible in each record's
#: command); a model's ETT settings belong in its config, these are only what differs
MODEL_OVERRIDES: dict[str, list[str]] = {}
#: --small: one dataset, one horizon, a short training (a smoke run, not a benchmark figure)
SMALL = ["trainer.max_epochs=1", "trainer.limit_train_batches=0.1"]

#: Published results at input length 96, MSE / MAE averaged over the 4 horizons, as reported in
#: the iTransformer paper (Liu et al., ICLR 2024, Table 10, "full results of the long-term
#: forecasting benchmark"), which re-ran every model under this protocol; S-Mamba from Wang et
#: al. 2024 ("Is Mamba effective for time series forecasting?", Table 2).
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "ett_h1": {"iTransformer": (0.454, 0.447), "DLinear": (0.456, 0.452),
               "PatchTST": (0.469, 0.454)},
    "ett_m1": {"PatchTST": (0.387, 0.400), "S-Mamba": (0.398, 0.405),
               "TimesNet": (0.400, 0.406), "DLinear": (0.403, 0.407)},
}


def _metrics_record(m: dict[str, float], dataset: str, horizon: int) -> dict:
    h = f"h{horizon}_"
    get = lambda k: m.get(k, math.nan)  # noqa: E731
    return {
        "dataset": dataset, "task": "forecast", "horizon": horizon,
        "mse": get(f"test/{h}mse"), "mae": get(f"test/{h}mae"), "crps": get(f"test/{h}crps"),
        "coverage95": get(f"test/{h}coverage95"), "nll": get(f"test/{h}nll"),
        "val_mse": get(f"val/{h}mse"), "windows": get(f"test/{h}windows"),
    }


def _store_uri(args, job_dir: Path) -> str:
    """Each training's own tracking store: SQLite, or MLflow's file store where SQLAlchemy is
    not installed (--store file; MLflow then needs MLFLOW_ALLOW_FILE_STORE=true)."""
    if getattr(args, "store", "sqlite") == "file":
        return (job_dir / "mlruns").resolve().as_uri()
    return f"sqlite:///{job_dir.resolve()}/mlflow.db"


def train_command(args, dataset: str, horizon: int, model: str, job_dir: Path) -> list[str]:
    overrides = [
        "experiment=ett", f"data={dataset}", f"data.root={Path(args.root).resolve()}",
        f"data.horizon={horizon}", f"model={model}", f"trainer={args.accelerator}", "seed=0",
        f"tracking.uri={_store_uri(args, job_dir)}",
        f"tracking.artifact_root={job_dir}/artifacts", f"tracking.output_dir={job_dir}",
        "trainer.enable_progress_bar=false",
        *MODEL_OVERRIDES.get(model, []), *(SMALL if args.small else []), *args.set,
    ]
    return ["tsssm", "train", *overrides]


def _run_trained(args, dataset: str, horizon: int, model: str) -> dict:
    from tsssm.tracking import Tracker

    logs = Path(args.logs) if args.logs else Path(tempfile.gettempdir()) / "tsssm-accuracy"
    job_dir = logs / f"{dataset}-{horizon}-{model}"
    job_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(args, dataset, horizon, model, job_dir)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    with open(job_dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tsssm.cli", *command[1:]], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    tail = (job_dir / "log.txt").read_text().strip().splitlines()[-3:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {' | '.join(tail)}")
    tracker = Tracker(_store_uri(args, job_dir), "tsssm")
    metrics = tracker.run_metrics(tracker.latest_run("train"))
    print(f"  {dataset} h{horizon} {model}: {tail[-3] if len(tail) >= 3 else tail}", flush=True)
    return {**_metrics_record(metrics, dataset, horizon), "model": model,
            "train_s": round(elapsed, 1), "command": " ".join(command)}


def _run_baseline(args, dataset: str, horizon: int, name: str) -> dict:
    import numpy as np
    import torch

    from tsssm.baselines import build_baseline
    from tsssm.cli import compose
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import horizon_metrics

    cfg = compose(["experiment=ett", f"data={dataset}", f"data.root={Path(args.root).resolve()}",
                   f"data.horizon={horizon}"])
    started = time.perf_counter()
    data = build_dataset(cfg.data).load()
    kwargs = {"period": cfg.data.seasonal_period} if name == "seasonal_naive" else {}
    model = build_baseline(name, **kwargs)
    model.fit(torch.from_numpy(np.stack(data.split_arrays("train"))))  # (1, T_train, C)
    metrics = {}
    for split in ("val", "test"):
        acc = horizon_metrics(model, [(p.stream.values, p.rows(split)) for p in data.parts],
                              cfg.data.input_len, horizon, cfg.data.eval_stride)
        metrics.update({f"{split}/h{horizon}_{k}": v for k, v in acc.result().items()})
    command = (f"python benchmarks/accuracy.py --suite ett --root {args.root} --datasets "
               f"{dataset} --horizons {horizon} --models {name}")
    return {**_metrics_record(metrics, dataset, horizon), "model": name,
            "train_s": round(time.perf_counter() - started, 1), "command": command}


def run(args) -> list[dict]:
    datasets = args.datasets or (DATASETS[:1] if args.small else DATASETS)
    horizons = args.horizons or (HORIZONS[:1] if args.small else HORIZONS)
    models = args.models or (TRAINED + BASELINES)
    common = {"device": device_name(args.accelerator), "commit": commit(), "runs": 1, "seed": 0}
    records: list[dict] = []
    for dataset in datasets:  # baselines: cheap, in process, one after another
        for horizon in horizons:
            for name in (m for m in models if m in BASELINES):
                records.append({**_run_baseline(args, dataset, horizon, name), **common,
                                "device": device_name("cpu")})
                print(f"  {dataset} h{horizon} {name}: mse {records[-1]['mse']:.4f}", flush=True)
    jobs = [(d, h, m) for d in datasets for h in horizons for m in models if m not in BASELINES]
    failures = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_trained, args, *job): job for job in jobs}
        for fut in cf.as_completed(futures):
            try:
                records.append({**fut.result(), **common})
            except RuntimeError as err:
                failures.append(str(err))
                print(f"  FAILED {futures[fut]}: {err}", flush=True)
    merge_records(args.out, records, KEY)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return records


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
        out.append(f"\n#### {dataset} (MSE / MAE, normalised; coverage of the 95% band)\n")
        out.append("| H | " + " | ".join(models) + " |")
        out.append("|---|" + "---|" * len(models))
        for h in horizons:
            cells = []
            for m in models:
                r = cell.get((m, h))
                cells.append("–" if r is None else
                             f"{r['mse']:.3f} / {r['mae']:.3f} ({r['coverage95']:.0%})"
                             if r.get("coverage95") == r.get("coverage95") else
                             f"{r['mse']:.3f} / {r['mae']:.3f}")
            out.append(f"| {h} | " + " | ".join(cells) + " |")
        if len(horizons) == 4:
            avg = []
            for m in models:
                got = [cell[(m, h)] for h in horizons if (m, h) in cell]
                avg.append("–" if len(got) < 4 else
                           f"**{sum(r['mse'] for r in got) / 4:.3f} / "
                           f"{sum(r['mae'] for r in got) / 4:.3f}**")
            out.append("| avg | " + " | ".join(avg) + " |")
        published = PUBLISHED.get(dataset)
        if published:
            out.append("\npublished averages (input 96): " + ", ".join(
                f"{k} {v[0]:.3f} / {v[1]:.3f}" for k, v in published.items()))
    return "\n".join(out)
