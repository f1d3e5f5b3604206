"""Accuracy benchmarks under each dataset's own protocol; results to benchmarks/results/*.json.

One command trains and evaluates the models and the classical baselines and merges one record per
(dataset, horizon or task, model) into ``benchmarks/results/accuracy.json``:

    # ETT: ETTh1, ETTh2, ETTm1, ETTm2 x horizons 96/192/336/720 (input 96, every window), GPU
    python benchmarks/accuracy.py --suite ett --root /path/to/ETT-small --accelerator gpu --jobs 6
    # ... from Parquet copies, shorter training on the 4x longer ETTm files, at most 500 s
    python benchmarks/accuracy.py --suite ett --root .devdata/ett --data-format parquet \
        --accelerator gpu --jobs 12 --set 'ett_m*:trainer.max_epochs=3' --time-limit 500
    # the same, small, on the CPU (one dataset, one horizon, short training; written to
    # benchmarks/results/accuracy_small.json so it never mixes with the real table)
    python benchmarks/accuracy.py --suite ett --root /path/to/ETT-small --small
    # SKAB: every detector on the 34 fault files (see benchmarks/accuracy_skab.py)
    python benchmarks/accuracy.py --suite skab --root /path/to/SKAB
    # SKAB with the real time steps (data.gaps=time) beside data.gaps=keep (accuracy_gaps.py)
    python benchmarks/accuracy.py --suite gaps --root /path/to/SKAB

Neural and Kalman models run through the user's own command, ``tsssm train experiment=ett ...``,
each in its own process with its own tracking store (``--jobs`` of them at once); the record's
``command`` field is that exact command. Baselines without training (last value, seasonal naive)
are evaluated in process by the same evaluation code. ``--print-table`` prints the Markdown table
of what the JSON holds (with the published numbers beside) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling suite modules

from records import RESULTS  # noqa: E402

SUITES = {"ett": "accuracy_ett", "skab": "accuracy_skab", "gaps": "accuracy_gaps"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--root", help="the dataset folder (ETT-small files / SKAB checkout)")
    ap.add_argument("--datasets", nargs="*", help="dataset config names (default: the suite's)")
    ap.add_argument("--horizons", nargs="*", type=int, help="forecast horizons (ETT)")
    ap.add_argument("--models", nargs="*", help="model configs and baselines (default: all)")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (one process each)")
    ap.add_argument("--small", action="store_true", help="a quick CPU-sized run")
    ap.add_argument("--set", nargs="*", default=[], metavar="[DATASETS:]KEY=VALUE",
                    help="extra overrides for every training command; with a prefix (a dataset "
                         "config name or glob, e.g. ett_m*:trainer.max_epochs=3) only for the "
                         "datasets it matches")
    ap.add_argument("--data-format", choices=["csv", "parquet"], default="csv",
                    help="which copy of each dataset file --root holds (ETT: ETTh1.csv or "
                         "ETTh1.parquet, ...)")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help="wall-clock budget in seconds: trainings still running then are "
                         "stopped and reported, the ones not started are skipped (every record "
                         "is written to --out as its run ends)")
    ap.add_argument("--out", type=Path, help="results file (default: results/accuracy.json)")
    ap.add_argument("--logs", type=Path, help="folder for each training's output")
    ap.add_argument("--store", choices=["sqlite", "file"], default="sqlite",
                    help="each training's tracking store (file: MLflow's file store, for "
                         "machines without SQLAlchemy; set MLFLOW_ALLOW_FILE_STORE=true)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the trainings' seed (ETT; default 0, the tables' figures)")
    ap.add_argument("--print-table", action="store_true", help="print RESULTS.md's table")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("accuracy_small.json" if args.small else "accuracy.json")
    suite = importlib.import_module(SUITES[args.suite])
    if args.print_table:
        print(suite.table(args.out))
        return
    if not args.root:
        ap.error("--root is required to run a suite")
    records = suite.run(args)
    print(suite.table(args.out, only=records))
    print(f"\n{len(records)} records merged into {args.out}")


if __name__ == "__main__":
    main()
