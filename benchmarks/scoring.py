"""Scoring throughput and memory, file to file: `tsssm score`'s streaming path (read in batches,
score with the state carried, write row groups) on one long stream of 8 channels, and on a fleet
of many short streams sharded across worker processes or a local Dask cluster; beside the bound
of just reading the same Parquet file (a polars scan of every column, no model).

Every measurement runs in a fresh process, so its peak RSS (the process's own high-water mark,
VmHWM, imports included) is that of one `tsssm score`; with workers, the largest total of the
process and its workers is sampled too. rows/s is the median over
--repeats runs of the time from opening the input to the renamed output (model loading
excluded). Inputs are generated once, in batches (never whole in memory), under --workdir and
deleted at the end unless --keep-data.

    python benchmarks/scoring.py                      # the CPU table (long: 10^8 rows)
    python benchmarks/scoring.py --device cuda --sizes kalman=1e6 mamba=1e6,1e7,1e8 \\
        --engines local --workers 1 2 --fleet-models kalman mamba --repeats 1   # the GPU table
    python benchmarks/scoring.py --sizes kalman=1e6 --fleet 50 --repeats 1   # a quick check

The hybrid forecasters of the forecasting issue are measured once they are on main
(--sizes hybrid=...).
"""

from __future__ import annotations

import argparse
import contextlib
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
CHANNELS = 8
DEFAULT_SIZES = {"kalman": [10**6, 10**7, 10**8], "mamba": [10**5]}
#: the scores measured (--scores): the one-step NIS, or the default anomaly task's windowed
#: joint score (conf/task/anomaly.yaml: Mahalanobis, 60-row trailing shift window since
#: 2026-12-01 20:00; 30 rows before); "+contrib": with the contrib:<channel> columns (tsssm
#: score's default, score.contributions=true)
SCORES = {"one-step": ("nis", 1, "mean"), "anomaly": ("mahalanobis", 60, "shift")}


# ------------------------------------------------------------------------------ inputs
#: how the inputs are written (since 2026-12-02): no dictionary pages, the float columns
#: uncompressed (pyarrow's defaults try a dictionary per column and snappy: 5x the CPU time to
#: write, 40.6 against 36.0 bytes a row, and 64 s of a device call for 10^8 rows)
INPUT_OPTIONS = {"use_dictionary": False,
                 "compression": {"ts": "snappy", **{f"c{i}": "none" for i in range(64)}}}

def generate(path: Path, rows: int, seed: int = 0, channels: int = CHANNELS,
             group: int = 1 << 20, device: str = "cpu") -> Path:
    """A random-walk-plus-noise stream to Parquet, row group by row group (flat memory).
    ``device="cuda"``: the random numbers drawn on the GPU (torch; another draw of the same
    process, ~50x faster than numpy on one core: 10^8 rows in seconds)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    if device != "cpu":
        return _generate_torch(path, rows, seed, channels, group, device)
    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(channels)]
    schema = pa.schema([("ts", pa.int64())] + [(n, pa.float32()) for n in names])
    level = np.zeros(channels)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, **INPUT_OPTIONS) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            steps = rng.standard_normal((n, channels)) * 0.01
            walk = level + np.cumsum(steps, axis=0)
            level = walk[-1]
            values = (walk + rng.standard_normal((n, channels))).astype(np.float32)
            cols = [pa.array(np.arange(start, start + n, dtype=np.int64))]
            cols += [pa.array(values[:, j]) for j in range(channels)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
    os.replace(tmp, path)
    return path


def _generate_torch(path: Path, rows: int, seed: int, channels: int, group: int,
                    device: str) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    names = [f"c{i}" for i in range(channels)]
    schema = pa.schema([("ts", pa.int64())] + [(n, pa.float32()) for n in names])
    level = torch.zeros(channels, dtype=torch.float64, device=device)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, **INPUT_OPTIONS) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            steps = torch.randn((n, channels), generator=gen, device=device,
                                dtype=torch.float64) * 0.01
            walk = level + torch.cumsum(steps, 0)
            level = walk[-1]
            noise = torch.randn((n, channels), generator=gen, device=device)
            values = (walk.float() + noise).T.contiguous().cpu().numpy()  # (C, n)
            cols = [pa.array(np.arange(start, start + n, dtype=np.int64))]
            cols += [pa.array(values[j]) for j in range(channels)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
    os.replace(tmp, path)
    return path


class Identity:
    """A forecaster that predicts 0 with variance 1 for every row, on the rows' device: the
    model's cost taken out of a file-to-file run (its host bound)."""

    def one_step(self, y, state=None, **_):
        import torch

        from tsssm.models.base import Gaussian

        return Gaussian(torch.zeros_like(y), torch.ones_like(y)), state


def model_bound(bundle: str, device: str, rows: int, batch: int, window: bool) -> dict:
    """The model alone on the device (rows already there, synchronised at the end): one stream
    in calls of ``batch`` rows with the state carried, and with ``window`` the scores too
    (step terms and the window sums on the device): the device bound of a file-to-file run."""
    import torch

    from tsssm.anomaly.scores import ScoreSpec, StepTerms, step_terms
    from tsssm.bundle import load_bundle
    from tsssm.scoring.device_window import DeviceWindow

    loaded = load_bundle(bundle)
    model = loaded.model.to(device).eval()
    spec = ScoreSpec.from_dict(loaded.score, loaded.score_kind)
    y = torch.randn((1, batch, CHANNELS), device=device)
    calls = max(rows // batch, 1)
    with torch.no_grad():
        for _ in range(2):  # compile and warm up
            model.one_step(y, None)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        started, cpu = time.perf_counter(), time.process_time()
        state = None
        win = DeviceWindow(spec.window, spec.window_kind, CHANNELS, torch.device(device))
        for _ in range(calls):
            pred, state = model.one_step(y, state)
            if window:
                st = step_terms(y, pred, spec.kind)
                score, contrib = win.update(StepTerms(st.contrib[0], st.whitened[0],
                                                      st.observed[0]))
        torch.cuda.synchronize() if device.startswith("cuda") else None
    return {"rows": calls * batch, "seconds": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu}


def fleet(folder: Path, n: int, rows: int) -> Path:
    """n short streams (one Parquet file each) in ``folder``."""
    if folder.exists() and len(list(folder.glob("*.parquet"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        generate(folder / f"s{i:05d}.parquet", rows, seed=i, group=rows)
    return folder


def make_bundle(model: str, folder: Path, device: str, score: str = "one-step") -> Path:
    """An untrained model of the default size (throughput does not depend on the weights),
    with a threshold fitted on its own scores of a short normal stretch (``score``: a key of
    SCORES)."""
    import numpy as np
    import torch

    from tsssm.anomaly.scores import ScoreSpec
    from tsssm.anomaly.thresholds import QuantileThreshold
    from tsssm.bundle import Bundle, save_bundle
    from tsssm.data.scaling import StandardScaler
    from tsssm.tasks.evaluate import predict_stream

    path = folder / f"bundle-{model}-{score}"
    if path.exists():
        return path
    torch.manual_seed(0)
    channels = [f"c{i}" for i in range(CHANNELS)]
    if model == "kalman":
        from tsssm.models.kalman import KalmanForecaster

        config = {"_target_": "tsssm.models.kalman.KalmanForecaster",
                  "components": ["level", "trend"]}
        net = KalmanForecaster(CHANNELS)
    elif model == "mamba":
        from tsssm.models.mamba_forecaster import MambaForecaster

        config = {"_target_": "tsssm.models.mamba_forecaster.MambaForecaster", "d_model": 64,
                  "n_layers": 2, "d_state": 16, "horizon": 24}
        net = MambaForecaster(CHANNELS, d_model=64, n_layers=2, d_state=16, horizon=24)
    else:
        raise SystemExit(f"unknown model {model!r} (kalman, mamba; hybrids once on main)")
    net.eval()
    rng = np.random.default_rng(1)
    normal = (rng.standard_normal((2000, CHANNELS)).cumsum(0) * 0.01
              + rng.standard_normal((2000, CHANNELS))).astype(np.float32)
    scaler = StandardScaler.fit([normal], channels)
    spec = ScoreSpec(*SCORES[score])
    pred = predict_stream(net, scaler.transform(normal), spec)
    bundle = Bundle(net, config, model, channels, scaler, False,
                    QuantileThreshold(0.99).fit(pred.score), spec.kind,
                    {"time_column": "ts", "channels": channels, "separator": ",",
                     "label_column": None}, score=spec.to_dict())
    return save_bundle(bundle, path)


# ------------------------------------------------------------------------------ children
def child(argv: list[str]) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    kind, rest = argv[0], argv[1:]
    if kind == "read":
        import polars as pl

        (path,) = rest
        started, cpu = time.perf_counter(), time.process_time()
        query = pl.scan_parquet(path).select(pl.all().sum())
        try:
            frame = query.collect(engine="streaming")
        except (TypeError, ValueError):  # polars before the new streaming engine
            frame = query.collect(streaming=True)
        rows = int(pl.scan_parquet(path).select(pl.len()).collect().item())
        seconds = time.perf_counter() - started
        assert frame.height == 1
    elif kind == "model":
        bundle, device, rows, batch, window = rest
        record = model_bound(bundle, device, int(rows), int(batch), window == "1")
        print(json.dumps({**record, "peak_rss_mb": high_water_mb(), "tree_rss_mb": 0.0}))
        return
    elif kind in ("score", "host"):
        path, bundle, device, batch, contributions, *threads = rest
        import numpy as np

        from tsssm.bundle import load_bundle
        from tsssm.data.io import ReadSpec
        from tsssm.scoring.files import score_file
        from tsssm.scoring.scorer import Scorer

        scorer = Scorer(load_bundle(bundle), device=device)
        if kind == "host":  # the model taken out: what the rest of the pipeline allows
            scorer.model = Identity()
        # compile kernels, not timed (long enough for the segmented scan's shapes too)
        warm = 4096 if device == "cpu" else min(int(batch), 1 << 20)
        scorer.update_many(np.zeros((warm, CHANNELS), np.float32))
        scorer.reset()
        spec = ReadSpec(time_column="ts", channels=tuple(scorer.channels))
        out = Path(path).with_name(Path(path).stem + f".scores-{os.getpid()}.parquet")
        started, cpu = time.perf_counter(), time.process_time()
        result = score_file(path, scorer, spec, out, batch_rows=int(batch), progress=False,
                            contributions=contributions == "1",
                            read_threads=int(threads[0]) if threads else None)
        seconds = time.perf_counter() - started
        rows = result.rows
        out.unlink()
        Path(result.intervals_output).unlink(missing_ok=True)
    elif kind == "live":
        bundle, n = rest
        record = live(bundle, int(n))
        print(json.dumps({**record, "peak_rss_mb": high_water_mb(), "tree_rss_mb": 0.0}))
        return
    elif kind == "bundle":
        model, folder, device, *score = rest
        print(json.dumps({"path": str(make_bundle(model, Path(folder), device, *score))}))
        return
    elif kind == "many":
        folder, bundle, engine, workers, device = rest
        from tsssm.bundle import load_bundle
        from tsssm.data.io import ReadSpec
        from tsssm.scoring.many import expand_inputs, plan, run_tasks

        loaded = load_bundle(bundle)
        spec = ReadSpec(time_column="ts", channels=tuple(loaded.channels))
        out = Path(folder).with_name(Path(folder).name + f".scores-{os.getpid()}")
        sampler = TreeSampler()
        started, cpu = time.perf_counter(), time.process_time()
        files, root = expand_inputs(folder)
        results = run_tasks(plan(files, root, out, spec), loaded, engine=engine,
                            workers=int(workers), progress=False,
                            device=None if device == "cpu" else device)
        seconds = time.perf_counter() - started
        tree = sampler.stop()
        failed = [r.error for r in results if r.error]
        if failed:
            raise SystemExit(f"{len(failed)} files failed: {failed[0]}")
        rows = sum(r.rows for r in results)
        shutil.rmtree(out)
    else:
        raise SystemExit(f"unknown child {kind}")
    print(json.dumps({"rows": rows, "seconds": seconds, "cpu_s": time.process_time() - cpu,
                      "peak_rss_mb": high_water_mb(),
                      "tree_rss_mb": tree if kind == "many" else 0.0}))


def high_water_mb() -> float:
    """This process's peak resident set (VmHWM: of its own memory image, unlike ru_maxrss,
    which after exec still counts the image of the process that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TreeSampler:
    """The largest total resident set of this process and all its descendants (the workers),
    sampled every 0.2 s on a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        try:
            import psutil
        except ImportError:  # not installed (a bare GPU machine): no total
            self.peak = float("nan")
            self._thread = threading.Thread(target=lambda: None)
            self._thread.start()
            return
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # a worker that just ended
                        total += p.memory_info().rss
                self.peak = max(self.peak, total / 2**20)
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def live(bundle: str, n: int) -> dict:
    """One stream sample by sample through Scorer.update on one CPU core: samples/s and the
    latency of each update."""
    import numpy as np
    import torch

    from tsssm.bundle import load_bundle
    from tsssm.scoring.scorer import Scorer

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    torch.set_num_threads(1)
    scorer = Scorer(load_bundle(bundle))
    rng = np.random.default_rng(2)
    raw = (rng.standard_normal((n + 1000, CHANNELS)).cumsum(0) * 0.01
           + rng.standard_normal((n + 1000, CHANNELS))).astype(np.float32)
    for row in raw[:1000]:  # past the filter's start-up
        scorer.update(row)
    latency = np.empty(n)
    clock = time.perf_counter
    started, cpu = clock(), time.process_time()
    for i in range(n):
        t = clock()
        scorer.update(raw[1000 + i])
        latency[i] = clock() - t
    seconds = clock() - started
    return {"rows": n, "seconds": seconds, "cpu_s": time.process_time() - cpu,
            "p50_us": float(np.percentile(latency, 50) * 1e6),
            "p99_us": float(np.percentile(latency, 99) * 1e6),
            "max_us": float(latency.max() * 1e6)}


_CHILDREN: list[subprocess.Popen] = []


def _stop_on_sigterm() -> None:
    """A `timeout` around the benchmark ends the measurement in flight too, and the table of
    what was measured so far is still written."""
    import signal

    def stop(signum, frame):
        for proc in _CHILDREN:
            proc.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


#: seconds a measurement may take before it is stopped and left out of the table (--child-timeout)
CHILD_TIMEOUT: float | None = None


class ChildTimeoutError(Exception):
    pass


def run_child(argv: list[str]) -> dict:
    """One measurement in a fresh process: its JSON line (with its own peak RSS). Raises
    ChildTimeoutError when it runs past CHILD_TIMEOUT (it is killed)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _CHILDREN.append(proc)
    try:
        out, err = (x.decode(errors="replace") for x in proc.communicate(timeout=CHILD_TIMEOUT))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"child {argv[:2]} stopped after {CHILD_TIMEOUT:.0f} s (--child-timeout)",
              flush=True)
        raise ChildTimeoutError(argv[0]) from None
    finally:
        _CHILDREN.remove(proc)
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measured(label: dict, argvs: list[list[str]], records: list[dict]) -> None:
    """Run the children, add their summary to records and print its line (none when one
    times out or fails: its error is printed)."""
    try:
        runs = [run_child(a) for a in argvs]
    except ChildTimeoutError:
        return
    except SystemExit as failed:  # one measurement failing leaves the others standing
        print(f"{label['what']}: {failed}", flush=True)
        return
    records.append(summarise(label, runs))
    print(table(records[-1:]).splitlines()[-1], flush=True)


# ------------------------------------------------------------------------------ table
def summarise(label: dict, runs: list[dict]) -> dict:
    rates = [r["rows"] / r["seconds"] for r in runs]
    return {**label, "rows": runs[0]["rows"], "runs": len(runs),
            "rows_per_s": statistics.median(rates), "rows_per_s_min": min(rates),
            "rows_per_s_max": max(rates),
            "cpu_rows_per_s": statistics.median(r["rows"] / max(r["cpu_s"], 1e-9)
                                                for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "tree_rss_mb": max(r["tree_rss_mb"] for r in runs),
            **({k: statistics.median(r[k] for r in runs) for k in ("p50_us", "p99_us")}
               if "p99_us" in runs[0] else {}),
            **({"max_us": max(r["max_us"] for r in runs)} if "max_us" in runs[0] else {})}


def table(records: list[dict]) -> str:
    head = ("| device | what | rows | rows/s (median) | min..max | vs read | rows per CPU-s |"
            " peak RSS MB | with workers MB |")
    lines = [head, "|" + "---|" * 9]
    bound = {(r["device"], r["rows"]): r["rows_per_s"] for r in records if r["what"] == "read"}
    for r in records:
        ref = bound.get((r["device"], r["rows"]))
        vs = "" if r["what"] == "read" or ref is None else f"{r['rows_per_s'] / ref:.0%}"
        workers = f"{r['tree_rss_mb']:.0f}" if r["what"].startswith("fleet") else ""
        if "p99_us" in r:  # live: latency instead of the read comparison
            vs = f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us"
        lines.append(f"| {r['device']} | {r['what']} | {r['rows']:.0e} | "
                     f"{r['rows_per_s']:,.0f} | {r['rows_per_s_min']:,.0f}.."
                     f"{r['rows_per_s_max']:,.0f} | {vs} | {r['cpu_rows_per_s']:,.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {workers} |")
    return "\n".join(lines)


def parse_sizes(items: list[str] | None) -> dict[str, list[int]]:
    if not items:
        return DEFAULT_SIZES
    out = {}
    for item in items:
        model, _, sizes = item.partition("=")
        out[model] = [int(float(s)) for s in sizes.split(",") if s]
    return out


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model's device)")
    p.add_argument("--sizes", nargs="*", help="model=rows,rows ... (default: kalman=1e6,1e7,"
                   "1e8 mamba=1e5; Mamba's CPU scan is too slow for more here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scores", nargs="+", default=["one-step", "anomaly+contrib"],
                   help="scores of the long-stream runs: one-step, anomaly (the default anomaly "
                   "task's windowed Mahalanobis score), each optionally +contrib (with the "
                   "contrib:<channel> columns)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows per batch (default 100000 on the CPU, 1048576 on a GPU)")
    p.add_argument("--fleet", type=int, default=1000, help="streams in the fleet (0: none)")
    p.add_argument("--fleet-rows", type=int, default=10_000)
    p.add_argument("--fleet-models", nargs="+", default=["kalman"],
                   help="the models the fleet is scored with")
    p.add_argument("--workers", type=int, nargs="+", default=[2],
                   help="worker processes of the fleet runs (with --device cuda: GPUs), each")
    p.add_argument("--engines", nargs="*", default=["local", "dask"])
    p.add_argument("--live", type=int, default=200_000,
                   help="samples of the live (one core, sample by sample) run; 0: none")
    p.add_argument("--stages", nargs="*", default=None,
                   help="beside each long-stream run of these models (none named: all): the "
                   "same run with an identity model (the host bound) and the model with its "
                   "scores alone on the device (the device bound)")
    p.add_argument("--child-timeout", type=float, default=None,
                   help="seconds one measurement may take; past it, it is left out")
    p.add_argument("--gen-device", default="cpu",
                   help="where the input's random numbers are drawn (cuda: fast, for 10^8 rows)")
    p.add_argument("--read-threads", nargs="+", default=["auto"],
                   help="threads converting the read batches in the long-stream runs "
                   "(StreamReader's threads; auto: by the cores); several: one run each")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tsssm-scoring-bench"))
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = p.parse_args()
    _stop_on_sigterm()
    global CHILD_TIMEOUT
    CHILD_TIMEOUT = args.child_timeout
    sizes = parse_sizes(args.sizes)
    batch = args.batch_rows or (100_000 if args.device == "cpu" else 1 << 20)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    records = []
    started = time.perf_counter()
    try:
        for rows in sorted({n for ns in sizes.values() for n in ns}):
            began = time.perf_counter()
            path = generate(args.workdir / f"stream-{rows:.0e}.parquet", rows,
                            device=args.gen_device)
            print(f"generated {rows:.0e} rows in {time.perf_counter() - began:.1f} s "
                  f"({path.stat().st_size / 1e9:.2f} GB)", flush=True)
            runs = [run_child(["read", str(path)]) for _ in range(args.repeats)]
            records.append(summarise({"device": args.device, "what": "read"}, runs))
            print(table(records[-1:]).splitlines()[-1], flush=True)
            for model, ns in sizes.items():
                if rows not in ns:
                    continue
                for score in args.scores:
                    name, _, contrib = score.partition("+")
                    bundle = run_child(["bundle", model, str(args.workdir), args.device,
                                        name])["path"]
                    flag = "1" if contrib else "0"
                    staged = args.stages is not None and (not args.stages
                                                          or model in args.stages)
                    for threads in args.read_threads:
                        what = f"{model}, {score} score" + (
                            "" if args.read_threads == ["auto"] else f", {threads} read threads")
                        extra = [] if threads == "auto" else [threads]
                        measured({"device": args.device, "what": what},
                                 [["score", str(path), str(bundle), args.device, str(batch),
                                   flag, *extra]] * args.repeats, records)
                        if staged:  # the same run with the model taken out (the host's bound)
                            measured({"device": args.device, "what": f"{what}: host bound "
                                      "(identity model)"}, [["host", str(path), str(bundle),
                                                             args.device, str(batch), flag,
                                                             *extra]], records)
                    if not staged:
                        continue
                    # the model alone on the device (with the scores: the device's bound)
                    what = f"{model}, {score} score"
                    measured({"device": args.device, "what": f"{what}: device bound (model + "
                              "scores, no I/O)"}, [["model", str(bundle), args.device,
                                                    str(min(rows, 16 * batch)), str(batch),
                                                    "1"]], records)
        if args.fleet:
            folder = fleet(args.workdir / f"fleet-{args.fleet}", args.fleet, args.fleet_rows)
            for model in args.fleet_models:
                bundle = run_child(["bundle", model, str(args.workdir), args.device])["path"]
                for engine, workers in ((e, w) for e in args.engines for w in args.workers):
                    runs = [run_child(["many", str(folder), str(bundle), engine,
                                       str(workers), args.device])
                            for _ in range(args.repeats)]
                    where = f"{workers} GPU(s)" if args.device == "cuda" and engine == "local" \
                        else f"{engine} x{workers}"
                    what = f"fleet {args.fleet}x{args.fleet_rows:.0e} {model}, {where}"
                    records.append(summarise({"device": args.device, "what": what}, runs))
                    print(table(records[-1:]).splitlines()[-1], flush=True)
        if args.live and args.device == "cpu":
            for name in dict.fromkeys(s.partition("+")[0] for s in args.scores):
                bundle = run_child(["bundle", "kalman", str(args.workdir), "cpu",
                                    name])["path"]
                runs = [run_child(["live", str(bundle), str(args.live)])
                        for _ in range(args.repeats)]
                records.append(summarise({"device": "cpu (1 core)", "what": "live kalman, "
                                          f"{name} score, Scorer.update per sample"}, runs))
                print(table(records[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(args.workdir, ignore_errors=True)
        print()
        print(table(records))
        print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
              f"{time.perf_counter() - started:.0f} s, batch {batch} rows, repeats "
              f"{args.repeats}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.out.read_text()) if args.out.exists() else []
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        from records import commit

        args.out.write_text(json.dumps(previous + [
            {**r, "date": stamp, "batch_rows": batch, "machine": machine(),
             "commit": commit(), "command": " ".join(sys.argv)} for r in records], indent=1))


def machine() -> str:
    """CPU cores and memory, and the GPU where one is visible."""
    text = f"{os.cpu_count()} cores"
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        text += f", {kb / 2**20:.0f} GiB"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text


if __name__ == "__main__":
    main()
