"""tsssm: forecasting and anomaly detection on sensor streams with state space models.

The Python API (tsssm.api), imported on first use so that ``import tsssm`` stays light:

    m = tsssm.train(data="skab_sample", model="kalman")   # = `tsssm train`, one MLflow run
    m = tsssm.load("tsssm_runs/models/<run id>")           # a bundle folder or a run id
    m.forecast(frame, horizon=8); m.score(frame); m.save("my_model")
"""

__version__ = "0.1.0"

#: names of the Python API, resolved lazily: {name: module}
_LAZY = {"train": "tsssm.api", "load": "tsssm.api", "compose": "tsssm.api", "Model": "tsssm.api",
         "Scorer": "tsssm.scoring.scorer", "ScoredRows": "tsssm.scoring.scorer"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The API (tsssm.api) and ``tsssm.Scorer`` (tsssm.scoring.scorer), imported on first use:
    ``import tsssm`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tsssm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
