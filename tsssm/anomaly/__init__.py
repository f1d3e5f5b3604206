"""Anomaly scores (joint, windowed, with per-channel attribution), fitted thresholds, and
detection metrics (points, events, ranges, SKAB's NAB)."""

from tsssm.anomaly.attribution import FlaggedInterval, flagged_intervals
from tsssm.anomaly.events import event_metrics, nab_score, vus_pr
from tsssm.anomaly.metrics import anomaly_metrics, forecast_metrics
from tsssm.anomaly.scores import (
    ScoreSpec,
    anomaly_scores,
    gaussian_nll,
    step_terms,
    window_scores,
)
from tsssm.anomaly.thresholds import Threshold, build_threshold, threshold_from_dict

__all__ = [
    "FlaggedInterval",
    "ScoreSpec",
    "Threshold",
    "anomaly_metrics",
    "anomaly_scores",
    "build_threshold",
    "event_metrics",
    "flagged_intervals",
    "forecast_metrics",
    "gaussian_nll",
    "nab_score",
    "step_terms",
    "threshold_from_dict",
    "vus_pr",
    "window_scores",
]
