"""Leave-one-group-out choice of a detector setting (tsssm.anomaly.selection), hand-worked."""

import numpy as np
import pytest

from tsssm.anomaly.selection import (
    choose_by_group,
    choose_by_group_with,
    pooled_rates,
    risk_for_rows,
    smallest_detectable_shift,
    stream_counts,
)
from tsssm.errors import DataError


def test_stream_counts_and_pooled_rates_by_hand():
    labels = [np.array([0, 0, 1, 1]), np.array([1, 0, 0])]
    flags = [np.array([1, 0, 1, 0]), np.array([1, 1, 0])]
    counts = stream_counts(labels, flags)
    assert counts.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    f1, far, mar = pooled_rates(counts)  # tp 2, fp 2, tn 2, fn 1
    assert f1 == pytest.approx(4 / 7) and far == pytest.approx(0.5) and mar == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="stream 0"):
        stream_counts([np.zeros(3)], [np.zeros(2)])


def _counts(per_setting):
    return np.array(per_setting, dtype=np.int64)  # (K, S, 4)


def test_a_group_never_chooses_with_its_own_labels():
    # setting 0 is perfect on stream 0 (group a) and useless on stream 1 (group b); setting 1
    # the reverse. Each group must get the setting that is best on the *other* group.
    good, bad = [10, 0, 10, 0], [0, 0, 10, 10]
    counts = _counts([[good, bad], [bad, good]])
    assert choose_by_group(counts, ["a", "b"]) == {"a": 1, "b": 0}
    # changing a group's own counts cannot change its choice
    counts2 = _counts([[bad, bad], [good, good]])
    assert choose_by_group(counts2, ["a", "b"])["a"] == choose_by_group(counts, ["a", "b"])["a"]


def test_far_budget_and_ties():
    # on the other group: setting 0 F1 0.8 but FAR 0.5; setting 1 F1 0.6 with FAR 0.1
    noisy, quiet = [8, 5, 5, 3], [3, 1, 9, 3]
    other = [5, 0, 5, 0]
    counts = _counts([[other, noisy], [other, quiet]])
    assert choose_by_group(counts, ["a", "b"])["a"] == 0
    assert choose_by_group(counts, ["a", "b"], max_far=0.2)["a"] == 1
    # no setting within the budget: the best F1 of all
    assert choose_by_group(counts, ["a", "b"], max_far=0.01)["a"] == 0
    # equal objective: the lower index
    same = _counts([[other, quiet], [other, quiet]])
    assert choose_by_group(same, ["a", "b"]) == {"a": 0, "b": 0}


def test_choose_with_an_objective_sees_only_the_other_streams():
    seen = []

    def objective(k, others):
        seen.append(others.copy())
        return float(k) if others[0] else -float(k)

    chosen = choose_by_group_with(3, ["x", "y", "y"], objective)
    assert chosen == {"x": 0, "y": 2}
    assert all(not m[0] for m in seen[:3]) and all(m.tolist() == [True, False, False]
                                                   for m in seen[3:])


def test_bad_shapes_are_refused():
    with pytest.raises(DataError, match="two groups"):
        choose_by_group(np.zeros((2, 2, 4)), ["a", "a"])
    with pytest.raises(DataError, match="groups for"):
        choose_by_group(np.zeros((2, 3, 4)), ["a", "b"])
    with pytest.raises(DataError, match="settings, streams, 4"):
        choose_by_group(np.zeros((2, 3)), ["a", "b", "c"])


def test_label_free_rule_by_hand():
    assert risk_for_rows(2720) == pytest.approx(1 / 2720)
    # thresholds 4, 4, 32 at windows 1, 4, 16: smallest shifts 2, 1, sqrt(2)
    window, shift = smallest_detectable_shift({1: 4.0, 4: 4.0, 16: 32.0})
    assert window == 4 and shift == pytest.approx({1: 2.0, 4: 1.0, 16: 2 ** 0.5})
    assert smallest_detectable_shift({8: 8.0, 2: 2.0})[0] == 2  # a tie goes to the shorter
    for bad in ({}, {0: 1.0}, {3: 0.0}, {3: float("nan")}):
        with pytest.raises(DataError):
            smallest_detectable_shift(bad)
    for bad in (0, 2.5, -1):
        with pytest.raises(DataError):
            risk_for_rows(bad)


def test_the_smallest_detectable_shift_is_what_the_shift_score_flags():
    """On white innovations, a persistent shift slightly above sqrt(threshold / window) lasting
    one window is flagged at its last row, one slightly below is not (the rule's premise)."""
    from tsssm.anomaly.scores import StepTerms, window_scores
    from tsssm.anomaly.thresholds import build_threshold

    rng = np.random.default_rng(0)
    C, w = 4, 30
    normal = rng.standard_normal((20_000, C))
    obs = np.ones_like(normal, dtype=bool)
    score, _ = window_scores(StepTerms(normal ** 2 / C, normal, obs), w, "shift")
    thr = build_threshold("pot", q=risk_for_rows(len(score)), level=0.98).fit(score).value
    _, shift = smallest_detectable_shift({w: thr})
    for factor, flagged in ((1.3, True), (0.7, False)):
        u = np.zeros((w, C)) + factor * shift[w]  # the shift alone, every channel, w rows
        s, _ = window_scores(StepTerms(u ** 2 / C, u, np.ones_like(u, dtype=bool)), w, "shift")
        assert bool(s[-1] > thr) is flagged
