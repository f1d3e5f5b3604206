"""Window scores and flagged intervals of a stream fed in batches of any size equal the
whole-stream functions (window_scores, flagged_intervals), with batch boundaries splitting
windows, gaps (rows with no observation) and flagged runs."""

from __future__ import annotations

import numpy as np
import pytest

from tsssm.anomaly.attribution import FlaggedInterval, flagged_intervals, interval_shares
from tsssm.anomaly.events import runs
from tsssm.anomaly.scores import window_scores
from tsssm.anomaly.streaming import (
    intervals_start,
    intervals_update,
    window_start,
    window_update,
)


def random_terms(rows: int, C: int, seed: int):
    rng = np.random.default_rng(seed)
    observed = rng.random((rows, C)) > 0.1
    observed[rows // 3 : rows // 3 + 17] = False  # a gap: no channel observed
    whitened = np.where(observed, rng.standard_normal((rows, C)), 0.0)
    whitened[rows // 2 : rows // 2 + 40, 0] += 1.5  # a mean shift
    n_obs = np.maximum(observed.sum(-1, keepdims=True), 1)
    contrib = whitened**2 / n_obs
    return contrib, whitened, observed


def splits(rows: int, seed: int) -> list[int]:
    """Batch sizes: single rows, tiny and large pieces, an empty batch."""
    rng = np.random.default_rng(seed)
    sizes = [1, 1, 0, 2]
    while sum(sizes) < rows:
        sizes.append(int(rng.choice([1, 3, 7, 29, 30, 31, 64, 200])))
    sizes[-1] -= sum(sizes) - rows
    return sizes


def fed_windows(terms, sizes, window, kind, align):
    state = window_start(terms[0].shape[1], kind)
    scores, contribs, a = [], [], 0
    for n in sizes:
        score, contrib, state = window_update(state, tuple(t[a : a + n] for t in terms),
                                              window, kind, align)
        scores.append(score)
        contribs.append(contrib)
        a += n
        assert len(state.tail) <= window  # O(window) memory
    score, contrib, state = window_update(state, tuple(t[:0] for t in terms), window, kind,
                                          align, final=True)
    scores.append(score)
    contribs.append(contrib)
    return np.concatenate(scores), np.concatenate(contribs)


@pytest.mark.parametrize("kind", ["mean", "shift"])
@pytest.mark.parametrize("align", ["trailing", "centered"])
@pytest.mark.parametrize("window", [1, 2, 30, 31])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_windows_equal_the_whole_stream(kind, align, window, seed):
    terms = random_terms(700, 4, seed)
    want_score, want_contrib = window_scores(terms, window, kind, align)
    got_score, got_contrib = fed_windows(terms, splits(700, seed + 10), window, kind, align)
    assert got_score.shape == want_score.shape
    np.testing.assert_allclose(got_score, want_score, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_contrib, want_contrib, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_contrib.sum(-1), got_score, rtol=1e-9, atol=1e-12)


def test_a_trailing_window_scores_every_row_at_once_and_a_centered_one_waits():
    terms = random_terms(100, 3, 2)
    state = window_start(3, "shift")
    score, _, state = window_update(state, tuple(t[:10] for t in terms), 30, "shift")
    assert len(score) == 10
    state = window_start(3, "shift")
    score, _, state = window_update(state, tuple(t[:10] for t in terms), 30, "shift",
                                    "centered")
    assert len(score) == 0 and state.emitted == 0  # row 0 needs rows up to 15
    score, _, state = window_update(state, tuple(t[10:20] for t in terms), 30, "shift",
                                    "centered")
    assert len(score) == 5 and state.emitted == 5


def fed_intervals(flags, score, contrib, time, sizes, channels):
    """(start, stop, start time, end time, peak, shares) of every interval found."""
    state = intervals_start()
    out, a = [], 0
    for i, n in enumerate([*sizes, 0]):  # an empty batch inside, and the final call
        found, state = intervals_update(state, flags[a : a + n], score[a : a + n],
                                        None if contrib is None else contrib[a : a + n],
                                        time[a : a + n], final=i == len(sizes))
        out += list(zip(found.start, found.stop, found.start_time, found.end_time, found.peak,
                        found.shares(channels)))
        a += n
    return out


def reference_intervals(flags, score, contrib, channels):
    """The oracle, independent of the streaming builder that flagged_intervals also uses: each
    maximal run of flags (events.runs) sliced out, its max score and summed contributions."""
    out = []
    for start, stop in runs(flags):
        shares = {} if contrib is None else interval_shares(contrib[start:stop].sum(axis=0),
                                                            channels)
        out.append(FlaggedInterval(int(start), int(stop), float(score[start:stop].max()),
                                   shares))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_contrib", [True, False])
@pytest.mark.parametrize("n_runs", [3, 25, 120])  # few flagged rows (gathered), most (in place)
def test_streamed_intervals_equal_the_whole_stream(seed, with_contrib, n_runs):
    rng = np.random.default_rng(seed)
    rows, C = 600, 3
    channels = ["x", "y", "z"]
    flags = np.zeros(rows, bool)
    for start in rng.integers(0, rows, n_runs):
        flags[start : start + rng.integers(1, 40)] = True
    flags[:3] = seed % 2 == 0  # a run at the start, and one at the end
    flags[-5:] = True
    score = rng.exponential(size=rows)
    contrib = rng.standard_normal((rows, C)) if with_contrib else None
    time = np.arange(rows) * 10 + 1000
    want = reference_intervals(flags, score, contrib, channels)
    whole = flagged_intervals(flags, score, contrib, channels)  # the whole stream at once
    assert [(w.start, w.stop, w.peak) for w in whole] == [(w.start, w.stop, w.peak) for w in want]
    for w, r in zip(whole, want):
        assert list(w.shares) == list(r.shares)
        np.testing.assert_allclose(list(w.shares.values()), list(r.shares.values()), rtol=1e-12)
    for split_seed in range(3):
        got = fed_intervals(flags, score, contrib, time, splits(rows, split_seed), channels)
        assert [(g[0], g[1]) for g in got] == [(w.start, w.stop) for w in want]
        for (_, _, start_time, end_time, peak, shares), w in zip(got, want):
            assert peak == w.peak
            assert start_time == time[w.start] and end_time == time[w.stop - 1]
            assert list(shares) == list(w.shares)
            np.testing.assert_allclose(list(shares.values()), list(w.shares.values()),
                                       rtol=1e-12)


def test_an_empty_batch_does_not_close_an_open_interval():
    state = intervals_start()
    found, state = intervals_update(state, np.array([False, True]), np.array([1.0, 5.0]),
                                    None, np.array([0, 1]))
    assert len(found) == 0 and state.start == 1
    found, state = intervals_update(state, np.zeros(0, bool), np.zeros(0), None,
                                    np.zeros(0, int))
    assert len(found) == 0 and state.start == 1
    found, state = intervals_update(state, np.array([True, False]), np.array([7.0, 0.0]),
                                    None, np.array([2, 3]))
    assert list(zip(found.start, found.stop, found.peak, found.start_time, found.end_time)) == [
        (1, 3, 7.0, 1, 2)]
