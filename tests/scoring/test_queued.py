"""Scorer.submit: the queued device path (a GPU's: rows copied in, scaled, scored and copied back
without waiting; results collected later, in order) gives what update_many's synchronous path
gives, row for row, and a bad row fails from it with the synchronous path's message. Run here on
the CPU by letting the scorer queue there (``defers``); the GPU run is the gpu-marked test."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from tsssm.anomaly.scores import ScoreSpec
from tsssm.data.io import ReadSpec
from tsssm.errors import DataError, NumericalError
from tsssm.scoring.files import score_file
from tsssm.scoring.scorer import Scorer

from .conftest import ANOMALY, make_bundle, stream

SPECS = {"one-step": ScoreSpec("nis"), "anomaly": ANOMALY}


@pytest.fixture
def queued(monkeypatch):
    """Scorers of torch models queue on the CPU as they do on a GPU."""
    monkeypatch.setattr(Scorer, "defers", property(lambda self: self._kalman is None))


def raw_stream() -> np.ndarray:
    raw = stream(900, nan_frac=0.02, gap=(300, 330), seed=4)
    raw[500:540, 2] += 12.0  # a fault in one sensor
    return raw


def cut(raw: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == len(raw)
    return [raw[a:b] for a, b in zip(edges[:-1], edges[1:])]


def scored(parts) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    contrib = None if parts[0].contrib is None else np.concatenate([p.contrib for p in parts])
    return (np.concatenate([p.score for p in parts]), np.concatenate([p.flag for p in parts]),
            contrib)


@pytest.mark.parametrize("score", SPECS)
@pytest.mark.parametrize("contributions", [False, True])
@pytest.mark.parametrize("family", ["mamba", "var_kalman"])
def test_queued_ahead_equals_synchronous(queued, monkeypatch, score, contributions, family):
    import tsssm.scoring.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "GPU_ROWS_PER_CALL", 64)  # several model calls a batch
    bundle = make_bundle(family, score=SPECS[score])
    raw = raw_stream()
    pieces = cut(raw, [1, 130, 7, 262, 500])
    want = Scorer(bundle, contributions=contributions, device_window=True)
    assert want.defers
    # the reference: each batch scored before the next is given
    monkeypatch.setattr(Scorer, "defers", property(lambda self: False))
    ref = [want.update_many(p) for p in pieces] + [want.finish()]
    monkeypatch.setattr(Scorer, "defers", property(lambda self: self._kalman is None))
    got_scorer = Scorer(bundle, contributions=contributions, device_window=True)
    pending = []
    for piece in pieces:  # every batch queued before any is collected
        buffer = piece.copy()
        pending.append(got_scorer.submit(buffer))
        buffer[:] = np.nan  # the caller may reuse its buffer at once
    assert not any(p.done for p in pending[:-1])
    got = [pending[2].result()]  # out of order: the earlier ones are collected first
    assert all(p.done for p in pending[:3])
    got = [pending[0].result(), pending[1].result(), *got, pending[3].result(),
           pending[4].result(), got_scorer.finish()]
    starts = [p.start for p in got]
    assert starts == [p.start for p in ref]
    for a, b in zip(scored(got), scored(ref)):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)
    assert scored(ref)[1].any()


def test_update_many_and_finish_collect_what_was_queued(queued):
    bundle = make_bundle("mamba", score=ANOMALY)
    raw = raw_stream()
    scorer = Scorer(bundle, contributions=True, device_window=True)
    first = scorer.submit(raw[:400])
    assert not first.done
    second = scorer.update_many(raw[400:])  # collects the queued batch, then its own
    assert first.done and second.start == 400
    scorer.reset()
    stale = scorer.submit(raw[:10])
    scorer.reset()  # a new stream drops what was queued for the last one
    with pytest.raises(Exception, match="earlier stream"):
        stale.result()


@pytest.mark.parametrize("what", ["inf", "overflow"])
def test_a_bad_row_in_a_queued_batch_fails_with_its_row(queued, what):
    bundle = make_bundle("mamba", score=ANOMALY)
    raw = raw_stream()
    if what == "inf":
        raw[612, 1] = -np.inf
    else:
        bundle.scaler.std[1] = np.float32(0.01)
        raw[612, 1] = 3e38  # overflows float32 once scaled
    sync = Scorer(bundle, device_window=True)
    with pytest.raises(DataError) as want:
        sync.update_many(raw[:600])
        sync.update_many(raw[600:])
    scorer = Scorer(bundle, device_window=True)
    first = scorer.submit(raw[:600])
    second = scorer.submit(raw[600:])  # queued: nothing is checked yet
    first.result()
    with pytest.raises(DataError) as got:
        second.result()
    assert str(got.value) == str(want.value) and "row 613" in str(got.value)


def test_a_model_that_goes_non_finite_fails_in_a_queued_batch(queued):
    bundle = make_bundle("mamba", score=SPECS["one-step"])
    with torch.no_grad():
        for weight in bundle.model.step_head.parameters():  # every forecast NaN
            weight.fill_(float("nan"))
    scorer = Scorer(bundle)
    pending = scorer.submit(raw_stream())
    with pytest.raises(NumericalError, match="not finite"):
        pending.result()


@pytest.mark.parametrize("score", SPECS)
def test_score_file_queued_equals_synchronous(tmp_path, monkeypatch, score):
    bundle = make_bundle("mamba", score=SPECS[score])
    raw = raw_stream()
    path = tmp_path / "s.parquet"
    pl.DataFrame({"ts": np.arange(len(raw)) * 10, "a": raw[:, 0], "b": raw[:, 1],
                  "c": raw[:, 2]}).write_parquet(path)
    spec = ReadSpec(time_column="ts", channels=("a", "b", "c"))
    outputs = []
    for defers in (False, True):
        monkeypatch.setattr(Scorer, "defers", property(lambda self, d=defers: d))
        out = tmp_path / f"scores-{defers}.parquet"
        score_file(path, Scorer(bundle, device_window=True), spec, out, batch_rows=128,
                   progress=False)
        outputs.append(pl.read_parquet(out))
    assert outputs[0].equals(outputs[1]) and len(outputs[0]) == len(raw)


@pytest.mark.gpu
@pytest.mark.parametrize("score", SPECS)
def test_score_file_on_the_gpu_queued_equals_the_cpu(tmp_path, score):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bundle = make_bundle("mamba", score=SPECS[score])
    raw = stream(5000, nan_frac=0.02, gap=(3000, 3040), seed=6)
    raw[2500:2600, 0] += 12.0
    raw[4321, 1] = np.inf
    scorer = Scorer(bundle, device="cuda")
    first, second = scorer.submit(raw[:4000]), scorer.submit(raw[4000:])
    first.result()
    with pytest.raises(DataError, match="row 4322, channel 'b' is infinite"):
        second.result()  # (a file's reader finds it first, with the file's own message)
    raw[4321, 1] = 0.0
    path = tmp_path / "s.parquet"
    spec = ReadSpec(time_column="ts", channels=("a", "b", "c"))
    pl.DataFrame({"ts": np.arange(len(raw)) * 10, "a": raw[:, 0], "b": raw[:, 1],
                  "c": raw[:, 2]}).write_parquet(path)
    frames = []
    for device in ("cpu", "cuda"):
        scorer = Scorer(make_bundle("mamba", score=SPECS[score]), device=device)
        assert scorer.defers == (device == "cuda")
        out = tmp_path / f"{device}.parquet"
        score_file(path, scorer, spec, out, batch_rows=512, progress=False)
        frames.append(pl.read_parquet(out))
    cpu, gpu = frames
    np.testing.assert_allclose(gpu["score"].to_numpy(), cpu["score"].to_numpy(), rtol=1e-3,
                               atol=1e-3)
    assert (gpu["flag"] == cpu["flag"]).mean() > 0.999
