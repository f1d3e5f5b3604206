"""A detector fitted on each stream's own first rows, as SKAB's published baselines are.

SKAB's notebooks fit one model per file on its first 400 rows (assumed normal) and score the rest
of that file with it. ``PerStreamDetector(base, train_rows)`` does the same inside tsssm's
one-model-for-every-stream interface: ``score(y)`` fits a fresh ``base`` detector on the first
``train_rows`` rows of each stream of ``y`` and scores the whole stream with it. Only those rows
of the stream being scored are used (the rows a per-file protocol calls training rows), never its
later rows and never a label; ``fit`` only checks the shapes (there is nothing global to learn).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tsssm.baselines._common import as_series, as_streams
from tsssm.errors import ConfigError, DataError


class PerStreamDetector:
    """Wraps a score-only detector class: one fit per scored stream, on its first rows."""

    def __init__(self, base: type, train_rows: int = 400, **kwargs: Any) -> None:
        if int(train_rows) != train_rows or train_rows < 2:
            raise ConfigError(f"train_rows must be an integer >= 2; got {train_rows!r}")
        self.base, self.train_rows, self.kwargs = base, int(train_rows), kwargs
        self.name = f"{base.name}_file"
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        return f"PerStreamDetector({self.base.__name__}, train_rows={self.train_rows})"

    def fit(self, y_train: Any) -> PerStreamDetector:
        streams = as_streams(y_train, "training data")
        self.n_channels = int(streams[0].shape[-1])
        self.n_train_rows = 0  # nothing is fitted across streams
        self.fitted = True
        return self

    def _per_stream(self, y: Any, method: str) -> np.ndarray:
        y = as_series(y, "input series", self.n_channels or None)
        if y.shape[1] <= self.train_rows:
            raise DataError(f"a stream of {y.shape[1]} rows: a per-stream detector fits on the "
                            f"first {self.train_rows} and needs rows after them")
        out = []
        for b in range(y.shape[0]):
            stream = y[b : b + 1]
            det = self.base(**self.kwargs).fit(stream[:, : self.train_rows])
            out.append(getattr(det, method)(stream)[0])
        return np.stack(out)

    def score(self, y: Any) -> np.ndarray:
        """(B, T): each stream scored by a detector fitted on its own first rows."""
        return self._per_stream(y, "score")

    def contributions(self, y: Any) -> np.ndarray:
        """(B, T, C), when the base detector gives contributions."""
        if not hasattr(self.base, "contributions"):
            raise AttributeError(f"{self.base.__name__} gives no contributions")
        return self._per_stream(y, "contributions")
