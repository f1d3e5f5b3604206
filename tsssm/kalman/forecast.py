"""k-step-ahead forecasts of the state and the observation, with their covariances."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tsssm.errors import DataError, ModelError
from tsssm.kalman.filter import FilterResult
from tsssm.kalman.ssm import (
    LinearGaussianSSM,
    compact,
    n_steps,
    per_step,
    step_loop_threads,
    symmetrize,
    validate,
)


class ForecastResult(NamedTuple):
    """Predictive moments of steps T, T+1, ..., T+horizon-1 given y_0..y_{T-1}."""

    state_mean: Tensor  # (..., h, n)
    state_cov: Tensor  # (..., h, n, n)
    obs_mean: Tensor  # (..., h, p)
    obs_cov: Tensor  # (..., h, p, p)


@step_loop_threads()
def forecast(
    ssm: LinearGaussianSSM,
    start: FilterResult | tuple[Tensor, Tensor],
    horizon: int,
    u: Tensor | None = None,
) -> ForecastResult:
    """Forecast ``horizon`` steps after the last filtered step.

    start: a FilterResult (its last filtered mean and covariance are used) or a pair
    ``(mean (..., n), cov (..., n, n))`` of the state after the last observation.
    Time-varying fields of ``ssm`` must have a time axis of length ``horizon`` (entry k describes
    forecast step k+1, i.e. leads into it); u: controls (..., horizon, k) when the model has B.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ModelError(f"forecast horizon must be a positive integer, got {horizon!r}")
    validate(ssm, None, None)
    if ssm.B is not None and (u is None or u.shape[-2] != horizon):
        raise DataError(f"the model has controls: pass u (..., {horizon}, k) for the horizon")
    steps = n_steps(ssm)
    if steps is not None and steps != horizon:
        raise ModelError(
            f"the model's time-varying matrices have {steps} steps; for a forecast they must "
            f"describe the {horizon} forecast steps"
        )
    if isinstance(start, FilterResult):
        m, P = start.filtered_mean[..., -1, :], start.filtered_cov[..., -1, :, :]
    else:
        m, P = start
    fields = {name: per_step(ssm, name, horizon) for name in ("F", "Q", "H", "R", "B", "c", "d")}
    us = u.unbind(-2) if ssm.B is not None else None
    means, covs, obs_means, obs_covs = [], [], [], []
    for k in range(horizon):
        F, Q = fields["F"][k], fields["Q"][k]
        m = (F @ m.unsqueeze(-1)).squeeze(-1)
        if ssm.c is not None:
            m = m + fields["c"][k]
        if us is not None:
            m = m + (fields["B"][k] @ us[k].unsqueeze(-1)).squeeze(-1)
        P = symmetrize(F @ P @ F.mT + Q)
        H, R = fields["H"][k], fields["R"][k]
        ym = (H @ m.unsqueeze(-1)).squeeze(-1)
        if ssm.d is not None:
            ym = ym + fields["d"][k]
        means.append(m)
        covs.append(P)
        obs_means.append(ym)
        obs_covs.append(symmetrize(H @ P @ H.mT + R))

    def stack(xs: list[Tensor], core: int) -> Tensor:
        return torch.stack(torch.broadcast_tensors(*xs), dim=-1 - core)

    return ForecastResult(stack(means, 1), stack(covs, 2), stack(obs_means, 1), stack(obs_covs, 2))


def observation_powers(H: Tensor, F: Tensor, k_max: int) -> Tensor:
    """H F^k for k = 0 .. k_max: (..., k_max + 1, p, n), by doubling (the rows for
    k + 1 .. 2k are the rows for 1 .. k times F^k): O(log k_max) batched products instead of
    k_max small ones (matters most under autograd, where each op is also a backward op)."""
    batch = torch.broadcast_shapes(H.shape[:-2], F.shape[:-2])
    rows = H.expand(*batch, *H.shape[-2:]).unsqueeze(-3)  # k = 0
    Fk = F.expand(*batch, *F.shape[-2:])  # F^1
    nxt = rows @ Fk.unsqueeze(-3)  # k = 1
    rows = torch.cat([rows, nxt], -3)
    have = 1  # rows hold k = 0 .. have
    while have < k_max:
        if have > 1:
            Fk = Fk @ Fk  # F^have (have is a power of two until the last round)
        take = min(have, k_max - have)
        rows = torch.cat([rows, rows[..., 1 : take + 1, :, :] @ Fk.unsqueeze(-3)], -3)
        have += take
    return rows[..., : k_max + 1, :, :]


@step_loop_threads()
def forecast_observations(
    ssm: LinearGaussianSSM, mean: Tensor, cov: Tensor, horizon: int
) -> tuple[Tensor, Tensor]:
    """Observation moments of the ``horizon`` steps after a filtered state, for a
    time-invariant model without controls: (obs mean (..., horizon, p), obs cov (..., horizon,
    p, p)), the same as :func:`forecast`'s ``obs_mean`` / ``obs_cov`` (to rounding).

    With G_k = H F^k (built once per model, k = 0..horizon):
    ``E[y_{T+k}] = G_k m`` (one contraction for all series) and
    ``Cov[y_{T+k}] = G_k P G_k' + sum_{j<k} G_j Q G_j' + R``: no covariance recursion and no
    state covariances stored; a covariance shared by many series (e.g. a broadcast view from
    the filter) is used once. mean (..., n), cov (..., n, n).
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ModelError(f"forecast horizon must be a positive integer, got {horizon!r}")
    if ssm.time_varying or ssm.B is not None:
        raise ModelError("forecast_observations needs a time-invariant model without controls; "
                         "use forecast()")
    F, H, Q, R = ssm.F, ssm.H, ssm.Q, ssm.R
    Gs = observation_powers(H, F, horizon)  # (mb.., horizon + 1, p, n)
    G = Gs[..., 1:, :, :]
    p, n = G.shape[-2], G.shape[-1]
    G2 = G.reshape(*G.shape[:-3], horizon * p, n)
    obs_mean = torch.einsum("...kn,...n->...k", G2, mean)  # one contraction for all series
    obs_mean = obs_mean.reshape(*obs_mean.shape[:-1], horizon, p)
    if ssm.c is not None:  # the intercept's contribution: sum_{j<k} H F^j c
        Gc = (Gs[..., :-1, :, :] @ ssm.c.unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
        obs_mean = obs_mean + Gc.cumsum(-2)
    if ssm.d is not None:
        obs_mean = obs_mean + ssm.d.unsqueeze(-2)
    P = compact(cov, 2).unsqueeze(-3)  # (cb.., 1, n, n)
    noise = symmetrize(Gs[..., :-1, :, :] @ Q.unsqueeze(-3) @ Gs[..., :-1, :, :].mT)
    obs_cov = symmetrize(G @ P @ G.mT) + noise.cumsum(-3) + R.unsqueeze(-3)
    batch = torch.broadcast_shapes(obs_mean.shape[:-2], obs_cov.shape[:-3])
    return obs_mean.expand(*batch, horizon, p), obs_cov.expand(*batch, horizon, p, p)
class ObservationForecast(NamedTuple):
    """Predictive moments of the observations of forecast steps 1..horizon."""

    mean: Tensor  # (..., h, p)
    cov: Tensor  # (..., h, p, p)


def transition_powers(F: Tensor, horizon: int) -> Tensor:
    """F^1 .. F^horizon stacked: (..., n, n) -> (..., horizon, n, n), by repeated doubling
    (ceil(log2(horizon)) batched products instead of ``horizon`` sequential ones)."""
    powers = F.unsqueeze(-3)  # (..., 1, n, n): F^1
    while powers.shape[-3] < horizon:
        last = powers[..., -1:, :, :]  # F^m with m = powers so far
        powers = torch.cat([powers, powers @ last], dim=-3)  # F^1..F^m, F^(m+1)..F^(2m)
    return powers[..., :horizon, :, :]


def forecast_invariant(ssm: LinearGaussianSSM, mean: Tensor, cov: Tensor, horizon: int
                       ) -> ObservationForecast:
    """:func:`forecast_observations` for a validated time-invariant model without intercepts
    or controls, as an :class:`ObservationForecast`: the same moments as :func:`forecast`
    (``obs_mean``, ``obs_cov``) in O(log h) batched products. mean (..., n), cov (..., n, n):
    the state after the last observation (a covariance shared by many series is propagated
    once and comes back as an expanded view)."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ModelError(f"forecast horizon must be a positive integer, got {horizon!r}")
    validate(ssm, None, None)
    if ssm.time_varying or ssm.B is not None or ssm.c is not None or ssm.d is not None:
        raise ModelError("forecast_invariant needs a time-invariant model without B, c or d; "
                         "use forecast()")
    return ObservationForecast(*forecast_observations(ssm, mean, cov, horizon))
