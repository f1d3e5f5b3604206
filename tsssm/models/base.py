"""The one interface every forecaster in tsssm offers (Kalman, Mamba, hybrids, baselines).

Series are laid out ``(B, T, C)``: batch of streams, time, channels, already normalised by the
fitted scaler. ``NaN`` marks a missing observation; models must accept it (the Kalman filter skips
it, neural models see it as zero plus a mask) and must never return NaN for it.

Both model families are recurrent, so a stream can be processed whole, in chunks with the
state carried between calls, or one sample at a time, with the same result:
``one_step(y[:, :k])`` followed by ``one_step(y[:, k:], state)`` equals ``one_step(y)``.

Exogenous information (:class:`Exog`): the known inputs ``u`` of a stream (setpoints, drive
signals: the ``u`` of ``dx/dt = A x + B u``) and the real sampling intervals ``dt``. A model that
uses them says so with a class attribute ``uses_exog`` naming the fields it reads, and takes them
as the keyword argument ``exog`` of ``one_step`` and ``forecast``; every other model is called
exactly as before. Callers go through :func:`call_one_step` / :func:`call_forecast`, which pass
``exog`` only to models that declare it, so one evaluation loop serves both.
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


class Exog(NamedTuple):
    """Known side information aligned with the rows of ``y (B, T, C)``.

    ``u``: inputs (B, T', K), normalised by their own fitted scaler; never missing (held
    between changes). For ``forecast(context (B, L, C), horizon, exog=...)`` they cover the
    context and, when the future inputs are known (setpoints), the horizon: T' = L + horizon;
    T' = L means "unknown": the model holds the last input and says so.
    ``dt``: time since the previous row (B, T'), in the data's time unit (seconds for
    timestamps); at a stream's first row, the nominal (median) step. In forecasts T' = L +
    horizon gives the forecast times; T' = L means the nominal step for the horizon.
    Either field may be None.
    """

    u: Tensor | None = None  # (B, T', K)
    dt: Tensor | None = None  # (B, T')

    def slice(self, start: int, stop: int) -> Exog:
        """The rows ``start:stop`` of both fields."""
        return Exog(None if self.u is None else self.u[:, start:stop],
                    None if self.dt is None else self.dt[:, start:stop])


def uses_exog(model: Any) -> bool:
    """Whether ``model`` takes ``exog=`` (declares a non-empty ``uses_exog``)."""
    return bool(getattr(model, "uses_exog", ()))


def needs_exog(model: Any) -> bool:
    """Whether ``model`` must be given ``exog`` (it uses exog and cannot run without it: a
    model that can declares ``runs_without_exog``, e.g. a Mamba without inputs that was trained
    on an evenly spaced grid)."""
    return uses_exog(model) and not getattr(model, "runs_without_exog", False)


def call_one_step(model: Any, y: Tensor, state: Any = None, exog: Exog | None = None
                  ) -> tuple[Gaussian, Any]:
    """``model.one_step(y, state)``, with ``exog`` when the model uses it."""
    if exog is not None and uses_exog(model):
        return model.one_step(y, state, exog=exog)
    return model.one_step(y, state)


def call_forecast(model: Any, context: Tensor, horizon: int, state: Any = None,
                  exog: Exog | None = None) -> Gaussian:
    """``model.forecast(context, horizon, state)``, with ``exog`` when the model uses it."""
    if exog is not None and uses_exog(model):
        return model.forecast(context, horizon, state, exog=exog)
    if state is None:  # simple forecasters may take no state at all
        return model.forecast(context, horizon)
    return model.forecast(context, horizon, state)


def call_predict_window(model: Any, context: Tensor, horizon: int, exog: Exog | None = None
                        ) -> tuple[Gaussian, Gaussian]:
    """``model.predict_window(context, horizon)``, with ``exog`` when the model uses it."""
    if exog is not None and uses_exog(model):
        return model.predict_window(context, horizon, exog=exog)
    return model.predict_window(context, horizon)


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
