"""tsssm: forecasting and anomaly detection on sensor streams with state space models."""

__version__ = "0.1.0"
