"""Windowed, joint (Mahalanobis) scores, contributions and per-stream or streaming thresholds
stream: a stream fed to the Scorer in pieces of any size - pieces that split the 30-row windows
and the rows with no observation - gets the scores, flags and ``contrib:<channel>`` shares of the
whole stream scored at once (tsssm score's in-memory path: predict_stream, then the threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.thresholds import SPOTThreshold
from tsssm.commands.score import stream_threshold
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ModelError
from tsssm.scoring.scorer import Scorer
from tsssm.tasks.evaluate import predict_stream

from .conftest import ANOMALY, make_bundle, stream

#: the default anomaly task on both families: Kalman (numpy engine), VAR Kalman (joint
#: covariance, torch), Mamba (torch)
FAMILIES = ["kalman", "var_kalman", "mamba"]

SPLITS = {
    "whole": [700],
    "ones-then-rest": [1, 1, 1, 697],
    "inside-windows": [7, 13, 29, 31, 3, 250, 367],  # boundaries inside 30-row windows
    "through-the-gap": [205, 10, 485],  # rows 200..230 hold no observation at all
}


def whole(bundle, raw: np.ndarray):
    """What `tsssm score` computes for a file read whole: scores, flags, contributions."""
    scaler = bundle.scaler
    rows = bundle.data_config["train_rows"]
    if bundle.per_stream_scaling and len(raw) > rows:
        scaler = StandardScaler.fit([raw[:rows]], bundle.channels)
    spec = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
    pred = predict_stream(bundle.model, scaler.transform(raw), spec, chunk_size=10**9)
    threshold = stream_threshold(bundle, pred.score, rows, "s")
    return pred.score, threshold.flags(pred.score), pred.contrib


def fed(scorer: Scorer, raw: np.ndarray, sizes: list[int]):
    parts, start, expected = [], 0, 0
    for size in sizes:
        out = scorer.update_many(raw[start : start + size])
        start += size
        assert out.start == expected  # rows come out in order, none skipped
        expected += len(out)
        parts.append(out)
    rest = scorer.finish()
    assert rest.start == expected
    parts.append(rest)
    assert start == len(raw)
    return (np.concatenate([p.score for p in parts]), np.concatenate([p.flag for p in parts]),
            np.concatenate([p.contrib for p in parts]))


def assert_same(family, got, want, level=None):
    score, flag, contrib = got
    ref_score, ref_flag, ref_contrib = want
    assert score.shape == ref_score.shape and contrib.shape == ref_contrib.shape
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(score, ref_score, rtol=tol, atol=tol)
    np.testing.assert_allclose(contrib, ref_contrib, rtol=tol, atol=tol)
    np.testing.assert_allclose(contrib.sum(-1), score, rtol=1e-5, atol=1e-5)
    level = np.full(len(score), np.nan) if level is None else level
    clear = ~np.isclose(ref_score, level, rtol=1e-3, atol=1e-3)  # not a rounding tie
    assert (flag[clear] == ref_flag[clear]).all()
    assert ref_flag.any() and not ref_flag.all()  # the threshold separates something


def raw_stream(seed: int = 3) -> np.ndarray:
    raw = stream(700, nan_frac=0.02, gap=(200, 230), seed=seed)
    raw[400:440, 1] += 12.0  # a level shift of one sensor: flagged, and attributed to it
    return raw


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", SPLITS)
def test_default_anomaly_score_chunked_equals_whole(family, split):
    bundle = make_bundle(family, score=ANOMALY)
    raw = raw_stream()
    want = whole(bundle, raw)
    got = fed(Scorer(bundle, contributions=True), raw, SPLITS[split])
    assert_same(family, got, want, np.full(len(raw), bundle.threshold.value))
    # chunked == one call of the same scorer, to rounding
    one = fed(Scorer(bundle, contributions=True), raw, [700])
    np.testing.assert_allclose(got[0], one[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], one[2], rtol=1e-6, atol=1e-6)
    # the shifted sensor carries the flagged rows' score
    flagged = got[1][400:440]
    assert flagged.any()
    assert (got[2][400:440][flagged].argmax(-1) == 1).mean() > 0.8


def test_joint_score_uses_the_full_covariance():
    bundle = make_bundle("var_kalman", score=ScoreSpec("mahalanobis"))
    raw = raw_stream()
    joint = fed(Scorer(bundle, contributions=True), raw, [123, 577])
    nis = whole(make_bundle("var_kalman", score=ScoreSpec("nis")), raw)
    assert not np.allclose(joint[0], nis[0], rtol=1e-3)  # a different score...
    assert_same("var_kalman", joint, whole(bundle, raw))  # ...equal to the whole path's


@pytest.mark.parametrize("family", ["kalman", "mamba"])
@pytest.mark.parametrize("spec", [ScoreSpec("nis", 9, "mean", "centered"),
                                  ScoreSpec("nll", 1), ScoreSpec("mahalanobis", 30, "shift",
                                                                 "centered")])
def test_other_windows_chunked_equal_whole(family, spec):
    bundle = make_bundle(family, score=spec)
    raw = raw_stream(4)
    got = fed(Scorer(bundle, contributions=True), raw, SPLITS["inside-windows"])
    assert_same(family, got, whole(bundle, raw), np.full(len(raw), bundle.threshold.value))


def test_centered_window_scores_come_out_late_and_update_refuses_it():
    bundle = make_bundle("kalman", score=ScoreSpec("nis", 9, "mean", "centered"))
    scorer = Scorer(bundle)
    out = scorer.update_many(raw_stream()[:10])
    assert out.start == 0 and len(out) == 6  # row t waits for row t + 4
    assert scorer.calibrating
    with pytest.raises(ModelError, match="centered 9-row windows"):
        scorer.update(raw_stream()[10])


@pytest.mark.parametrize("family", ["kalman", "mamba"])
@pytest.mark.parametrize("sizes", [[700], [20, 30, 1, 649], [101, 599], [99, 1, 1, 599]])
def test_per_stream_threshold_is_refitted_on_the_first_rows(family, sizes):
    bundle = make_bundle(family, score=ANOMALY, scope="per_stream", train_rows=100,
                         per_stream=True)
    raw = raw_stream() + 5.0
    want = whole(bundle, raw)
    scorer = Scorer(bundle, contributions=True)
    got = fed(scorer, raw, sizes)
    level = stream_threshold(bundle, want[0], 100, "s").value
    assert level != bundle.threshold.value
    assert f"{level:.3g}" in scorer.threshold_note and "refitted" in scorer.threshold_note
    assert_same(family, got, want, np.full(len(raw), level))


def test_short_stream_with_a_per_stream_threshold_uses_the_pooled_one(caplog):
    bundle = make_bundle("kalman", score=ANOMALY, scope="per_stream", train_rows=100)
    raw = raw_stream()[:100]
    scorer = Scorer(bundle, contributions=True)
    assert len(scorer.update_many(raw)) == 0
    out = scorer.finish()
    assert len(out) == 100 and "pooled training threshold" in caplog.text
    np.testing.assert_array_equal(out.flag, out.score > bundle.threshold.value)


@pytest.mark.parametrize("family", ["kalman", "mamba"])
def test_spot_threshold_carries_its_recursion(family):
    bundle = make_bundle(family, score=ANOMALY, threshold=SPOTThreshold(q=0.01, level=0.9))
    raw = raw_stream()
    score, flags, _ = whole(bundle, raw)
    levels = bundle.threshold.levels(score)
    assert np.ptp(levels) > 0  # the level moves along the stream
    got = fed(Scorer(bundle, contributions=True), raw, SPLITS["inside-windows"])
    assert_same(family, got, (score, flags, whole(bundle, raw)[2]), levels)


@pytest.mark.parametrize("family", ["kalman", "mamba"])
def test_live_samples_equal_batch(family):
    bundle = make_bundle(family, score=ANOMALY)
    raw = raw_stream()[:300]
    scorer = Scorer(bundle)
    results = [scorer.update(row) for row in raw]
    score = np.array([r[0] for r in results])
    flag = np.array([r[1] for r in results])
    want_score, want_flag, _ = whole(bundle, raw)
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(score, want_score, rtol=tol, atol=tol)
    clear = ~np.isclose(want_score, bundle.threshold.value, rtol=1e-3)
    assert (flag[clear] == want_flag[clear]).all()


#: the torch families, whose trailing windows can be summed on the model's device
DEVICE_FAMILIES = ["var_kalman", "mamba"]


@pytest.mark.parametrize("family", DEVICE_FAMILIES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("spec", [ANOMALY, ScoreSpec("nll", 9, "mean"), ScoreSpec("nis", 1)])
def test_window_on_the_device_equals_whole(family, split, spec):
    # the GPU path (tsssm.scoring.device_window), here on the CPU: windows summed in torch
    bundle = make_bundle(family, score=spec)
    raw = raw_stream()
    scorer = Scorer(bundle, contributions=True, device_window=True)
    got = fed(scorer, raw, SPLITS[split])
    assert scorer._device_win  # the device path ran, not the numpy window
    assert_same(family, got, whole(bundle, raw), np.full(len(raw), bundle.threshold.value))
    host = fed(Scorer(bundle, contributions=True, device_window=False), raw, SPLITS[split])
    np.testing.assert_allclose(got[0], host[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[2], host[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], host[1])


@pytest.mark.parametrize("family", DEVICE_FAMILIES)
def test_window_on_the_device_with_per_stream_and_spot_thresholds(family):
    raw = raw_stream() + 5.0
    for kwargs, level in ((dict(scope="per_stream", train_rows=100, per_stream=True), None),
                          (dict(threshold=SPOTThreshold(q=0.01, level=0.9)), "spot")):
        bundle = make_bundle(family, score=ANOMALY, **kwargs)
        want = whole(bundle, raw)
        scorer = Scorer(bundle, contributions=True, device_window=True)
        got = fed(scorer, raw, [20, 30, 1, 649])
        assert scorer._device_win
        levels = bundle.threshold.levels(want[0]) if level else np.full(
            len(raw), stream_threshold(bundle, want[0], 100, "s").value)
        assert_same(family, got, want, levels)


def test_window_on_the_device_without_contributions_and_centered_falls_back():
    bundle = make_bundle("mamba", score=ANOMALY)
    raw = raw_stream()
    scorer = Scorer(bundle, device_window=True)
    out = scorer.update_many(raw)
    assert out.contrib is None and scorer._device_win
    np.testing.assert_allclose(out.score, whole(bundle, raw)[0], rtol=1e-4, atol=1e-4)
    centered = Scorer(make_bundle("mamba", score=ScoreSpec("nis", 9, "mean", "centered")),
                      device_window=True)
    centered.update_many(raw[:50])
    assert centered._device_win is False  # a centered window is summed on the host


@pytest.mark.parametrize("split", ["whole", "inside-windows", "through-the-gap"])
def test_mamba_scanning_in_segments_equals_whole(monkeypatch, split):
    # the GPU path of a long stream (tsssm.ssm.segmented, windows on the device), on the CPU
    import tsssm.models.mamba as mamba

    bundle = make_bundle("mamba", score=ANOMALY)
    raw = raw_stream()
    want = whole(bundle, raw)
    monkeypatch.setattr(mamba, "SEGMENT_DEVICES", ("cpu",))
    monkeypatch.setattr(mamba, "SEGMENT_ROWS", 16)
    got = fed(Scorer(bundle, contributions=True, device_window=True), raw, SPLITS[split])
    assert_same("mamba", got, want, np.full(len(raw), bundle.threshold.value))


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["whole", "inside-windows", "through-the-gap"])
def test_scorer_on_the_gpu_equals_whole(split):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    bundle = make_bundle("mamba", score=ANOMALY)
    raw = raw_stream()
    want = whole(bundle, raw)  # on the CPU
    scorer = Scorer(bundle, device="cuda", contributions=True)
    got = fed(scorer, raw, SPLITS[split])
    assert scorer._device_win  # windows summed on the GPU
    assert_same("mamba", got, want, np.full(len(raw), bundle.threshold.value))


@pytest.mark.parametrize("kind", ["shift", "mean"])
def test_running_window_equals_the_batch_window_on_a_long_stream(monkeypatch, kind):
    # the live path's O(1) window (running sums, recomputed now and then) against window_update
    import tsssm.anomaly.streaming as streaming

    monkeypatch.setattr(streaming, "RESUM_EVERY", 97)
    rng = np.random.default_rng(5)
    n, C, w = 3000, 4, 60
    contrib = rng.exponential(size=(n, C))
    whitened = rng.standard_normal((n, C)) * 3
    observed = rng.random((n, C)) > 0.1
    observed[1000:1100] = False  # no observation at all for 100 rows
    contrib[~observed], whitened[~observed] = 0.0, 0.0
    want, want_c, _ = streaming.window_update(streaming.window_start(C, kind),
                                              (contrib, whitened, observed), w, kind)
    live = streaming.RunningWindow(w, kind, C)
    got = [live.step(contrib[i], whitened[i], observed[i]) for i in range(n)]
    np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.stack([g[1] for g in got]), want_c, rtol=1e-9, atol=1e-12)
    # handed to the batch path and back, anywhere
    state = live.to_state()
    assert state.received == n and len(state.tail) == w - 1
    again = streaming.RunningWindow.from_state(state, w, kind, C)
    assert again.step(contrib[0], whitened[0], observed[0])[0] == pytest.approx(
        streaming.window_update(state, (contrib[:1], whitened[:1], observed[:1]), w, kind)[0][0])


def test_live_samples_interleaved_with_batches_equal_whole():
    # samples one by one, a sample with a missing reading (the batch path), a batch, samples
    bundle = make_bundle("kalman", score=ANOMALY)
    raw = raw_stream()
    want_score, want_flag, want_contrib = whole(bundle, raw)
    scorer = Scorer(bundle, contributions=True)
    scores = []
    for i in range(0, 150):
        scores.append(scorer.update(raw[i])[0])
    scores.extend(scorer.update_many(raw[150:260]).score)  # 200..230: nothing observed
    for i in range(260, 500):
        scores.append(scorer.update(raw[i])[0])
    scores.extend(scorer.update_many(raw[500:]).score)
    np.testing.assert_allclose(scores, want_score, rtol=1e-5, atol=1e-5)
