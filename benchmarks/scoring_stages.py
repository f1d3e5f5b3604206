"""Where the host's time goes in file-to-file scoring: the stages of `tsssm score`'s streaming path
timed cumulatively on one Parquet file, with no model (the scores are a stand-in computed from the
rows), so what is left is the host's bound.

    python benchmarks/scoring_stages.py FILE.parquet [--batch-rows 1048576] [--stages ...]

Stages: ``raw`` (pyarrow's batches, nothing else), ``reader`` (tsssm.scoring.reader.StreamReader:
+ polars frames, validation, order checks), ``scale`` (+ the scaler's transform and its overflow
check), ``sink`` (+ the scores sink in the same thread: the scores Parquet's columns, the flagged
intervals, the writer thread), ``sink+contrib`` (+ the 8 contrib:<channel> columns), and
``piped`` / ``piped+contrib`` (the same with the reading and the sink on their own threads, as
score_file runs them: tsssm.scoring.pipeline). Prints wall and CPU seconds (all threads) and
rows/s for each; the file's channels are every float column but the time column ``ts``. The
FILE is e.g. one that benchmarks/scoring.py generated (--keep-data).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tsssm.data.io import ReadSpec
from tsssm.scoring.files import ScoresSink
from tsssm.scoring.pipeline import OrderedWorker, prefetch
from tsssm.scoring.reader import StreamReader
from tsssm.scoring.stream_scores import ScoredRows

STAGES = ("raw", "reader", "scale", "sink", "sink+contrib", "piped", "piped+contrib")


def stand_in(values: np.ndarray) -> np.ndarray:
    """A score per row (n,) float32 from the rows themselves (the first batch's 0.99 quantile
    flags ~1% of the rows)."""
    return np.abs(values[:, 0] - values[:, 0].mean()).astype(np.float32)


def run(stage: str, path: Path, spec: ReadSpec, batch: int, out: Path,
        threads: int | None = None) -> int:
    if stage == "raw":
        return sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(batch_size=batch))
    reader = StreamReader(path, spec, batch_rows=batch, threads=threads)
    if stage == "reader":
        return sum(len(b.time) for b in reader)
    if stage == "scale":
        n = 0
        for b in reader:
            y = (b.values - b.values[:1]) / np.float32(1.0)
            np.isinf(y).any()
            n += len(b.time)
        return n
    contrib = stage.endswith("+contrib")
    sink = ScoresSink("s", out, list(spec.channels))
    piped = stage.startswith("piped")
    worker = OrderedWorker() if piped else None
    n = 0
    level = None
    for b in (prefetch(iter(reader)) if piped else reader):
        score = stand_in(b.values)
        level = np.quantile(score, 0.99) if level is None else level
        rows = ScoredRows(n, score, score > level,
                          contrib=np.abs(b.values) if contrib else None)
        if worker is None:
            sink.add(b)
            sink.write(rows)
        else:
            worker.submit(sink.add, b)
            worker.submit(sink.write, rows)
        n += len(b.time)
    if worker is not None:
        worker.join()
    sink.close()
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--batch-rows", type=int, default=1 << 20)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--threads", type=int, default=None,
                   help="StreamReader threads converting batches (default: by the cores)")
    args = p.parse_args()
    schema = pq.ParquetFile(args.path).schema_arrow
    channels = tuple(f.name for f in schema if f.name != "ts")
    spec = ReadSpec(time_column="ts", channels=channels)
    print(f"{args.path} ({pq.ParquetFile(args.path).metadata.num_rows:.0e} rows, "
          f"{len(channels)} channels), batches of {args.batch_rows} rows")
    print("| stage | rows | wall s | CPU s | rows/s | rows per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            started, cpu = time.perf_counter(), time.process_time()
            n = run(stage, args.path, spec, args.batch_rows, Path(tmp) / "scores.parquet",
                    args.threads)
            wall, used = time.perf_counter() - started, time.process_time() - cpu
            print(f"| {stage} | {n:.0e} | {wall:.2f} | {used:.2f} | {n / wall:,.0f} | "
                  f"{n / used:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
