"""Score many streams at once: one output per input, in parallel, a failing file reported by name
without losing the others.

Engines (``score.engine``):

- ``local`` (default): worker processes on this machine (``score.workers``, default one per core),
  each with its own single-threaded model; the bundle is sent to every worker once. With
  ``score.device=cuda`` the files are instead stacked into batched calls on the GPU
  (tsssm.scoring.batched), sharded over the visible GPUs (``score.workers`` of them; 0: all),
  one process per GPU (:func:`run_sharded`).
- ``dask``: the tasks of a Dask cluster (``pip install "tsssm[cluster]"``): a scheduler at
  ``score.address`` (``tcp://host:8786``), or a ``distributed.LocalCluster`` of ``score.workers``
  processes started for the command. Inputs and outputs must be on a filesystem every worker sees.

Every task is :func:`score_task`: one file through :func:`tsssm.scoring.files.score_file`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tsssm.bundle import Bundle
from tsssm.data.io import ReadSpec
from tsssm.errors import ConfigError, DataError, TsssmError
from tsssm.scoring.files import FileResult, score_file

log = logging.getLogger("tsssm")

SUFFIXES = (".csv", ".parquet", ".pq", ".tsv", ".txt")
ENGINES = ("local", "dask")


@dataclass(frozen=True)
class FileTask:
    """One input file and where its scores go."""

    path: str
    output: str
    name: str
    spec: ReadSpec
    gaps: str = "keep"
    gap_factor: float = 3.0
    fill: str = "none"
    batch_rows: int = 65_536
    contributions: bool = True  # write the contrib:<channel> columns


def is_many(pattern: str) -> bool:
    """A folder or a glob pattern (rather than one file)."""
    return Path(pattern).expanduser().is_dir() or glob.has_magic(pattern)


def expand_inputs(pattern: str) -> tuple[list[Path], Path]:
    """The data files a folder (every CSV/Parquet file in it, recursively) or a glob pattern
    (``**`` recursive) names, sorted, and the folder their outputs are named relative to."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not p.name.startswith("."))
        root = path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                       if Path(p).is_file())
        # outputs are named relative to the pattern's folder before its first wildcard
        first = next(i for i, part in enumerate(path.parts) if glob.has_magic(part))
        root = Path(*path.parts[:first]) if first else Path(".")
    if not files:
        raise DataError(f"data.path={pattern}: no CSV or Parquet file there")
    return files, root


def plan(files: list[Path], root: Path, out_dir: Path, spec: ReadSpec, **read: object
         ) -> list[FileTask]:
    """One task per file; its output mirrors the file's place under ``root`` in ``out_dir``."""
    tasks, seen = [], {}
    for f in files:
        try:
            rel = f.resolve().relative_to(root.resolve())
        except ValueError:
            rel = Path(f.name)
        out = out_dir / rel.with_suffix(".parquet")
        if out in seen:
            raise ConfigError(f"{seen[out]} and {f} would both write {out}; rename one of them")
        seen[out] = f
        name = str(rel.with_suffix(""))
        tasks.append(FileTask(str(f), str(out), name, spec, **read))  # type: ignore[arg-type]
    return tasks


def score_task(task: FileTask, bundle: Bundle, progress: bool = False,
               device: str | None = None) -> FileResult:
    """Score one file; a bad file becomes a FileResult with ``error`` (its one-line message)."""
    from tsssm.scoring.scorer import Scorer

    try:
        scorer = Scorer(bundle, device=device)
        return score_file(task.path, scorer, task.spec, task.output, name=task.name,
                          gaps=task.gaps, gap_factor=task.gap_factor, fill=task.fill,
                          batch_rows=task.batch_rows, progress=progress,
                          contributions=task.contributions)
    except TsssmError as err:
        return FileResult(task.path, None, task.name, error=str(err))
    except Exception as err:  # a bug, or a library's error on this file: keep the others going
        first = str(err).splitlines()[0] if str(err) else ""
        return FileResult(task.path, None, task.name,
                          error=f"internal error: {type(err).__name__}: {first}")


# ---------------------------------------------------------------------------------- local
_WORKER: dict[str, Bundle] = {}  # the bundle of this worker process (set by _init_worker)


def _init_worker(bundle: Bundle, device: str | None) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    _WORKER["bundle"] = bundle
    _WORKER["device"] = device


def _run_in_worker(task: FileTask) -> FileResult:
    return score_task(task, _WORKER["bundle"], device=_WORKER["device"])


def run_local(tasks: list[FileTask], bundle: Bundle, workers: int = 0,
              on_done: Callable[[FileResult], None] | None = None,
              device: str | None = None) -> list[FileResult]:
    """Score ``tasks`` in worker processes (``workers``: 0 = one per core); results in order."""
    workers = min(len(tasks), workers or os.cpu_count() or 1)
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = []
            for task in tasks:
                results.append(score_task(task, bundle, device=device))
                if on_done is not None:
                    on_done(results[-1])
            return results
        finally:
            torch.set_num_threads(threads)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: torch and polars hold threads that a forked child would inherit dead
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(bundle, device)) as pool:
        futures = {pool.submit(_run_in_worker, t): i for i, t in enumerate(tasks)}
        results: list[FileResult | None] = [None] * len(tasks)
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as err:  # the worker died (out of memory, a signal)
                results[i] = FileResult(tasks[i].path, None, tasks[i].name,
                                        error=f"the worker process failed: {err}")
            if on_done is not None:
                on_done(results[i])
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- GPUs
def gpu_devices(device: str, workers: int = 0) -> list[str]:
    """The devices ``score.device=cuda`` shards files over: ``cuda:0 .. cuda:N-1`` for the
    first ``workers`` visible GPUs (0: all of them); a numbered device (``cuda:1``) alone."""
    import torch

    if ":" in device:
        return [device]
    visible = torch.cuda.device_count()
    if visible == 0:
        raise ConfigError("score.device=cuda, but no CUDA device is visible; leave score.device "
                          "unset to score on the CPU")
    if workers > visible:
        raise ConfigError(f"score.workers={workers} GPUs asked for, {visible} visible")
    return [f"cuda:{i}" for i in range(workers or visible)]


def _run_shard(tasks: list[FileTask], bundle: Bundle, device: str) -> list[FileResult]:
    from tsssm.scoring.batched import run_batched

    return run_batched(tasks, bundle, device)


def run_sharded(tasks: list[FileTask], bundle: Bundle, devices: list[str],
                on_done: Callable[[FileResult], None] | None = None) -> list[FileResult]:
    """Score ``tasks`` stacked into batched model calls (tsssm.scoring.batched), sharded over
    ``devices``: one process per device, each with a contiguous share of the files (files of
    similar length stay together). One device: in this process. Results in order."""
    from tsssm.scoring.batched import run_batched

    if len(devices) <= 1 or len(tasks) <= 1:
        return run_batched(tasks, bundle, devices[0] if devices else None, on_done=on_done)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    n = min(len(devices), len(tasks))
    bounds = [len(tasks) * k // n for k in range(n + 1)]
    shards = [(bounds[k], bounds[k + 1]) for k in range(n)]
    results: list[FileResult | None] = [None] * len(tasks)
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_shard, tasks[a:b], bundle, devices[k]): (a, b, devices[k])
                   for k, (a, b) in enumerate(shards)}
        for future in as_completed(futures):
            a, b, device = futures[future]
            try:
                shard = future.result()
            except Exception as err:  # the process died (out of memory, a signal)
                shard = [FileResult(t.path, None, t.name,
                                    error=f"the process scoring on {device} failed: {err}")
                         for t in tasks[a:b]]
            for i, result in enumerate(shard):
                results[a + i] = result
                if on_done is not None:
                    on_done(result)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- dask
def run_dask(tasks: list[FileTask], bundle: Bundle, address: str | None = None,
             workers: int = 0, on_done: Callable[[FileResult], None] | None = None,
             device: str | None = None) -> list[FileResult]:
    """Score ``tasks`` on a Dask cluster: the scheduler at ``address``, or a LocalCluster of
    ``workers`` processes (0 = one per core) for the duration of the call."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise ConfigError('score.engine=dask needs Dask: pip install "tsssm[cluster]"') from err
    cluster = None
    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as err:
            raise ConfigError(f"score.address={address}: no Dask scheduler answers there "
                              f"({err})") from err
    else:
        n = min(len(tasks), workers or os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        shared = client.scatter(bundle, broadcast=True)  # each worker deserialises it once
        futures = client.map(score_task, tasks, bundle=shared, device=device, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[FileResult | None] = [None] * len(tasks)
        for future in as_completed(futures):
            i = index[future.key]
            try:
                results[i] = future.result()
            except Exception as err:  # a worker lost mid-task
                results[i] = FileResult(tasks[i].path, None, tasks[i].name,
                                        error=f"the Dask task failed: {err}")
            if on_done is not None:
                on_done(results[i])
        return results  # type: ignore[return-value]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_tasks(tasks: list[FileTask], bundle: Bundle, engine: str = "local", workers: int = 0,
              address: str | None = None, progress: bool = True,
              device: str | None = None) -> list[FileResult]:
    """Score every task with the chosen engine; a progress bar over the files."""
    if engine not in ENGINES:
        raise ConfigError(f"score.engine={engine!r}: choose one of {', '.join(ENGINES)}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="scoring files", unit="file", disable=not progress,
               dynamic_ncols=True, leave=False)

    def done(result: FileResult) -> None:
        bar.update(1)
        if result.error:
            bar.write(f"failed: {result.error}")

    try:
        if engine == "dask":
            return run_dask(tasks, bundle, address, workers, done, device)
        if device is not None and str(device).startswith("cuda"):
            # files stacked into batched model calls, one process per GPU
            return run_sharded(tasks, bundle, gpu_devices(str(device), workers), done)
        return run_local(tasks, bundle, workers, done, device)
    finally:
        bar.close()
