"""Many streams: a folder or glob scored in parallel (worker processes; a local Dask cluster of
2 workers), one output per input equal to scoring that file alone; a bad file is reported by
name and the others are still written."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tsssm.data.io import ReadSpec
from tsssm.errors import ConfigError, DataError
from tsssm.scoring.files import score_file
from tsssm.scoring.many import expand_inputs, is_many, plan, run_tasks
from tsssm.scoring.scorer import Scorer

from .conftest import make_bundle, stream

SPEC = ReadSpec(time_column="ts", channels=("a", "b", "c"))


def fleet(root, n=4, rows=600):
    """n streams in root/site{i}/s.csv|parquet, one of them with a bad row."""
    paths = []
    for i in range(n):
        raw = stream(rows, seed=i)
        frame = pl.DataFrame({"ts": np.arange(rows), "a": raw[:, 0], "b": raw[:, 1],
                              "c": raw[:, 2]})
        folder = root / f"site{i}"
        folder.mkdir(parents=True)
        path = folder / ("s.parquet" if i % 2 else "s.csv")
        frame.write_parquet(path) if i % 2 else frame.write_csv(path)
        paths.append(path)
    bad = root / "site9" / "broken.csv"
    bad.parent.mkdir()
    bad.write_text("ts,a,b,c\n1,1,2,3\n2,1,oops,3\n")
    return paths, bad


def check(results, paths, bad, out, bundle, tmp_path):
    by_path = {r.path: r for r in results}
    failed = by_path[str(bad)]
    assert failed.output is None and "broken.csv" in failed.error and "row 2" in failed.error
    assert not (out / "site9").exists() or not list((out / "site9").iterdir())
    for path in paths:
        r = by_path[str(path)]
        assert r.error is None and r.rows == 600
        got = pl.read_parquet(r.output)
        assert got["stream"][0] == f"{path.parent.name}/s"
        alone = score_file(path, Scorer(bundle), SPEC, tmp_path / "alone.parquet",
                           progress=False)
        want = pl.read_parquet(alone.output)
        np.testing.assert_array_equal(got["score"].to_numpy(), want["score"].to_numpy())


def test_folder_in_worker_processes(tmp_path):
    paths, bad = fleet(tmp_path / "in")
    assert is_many(str(tmp_path / "in")) and not is_many(str(paths[0]))
    files, root = expand_inputs(str(tmp_path / "in"))
    assert files == sorted([*paths, bad])
    out = tmp_path / "out"
    tasks = plan(files, root, out, SPEC)
    assert tasks[0].output == str(out / "site0" / "s.parquet")
    bundle = make_bundle("kalman")
    results = run_tasks(tasks, bundle, workers=2, progress=False)
    check(results, paths, bad, out, bundle, tmp_path)


def test_glob_and_output_names(tmp_path):
    paths, bad = fleet(tmp_path / "in")
    files, root = expand_inputs(str(tmp_path / "in" / "site*" / "*.parquet"))
    assert files == [p for p in paths if p.suffix == ".parquet"]
    assert root == tmp_path / "in"
    with pytest.raises(DataError, match="no CSV or Parquet file"):
        expand_inputs(str(tmp_path / "in" / "*.nothing"))
    (tmp_path / "in" / "site0" / "s.parquet").write_bytes(b"")
    files, root = expand_inputs(str(tmp_path / "in" / "site0"))
    with pytest.raises(ConfigError, match="would both write"):
        plan(files, root, tmp_path / "out", SPEC)


def test_local_dask_cluster_of_two_workers(tmp_path):
    pytest.importorskip("distributed")
    paths, bad = fleet(tmp_path / "in", n=3)
    files, root = expand_inputs(str(tmp_path / "in"))
    out = tmp_path / "out"
    bundle = make_bundle("mamba")
    results = run_tasks(plan(files, root, out, SPEC), bundle, engine="dask", workers=2,
                        progress=False)
    check(results, paths, bad, out, bundle, tmp_path)
