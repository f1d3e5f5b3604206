"""The one interface every forecaster in tsssm offers (Kalman, Mamba, hybrids, baselines).

Series are laid out ``(B, T, C)``: batch of streams, time, channels, already normalised by the
fitted scaler. ``NaN`` marks a missing observation; models must accept it (the Kalman filter skips
it, neural models see it as zero plus a mask) and must never return NaN for it.

Both model families are recurrent, so a stream can be processed whole, in chunks with the
state carried between calls, or one sample at a time, with the same result:
``one_step(y[:, :k])`` followed by ``one_step(y[:, k:], state)`` equals ``one_step(y)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor


class Gaussian(NamedTuple):
    """Gaussian predictive distribution of the channels of every step.

    ``mean`` and ``var`` are always given. ``cov``, when a model provides it, is the full
    covariance of the C channels of a step (the joint predictive distribution, e.g. a
    multivariate Kalman filter's innovation covariance); ``var`` is then its diagonal. Models
    with independent channels leave it None, and every consumer treats None as
    ``diag(var)``.
    """

    mean: Tensor  # (B, T, C)
    var: Tensor  # (B, T, C), strictly positive
    cov: Tensor | None = None  # (B, T, C, C) symmetric positive definite, or None (diagonal)


@runtime_checkable
class Forecaster(Protocol):
    """A probabilistic forecaster over normalised multichannel series."""

    n_channels: int
    #: "streams": trained on whole training segments (NaN-padded); "windows": on sliding windows.
    training_input: str

    def one_step(self, y: Tensor, state: Any = None) -> tuple[Gaussian, Any]:
        """Predictive distribution of ``y[:, t]`` given ``y[:, :t]`` (and ``state``) for every t.

        y: (B, T, C) with NaN for missing entries. Returns (Gaussian (B, T, C), state after the
        last step). ``state=None`` starts from the model's prior.
        """
        ...

    def forecast(self, context: Tensor, horizon: int, state: Any = None) -> Gaussian:
        """Predictive distribution of the ``horizon`` steps after ``context`` (B, L, C).

        Returns Gaussian with mean/var (B, horizon, C).
        """
        ...
