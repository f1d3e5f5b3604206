"""Seasonal-naive and last-value (random walk) forecasters.

Model (per channel): ``y[t] = y[t - period] + e[t]``, ``e ~ N(0, sigma2)``: a seasonal random walk.
The one-step prediction of ``y[t]`` is the last *observed* value in the same phase
(``y[t-period]``, or ``y[t-2*period]`` if that was missing, ...), and its variance is
``k * sigma2`` when that value lies ``k`` seasons back, as the random walk implies. ``period=1``
is the plain last-value forecaster. Before any observation in a phase, the prediction is the
training mean with variance ``prior_var + k * sigma2`` (prior_var = training variance).

``sigma2`` is fitted per channel as the mean squared ``y[t] - y[t-period]`` over training pairs
where both values are observed (the maximum-likelihood estimate of the increment variance).

The computation is vectorised over time: the series is laid out as (cycles, period) and the last
observed value of each phase is forward-filled along the cycles with a cumulative max of indices.
The state carried between chunks is the forward-filled value and its variance for the last
``period`` steps, so chunked and one-pass results agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tsssm.baselines._common import (
    MIN_VAR,
    as_series,
    as_streams,
    channel_moments,
    concat_streams,
    require_fitted,
)
from tsssm.errors import ConfigError, DataError
from tsssm.models.base import Gaussian


class SeasonalState(NamedTuple):
    """Last observed value per phase for the latest ``period`` steps, with its variance."""

    value: Tensor  # (B, P, C) float64
    var: Tensor  # (B, P, C) float64: variance of ``value`` as an estimate at its own time step


class SeasonalNaiveForecaster:
    """Seasonal random walk forecaster; ``period=1`` is the last-value forecaster."""

    name = "seasonal_naive"
    training_input = "streams"

    def __init__(self, period: int = 1) -> None:
        if int(period) != period or period < 1:
            raise ConfigError(f"{self.name} period must be a positive integer; got {period!r}")
        self.period = int(period)
        self.n_channels = 0
        self.fitted = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(period={self.period})"

    # ----------------------------------------------------------------------------------- fit
    def fit(self, y_train: Tensor | Sequence) -> SeasonalNaiveForecaster:
        """Fit prior mean/var and the increment variance per channel on ``y_train``: (B, T, C),
        or a list of streams (T_i, C) of different lengths (pairs never cross streams)."""
        streams = as_streams(y_train, "training data")
        p = self.period
        longest = max(st.shape[1] for st in streams)
        if longest <= p:
            raise DataError(
                f"training data has {longest} steps; {self.name} with period {p} needs more "
                f"than {p}"
            )
        y = concat_streams(streams)
        self.prior_mean, self.prior_var = channel_moments(y, "training data")
        # (1, sum(T_i - p), C), NaN where either side is missing
        diff = torch.cat([st[:, p:] - st[:, :-p] for st in streams if st.shape[1] > p], dim=1)
        observed = ~torch.isnan(diff)
        count = observed.sum(dim=(0, 1))
        empty = (count == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(
                f"training data: channels {empty} have no two observations {p} step(s) apart, "
                f"so {self.name} cannot estimate its variance"
            )
        sq = torch.where(observed, diff.square(), torch.zeros_like(diff)).sum(dim=(0, 1))
        self.sigma2 = (sq / count).clamp_min(MIN_VAR)  # (C,)
        self.n_channels = int(y.shape[-1])
        self.fitted = True
        return self

    # ------------------------------------------------------------------------------ predict
    def _initial_state(self, batch: int) -> SeasonalState:
        shape = (batch, self.period, self.n_channels)
        return SeasonalState(self.prior_mean.expand(shape).clone(),
                             self.prior_var.expand(shape).clone())

    def one_step(self, y: Tensor, state: Any = None) -> tuple[Gaussian, SeasonalState]:
        """One-step predictive Gaussian for every step of ``y`` (B, T, C); see the module doc."""
        require_fitted(self)
        y = as_series(y, "input series", self.n_channels)
        B, T, C = y.shape
        p = self.period
        if state is None:
            state = self._initial_state(B)
        elif not isinstance(state, SeasonalState) or tuple(state.value.shape) != (B, p, C):
            raise DataError(
                f"{self.name} state does not fit a batch of {B} streams with {C} channels "
                f"(period {p}); pass the state returned for the same streams"
            )
        sigma2 = self.sigma2.to(y.device)
        y64 = y.detach().to(torch.float64)
        # Extended series: the carried state (always "observed") followed by the new data.
        ext_val = torch.cat([state.value.to(y.device), y64], dim=1)  # (B, P+T, C)
        ext_var = torch.cat([state.var.to(y.device), torch.zeros_like(y64)], dim=1)
        ext_obs = ~torch.isnan(ext_val)
        ext_obs[:, :p] = True
        n_cyc = -(-(p + T) // p)
        pad = n_cyc * p - (p + T)
        if pad:
            ext_val = torch.cat([ext_val, ext_val.new_full((B, pad, C), float("nan"))], dim=1)
            ext_var = torch.cat([ext_var, ext_var.new_zeros((B, pad, C))], dim=1)
            ext_obs = torch.cat([ext_obs, ext_obs.new_zeros((B, pad, C))], dim=1)
        val4 = ext_val.view(B, n_cyc, p, C)
        var4 = ext_var.view(B, n_cyc, p, C)
        obs4 = ext_obs.view(B, n_cyc, p, C)
        cycle = torch.arange(n_cyc, device=y.device).view(1, n_cyc, 1, 1)
        # Index of the last observed cycle at or before each cycle, per phase (cycle 0 = state).
        src = torch.where(obs4, cycle, torch.full_like(cycle, -1)).cummax(dim=1).values
        filled_val = torch.gather(val4, 1, src)  # (B, n_cyc, P, C)
        filled_var = torch.gather(var4, 1, src) + (cycle - src).to(torch.float64) * sigma2
        filled_val = filled_val.reshape(B, n_cyc * p, C)
        filled_var = filled_var.reshape(B, n_cyc * p, C)
        # y[t] sits at extended position p + t; its prediction comes from position t (one season
        # earlier), whose filled value is the last observation in that phase.
        mean = filled_val[:, :T]
        var = filled_var[:, :T] + sigma2
        new_state = SeasonalState(filled_val[:, T:T + p].clone(), filled_var[:, T:T + p].clone())
        return Gaussian(mean.to(y.dtype), var.to(y.dtype)), new_state

    def forecast(self, context: Tensor, horizon: int, state: Any = None) -> Gaussian:
        """Predictive Gaussian (B, horizon, C) of the steps after ``context`` (B, L, C).

        Step h repeats the last observed value of its phase; its variance grows by ``sigma2``
        per season ahead (random walk).
        """
        if int(horizon) != horizon or horizon < 1:
            raise ConfigError(f"forecast horizon must be a positive integer; got {horizon!r}")
        context = as_series(context, "context", self.n_channels if self.fitted else None)
        _, st = self.one_step(context, state)
        h = torch.arange(int(horizon), device=st.value.device)
        phase = h % self.period
        seasons_ahead = (h // self.period + 1).to(torch.float64).view(1, -1, 1)
        mean = st.value[:, phase]
        var = st.var[:, phase] + seasons_ahead * self.sigma2.to(st.value.device)
        return Gaussian(mean.to(context.dtype), var.to(context.dtype))


class LastValueForecaster(SeasonalNaiveForecaster):
    """Random walk: predicts the last observed value, variance ``k * sigma2`` for ``k`` steps."""

    name = "last_value"

    def __init__(self) -> None:
        super().__init__(period=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
