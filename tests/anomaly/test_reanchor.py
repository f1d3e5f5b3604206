"""The re-anchored shift score (tsssm.anomaly.reanchor): the plain score when nothing moves, a
reference that re-anchors after a large fault but never during a steady one, and a drift that
rows near the threshold cannot move."""

import numpy as np
import pytest

from tsssm.anomaly.reanchor import ReanchorSpec, _per_row, reanchored_shift_scores
from tsssm.anomaly.scores import StepTerms, window_scores
from tsssm.errors import ConfigError, DataError

C = 3


def _noise(T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, C))


def _plain(u: np.ndarray, obs: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    return window_scores(StepTerms(np.where(obs, u * u, 0.0) / C, np.where(obs, u, 0.0), obs),
                         w, "shift", "trailing")


def test_equals_the_plain_shift_score_when_the_reference_never_moves():
    u = _noise(400)
    obs = np.random.default_rng(1).random(u.shape) > 0.1  # missing entries too
    obs[50:60] = False  # rows with nothing observed
    for w in (1, 7, 60):
        score, contrib = reanchored_shift_scores(u, obs, threshold=3.0, window=w)
        ref, ref_contrib = _plain(u, obs, w)
        np.testing.assert_allclose(score, ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(contrib, ref_contrib, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(contrib.sum(-1), score, rtol=1e-12)
        if w == 1:  # a row with nothing observed scores 0
            assert (score[50:60] == 0.0).all()


def _fault_then_offset(big: float, small: float, seed: int = 2):
    """White noise; a fault of ``big`` on every channel over rows 300-599; then a persistent
    offset of ``small`` (the process settled elsewhere) from row 600 to 899."""
    u = _noise(900, seed)
    u[300:600] += big
    u[600:] += small
    return u


def test_re_anchors_after_a_large_fault_and_not_during_it():
    u = _fault_then_offset(big=4.0, small=0.8)
    obs = np.ones_like(u, bool)
    w, thr = 30, 3.0  # a 30-row shift score of white noise is chi2_3/3: 3.0 is its 99.3% point
    plain, _ = _plain(u, obs, w)
    spec = ReanchorSpec(rho=0.1, hold=10)
    score, _ = reanchored_shift_scores(u, obs, thr, w, spec)
    # the plain score keeps alarming on the settled offset (30 x 0.8^2 = 19 > 3) ...
    assert (plain[700:] > thr).mean() > 0.95
    # ... the re-anchored one takes it as the new normal once the fault's score has fallen
    assert (score[700:] > thr).mean() < 0.05
    # the whole fault is still flagged: a steady fault's score does not fall below its peak
    assert (score[310:600] > thr).all()
    # before the fault the two scores are the same
    np.testing.assert_allclose(score[:300], plain[:300], rtol=1e-12)


def test_a_fault_that_does_not_fall_relative_to_its_peak_is_never_absorbed():
    u = _noise(900, 3)
    u[300:] += 1.0  # a fault that never ends: 30 x 1 = 30 > 3, flat
    obs = np.ones_like(u, bool)
    score, _ = reanchored_shift_scores(u, obs, 3.0, 30, ReanchorSpec(rho=0.2, hold=10))
    assert (score[330:] > 3.0).mean() > 0.97


def test_the_drift_moves_only_on_clearly_normal_rows():
    # a slow ramp of the normal operating point (0 -> 1.5 over 2000 rows), then a fault
    T = 2600
    u = _noise(T, 4)
    u[:2000] += np.linspace(0.0, 1.5, 2000)[:, None]
    u[2000:] += 1.5
    u[2200:2500] += 2.0
    obs = np.ones_like(u, bool)
    w, thr = 30, 3.0
    plain, _ = _plain(u, obs, w)
    drift, _ = reanchored_shift_scores(u, obs, thr, w, ReanchorSpec(alpha=0.02, gamma=0.5))
    # the frozen reference alarms on the drifted normal rows; the drifting one follows them
    assert (plain[1500:2000] > thr).mean() > 0.9
    assert (drift[1500:2000] > thr).mean() < 0.1
    # the fault is above the threshold, so the reference does not follow it
    assert (drift[2230:2500] > thr).all()


def test_a_batch_of_settings_equals_each_setting_alone():
    u = np.stack([_fault_then_offset(4.0, 0.8, s) for s in range(3)])
    obs = np.ones_like(u, bool)
    obs[1, 100:120, 0] = False
    settings = [ReanchorSpec(0.0, 0.5, 0.1, 10), ReanchorSpec(0.01, 1.0, 0.0, 20),
                ReanchorSpec(0.005, 0.5, 0.2, 5)]
    thr, win = np.array([3.0, 2.5, 4.0]), np.array([30, 10, 60])
    batch, contrib = reanchored_shift_scores(
        u, obs, thr, win, alpha=[s.alpha for s in settings], gamma=[s.gamma for s in settings],
        rho=[s.rho for s in settings], hold=[s.hold for s in settings])
    for i, s in enumerate(settings):
        one, one_c = reanchored_shift_scores(u[i], obs[i], thr[i], int(win[i]), s)
        np.testing.assert_allclose(batch[i], one, rtol=1e-12)
        np.testing.assert_allclose(contrib[i], one_c, rtol=1e-12)


def test_bad_settings_and_shapes_are_clear_errors():
    u = _noise(50)
    obs = np.ones_like(u, bool)
    for bad, key in ((ReanchorSpec(alpha=1.0), "alpha"), (ReanchorSpec(hold=0), "hold"),
                     (ReanchorSpec(rho=-0.1), "rho"), (ReanchorSpec(gamma=0.0), "gamma")):
        with pytest.raises(ConfigError, match=key):
            reanchored_shift_scores(u, obs, 3.0, 10, bad)
    with pytest.raises(ConfigError, match="window"):
        reanchored_shift_scores(u, obs, 3.0, 0)
    with pytest.raises(DataError, match="same shape"):
        reanchored_shift_scores(u, obs[:, :2], 3.0, 10)
    with pytest.raises(DataError, match="threshold"):
        reanchored_shift_scores(u, obs, float("nan"), 10)
    with pytest.raises(ConfigError, match="hold"):
        reanchored_shift_scores(u[None], obs[None], 3.0, 10, hold=[0])


def _grid_case(seed: int = 5):
    """Six streams with faults, settled offsets, a ramp and missing entries, and a setting per
    stream that drifts, re-anchors or both (windows 1-60, holds 3-60)."""
    rng = np.random.default_rng(seed)
    u = np.stack([_fault_then_offset(3.0 + i, 0.6 + 0.1 * i, seed + i) for i in range(6)])
    u[2, :600] += np.linspace(0.0, 1.0, 600)[:, None]
    obs = rng.random(u.shape) > 0.05
    obs[3, 200:230] = False  # rows with nothing observed
    u = np.where(obs, u, 0.0)
    kw = dict(alpha=[0.0, 0.003, 0.03, 0.01, 0.0, 0.001], gamma=[0.5, 1.0, 0.5, 1.0, 0.5, 0.5],
              rho=[0.1, 0.0, 0.3, 0.2, 0.05, 0.1], hold=[10, 20, 3, 60, 20, 10])
    return u, obs, np.array([3.0, 2.5, 4.0, 3.0, 2.0, 3.5]), np.array([30, 10, 60, 1, 45, 60]), kw


def test_exactly_the_first_implementation():
    """The streamed implementation equals the first one (the oracle below) bit
    for bit: same arithmetic in the same order, the full-length arrays replaced by rings."""
    u, obs, thr, win, kw = _grid_case()
    want, want_c = oracle_reanchored_shift_scores(u, obs, thr, win, **kw)
    got, got_c = reanchored_shift_scores(u, obs, thr, win, **kw)
    assert (want[:, 320:] > thr[:, None]).any()  # alarms happen, so the state machine runs
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_c, want_c)
    got2, none = reanchored_shift_scores(u, obs, thr, win, contributions=False, **kw)
    assert none is None
    np.testing.assert_array_equal(got2, want)


@pytest.mark.parametrize("sizes", [(1,), (7,), (29, 31), (59, 1, 200), (450,)])
def test_pieces_of_any_size_give_the_whole_stream(sizes):
    """State carried across pieces: chunk sizes that split windows, holds and alarms give the
    whole-stream scores exactly."""
    from tsssm.anomaly.reanchor import ReanchoredShift

    u, obs, thr, win, kw = _grid_case(7)
    whole, whole_c = reanchored_shift_scores(u, obs, thr, win, **kw)
    state = ReanchoredShift(C, thr, win, batch=len(u), **kw)
    scores, contribs, t, k = [], [], 0, 0
    while t < u.shape[1]:
        n = sizes[k % len(sizes)]
        s, c = state.update(u[:, t:t + n], obs[:, t:t + n])
        scores.append(s)
        contribs.append(c)
        t, k = t + n, k + 1
    np.testing.assert_array_equal(np.concatenate(scores, axis=1), whole)
    np.testing.assert_array_equal(np.concatenate(contribs, axis=1), whole_c)


# The re-anchored shift score as first written (tsssm/anomaly/reanchor.py before 2026-12-02, at
# commit 752e99e): a numpy loop over time holding (B, T, C) arrays of every row. The oracle of
# the streamed implementation (ReanchoredShift), which must give the same numbers.
def oracle_reanchored_shift_scores(whitened: np.ndarray, observed: np.ndarray, threshold,
                            window, spec: ReanchorSpec | None = None, *, alpha=None,
                            gamma=None, rho=None, hold=None) -> tuple[np.ndarray, np.ndarray]:
    """Shift scores (B, T) and their per-channel contributions (B, T, C) around the guarded
    reference (module doc).

    whitened: (B, T, C) or (T, C) whitened innovations (``StepTerms.whitened``; 0 where
    missing); observed: the same shape, bool. threshold, window: scalars or (B,) (one per batch
    row, e.g. a grid of settings); the setting is ``spec`` or, per batch row, the keyword
    arrays ``alpha``, ``gamma``, ``rho``, ``hold`` (each scalar or (B,), defaulting to
    ``spec``'s). A (T, C) input gives (T,) and (T, C) back. The contributions of a row sum to
    its score; a row whose window holds no observation scores 0.
    """
    u = np.asarray(whitened, dtype=np.float64)
    obs = np.asarray(observed, dtype=bool)
    single = u.ndim == 2
    if single:
        u, obs = u[None], obs[None]
    if u.ndim != 3 or obs.shape != u.shape:
        raise DataError(f"whitened innovations must be (B, T, C) with observed of the same "
                        f"shape; got {u.shape} and {obs.shape}")
    B, T, C = u.shape
    spec = (spec or ReanchorSpec()).check()
    thr = _per_row(threshold, B, "threshold")
    w = _per_row(window, B, "window", np.int64)
    if np.any(w < 1):
        raise ConfigError(f"score window must be a positive integer; got {window!r}")
    a = _per_row(spec.alpha if alpha is None else alpha, B, "alpha")
    g = _per_row(spec.gamma if gamma is None else gamma, B, "gamma")
    r = _per_row(spec.rho if rho is None else rho, B, "rho")
    h = _per_row(spec.hold if hold is None else hold, B, "hold", np.int64)
    for row in zip(a, g, r, h):  # every batch row's setting must be valid
        ReanchorSpec(float(row[0]), float(row[1]), float(row[2]), int(row[3])).check()
    u = np.where(obs, u, 0.0)
    of = obs.astype(np.float64)
    idx = np.arange(B)
    ref = np.zeros((B, C))
    # E[:, t] = the row's innovation around the reference in force at t (0 where missing);
    # CE / CN their cumulative sums and observed counts (for the window and the re-anchor mean)
    E = np.zeros((B, T, C))
    CE = np.zeros((B, T + 1, C))
    CN = np.zeros((B, T + 1, C))
    run_s = np.zeros((B, C))
    run_n = np.zeros((B, C))
    anchor = np.zeros(B, np.int64)  # the window never reaches before the last re-anchor
    anchored = np.zeros(B, bool)  # re-anchored at least once (the reference is an estimate)
    alarm = np.zeros(B, bool)
    peak = np.zeros(B)
    low = np.zeros(B, np.int64)
    score = np.zeros((B, T))
    contrib = np.zeros((B, T, C))
    for t in range(T):
        e = (u[:, t] - ref) * of[:, t]
        E[:, t] = e
        CE[:, t + 1] = CE[:, t] + e
        CN[:, t + 1] = CN[:, t] + of[:, t]
        run_s += e
        run_n += of[:, t]
        old = t - w  # the row leaving each window, if the window has not restarted since
        leave = old >= anchor
        if leave.any():
            j = np.clip(old, 0, None)
            run_s -= np.where(leave[:, None], E[idx, j], 0.0)
            run_n -= np.where(leave[:, None], of[idx, j], 0.0)
        n_ch = np.count_nonzero(run_n > 0.5, axis=1)
        # after a re-anchor the reference is the mean of `hold` rows, so a sum over n rows
        # around it has variance n (1 + n / hold) rather than n: scaled back to chi-square
        inflate = np.where(anchored[:, None], 1.0 + run_n / h[:, None], 1.0)
        part = run_s * run_s / (np.maximum(run_n, 1.0) * inflate) / np.maximum(n_ch, 1)[:, None]
        part[n_ch == 0] = 0.0
        contrib[:, t] = part
        s = part.sum(axis=1)
        score[:, t] = s
        above = s > thr
        start = above & ~alarm
        peak = np.where(start, s, np.where(above, np.maximum(peak, s), 0.0))
        low = np.where(above & (s < r * peak), low + 1, 0)
        alarm = above
        jump = above & (r > 0) & (low >= h)
        if jump.any():
            k = np.flatnonzero(jump)
            lo = t + 1 - h[k]
            cnt = CN[k, t + 1] - CN[k, lo]
            mean = (CE[k, t + 1] - CE[k, lo]) / np.maximum(cnt, 1.0)
            ref[k] += np.where(cnt > 0, mean, 0.0)
            anchor[k] = t + 1
            anchored[k] = True
            run_s[k] = 0.0
            run_n[k] = 0.0
            alarm[k] = False
            peak[k] = 0.0
            low[k] = 0
        drift = ~above & (a > 0) & (s < g * thr)
        if drift.any():
            ref[drift] += a[drift, None] * e[drift]
    if single:
        return score[0], contrib[0]
    return score, contrib
