"""The Kalman library: batched, differentiable linear Gaussian state space models in torch.

Pure functions over typed containers (conventions in :mod:`tsssm.kalman.ssm`)::

    ssm = LinearGaussianSSM(F, H, Q, R, m0, P0)           # x_0 ~ N(m0, P0) at the first y
    res = kalman_filter(ssm, y)                           # y (..., T, p), NaN = missing
    ll = kalman_loglik(ssm, y)                            # the log-likelihood alone
    sm = rts_smoother(ssm, res)                           # smoothed moments, lag-one covs
    fc = forecast(ssm, res, horizon=24)                   # k-step state/observation moments
    x, y = sample(ssm, T=1000)

Structural models and fitting: :mod:`tsssm.kalman.models` (StructuralModel),
:mod:`tsssm.kalman.fit` (fit_mle, fit_em, standard_errors).
"""

from tsssm.kalman.filter import (
    METHODS,
    FilterResult,
    choose_method,
    kalman_filter,
    kalman_loglik,
)
from tsssm.kalman.fit import EMResult, FitResult, fit_em, fit_mle, standard_errors
from tsssm.kalman.forecast import ForecastResult, forecast
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.sample import sample
from tsssm.kalman.smoother import SmootherResult, rts_smoother
from tsssm.kalman.ssm import LinearGaussianSSM

__all__ = [
    "METHODS",
    "EMResult",
    "FilterResult",
    "FitResult",
    "ForecastResult",
    "LinearGaussianSSM",
    "SmootherResult",
    "StructuralModel",
    "choose_method",
    "fit_em",
    "fit_mle",
    "forecast",
    "kalman_filter",
    "kalman_loglik",
    "rts_smoother",
    "sample",
    "standard_errors",
]
