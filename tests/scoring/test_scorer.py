"""The Scorer: a stream fed in chunks of any size, or sample by sample, gets the scores and flags
of the whole stream scored at once (the batch path: scale, predict_stream, threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from tsssm.data.scaling import StandardScaler
from tsssm.errors import DataError
from tsssm.scoring.scorer import Scorer, numpy_scores
from tsssm.tasks.evaluate import predict_stream

from .conftest import make_bundle, stream


def batch_scores(bundle, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What `tsssm score` computes for a whole stream in memory (tsssm.commands.score)."""
    scaler = bundle.scaler
    rows = bundle.data_config["train_rows"]
    if bundle.per_stream_scaling and len(raw) > rows:
        scaler = StandardScaler.fit([raw[:rows]], bundle.channels)
    pred = predict_stream(bundle.model, scaler.transform(raw), bundle.score_kind,
                          chunk_size=10**9)
    return pred.score, bundle.threshold.flags(pred.score)


def fed(scorer: Scorer, raw: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    scores, flags, start, expected_start = [], [], 0, 0
    for size in sizes:
        out = scorer.update_many(raw[start : start + size])
        start += size
        if len(out):
            assert out.start == expected_start  # rows come out in order, none skipped
            expected_start += len(out)
        scores.append(out.score)
        flags.append(out.flag)
    assert start == len(raw)
    rest = scorer.finish()
    scores.append(rest.score)
    flags.append(rest.flag)
    return np.concatenate(scores), np.concatenate(flags)


def assert_same(family, got, want, threshold):
    score, flag = got
    ref_score, ref_flag = want
    assert score.shape == ref_score.shape and score.dtype == np.float32
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(score, ref_score, rtol=tol, atol=tol)
    clear = np.abs(ref_score - threshold) > 10 * tol * max(1.0, threshold)  # not a rounding tie
    assert (flag[clear] == ref_flag[clear]).all()
    assert ref_flag.any() and not ref_flag.all()  # the threshold separates something


SPLITS = {
    "whole": [700],
    "ones-then-rest": [1, 1, 1, 697],
    "primes": [7, 13, 101, 3, 250, 326],
    "through-the-gap": [205, 10, 485],  # rows 200..230 hold no observation at all
}


@pytest.mark.parametrize("split", SPLITS)
def test_chunked_equals_whole(family, split):
    bundle = make_bundle(family)
    raw = stream(700, nan_frac=0.02, gap=(200, 230), seed=3)
    want = batch_scores(bundle, raw)
    got = fed(Scorer(bundle), raw, SPLITS[split])
    assert_same(family, got, want, bundle.threshold.value)


def test_nll_scores(family):
    bundle = make_bundle(family, score_kind="nll")
    raw = stream(400, nan_frac=0.05, seed=4)
    assert_same(family, fed(Scorer(bundle), raw, [33, 367]), batch_scores(bundle, raw),
                bundle.threshold.value)


@pytest.mark.parametrize("sizes", [[700], [20, 30, 1, 649], [51, 649], [49, 1, 1, 649]])
def test_per_stream_scaling_holds_the_first_rows(family, sizes):
    bundle = make_bundle(family, per_stream=True, train_rows=50)
    raw = stream(700, nan_frac=0.01, seed=5) + 7.0  # a level the training scaler never saw
    want = batch_scores(bundle, raw)
    scorer = Scorer(bundle)
    assert scorer.calibrating
    got = fed(scorer, raw, sizes)
    assert not scorer.calibrating
    assert_same(family, got, want, bundle.threshold.value)


def test_short_stream_with_per_stream_scaling_uses_the_training_scaler(family):
    bundle = make_bundle(family, per_stream=True, train_rows=50)
    raw = stream(50, seed=6)  # not more rows than train_rows: batch scoring falls back too
    scorer = Scorer(bundle)
    assert len(scorer.update_many(raw)) == 0
    out = scorer.finish()
    assert out.start == 0
    assert_same(family, (out.score, out.flag), batch_scores(bundle, raw), 1e9)


def test_live_samples_equal_batch(family):
    bundle = make_bundle(family)
    raw = stream(300, nan_frac=0.03, gap=(100, 104), seed=7)
    scorer = Scorer(bundle)
    results = [scorer.update(row) for row in raw]
    score = np.array([r[0] for r in results], np.float32)
    flag = np.array([r[1] for r in results])
    assert_same(family, (score, flag), batch_scores(bundle, raw), bundle.threshold.value)


def test_live_samples_by_channel_name_and_none():
    bundle = make_bundle("kalman")
    raw = stream(50, seed=8)
    a, b = Scorer(bundle), Scorer(bundle)
    for row in raw[:-1]:
        assert a.update(dict(zip(bundle.channels, row.tolist()))) == b.update(row)
    # a missing channel: left out of the dict, or None in a list
    assert a.update({"a": 1.0, "c": 2.0}) == b.update([1.0, None, 2.0])
    with pytest.raises(DataError, match="unknown channel 'z'"):
        a.update({"z": 1.0})
    with pytest.raises(DataError, match="needs 3 values"):
        a.update([1.0, 2.0])
    with pytest.raises(DataError, match="channel 'b' is infinite"):
        a.update([1.0, float("inf"), 2.0])


def test_live_per_stream_scaling_returns_held_rows_later():
    bundle = make_bundle("kalman", per_stream=True, train_rows=20)
    raw = stream(100, seed=9)
    scorer = Scorer(bundle)
    assert all(scorer.update(row) is None for row in raw[:20])
    first = scorer.update_many(raw[20:21])  # the row that completes the calibration
    assert first.start == 0 and len(first) == 21
    rest = [scorer.update(row) for row in raw[21:]]
    score = np.concatenate([first.score, np.array([r[0] for r in rest], np.float32)])
    np.testing.assert_allclose(score, batch_scores(bundle, raw)[0], rtol=1e-5, atol=1e-5)


def test_numpy_engine_equals_torch_engine():
    bundle = make_bundle("kalman")
    raw = stream(2000, nan_frac=0.01, gap=(500, 520), seed=10)
    fast, slow = Scorer(bundle), Scorer(bundle, engine="torch")
    assert fast.engine == "numpy" and slow.engine == "torch"
    a = fed(fast, raw, [333, 1667])
    b = fed(slow, raw, [1000, 1000])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_reset_starts_a_new_stream(family):
    bundle = make_bundle(family)
    raw = stream(120, seed=11)
    scorer = Scorer(bundle)
    first = scorer.update_many(raw).score
    scorer.reset()
    again = scorer.update_many(raw)
    assert again.start == 0
    np.testing.assert_array_equal(first, again.score)


def test_numpy_scores_match_torch_anomaly_scores():
    import torch

    from tsssm.anomaly.scores import anomaly_scores
    from tsssm.models.base import Gaussian

    rng = np.random.default_rng(0)
    y = rng.standard_normal((500, 4)).astype(np.float32)
    y[rng.random(y.shape) < 0.2] = np.nan
    y[10] = np.nan
    mean = rng.standard_normal((500, 4)).astype(np.float32)
    var = rng.uniform(1e-3, 3, (500, 4)).astype(np.float32)
    for kind in ("nis", "nll"):
        want = anomaly_scores(torch.from_numpy(y)[None], Gaussian(
            torch.from_numpy(mean)[None], torch.from_numpy(var)[None]), kind=kind)[0].numpy()
        got = numpy_scores(y, mean, var, kind)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert got[10] == 0.0


def test_rows_of_the_wrong_width_are_refused():
    scorer = Scorer(make_bundle("kalman"))
    with pytest.raises(DataError, match=r"rows must be \(n, 3\)"):
        scorer.update_many(np.zeros((4, 2)))
