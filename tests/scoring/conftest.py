"""Small trained-looking models and synthetic streams for the scoring tests (no training: the
weights are perturbed so the filters are not at a trivial point, the threshold is fitted on the
model's own scores of a normal stretch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.anomaly.scores import ScoreSpec
from tsssm.anomaly.thresholds import QuantileThreshold, Threshold
from tsssm.bundle import Bundle
from tsssm.data.scaling import StandardScaler
from tsssm.tasks.evaluate import predict_stream

CHANNELS = ["a", "b", "c"]


def make_model(family: str, n_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "var_kalman":  # joint predictive covariance across channels
        from tsssm.models.var_kalman import VARKalmanForecaster

        net_config = {"_target_": "tsssm.models.var_kalman.VARKalmanForecaster", "order": 1}
        model = VARKalmanForecaster(n_channels, order=1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    elif family == "kalman":
        from tsssm.models.kalman import KalmanForecaster

        net_config = {"_target_": "tsssm.models.kalman.KalmanForecaster",
                      "components": ["level", "trend"]}
        model = KalmanForecaster(n_channels, components=("level", "trend"))
        with torch.no_grad():
            model.theta.add_(0.5 * torch.randn_like(model.theta))
    else:
        from tsssm.models.mamba_forecaster import MambaForecaster

        net_config = {"_target_": "tsssm.models.mamba_forecaster.MambaForecaster",
                      "d_model": 16, "n_layers": 2, "d_state": 8, "horizon": 4,
                      "scan_backend": "torch"}
        model = MambaForecaster(n_channels, d_model=16, n_layers=2, d_state=8, horizon=4,
                                scan_backend="torch")
    model.eval()
    model.net_config = net_config  # type: ignore[attr-defined]
    return model


def stream(rows: int, n_channels: int = 3, seed: int = 0, nan_frac: float = 0.0,
           gap: tuple[int, int] | None = None) -> np.ndarray:
    """A random-walk-plus-noise stream in raw units (offset and scaled), (rows, C) float32."""
    rng = np.random.default_rng(seed)
    walk = rng.standard_normal((rows, n_channels)).cumsum(0) * 0.05
    y = 10.0 + 3.0 * (walk + rng.standard_normal((rows, n_channels)))
    if nan_frac:
        y[rng.random(y.shape) < nan_frac] = np.nan
    if gap is not None:
        y[gap[0] : gap[1]] = np.nan  # a stretch with no channel observed
    return y.astype(np.float32)


#: the default anomaly task's score (conf/task/anomaly.yaml): joint Mahalanobis, 30-row shift
ANOMALY = ScoreSpec("mahalanobis", 30, "shift", "trailing")


def make_bundle(family: str, *, per_stream: bool = False, train_rows: int = 50,
                score_kind: str = "nis", n_channels: int = 3, seed: int = 0,
                score: ScoreSpec | None = None, scope: str = "pooled",
                threshold: Threshold | None = None) -> Bundle:
    """A bundle of ``family`` with the one-step ``score_kind`` score, or ``score`` (a full
    ScoreSpec), and ``threshold`` (default: the 0.9 quantile) fitted on a normal stream."""
    model = make_model(family, n_channels, seed)
    channels = CHANNELS if n_channels == 3 else [f"c{i}" for i in range(n_channels)]
    normal = stream(300, n_channels, seed=seed + 100)
    scaler = StandardScaler.fit([normal], channels)
    spec = score or ScoreSpec(score_kind)
    pred = predict_stream(model, scaler.transform(normal), spec)
    threshold = (threshold or QuantileThreshold(0.9)).fit(pred.score)
    data_config = {"time_column": "ts", "channels": list(channels), "label_column": None,
                   "separator": ",", "train_rows": train_rows}
    return Bundle(model=model, net_config=model.net_config, model_name=family,
                  channels=list(channels), scaler=scaler, per_stream_scaling=per_stream,
                  threshold=threshold, score_kind=spec.kind, data_config=data_config,
                  score=spec.to_dict() if score is not None else None, threshold_scope=scope)


@pytest.fixture(params=["kalman", "mamba"])
def family(request) -> str:
    return request.param
