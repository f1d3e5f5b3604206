"""Classical comparators for ``tsssm compare``.

Forecasters (follow tsssm.models.base.Forecaster; ``fit(y_train)`` then ``one_step``/``forecast``):
``LastValueForecaster``, ``SeasonalNaiveForecaster(period)``, ``EWMAForecaster(alpha=None)``.
Their anomaly score comes from their one-step Gaussian via tsssm.anomaly.scores.anomaly_scores.

Detectors (``fit(y_train)`` then ``score(y) -> ndarray (B, T)``, and where they can say which
channel caused a score, ``contributions(y) -> (B, T, C)`` summing to it):
``IsolationForestDetector``, ``PCAT2QDetector`` (Hotelling's T² + Q), ``MSETDetector``
(similarity-based state estimation); ``pca_t2q_file`` / ``mset_file`` fit one of those per stream
on its own first rows (``PerStreamDetector``), as SKAB's per-file baselines do.

Every ``fit`` takes a (B, T, C) batch or a list of streams (T_i, C) of different lengths, so
comparators are fitted on the same real training rows as the models (no padding).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tsssm.baselines.ewma import EWMAForecaster, EWMAState
from tsssm.baselines.isolation_forest import IsolationForestDetector
from tsssm.baselines.mset import MSETDetector
from tsssm.baselines.naive import LastValueForecaster, SeasonalNaiveForecaster, SeasonalState
from tsssm.baselines.pca import PCAT2QDetector
from tsssm.baselines.per_stream import PerStreamDetector
from tsssm.errors import ConfigError

BASELINES: dict[str, type] = {
    "last_value": LastValueForecaster,
    "seasonal_naive": SeasonalNaiveForecaster,
    "ewma": EWMAForecaster,
    "isolation_forest": IsolationForestDetector,
    "pca_t2q": PCAT2QDetector,
    "mset": MSETDetector,
    # SKAB's per-file protocol: one model per stream, fitted on its own first 400 rows
    "pca_t2q_file": partial(PerStreamDetector, PCAT2QDetector),
    "mset_file": partial(PerStreamDetector, MSETDetector),
}

#: Baselines ``tsssm compare`` runs when none are configured (seasonal_naive needs a period).
DEFAULT_BASELINES: list[str] = ["last_value", "ewma", "isolation_forest", "pca_t2q", "mset"]


def build_baseline(name: str, **kwargs: Any) -> Any:
    """Build an unfitted baseline by registry name (see ``BASELINES``)."""
    cls = BASELINES.get(name)
    if cls is None:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments for baseline {name!r} {kwargs}: {err}") from None


def is_detector(baseline: Any) -> bool:
    """True for score-only detectors (``score(y)``), False for forecasters (``one_step``)."""
    return not hasattr(baseline, "one_step") and hasattr(baseline, "score")


__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "EWMAForecaster",
    "EWMAState",
    "IsolationForestDetector",
    "LastValueForecaster",
    "MSETDetector",
    "PCAT2QDetector",
    "PerStreamDetector",
    "SeasonalNaiveForecaster",
    "SeasonalState",
    "build_baseline",
    "is_detector",
]
