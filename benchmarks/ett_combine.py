"""A validation-weighted combination of ETT forecasters trained earlier (same dataset, horizon).

The product form is ``tsssm train ... model=ensemble`` (tsssm/models/ensemble.py,
tsssm/tasks/combine.py: members trained by the command, weights per lead time or block chosen
on held-out validation windows, the pooled variance calibrated, a bundle that `score` and
`compare` use). This script stays for one purpose: combining bundles that separate driver runs
already left in a logs folder (it reproduces the 2026-12-01 21:12 figure in RESULTS.md) with one
weight vector per horizon, by the same exact solver (tsssm.tasks.combine.simplex_weights).

For each horizon: the bundles that ``benchmarks/accuracy.py --logs DIR`` left in
``DIR/<dataset>-<H>-<model>/models/<run id>`` are loaded, every one forecasts every validation
and test window (stride 1, the protocol's windows, the data normalised by the bundles' own
training scaler), and the convex weights (w >= 0, sum 1) that minimise the pooled squared error
on the VALIDATION windows are chosen: the minimiser of w' G w over the simplex, G the models'
validation error cross-products (solved exactly: the best of the closed forms on every subset
of models whose weights come out non-negative). The test MSE / MAE of the combined mean
forecast are then computed once with those weights; the test split never chooses anything.
Only means are combined (no variance, so no coverage or CRPS for the combination).

    python benchmarks/ett_combine.py --root .devdata/ett --data-format parquet --dataset ett_m1 \\
        --logs /tmp/hl --models hybrid_residual mamba kalman_ett --out combine.json

``--limit-windows N`` (a check of the script on a CPU) uses the first N windows of each split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_ett import FILES  # noqa: E402

from tsssm.tasks.combine import simplex_weights  # noqa: E402  (the one exact solver)


def _bundle(logs: Path, dataset: str, horizon: int, model: str) -> Path:
    found = sorted((logs / f"{dataset}-{horizon}-{model}" / "models").glob("*/"))
    if not found:
        raise FileNotFoundError(f"no bundle of {model} for {dataset} h{horizon} under {logs}")
    return found[-1]


def combine(args, horizon: int) -> dict:
    from tsssm.bundle import load_bundle
    from tsssm.cli import compose
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import forecast_origin_rows, iter_forecasts

    device = torch.device(args.device)
    names, paths = [], []
    for m in args.models:  # the trainings that finished (a stopped one left no bundle)
        try:
            paths.append(_bundle(args.logs, args.dataset, horizon, m))
            names.append(m)
        except FileNotFoundError as err:
            print(f"  h{horizon}: {err}; combining the others", flush=True)
    if len(names) < 2:
        raise FileNotFoundError(f"fewer than two trained models for {args.dataset} h{horizon}")
    bundles = [load_bundle(p) for p in paths]
    overrides = ["experiment=ett", f"data={args.dataset}", f"data.root={Path(args.root).resolve()}",
                 f"data.horizon={horizon}"]
    if args.data_format != "csv":
        overrides.append(f"data.files=[{FILES[args.dataset]}.{args.data_format}]")
    cfg = compose(overrides)
    data = build_dataset(cfg.data).load(scaler=bundles[0].scaler)
    models = [b.model.to(device).eval() for b in bundles]
    context = cfg.data.input_len
    K = len(models)

    def windows(split: str):
        """(forecast means (K, b, H, C), targets (b, H, C)) batch by batch, all models alike."""
        for part in data.parts:
            origins = forecast_origin_rows(part.rows(split), context, horizon, 1)
            if args.limit_windows:
                origins = origins[: args.limit_windows]
            streams = [iter_forecasts(m, part.stream.values, origins, context, horizon)
                       for m in models]
            for preds in zip(*streams):
                yield (np.stack([p[0].mean.numpy().astype(np.float64) for p in preds]),
                       preds[0][1].astype(np.float64))

    G = np.zeros((K, K))
    n_val = 0
    for means, target in windows("val"):
        err = (means - target).reshape(K, -1)
        G += err @ err.T
        n_val += err.shape[1]
    w = simplex_weights(G)
    sq = ab = 0.0
    n_test = 0
    per_model_sq = np.zeros(K)
    for means, target in windows("test"):
        comb = np.tensordot(w, means, axes=1)
        sq += float(((comb - target) ** 2).sum())
        ab += float(np.abs(comb - target).sum())
        per_model_sq += ((means - target) ** 2).reshape(K, -1).sum(1)
        n_test += target.size
    return {
        "dataset": args.dataset, "task": "forecast", "horizon": horizon,
        "model": "combination(" + ",".join(names) + ")",
        "mse": sq / n_test, "mae": ab / n_test,
        "val_mse": float(w @ G @ w) / n_val,
        "weights": dict(zip(names, map(float, w))),
        "val_mse_each": dict(zip(names, map(float, np.diag(G) / n_val))),
        "test_mse_each": dict(zip(names, map(float, per_model_sq / n_test))),
        "bundles": [str(p) for p in paths],
        "windows": n_test // (horizon * target.shape[-1]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--data-format", default="csv", choices=["csv", "parquet"])
    ap.add_argument("--dataset", default="ett_m1")
    ap.add_argument("--horizons", nargs="*", type=int, default=[96, 192, 336, 720])
    ap.add_argument("--logs", type=Path, required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit-windows", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    records = []
    for h in args.horizons:
        started = time.perf_counter()
        try:
            rec = combine(args, h)
        except FileNotFoundError as err:  # a training that did not finish: say so, go on
            print(f"skipped h{h}: {err}", flush=True)
            continue
        rec["combine_s"] = round(time.perf_counter() - started, 1)
        records.append(rec)
        args.out.write_text(json.dumps(records, indent=1))
        each = " ".join(f"{m} {v:.4f}" for m, v in rec["test_mse_each"].items())
        wts = " ".join(f"{m} {v:.2f}" for m, v in rec["weights"].items())
        print(f"{args.dataset} h{h}: combined test MSE {rec['mse']:.4f} MAE {rec['mae']:.4f} "
              f"(val {rec['val_mse']:.4f}); weights {wts}; each: {each}", flush=True)
    if records and len(records) == len(args.horizons):
        avg = np.mean([r["mse"] for r in records])
        print(f"{args.dataset} avg combined test MSE {avg:.4f} over {len(records)} horizons")


if __name__ == "__main__":
    main()
