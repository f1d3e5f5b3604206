"""Which sensors caused each flagged interval: the per-channel contributions of the scores
(additive: they sum to the score, see tsssm.anomaly.scores) summed over the interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tsssm.errors import DataError


@dataclass
class FlaggedInterval:
    """One maximal run of flagged rows of a stream."""

    start: int  # first row (index into the arrays given)
    stop: int  # one past the last row
    peak: float  # largest score inside
    shares: dict[str, float]  # channel -> share of the interval's summed score, sorted, sum 1

    def top(self, k: int = 3, min_share: float = 0.05) -> list[tuple[str, float]]:
        """The ``k`` largest shares (at least ``min_share``; always at least one)."""
        items = list(self.shares.items())
        kept = [(c, s) for c, s in items[:k] if s >= min_share]
        return kept or items[:1]

    def describe(self, k: int = 3) -> str:
        return ", ".join(f"{c} {100 * s:.0f}%" for c, s in self.top(k))


def interval_shares(summed: np.ndarray, channels: Sequence[str]) -> dict[str, float]:
    """Each channel's share of an interval from its summed contributions (C,): negative sums
    count as 0, largest first; empty when nothing is positive."""
    part = np.clip(np.asarray(summed, dtype=np.float64), 0.0, None)
    total = float(part.sum())
    if not total > 0:
        return {}
    order = np.argsort(-part, kind="stable")
    return {channels[j]: float(part[j] / total) for j in order}


def flagged_intervals(flags: np.ndarray, score: np.ndarray, contrib: np.ndarray | None,
                      channels: Sequence[str]) -> list[FlaggedInterval]:
    """Flagged intervals of one stream with each channel's share of the interval's score.

    flags (T,) bool, score (T,), contrib (T, C) or None (then shares are empty). A channel's
    share is its summed contribution over the interval divided by the summed score, so the
    shares of an interval sum to 1 (when the score there is positive).
    """
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if flags.shape != score.shape:
        raise DataError(f"{flags.size} flags for {score.size} scores")
    if contrib is not None:
        contrib = np.asarray(contrib, dtype=np.float64)
        if contrib.shape != (score.size, len(channels)):
            raise DataError(f"contributions of shape {contrib.shape} do not match {score.size} "
                            f"rows and {len(channels)} channels")
    # the whole stream is one streaming update (tsssm.anomaly.streaming): one interval builder
    from tsssm.anomaly.streaming import intervals_start, intervals_update  # (it imports us)

    found, _ = intervals_update(intervals_start(), flags, score, contrib,
                                np.arange(score.size), final=True)
    return [FlaggedInterval(int(start), int(stop), float(peak), shares)
            for start, stop, peak, shares in zip(found.start, found.stop, found.peak,
                                                 found.shares(channels))]
