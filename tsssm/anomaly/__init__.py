"""Anomaly scores from predictive distributions, fitted thresholds, and detection metrics."""

from tsssm.anomaly.metrics import anomaly_metrics, forecast_metrics
from tsssm.anomaly.scores import anomaly_scores, gaussian_nll
from tsssm.anomaly.thresholds import Threshold, build_threshold, threshold_from_dict

__all__ = [
    "Threshold",
    "anomaly_metrics",
    "anomaly_scores",
    "build_threshold",
    "forecast_metrics",
    "gaussian_nll",
    "threshold_from_dict",
]
