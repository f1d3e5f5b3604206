"""task.window.reanchor (tsssm/anomaly/reanchor.py) as a product feature: saved with the bundle,
and the same scores, contributions and flags from every path that scores a stream - the whole
stream at once (`tsssm score`'s in-memory path, tsssm.tasks.evaluate.flag_stream), the Scorer fed
pieces that split the windows, the hold rows and the gap, a per-stream threshold that holds rows
first, and live samples one at a time - with the reference and alarm state carried across."""

from __future__ import annotations

import numpy as np
import pytest

from tsssm.anomaly.reanchor import ReanchorSpec, reanchored_shift_scores
from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.thresholds import SPOTThreshold
from tsssm.bundle import load_bundle, save_bundle
from tsssm.commands.score import stream_threshold
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ConfigError
from tsssm.scoring.scorer import Scorer
from tsssm.tasks.evaluate import flag_stream, predict_stream, stream_terms

from .conftest import make_bundle
from .test_windowed import SPLITS, assert_same, fed, raw_stream

#: re-anchors after the one-sensor shift of raw_stream (rows 400-440) and drifts on normal rows
REANCHOR = ScoreSpec("mahalanobis", 30, "shift", "trailing",
                     ReanchorSpec(alpha=0.01, gamma=0.5, rho=0.3, hold=10))


def whole(bundle, raw: np.ndarray):
    """What `tsssm score` computes for a file read whole (flag_stream: the plain score's
    threshold, then the re-anchored score around it)."""
    scaler = bundle.scaler
    rows = bundle.data_config["train_rows"]
    if bundle.per_stream_scaling and len(raw) > rows:
        scaler = StandardScaler.fit([raw[:rows]], bundle.channels)
    spec = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
    pred, threshold = flag_stream(bundle.model, scaler.transform(raw), spec,
                                  lambda s: stream_threshold(bundle, s, rows, "s"), 10**9)
    return (pred.score, threshold.flags(pred.score), pred.contrib), threshold


def test_the_bundle_keeps_it_and_the_score_moves(tmp_path):
    bundle = make_bundle("kalman", score=REANCHOR)
    save_bundle(bundle, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.score["reanchor"] == {"alpha": 0.01, "gamma": 0.5, "rho": 0.3, "hold": 10}
    assert ScoreSpec.from_dict(back.score, back.score_kind) == REANCHOR
    raw = raw_stream()
    (score, flags, contrib), threshold = whole(back, raw)
    plain = predict_stream(back.model, back.scaler.transform(raw), REANCHOR._replace(
        reanchor=None), 10**9)
    # the oracle: the re-anchored score of the stream's step terms around the same threshold
    _, _, terms = stream_terms(back.model, back.scaler.transform(raw), "mahalanobis")
    want, want_c = reanchored_shift_scores(terms.whitened, terms.observed, threshold.value, 30,
                                           REANCHOR.reanchor)
    np.testing.assert_array_equal(score, want)
    np.testing.assert_array_equal(contrib, want_c)
    assert not np.allclose(score, plain.score)  # the reference did move
    assert flags[400:440].any()  # the shift is still flagged
    # off (alpha = rho = 0) is no key at all: older bundles and plain ones read the same
    assert "reanchor" not in REANCHOR._replace(reanchor=None).to_dict()


@pytest.mark.parametrize("family", ["kalman", "var_kalman", "mamba"])
@pytest.mark.parametrize("split", SPLITS)
def test_chunked_equals_whole(family, split):
    bundle = make_bundle(family, score=REANCHOR)
    raw = raw_stream()
    want, threshold = whole(bundle, raw)
    got = fed(Scorer(bundle, contributions=True), raw, SPLITS[split])
    assert_same(family, got, want, np.full(len(raw), threshold.value))
    # pieces of one scorer: the same numbers whatever the pieces (to float32 output rounding)
    one = fed(Scorer(bundle, contributions=True), raw, [700])
    np.testing.assert_allclose(got[0], one[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], one[1])


@pytest.mark.parametrize("sizes", [[700], [20, 30, 1, 649], [99, 1, 1, 599]])
def test_per_stream_threshold_holds_rows_then_reanchors(sizes):
    bundle = make_bundle("kalman", score=REANCHOR, scope="per_stream", train_rows=100,
                         per_stream=True)
    raw = raw_stream() + 5.0
    want, threshold = whole(bundle, raw)
    assert threshold.value != bundle.threshold.value
    got = fed(Scorer(bundle, contributions=True), raw, sizes)
    assert_same("kalman", got, want, np.full(len(raw), threshold.value))


@pytest.mark.parametrize("family", ["kalman", "mamba"])
def test_live_samples_equal_batch(family):
    bundle = make_bundle(family, score=REANCHOR)
    raw = raw_stream()[:600]
    raw[:, :] = np.where(np.isnan(raw), 0.0, raw)  # live samples: every channel observed
    scorer = Scorer(bundle)
    first = scorer.update_many(raw[:250])  # a batch first, then sample by sample
    results = [scorer.update(row) for row in raw[250:]]
    score = np.concatenate([first.score, [r[0] for r in results]])
    flag = np.concatenate([first.flag, [r[1] for r in results]])
    (want_score, want_flag, _), threshold = whole(bundle, raw)
    tol = 1e-5 if family == "kalman" else 1e-4
    np.testing.assert_allclose(score, want_score, rtol=tol, atol=tol)
    clear = ~np.isclose(want_score, threshold.value, rtol=1e-3)
    assert (flag[clear] == want_flag[clear]).all()
    assert want_flag[400:440].any() and not want_flag.all()


def test_a_moving_threshold_is_refused():
    bundle = make_bundle("kalman", score=REANCHOR, threshold=SPOTThreshold(q=0.01, level=0.9))
    with pytest.raises(ConfigError, match="task.window.reanchor"):
        Scorer(bundle)


def test_a_window_that_is_not_a_trailing_shift_is_refused():
    for bad in (REANCHOR._replace(window_kind="mean"), REANCHOR._replace(align="centered")):
        with pytest.raises(ConfigError, match="task.window.reanchor"):
            bad.check()


def test_alpha_rho_zero_is_the_plain_shift_score():
    """Off (alpha = rho = 0) gives the plain trailing shift score on every path: the config
    maps it to no reanchor at all, and a ReanchorSpec that cannot move scores the same."""
    from tsssm.cli import compose
    from tsssm.commands.common import score_spec

    assert score_spec(compose(["task=anomaly"]).task).reanchor is None
    on = score_spec(compose(["task=anomaly", "task.window.reanchor.rho=0.2"]).task)
    assert on.reanchor == ReanchorSpec(0.0, 0.5, 0.2, 20)
    plain = make_bundle("kalman", score=REANCHOR._replace(reanchor=None))
    still = make_bundle("kalman", score=REANCHOR._replace(reanchor=ReanchorSpec()))
    raw = raw_stream()
    want = fed(Scorer(plain, contributions=True), raw, SPLITS["inside-windows"])
    got = fed(Scorer(still, contributions=True), raw, SPLITS["inside-windows"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
