"""The gaps suite of benchmarks/accuracy.py: SKAB with the real time steps (data.gaps=time)
beside the rows taken as evenly spaced (data.gaps=keep).

SKAB's streams are sampled about once a second with a few longer gaps (in the 34 fault files:
steps of 1 s and 2 s, and single gaps of up to ~250 s). The continuous-time Kalman model
(``model=kalman_ct``) discretises its dynamics for each real step under ``gaps=time``; under
``gaps=keep`` it sees every step as the median one, as the discrete models do. Everything else
is SKAB's protocol as in ``data=skab``: per file, the first 400 rows train (the last 20% of them
validate; the threshold is fitted on the training scores) and the rest is test; all test rows,
no point-adjust. Records: F1 / FAR / MAR / AUC-PR of the anomaly flags, one-step and horizon (8)
forecast MSE on the normalised scale.

    python benchmarks/accuracy.py --suite gaps --root /path/to/SKAB
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

from accuracy_ett import _store_uri
from records import commit, device_name, merge_records

REPO = Path(__file__).resolve().parents[1]
KEY = ("dataset", "task", "model", "gaps")
#: (record name, tsssm train overrides, gaps modes): the same model under both time modes
MODELS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "kalman_ct[level,ou]": (["model=kalman_ct", "model.net.components=[level,ou]"],
                            ("time", "keep")),
    "kalman_ct[level]": (["model=kalman_ct", "model.net.components=[level]"], ("time", "keep")),
    "kalman": (["model=kalman"], ("keep",)),  # the discrete structural model, for reference
}
SMALL = ["data.files=[data/valve1/0.csv,data/valve1/1.csv]", "data.extra_train_files=[]",
         "data.eval_stride=64"]


def train_command(args, overrides: list[str], gaps: str, job_dir: Path) -> list[str]:
    return ["tsssm", "train", "data=skab", f"data.root={Path(args.root).resolve()}",
            *overrides, f"data.gaps={gaps}", "seed=0",
            f"tracking.uri={_store_uri(args, job_dir)}",
            f"tracking.artifact_root={job_dir}/artifacts", f"tracking.output_dir={job_dir}",
            "trainer.enable_progress_bar=false", *(SMALL if args.small else []), *args.set]


def _run(args, name: str, overrides: list[str], gaps: str) -> dict:
    from tsssm.tracking import Tracker

    logs = Path(args.logs) if args.logs else Path(tempfile.gettempdir()) / "tsssm-accuracy"
    job_dir = logs / f"skab-gaps-{name.replace('[', '-').replace(']', '').replace(',', '-')}-{gaps}"
    job_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(args, overrides, gaps, job_dir)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    with open(job_dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tsssm.cli", *command[1:]], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (job_dir / "log.txt").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {' | '.join(tail)}")
    tracker = Tracker(_store_uri(args, job_dir), "tsssm")
    m = tracker.run_metrics(tracker.latest_run("train"))
    get = lambda k: m.get(k, math.nan)  # noqa: E731
    return {
        "dataset": "skab", "task": "anomaly", "model": name, "gaps": gaps,
        "f1": get("test/f1"), "far": get("test/far"), "mar": get("test/mar"),
        "auc_pr": get("test/auc_pr"), "mse": get("test/mse"), "mae": get("test/mae"),
        "h8_mse": get("test/h8_mse"), "h8_mae": get("test/h8_mae"),
        "h8_coverage95": get("test/h8_coverage95"),
        "train_s": round(elapsed, 1), "command": " ".join(command),
    }


def run(args) -> list[dict]:
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    common = {"device": device_name("cpu"), "commit": commit(), "runs": 1, "seed": 0,
              "small": bool(args.small)}
    jobs = [(n, MODELS[n][0], g) for n in names for g in MODELS[n][1]]
    records, failures = [], []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run, args, *job): job for job in jobs}
        for fut in cf.as_completed(futures):
            try:
                records.append({**fut.result(), **common})
                r = records[-1]
                print(f"  {r['model']} gaps={r['gaps']}: F1 {r['f1']:.3f} FAR {r['far']:.3f} "
                      f"MAR {r['mar']:.3f} mse {r['mse']:.4f}", flush=True)
            except RuntimeError as err:
                failures.append(str(err))
                print(f"  FAILED {futures[fut][0]} {futures[fut][2]}: {err}", flush=True)
    merge_records(args.out, records, KEY)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return records


def table(path: Path, only: list[dict] | None = None) -> str:
    """Markdown: one row per model and time mode."""
    import json

    records = only if only is not None else (json.loads(Path(path).read_text())
                                             if Path(path).exists() else [])
    records = [r for r in records if r.get("dataset") == "skab" and "gaps" in r]
    out = ["\n#### SKAB, real time steps (gaps=time) beside evenly spaced rows (gaps=keep)\n",
           "| model | gaps | F1 | FAR | MAR | AUC-PR | one-step MSE | h8 MSE | h8 cov95 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["model"], r["gaps"] != "time")):
        out.append(f"| {r['model']} | {r['gaps']} | {r['f1']:.3f} | {r['far']:.3f} | "
                   f"{r['mar']:.3f} | {r['auc_pr']:.3f} | {r['mse']:.4f} | {r['h8_mse']:.4f} | "
                   f"{r['h8_coverage95']:.3f} |")
    return "\n".join(out)
