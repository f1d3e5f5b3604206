"""tsssm: forecasting and anomaly detection on sensor streams with state space models.

The Python API (tsssm.api), imported on first use so that ``import tsssm`` stays light:

    m = tsssm.train(data="skab_sample", model="kalman")   # = `tsssm train`, one MLflow run
    m = tsssm.load("tsssm_runs/models/<run id>")           # a bundle folder or a run id
    m.forecast(frame, horizon=8); m.score(frame); m.save("my_model")
"""

__version__ = "0.1.0"

#: names of the Python API, resolved lazily from tsssm.api
_API = ("train", "load", "compose", "Model")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from tsssm import api

        return getattr(api, name)
    raise AttributeError(f"module 'tsssm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
