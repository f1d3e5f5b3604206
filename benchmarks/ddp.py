"""Training throughput with Lightning DDP (`trainer=ddp`) against one device without DDP, and the
test metrics of each run (a DDP fit must match the single-device fit within seed noise).

Every training is the user's `tsssm train` command in its own process with its own MLflow file
store; throughput is the `train/samples_per_s` the run logs (training windows per second over
every rank, validation excluded; the median over the epochs after the first, which compiles the
kernels). Scaling efficiency = samples/s on N devices / (N x samples/s of the 1-device run).

    # one H200: the DDP code path on one device beside the plain GPU run
    python benchmarks/ddp.py --devices 1 --out $OUT
    # several GPUs of one host (issue 13)
    python benchmarks/ddp.py --devices 1 2 4 --root ../shared/datasets/ett --out $OUT
    # CPU processes (gloo), small: a check of the driver itself
    python benchmarks/ddp.py --accelerator cpu --devices 1 2 --small --models kalman

Data: ETTm1 with the long-horizon protocol (experiment=ett, input 96, horizon 96, stride 1) when
--root holds ETTm1.csv; otherwise a synthetic stream of ETTm1's shape (69,680 rows x 7 channels
at 15 minutes, daily and weekly seasons plus noise) through data=csv with the same window
protocol, named as such in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ETT_CHANNELS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
#: the window protocol: ETT's long-horizon one, or short windows for --small (a CPU check)
WINDOWS = ["data.input_len=96", "data.horizon=96", "data.stride=1"]
SMALL_WINDOWS = ["data.input_len=24", "data.horizon=8", "data.stride=8", "data.eval_stride=8"]
SMALL_NETS = {"mamba": ["model.net.d_model=16", "model.net.n_layers=1"]}


def synthetic_ett(path: Path, rows: int = 69_680, seed: int = 0) -> Path:
    """A stream shaped like ETTm1 (15-minute stamps, 7 channels) to CSV."""
    import numpy as np
    import polars as pl

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    t = np.arange(rows, dtype=np.float64)
    day, week = 96.0, 96.0 * 7
    columns = {}
    for i, name in enumerate(ETT_CHANNELS):
        walk = np.cumsum(rng.standard_normal(rows)) * 0.02
        columns[name] = (np.sin(2 * np.pi * t / day + i) * (1 + 0.3 * i)
                         + 0.5 * np.sin(2 * np.pi * t / week + 2 * i) + walk
                         + 0.3 * rng.standard_normal(rows)).astype(np.float32)
    stamps = np.datetime64("2016-07-01T00:00") + np.arange(rows) * np.timedelta64(15, "m")
    frame = pl.DataFrame({"date": stamps.astype("datetime64[us]"), **columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.write_csv(tmp)
    os.replace(tmp, path)
    return path


def data_overrides(args, work: Path) -> tuple[str, list[str]]:
    windows = SMALL_WINDOWS if args.small else [*WINDOWS, f"data.eval_stride={args.eval_stride}"]
    root = Path(args.root).expanduser() if args.root else None
    if root is not None and (root / "ETTm1.csv").exists():
        return "ETTm1", ["experiment=ett", "data=ett_m1", f"data.root={root.resolve()}",
                         *(SMALL_WINDOWS if args.small else [
                             f"data.eval_stride={args.eval_stride}"])]
    rows = 6_000 if args.small else 69_680
    path = synthetic_ett(work / f"synthetic-ettm1-{rows}.csv", rows)
    return f"synthetic ETTm1-shaped ({rows} rows)", [
        "data=csv", f"data.path={path}", "data.time_column=date", "task=forecast",
        "data.batch_size=64", *windows]


_CHILDREN: list[subprocess.Popen] = []


def _stop_on_sigterm() -> None:
    """A `timeout` around the benchmark ends the training in flight too, and the table of what
    was measured so far is still written."""
    import signal

    def stop(signum, frame):
        for proc in _CHILDREN:
            proc.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def train(args, name: str, model: str, trainer: list[str], data: list[str], work: Path
          ) -> dict:
    """One `tsssm train` in its own process; the run's metrics."""
    from mlflow.tracking import MlflowClient

    job = work / name
    shutil.rmtree(job, ignore_errors=True)  # one run per store
    store = (job / "mlruns").resolve().as_uri()
    command = [sys.executable, "-m", "tsssm.cli", "train", *data, f"model={model}", *trainer,
               f"tracking.uri={store}", f"tracking.artifact_root={job}/artifacts",
               f"tracking.output_dir={job}", "trainer.enable_progress_bar=false",
               "seed=0",
               *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
               *(SMALL_NETS.get(model, []) if args.small else []), *args.set]
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _CHILDREN.append(child)
    try:
        out, err = child.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    finally:
        _CHILDREN.remove(child)
    proc = subprocess.CompletedProcess(command, child.returncode, out, err)
    wall = time.perf_counter() - started
    (job / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (job / "log.txt").write_text(" ".join(command) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("tsssm")
    (run,) = client.search_runs([exp.experiment_id])
    rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id,
                                                               "train/samples_per_s"),
                                     key=lambda m: m.step)]
    steady = rates[1:] or rates
    metrics = run.data.metrics
    test = {k: v for k, v in metrics.items() if k.startswith("test/")
            and k.split("/")[1].split("_", 1)[-1] in ("mse", "mae", "crps", "nll")}
    return {"run": name, "model": model, "trainer": " ".join(trainer), "wall_s": wall,
            "epochs": len(rates), "samples_per_s": statistics.median(steady),
            "samples_per_s_all": rates, "status": run.info.status, **test}


def table(records: list[dict]) -> str:
    keys = sorted({k for r in records for k in r if k.startswith("test/")})[:4]
    head = ["model", "run", "samples/s", "vs 1 device", "efficiency", "epochs", "wall s", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        rate = r["samples_per_s"]
        cells = [r["model"], r["run"], f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}",
                 f"{r['speedup']:.2f}x" if "speedup" in r else "",
                 f"{r['efficiency']:.0%}" if "efficiency" in r else "", str(r["epochs"]),
                 f"{r['wall_s']:.0f}", *(f"{r[k]:.4f}" if k in r else "" for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1],
                   help="trainer.devices of the DDP runs (beside one device without DDP)")
    p.add_argument("--accelerator", default="gpu", help="gpu or cpu (gloo processes)")
    p.add_argument("--models", nargs="+", default=["mamba"])
    p.add_argument("--root", help="folder with ETTm1.csv (else a synthetic stream of its shape)")
    p.add_argument("--epochs", type=int, default=3, help="trainer.max_epochs (0: the model's)")
    p.add_argument("--small", action="store_true", help="small nets and data (a CPU check)")
    p.add_argument("--eval-stride", type=int, default=1,
                   help="data.eval_stride (1: every test window, the benchmark's protocol)")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training")
    p.add_argument("--out", type=Path, default=Path("/tmp/tsssm-ddp-bench/out"),
                   help="folder for ddp.json, ddp.md and ddp-logs.txt (nothing else)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tsssm-ddp-bench"),
                   help="the runs' stores, outputs and data")
    args = p.parse_args()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # each run's own file store, read here
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir
    dataset, data = data_overrides(args, work)
    plain = [f"trainer={'gpu' if args.accelerator == 'gpu' else 'cpu'}"]
    records: list[dict] = []
    _stop_on_sigterm()
    try:
        measure(args, data, work, plain, records)
    finally:
        write(args, work, dataset, records)


def measure(args, data: list[str], work: Path, plain: list[str], records: list[dict]) -> None:
    for model in args.models:
        try:
            base = train(args, f"{model}-1-plain", model, plain, data, work)
        except Exception as err:  # one failed model does not lose the others
            print(f"{model}: {err}", flush=True)
            continue
        records.append(base)
        print(table(records[-1:]).splitlines()[-1], flush=True)
        for n in args.devices:
            ddp = ["trainer=ddp", f"trainer.accelerator={args.accelerator}",
                   f"trainer.devices={n}"]
            try:
                r = train(args, f"{model}-{n}-ddp", model, ddp, data, work)
            except Exception as err:
                print(f"{model} ddp x{n}: {err}", flush=True)
                continue
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
            r["efficiency"] = r["speedup"] / n
            records.append(r)
            print(table(records[-1:]).splitlines()[-1], flush=True)


def write(args, work: Path, dataset: str, records: list[dict]) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = "cpu"
    if args.accelerator == "gpu":
        import torch

        device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
                  if torch.cuda.is_available() else "no GPU visible")
    text = (f"{table(records)}\n\n{stamp}, {device}, data {dataset}, "
            f"command: python {' '.join(sys.argv)}")
    print("\n" + text)
    (args.out / "ddp.md").write_text(text + "\n")
    logs = sorted(work.glob("*/log.txt"))
    (args.out / "ddp-logs.txt").write_text("".join(
        f"===== {p.parent.name}\n{p.read_text()[-20000:]}\n" for p in logs))
    (args.out / "ddp.json").write_text(json.dumps(
        [{**r, "date": stamp, "device": device, "data": dataset,
          "command": " ".join(sys.argv)} for r in records], indent=1))


if __name__ == "__main__":
    main()
