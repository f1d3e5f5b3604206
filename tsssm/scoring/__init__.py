"""Scoring streams of any length: out of core, many at once, or live.

- :class:`tsssm.scoring.scorer.Scorer`: one stream fed in chunks or samples, with the model's
  state carried (equal to scoring the whole stream at once);
- :mod:`tsssm.scoring.files`: one file in row batches to a scores Parquet;
- :mod:`tsssm.scoring.many`: many files in worker processes or on a Dask cluster;
- :mod:`tsssm.scoring.live`: CSV rows from standard input or a growing file;
- :mod:`tsssm.scoring.kalman_steady`: the Kalman forecaster's filter in numpy (live samples in
  microseconds, long chunks solved in blocks at the filter's fixed point).
"""

from tsssm.scoring.scorer import ScoredRows, Scorer

__all__ = ["ScoredRows", "Scorer"]
