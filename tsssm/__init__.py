"""tsssm: forecasting and anomaly detection on sensor streams with state space models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``tsssm.Scorer`` (tsssm.scoring.scorer), imported on first use: ``import tsssm`` stays
    light."""
    if name in ("Scorer", "ScoredRows"):
        from tsssm.scoring import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module 'tsssm' has no attribute {name!r}")
