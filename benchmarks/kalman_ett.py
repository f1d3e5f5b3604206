"""The structural Kalman baseline on ETT under the standard long-horizon protocol.

Protocol (as TSLib's; ``experiment=ett``): input 96, horizons 96/192/336/720, every val/test
window at stride 1 (a window's context may reach into the previous split), z-scored on the
training months, MSE
and MAE over all 7 channels; plus the coverage of the ±1.96σ band. The Kalman model is fitted
on the training months only, exactly as ``tsssm train model=kalman_ett`` fits it
(:func:`tsssm.models.kalman.fit_forecaster`: EM on 96-step segments with the prior, then the
multi-step criterion over the horizon, then the variance calibration on the training windows);
one model per dataset and horizon, as every model in the published tables. Beside it:
tsssm's last_value and seasonal_naive baselines on the same windows.

    python benchmarks/kalman_ett.py --root ../shared/datasets/ett [--datasets ett_h1,...]
        [--horizons 96,192,336,720] [--set model.net.diffuse_level=true ...] [--out DIR]

``--set`` overrides keys of conf/model/kalman_ett.yaml (model.* only); ``--structure-search``
instead fits the candidate structures of STRUCTURES and reports their validation scores (the
table in benchmarks/RESULTS.md says which was chosen and why). Writes kalman_ett.json and
kalman_ett_table.md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsssm.baselines import build_baseline  # noqa: E402
from tsssm.bundle import build_net  # noqa: E402
from tsssm.cli import compose  # noqa: E402
from tsssm.config import to_plain  # noqa: E402
from tsssm.data.datasets import build_dataset  # noqa: E402
from tsssm.models.kalman import fit_forecaster  # noqa: E402
from tsssm.tasks.evaluate import horizon_metrics  # noqa: E402

HORIZONS = (96, 192, 336, 720)
CONTEXT = 96
#: the data configs
DATASETS = ("ett_h1", "ett_h2", "ett_m1", "ett_m2")
#: candidates of --structure-search: overrides of conf/model/kalman_ett.yaml
STRUCTURES = {
    "kalman_ett: level + seasonal(4 harmonics) + ar(1), diffuse level": [],
    "... prior level not diffuse": ["model.net.diffuse_level=false"],
    "... 8 harmonics": ["model.net.seasonal_harmonics=8"],
    "... damped trend": ["model.net.components=[level,damped,seasonal,ar]"],
    "... ar(2)": ["model.net.ar_order=2"],
    "... likelihood only (EM + 200 L-BFGS evaluations), no multi-step criterion": [
        "model.fit=em", "model.em_polish=200"],
}


def load(name: str, root: str, horizon: int, overrides: list[str]):
    """The config of ``tsssm train experiment=ett data=<name> data.horizon=<H>
    model=kalman_ett`` and its prepared data."""
    cfg = compose(["experiment=ett", f"data={name}", f"data.root={root}",
                   f"data.input_len={CONTEXT}", f"data.horizon={horizon}", "model=kalman_ett",
                   *overrides])
    return cfg, build_dataset(cfg.data).load()


def evaluate(model, values: np.ndarray, rows: tuple[int, int], horizon: int) -> dict:
    """MSE, MAE, CRPS, NLL and ±1.96σ coverage over every window of ``rows`` at stride 1,
    by the pipeline's own evaluation (:func:`tsssm.tasks.evaluate.horizon_metrics`)."""
    return horizon_metrics(model, [(values, rows)], CONTEXT, horizon, stride=1).result()


def run_kalman(cfg, data, horizon: int) -> tuple[dict, object]:
    torch.manual_seed(cfg.seed)
    net = build_net(to_plain(cfg.model.net), len(data.channels))
    train = data.padded("train")
    m = cfg.model
    start = time.perf_counter()
    cpu0 = time.process_time()
    net.initialize(train)
    report = fit_forecaster(
        net, [train], fit=m.fit, em_iters=m.em_iters, em_segment=m.em_segment,
        em_prior=m.em_prior, em_polish=m.em_polish, multistep_iters=m.multistep_iters,
        calibrate=m.calibrate, context=cfg.data.input_len, horizon=horizon)
    fit = {"fit_s": time.perf_counter() - start, "fit_cpu_s": time.process_time() - cpu0,
           "multistep_evals": len(report.multistep_mse)}
    return fit, net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "datasets" / "ett"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--horizons", default=",".join(map(str, HORIZONS)))
    ap.add_argument("--set", nargs="*", default=[], help="model.* overrides")
    ap.add_argument("--structure-search", action="store_true",
                    help="fit every candidate of STRUCTURES, report validation scores")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TSSSM_BENCH_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, commit {commit}, command: "
              f"python benchmarks/kalman_ett.py {' '.join(sys.argv[1:])}")
    print(header, flush=True)
    bad = [s for s in args.set if not s.startswith("model.")]
    if bad:
        sys.exit(f"--set takes model.* overrides only, got {bad}")
    candidates = STRUCTURES if args.structure_search else {"kalman_ett": []}
    splits = args.splits.split(",")
    records = []
    name = "kalman_ett_structures.json" if args.structure_search else "kalman_ett.json"
    for ds in args.datasets.split(","):
        for H in [int(h) for h in args.horizons.split(",")]:
            for label, extra in candidates.items():
                cfg, data = load(ds, args.root, H, [*args.set, *extra])
                part = data.parts[0]
                fit, net = run_kalman(cfg, data, H)
                rec = {"dataset": ds, "horizon": H, "model": "kalman_ett", "structure": label,
                       "overrides": [*args.set, *extra], **fit}
                for split in splits:
                    rec[split] = evaluate(net, part.stream.values, part.rows(split), H)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                (out / name).write_text(json.dumps(records, indent=1))
            if args.structure_search:
                continue
            for bl, kw in (("last_value", {}), ("seasonal_naive",
                                                {"period": cfg.data.seasonal_period})):
                f = build_baseline(bl, **kw)
                a, b = part.rows("train")
                f.fit(torch.from_numpy(part.stream.values[a:b])[None])
                rec = {"dataset": ds, "horizon": H, "model": bl}
                for split in splits:
                    rec[split] = evaluate(f, part.stream.values, part.rows(split), H)
                records.append(rec)
                print(json.dumps(rec), flush=True)
            (out / name).write_text(json.dumps(records, indent=1))
    if not args.structure_search:
        table = markdown(records, splits)
        (out / "kalman_ett_table.md").write_text(header + "\n\n" + table + "\n")
        print("\n" + table)


def markdown(records: list[dict], splits: list[str]) -> str:
    lines = ["| dataset | H | " + " | ".join(
        f"{s} MSE kalman / seasonal_naive / last_value" for s in splits)
        + " | test MAE kalman / s-naive | test CRPS kalman / s-naive | test coverage95 kalman / "
        "s-naive | fit s (CPU s) |",
        "|---|---|" + "---|" * len(splits) + "---|---|---|---|"]
    by = {}
    for r in records:
        by.setdefault((r["dataset"], r["horizon"]), {})[r["model"]] = r
    for (ds, H), models in by.items():
        k, sn, lv = models["kalman_ett"], models["seasonal_naive"], models["last_value"]
        cells = [f"{k[s]['mse']:.3f} / {sn[s]['mse']:.3f} / {lv[s]['mse']:.3f}" for s in splits]
        lines.append(f"| {ds} | {H} | " + " | ".join(cells)
                     + f" | {k['test']['mae']:.3f} / {sn['test']['mae']:.3f} | "
                     f"{k['test']['crps']:.3f} / {sn['test']['crps']:.3f} | "
                     f"{k['test']['coverage95']:.3f} / {sn['test']['coverage95']:.3f} | "
                     f"{k['fit_s']:.1f} ({k['fit_cpu_s']:.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
