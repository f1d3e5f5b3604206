"""The threads of file scoring (tsssm.scoring.pipeline): order kept, errors raised in the caller
unchanged, threads ended on every path; score_file's output is the same with them or without."""

from __future__ import annotations

import threading

import polars as pl
import pytest

from tsssm.errors import DataError
from tsssm.scoring.files import score_file
from tsssm.scoring.pipeline import OrderedWorker, ordered_map, prefetch
from tsssm.scoring.scorer import Scorer

from .conftest import ANOMALY, make_bundle
from .test_files import SPEC, write_stream


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def items():
        yield 1
        yield 2
        raise DataError("row 3 is bad")

    got = []
    with pytest.raises(DataError, match="row 3 is bad"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    before = threading.active_count()
    it = prefetch(iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_ordered_map_keeps_order_and_raises_the_first_error_in_turn(workers):
    import random
    import time

    def slow_square(i: int) -> int:
        time.sleep(random.random() * 1e-3)  # later items often finish first
        return i * i

    assert list(ordered_map(slow_square, iter(range(200)), workers)) == [i * i for i in
                                                                          range(200)]

    def fails_at_3_and_5(i: int) -> int:
        if i in (3, 5):
            time.sleep(0.01 if i == 3 else 0.0)  # 5 fails first in time, 3 first in order
            raise DataError(f"row {i} is bad")
        return i

    got = []
    with pytest.raises(DataError, match="row 3 is bad"):
        for item in ordered_map(fails_at_3_and_5, iter(range(10)), workers):
            got.append(item)
    assert got == [0, 1, 2]


def test_ordered_map_takes_a_bounded_number_ahead_and_stops_with_the_consumer():
    taken = []

    def items():
        for i in range(10**9):
            taken.append(i)
            yield i

    before = threading.active_count()
    it = ordered_map(lambda i: i, items(), workers=3)
    assert next(it) == 0
    assert len(taken) <= 3 + 1 + 1  # the workers' items, the one yielded, and the next
    it.close()
    assert threading.active_count() == before


def test_ordered_worker_runs_in_order_and_raises_the_first_error():
    done = []
    worker = OrderedWorker(depth=2)
    for i in range(50):
        worker.submit(done.append, i)
    worker.join()
    assert done == list(range(50))

    def fail(i):
        if i == 3:
            raise DataError(f"cannot write row {i}")
        done.append(i)

    done.clear()
    worker = OrderedWorker(depth=1)
    with pytest.raises(DataError, match="cannot write row 3"):
        for i in range(20):
            worker.submit(fail, i)
        worker.join()
    assert done == [0, 1, 2]  # nothing after the failing call
    worker.cancel()
    cancelled = OrderedWorker()
    cancelled.submit(done.append, 99)
    cancelled.cancel()


@pytest.mark.parametrize("family", ["kalman", "mamba"])
def test_pipelined_score_file_writes_what_one_thread_writes(tmp_path, family):
    bundle = make_bundle(family, score=ANOMALY, per_stream=True, train_rows=400)
    path = write_stream(tmp_path)
    outs = []
    for pipelined in (True, False):
        out = tmp_path / f"out-{pipelined}" / "scores.parquet"
        result = score_file(path, Scorer(bundle), SPEC, out, batch_rows=97, progress=False,
                            pipelined=pipelined)
        assert result.rows == 3000
        outs.append((pl.read_parquet(out), pl.read_parquet(result.intervals_output)))
    assert outs[0][0].equals(outs[1][0]) and outs[0][1].equals(outs[1][1])


def test_pipelined_score_file_fails_on_a_bad_row_and_leaves_nothing(tmp_path):
    path = write_stream(tmp_path, suffix=".csv")
    lines = path.read_text().splitlines()
    lines[2500] = lines[2500].replace(lines[2500].split(",")[1], "abc", 1)
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "scores.parquet"
    before = threading.active_count()
    with pytest.raises(DataError, match="2501|2500"):
        score_file(path, Scorer(make_bundle("kalman")), SPEC, out, batch_rows=97,
                   progress=False)
    assert not out.exists() and not list(out.parent.glob(".*tmp"))
    assert threading.active_count() == before
