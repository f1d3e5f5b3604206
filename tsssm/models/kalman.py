"""Kalman forecaster: one structural state space model per channel (the classical baseline).

Every channel c of a stream gets its own univariate structural model (level, trend, seasonal, AR
components; :class:`tsssm.kalman.models.StructuralModel`) with its own unconstrained parameters
``theta[c]`` (an ``nn.Parameter`` of shape (C, n_params)). The channels are a batch axis of the
filter, so ``(B, T, C)`` runs as B*C independent univariate filters (sharing the covariance
recursion of a channel across streams when nothing is missing).

The Gaussian negative log-likelihood of ``one_step``'s predictions, summed over the observed
entries, is exactly the model's negative log-likelihood (prediction-error decomposition; missing
entries contribute nothing), so training this module by minimising that loss is maximum
likelihood. Numerics run in ``dtype`` (float64 by default); outputs come back in the input's
dtype.

Prior of the first state: zero (or the level of the training data, see :meth:`initialize`) with
variance ``prior_scale`` times the channel's training variance on the nonstationary states, the
stationary covariance on AR states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError, NumericalError
from tsssm.kalman.filter import METHODS, FilterResult, kalman_filter
from tsssm.kalman.forecast import forecast as kalman_forecast
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.smoother import SmootherResult, rts_smoother
from tsssm.kalman.ssm import LinearGaussianSSM, step_loop_threads, symmetrize
from tsssm.models.base import Gaussian

ALLOWED_COMPONENTS = ("level", "trend", "seasonal", "ar")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class KalmanState(NamedTuple):
    """Filtered state after the last step of a ``one_step`` call (per stream and channel)."""

    mean: Tensor  # (B, C, n)
    cov: Tensor  # (B, C, n, n)


class KalmanForecaster(nn.Module):
    """Per-channel structural Kalman model implementing tsssm.models.base.Forecaster."""

    training_input = "streams"

    def __init__(
        self,
        n_channels: int,
        components: Sequence[str] = ("level", "trend"),
        seasonal_period: int | None = None,
        seasonal_kind: Literal["dummy", "trig"] = "trig",
        seasonal_harmonics: int | None = None,
        ar_order: int = 1,
        method: Literal["sequential", "parallel", "fused"] = "sequential",
        dtype: Literal["float64", "float32"] = "float64",
        prior_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ConfigError(f"model.n_channels must be a positive integer, got {n_channels!r}")
        comps = tuple(str(c) for c in components)
        bad = [c for c in comps if c not in ALLOWED_COMPONENTS]
        if bad or not comps:
            raise ConfigError(
                f"model.components has {bad or 'nothing'}; allowed: "
                f"{', '.join(ALLOWED_COMPONENTS)}"
            )
        if method not in ("sequential", "parallel", "fused") or method not in METHODS:
            raise ConfigError(
                f"model.method must be sequential, parallel or fused, got {method!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(f"model.dtype must be float64 or float32, got {dtype!r}")
        self.n_channels = n_channels
        self.method = method
        self.compute_dtype = _DTYPES[dtype]
        self.structure = StructuralModel(
            components=comps,
            seasonal_period=seasonal_period,
            seasonal_kind=seasonal_kind,
            seasonal_harmonics=seasonal_harmonics,
            ar_order=ar_order,
            prior_scale=prior_scale,
        )
        k, n = self.structure.n_params, self.structure.n_states
        # log-variances start at unit observation noise and small state noise (initialize()
        # replaces them with data-based values)
        theta = torch.full((n_channels, k), -4.0, dtype=self.compute_dtype)
        for j, name in enumerate(self.structure.param_names):
            if name == "log_var_obs":
                theta[:, j] = -1.0
            elif name.startswith("pacf"):
                theta[:, j] = 0.0
        self.theta = nn.Parameter(theta)
        self.register_buffer("prior_mean", torch.zeros(n_channels, n, dtype=self.compute_dtype))
        self.register_buffer("prior_var", torch.ones(n_channels, dtype=self.compute_dtype))

    # ------------------------------------------------------------------------------ helpers
    @property
    def param_names(self) -> tuple[str, ...]:
        return self.structure.param_names

    def ssm(self, state: KalmanState | None = None) -> LinearGaussianSSM:
        """The per-channel models: batch (C,) (or (B, C) when continuing from ``state``)."""
        theta = self.theta.to(self.compute_dtype)
        st = self.structure
        F, Q = st.transition(theta)
        if state is None:
            _, P0 = st.default_prior(theta, F, Q, variance=st.prior_scale * self.prior_var)
            m0 = self.prior_mean.to(self.compute_dtype)
        else:  # the first step of this call is the step after the state's
            m, P = state.mean.to(self.compute_dtype), state.cov.to(self.compute_dtype)
            m0 = (F @ m.unsqueeze(-1)).squeeze(-1)
            P0 = symmetrize(F @ P @ F.mT + Q)
        return st.to_ssm(theta, m0, P0)

    def _channels_as_batch(self, y: Tensor) -> Tensor:
        """(B, T, C) -> (B, C, T, 1) in the compute dtype."""
        if y.ndim != 3 or y.shape[-1] != self.n_channels:
            raise DataError(
                f"expected y shaped (B, T, C={self.n_channels}), got {tuple(y.shape)}"
            )
        if torch.isinf(y).any():
            raise DataError("y contains +-inf; mark missing values with NaN")
        return y.to(self.compute_dtype).transpose(1, 2).unsqueeze(-1)

    # ------------------------------------------------------------------------------ protocol
    def one_step(self, y: Tensor, state: KalmanState | None = None
                 ) -> tuple[Gaussian, KalmanState]:
        """One-step-ahead predictive distribution of every y[:, t] (B, T, C), and the state."""
        yk = self._channels_as_batch(y)
        if y.shape[1] == 0:
            raise DataError("y has no time steps")
        res = kalman_filter(self.ssm(state), yk, method=self.method, covariances="last")
        mean = res.predicted_obs_mean[..., 0].transpose(1, 2)  # (B, T, C)
        var = res.predicted_obs_cov[..., 0, 0].transpose(1, 2)
        new_state = KalmanState(res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :])
        return Gaussian(mean.to(y.dtype), var.to(y.dtype)), new_state

    def forecast(self, context: Tensor, horizon: int, state: KalmanState | None = None
                 ) -> Gaussian:
        """Predictive distribution (B, horizon, C) of the steps after ``context`` (B, L, C)."""
        if context.shape[1] > 0:
            _, state = self.one_step(context, state)
        elif state is None:
            prior = self.ssm()
            fc = _forecast_from_prior(prior, context.shape[0], horizon)
            return Gaussian(fc[0].to(context.dtype), fc[1].to(context.dtype))
        ssm = self.structure.to_ssm(self.theta.to(self.compute_dtype), state.mean, state.cov)
        fc = kalman_forecast(ssm, (state.mean, state.cov), horizon)
        mean = fc.obs_mean[..., 0].transpose(1, 2)  # (B, horizon, C)
        var = fc.obs_cov[..., 0, 0].transpose(1, 2)
        return Gaussian(mean.to(context.dtype), var.to(context.dtype))

    # ------------------------------------------------------------------------------ extras
    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Data-based parameters and prior from training streams y (B, T, C) (NaN allowed).

        Per channel: moment estimates from the first differences (see
        StructuralModel.initial_params), averaged over the streams; the prior level is the mean
        of the streams' first observed values, the prior variance the channel's variance.
        """
        yk = self._channels_as_batch(y)  # (B, C, T, 1)
        observed = ~torch.isnan(yk)
        has_data = observed.any(dim=2)[..., 0]  # (B, C)
        if not bool(has_data.any(0).all()):
            empty = (~has_data.any(0)).nonzero().flatten().tolist()
            raise DataError(f"channels {empty} have no observed value in the training streams")
        theta = torch.zeros_like(self.theta, dtype=self.compute_dtype)
        prior_mean = torch.zeros_like(self.prior_mean)
        prior_var = torch.ones_like(self.prior_var)
        for c in range(self.n_channels):
            yc = yk[has_data[:, c], c]  # (B', T, 1)
            theta[c] = self.structure.initial_params(yc).mean(0)
            m0, _ = self.structure.initial_state(theta[c].expand(yc.shape[0], -1), yc)
            prior_mean[c] = m0.mean(0)
            vals = yc[~torch.isnan(yc)]
            prior_var[c] = vals.var().clamp_min(1e-8) if vals.numel() > 1 else 1.0
        self.theta.copy_(theta.to(self.theta.dtype))
        self.prior_mean.copy_(prior_mean)
        self.prior_var.copy_(prior_var)

    def log_likelihood(self, y: Tensor, per_channel: bool = False) -> Tensor:
        """Exact log-likelihood of streams y (B, T, C): (B,) or (B, C) with ``per_channel``."""
        res = kalman_filter(self.ssm(), self._channels_as_batch(y), method=self.method,
                            covariances="last")
        ll = res.loglik  # (B, C)
        return ll if per_channel else ll.sum(-1)

    def smooth_states(self, y: Tensor) -> SmootherResult:
        """Smoothed states of every stream and channel: mean (B, C, T, n), cov, lag-one cov."""
        ssm = self.ssm()
        res = kalman_filter(ssm, self._channels_as_batch(y), method=self.method)
        return self._smooth(ssm, res)

    def _smooth(self, ssm: LinearGaussianSSM, res: FilterResult) -> SmootherResult:
        return rts_smoother(ssm, res, method="parallel" if self.method == "parallel" else
                            "sequential")

    # ------------------------------------------------------------------------------ EM
    def _em_layout(self) -> tuple[list[int], Tensor, int]:
        """Which diagonal entries of Q each state-noise parameter drives.

        Returns (indices of the state-noise parameters in theta, a (k, n) 0/1 mask whose row j
        marks the entries S_j of diag(Q) that parameter j sets, the index of log_var_obs).
        Found by perturbing each parameter, so it holds for any variance-only component.
        """
        names = self.param_names
        other = [nm for nm in names if not nm.startswith("log_var_")]
        if other or "log_var_arma" in names:
            raise ConfigError(
                f"model.fit=em needs a model whose parameters are all variances (components "
                f"level, trend, seasonal); {self.structure.components} has "
                f"{', '.join(other + [nm for nm in names if nm == 'log_var_arma'])}: use "
                f"model.fit=mle"
            )
        obs = names.index("log_var_obs")
        noise = [j for j in range(len(names)) if j != obs]
        base = torch.zeros(1, len(names), dtype=torch.float64)
        _, Q0 = self.structure.transition(base)
        rows = []
        for j in noise:
            bumped = base.clone()
            bumped[0, j] = 1.0
            _, Qj = self.structure.transition(bumped)
            changed = (Qj[0] - Q0[0]).abs() > 0
            if bool((changed & ~torch.eye(Q0.shape[-1], dtype=torch.bool)).any()):
                raise ConfigError(  # a correlated state noise has no per-entry M-step here
                    f"model.fit=em: parameter {names[j]} drives off-diagonal entries of Q; "
                    f"use model.fit=mle"
                )
            rows.append(torch.diagonal(changed).to(torch.float64))
        mask = torch.stack(rows) if rows else torch.zeros(0, Q0.shape[-1], dtype=torch.float64)
        if bool((mask.sum(0) > 1).any()) or bool((mask.sum(1) == 0).any()):
            raise ConfigError("model.fit=em: the state-noise parameters do not map one-to-one "
                              "onto diagonal entries of Q; use model.fit=mle")
        return noise, mask, obs

    def fit_em(self, ys: list[Tensor], n_iter: int = 50, tol: float = 1e-8) -> list[float]:
        """Fit the variances of every channel by EM (Shumway & Stoffer 1982); ``theta`` in place.

        ys: training streams, each (B_k, T_k, C) with NaN for missing entries (lengths may
        differ between the tensors). E-step: filter + RTS smoother with the current parameters
        and the model's prior (as in ``one_step(y, state=None)``). M-step, per channel, in closed
        form: the variance q_j of state-noise parameter j, which drives the diagonal entries S_j
        of Q, is the mean over transitions t = 1..T-1 and over S_j of
        E[(x_t - F x_{t-1})_i^2 | y]; the observation variance is the mean over observed steps
        of E[(y_t - H x_t)^2 | y]. The complete data are (states, observed y): a missing y is
        simply not in the model's complete-data likelihood, which is exact EM (the likelihood
        never decreases) and converges faster than also imputing the missing y (whose update
        mixes in the current R). The prior of the first state does not depend on the variances,
        so it needs no update. Variances are floored at 1e-12 times the channel's variance.

        Only for models whose parameters are all variances (level, trend, seasonal); raises
        ConfigError otherwise. Returns the total log-likelihood (summed over streams and
        channels) before each iteration and after the last; stops early when an iteration
        gains less than ``tol`` relative to the log-likelihood.
        """
        noise, mask, obs_idx = self._em_layout()
        if isinstance(ys, Tensor):
            ys = [ys]
        if not ys:
            raise DataError("fit_em needs at least one training stream")
        dt = self.compute_dtype
        groups = [self._channels_as_batch(y) for y in ys]  # each (B, C, T, 1)
        dev = groups[0].device
        mask = mask.to(dt).to(dev)  # (k, n)
        h = self.structure.natural_observation_row(dt, dev)  # (n,)
        # data variance per channel, for the floor
        vals = torch.cat([g.transpose(0, 1).reshape(self.n_channels, -1) for g in groups], 1)
        ok = ~torch.isnan(vals)
        n_ok = ok.sum(1)
        if bool((n_ok == 0).any()):
            empty = (n_ok == 0).nonzero().flatten().tolist()
            raise DataError(f"channels {empty} have no observed value in the training streams")
        v0 = torch.where(ok, vals, 0)
        mean = v0.sum(1) / n_ok
        var = (torch.where(ok, vals - mean[:, None], 0) ** 2).sum(1) / n_ok
        floor = 1e-12 * torch.where(var > 0, var, torch.ones_like(var))  # (C,)

        history: list[float] = []
        with torch.no_grad():
            for it in range(n_iter + 1):
                ssm = self.ssm()
                results = [kalman_filter(ssm, g, method=self.method) for g in groups]
                total = sum(float(r.loglik.sum()) for r in results)
                if not math.isfinite(total):
                    raise NumericalError(
                        f"fit_em: the log-likelihood is not finite at iteration {it}; rescale "
                        f"the data or start from other parameters (initialize())"
                    )
                history.append(total)
                if it == n_iter:
                    break
                if it > 0 and total - history[-2] <= tol * abs(total):
                    break
                self._em_update(ssm, groups, results, noise, mask, obs_idx, h, floor)
        return history

    def _em_update(self, ssm: LinearGaussianSSM, groups: list[Tensor],
                   results: list[FilterResult], noise: list[int], mask: Tensor, obs_idx: int,
                   h: Tensor, floor: Tensor) -> None:
        """One M-step from the smoothed statistics of every group (see :meth:`fit_em`)."""
        C, n = self.n_channels, ssm.F.shape[-1]
        F = ssm.F  # (C, n, n)
        w2 = F.new_zeros(C, n)  # sum over transitions of E[w_t w_t'] diagonal, per channel
        n_trans = 0
        e2 = F.new_zeros(C)  # sum over observed steps of E[(y_t - H x_t)^2]
        n_obs = F.new_zeros(C)
        for g, res in zip(groups, results):
            sm = self._smooth(ssm, res)
            m, P = sm.mean, sm.cov  # (B, C, T, n), (B, C, T, n, n)
            B, _, T, _ = m.shape
            if T > 1:
                # w_t = x_t - F x_{t-1}, t = 1..T-1: mean part plus covariance part, summed
                # over streams and steps before the (small) products with F
                Fb = F.unsqueeze(1)  # (C, 1, n, n) against (B, C, T-1, n, n)
                e = m[..., 1:, :] - (Fb @ m[..., :-1, :].unsqueeze(-1)).squeeze(-1)
                sP1 = P[..., 1:, :, :].sum((0, 2))  # (C, n, n)
                sP0 = P[..., :-1, :, :].sum((0, 2))
                sL = sm.lag_one_cov.sum((0, 2))  # sum Cov[x_t, x_{t-1}]
                w2 += ((e * e).sum((0, 2)) + torch.diagonal(sP1, dim1=-2, dim2=-1)
                       - 2 * (F * sL).sum(-1) + ((F @ sP0) * F).sum(-1))
                n_trans += B * (T - 1)
            o = res.observed[..., 0]  # (B, C, T)
            y0 = torch.where(o, g[..., 0], 0)
            resid = y0 - m @ h
            hPh = ((P @ h) * h).sum(-1)  # (B, C, T)
            e2 += torch.where(o, resid * resid + hPh, 0).sum((0, 2))
            n_obs += o.sum((0, 2)).to(e2.dtype)
        theta = self.theta.detach().to(self.compute_dtype).clone()
        if n_trans > 0 and noise:
            q = (w2 @ mask.T) / (mask.sum(1) * n_trans)  # (C, k): tied entries averaged
            theta[:, noise] = torch.maximum(q, floor[:, None]).log()
        r = torch.maximum(e2 / n_obs.clamp_min(1), floor).log()
        theta[:, obs_idx] = torch.where(n_obs > 0, r, theta[:, obs_idx])
        self.theta.copy_(theta.to(self.theta.dtype))

    def smooth(self, y: Tensor) -> Gaussian:
        """Smoothed signal E[H x_t | all y] and its variance, (B, T, C) (offline analysis)."""
        sm = self.smooth_states(y)
        h = self.structure.natural_observation_row(self.compute_dtype, y.device)
        mean = (sm.mean @ h).transpose(1, 2)
        var = (h @ sm.cov @ h).transpose(1, 2)
        return Gaussian(mean.to(y.dtype), var.clamp_min(0).to(y.dtype))


@step_loop_threads()
def _forecast_from_prior(prior: LinearGaussianSSM, B: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Observation moments (B, horizon, C) when there is no context: step 1 is the prior."""
    m, P = prior.m0, prior.P0  # (C, n), (C, n, n)
    means, variances = [], []
    for k in range(horizon):
        if k > 0:
            m = (prior.F @ m.unsqueeze(-1)).squeeze(-1)
            P = symmetrize(prior.F @ P @ prior.F.mT + prior.Q)
        means.append((prior.H @ m.unsqueeze(-1))[..., 0, 0])
        variances.append((prior.H @ P @ prior.H.mT + prior.R)[..., 0, 0])
    mean = torch.stack(means, -1).T.unsqueeze(0).expand(B, horizon, -1)
    var = torch.stack(variances, -1).T.unsqueeze(0).expand(B, horizon, -1)
    return mean, var
