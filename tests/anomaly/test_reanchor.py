"""The re-anchored shift score (tsssm.anomaly.reanchor): the plain score when nothing moves, a
reference that re-anchors after a large fault but never during a steady one, and a drift that
rows near the threshold cannot move."""

import numpy as np
import pytest

from tsssm.anomaly.reanchor import ReanchorSpec, reanchored_shift_scores
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
