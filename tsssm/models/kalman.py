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
stationary covariance on AR states; or, once fitted (``fit_em(..., fit_prior=True)``), a full
mean and covariance per channel estimated as the distribution of the state where a training
segment starts, optionally with a diffuse level (``diffuse_level``: forecasts then shift with
the context instead of being drawn toward the training level).

Fitting without Lightning (:func:`fit_forecaster`, ``model.fit=em`` / ``multistep``): EM on
segments of the training streams (closed-form updates of variances, damping and AR
coefficients; a linear E-step whose cost does not grow with the number of segments), an
optional L-BFGS polish of the exact likelihood, the multi-step criterion (the parameters and
prior that minimise the mean squared forecast error over a horizon on the training windows), and
the calibration of the forecast variance per lead time. Forecasts from a fully observed context
take a linear fast path (gains computed once per channel, one matrix product for all windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError
from tsssm.kalman.filter import METHODS, FilterResult, filtered_last, kalman_filter
from tsssm.kalman.fit import (
    StructuralEMResult,
    WindowMoments,
    fit_structural_em,
    fit_structural_lbfgs,
    fit_structural_multistep,
    forecast_maps,
    multistep_mse,
    window_moments,
)
from tsssm.kalman.forecast import forecast_observations
from tsssm.kalman.models import StructuralModel
from tsssm.kalman.smoother import SmootherResult, rts_smoother
from tsssm.kalman.ssm import LinearGaussianSSM, step_loop_threads, symmetrize
from tsssm.kalman.window import window_applies, window_predictions
from tsssm.models.base import Gaussian

ALLOWED_COMPONENTS = ("level", "trend", "damped", "seasonal", "ar")
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
        method: Literal["sequential", "parallel", "fused", "window"] = "sequential",
        dtype: Literal["float64", "float32"] = "float64",
        prior_scale: float = 10.0,
        diffuse_level: bool = False,
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
        if method not in ("sequential", "parallel", "fused", "window") or method not in METHODS:
            raise ConfigError(
                f"model.method must be sequential, parallel, fused or window, got {method!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(f"model.dtype must be float64 or float32, got {dtype!r}")
        self.n_channels = n_channels
        self.method = method
        self.compute_dtype = _DTYPES[dtype]
        self.diffuse_level = bool(diffuse_level)
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
        # a fitted prior (fit_em(..., fit_prior=True)): the full covariance of the first state
        self.register_buffer("prior_cov", torch.eye(n, dtype=self.compute_dtype).repeat(
            n_channels, 1, 1))
        self.register_buffer("prior_fitted", torch.tensor(False))
        # forecast variance calibration (calibrate()): a factor per channel and lead, (C, H);
        # empty until calibrated; leads past its end use its last column
        self.register_buffer("var_scale", torch.ones(n_channels, 0, dtype=self.compute_dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # bundles saved before these buffers existed: keep the defaults
        for name in ("prior_cov", "prior_fitted", "var_scale"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).clone()
        saved = state_dict[prefix + "var_scale"]
        if saved.shape != self.var_scale.shape:  # calibrated for another horizon
            self.var_scale = torch.ones_like(saved, dtype=self.compute_dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            if bool(self.prior_fitted):
                P0 = self.prior_cov.to(self.compute_dtype) + torch.diag_embed(
                    self._prior_extra())
            else:
                _, P0 = st.default_prior(theta, F, Q, variance=st.prior_scale * self.prior_var)
            m0 = self.prior_mean.to(self.compute_dtype)
        else:  # the first step of this call is the step after the state's
            m, P = state.mean.to(self.compute_dtype), state.cov.to(self.compute_dtype)
            m0 = (F @ m.unsqueeze(-1)).squeeze(-1)
            P0 = symmetrize(F @ P @ F.mT + Q)
        return st.to_ssm(theta, m0, P0)

    def _prior_extra(self) -> Tensor:
        """(C, n) variance added to the fitted prior's diagonal: with ``diffuse_level``, a
        practically infinite one on the level (10^6, 10^3 in float32, times the channel's
        variance), so forecasts move with the data (a shift of the context shifts them
        alike) instead of being drawn toward the training level."""
        extra = torch.zeros(self.n_channels, self.structure.n_states, dtype=self.compute_dtype,
                            device=self.prior_var.device)
        if self.diffuse_level and self.structure.blocks[0].name in ("level", "trend",
                                                                   "damped_trend"):
            kappa = 1e6 if self.compute_dtype == torch.float64 else 1e3
            extra[:, 0] = kappa * self.prior_var.to(self.compute_dtype)
        return extra

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
        ssm = self.ssm(state)
        if self.method == "window" and window_applies(ssm, yk):
            # windows of a fully observed time-invariant model: a few batched ops, the same
            # numbers (tsssm.kalman.window); only what this method returns is computed
            win = window_predictions(ssm, yk)
            mean = win.predicted_obs_mean.transpose(1, 2)  # (B, T, C)
            var = win.predicted_obs_var.transpose(-1, -2).expand_as(mean)
            cov = win.filtered_cov.expand(*win.filtered_mean.shape, win.filtered_mean.shape[-1])
            return (Gaussian(mean.to(y.dtype), var.to(y.dtype)),
                    KalmanState(win.filtered_mean, cov))
        res = kalman_filter(ssm, yk, method=self.method, covariances="last")
        mean = res.predicted_obs_mean[..., 0].transpose(1, 2)  # (B, T, C)
        var = res.predicted_obs_cov[..., 0, 0].transpose(1, 2)
        new_state = KalmanState(res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :])
        return Gaussian(mean.to(y.dtype), var.to(y.dtype)), new_state

    def forecast(self, context: Tensor, horizon: int, state: KalmanState | None = None
                 ) -> Gaussian:
        """Predictive distribution (B, horizon, C) of the steps after ``context`` (B, L, C).

        A context without missing values filtered from the prior takes the linear fast path
        (:func:`tsssm.kalman.filter.filtered_last`: gains computed once per channel, one
        matrix product for all windows); the moments of the horizon come from
        :func:`tsssm.kalman.forecast.forecast_observations` (no per-window covariances).
        """
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ConfigError(f"forecast horizon must be a positive integer, got {horizon!r}")
        if context.shape[1] == 0 and state is None:
            prior = self.ssm()
            fc = _forecast_from_prior(prior, context.shape[0], horizon)
            return Gaussian(fc[0].to(context.dtype), fc[1].to(context.dtype))
        if context.shape[1] > 0 and state is None and self.method in ("sequential", "auto",
                                                                     "window"):
            ssm = self.ssm()
            mean, cov = filtered_last(ssm, self._channels_as_batch(context))
        else:
            if context.shape[1] > 0:
                _, state = self.one_step(context, state)
            mean, cov = state.mean.to(self.compute_dtype), state.cov.to(self.compute_dtype)
            ssm = self.structure.to_ssm(self.theta.to(self.compute_dtype), mean, cov)
        obs_mean, obs_cov = forecast_observations(ssm, mean, cov, horizon)
        mean = obs_mean[..., 0].transpose(1, 2)  # (B, horizon, C)
        var = obs_cov[..., 0, 0].transpose(1, 2) * self._variance_scale(horizon)
        return Gaussian(mean.to(context.dtype), var.to(context.dtype))

    def _variance_scale(self, horizon: int) -> Tensor | float:
        """(horizon, C) calibration factors of the forecast variance (1 when uncalibrated)."""
        scale = self.var_scale
        if scale.shape[1] == 0:
            return 1.0
        if scale.shape[1] < horizon:
            scale = torch.cat([scale, scale[:, -1:].expand(-1, horizon - scale.shape[1])], 1)
        return scale[:, :horizon].T.to(self.compute_dtype)

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
    def fit_em(self, ys: list[Tensor] | Tensor, n_iter: int = 50, tol: float = 1e-8,
               segment: int | None = None, fit_prior: bool = False, polish_iters: int = 0
               ) -> list[float]:
        """Fit every channel's parameters by EM (Shumway & Stoffer 1982); ``theta`` in place.

        ys: training streams, each (B_k, T_k, C) with NaN for missing entries (lengths may
        differ between the tensors). ``segment``: cut every stream into consecutive segments
        of this many steps (the remainder of a stream is a shorter segment), each filtered from
        the prior: the E-step then costs O(segment) sequential steps however long the data,
        and the prior learns where a window of that length starts. ``fit_prior``: also
        estimate the prior (mean and full covariance of the first state, per channel), which
        ``one_step``/``forecast`` from ``state=None`` then use; otherwise the prior stays the
        data-based one of :meth:`initialize`.

        E-step: filter + RTS smoother; M-step in closed form per component
        (:func:`tsssm.kalman.fit.fit_structural_em`): variances, the damping factor and AR
        coefficients (a regression of the state on its previous value), the observation
        variance. Missing y are simply not in the complete-data likelihood (exact EM). Variances
        are floored at 1e-12 times the channel's variance. With a fitted prior (or none of the
        prior depending on the parameters) every iteration increases the likelihood; without
        ``fit_prior`` an AR component's stationary prior moves with its coefficients, which EM
        does not account for (the likelihood may then dip slightly).

        ``polish_iters``: then continue with up to this many L-BFGS evaluations of the exact
        likelihood (parameters and, with ``fit_prior``, the prior;
        :func:`tsssm.kalman.fit.fit_structural_lbfgs`): EM climbs fast at first and slowly
        near the optimum, L-BFGS the other way round.

        Returns the total log-likelihood (summed over segments and channels) before each
        iteration and after the last (then after each L-BFGS evaluation); EM stops early when
        an iteration gains less than ``tol`` relative to the log-likelihood.
        """
        if isinstance(ys, Tensor):
            ys = [ys]
        if not ys:
            raise DataError("fit_em needs at least one training stream")
        if segment is not None and (int(segment) != segment or segment < 2):
            raise ConfigError(f"model.em_segment must be an integer >= 2, got {segment!r}")
        if any(b.name == "arma" for b in self.structure.blocks):  # pragma: no cover
            raise ConfigError("model.fit=em has no update for an MA part; use model.fit=mle")
        groups = [self._channels_as_batch(y) for y in ys]  # each (B, C, T, 1)
        if segment is not None:
            groups = _segments(groups, int(segment))
        vals = torch.cat([g.transpose(0, 1).reshape(self.n_channels, -1) for g in groups], 1)
        ok = ~torch.isnan(vals)
        n_ok = ok.sum(1)
        if bool((n_ok == 0).any()):
            empty = (n_ok == 0).nonzero().flatten().tolist()
            raise DataError(f"channels {empty} have no observed value in the training streams")
        mean = torch.where(ok, vals, 0).sum(1) / n_ok
        var = (torch.where(ok, vals - mean[:, None], 0) ** 2).sum(1) / n_ok
        floor = 1e-12 * torch.where(var > 0, var, torch.ones_like(var))  # (C,)
        theta = self.theta.detach().to(self.compute_dtype)
        ssm = self.ssm()
        st, prior_var = self.structure, self.prior_var.to(self.compute_dtype)

        def default_prior(th: Tensor) -> tuple[Tensor, Tensor]:  # as in ssm(), from theta
            return ssm.m0, st.default_prior(th, variance=st.prior_scale * prior_var)[1]

        extra = self._prior_extra() if fit_prior or bool(self.prior_fitted) else None
        P0 = ssm.P0 - torch.diag_embed(extra) if extra is not None else ssm.P0
        out = fit_structural_em(
            st, theta, groups, ssm.m0, P0, n_iter=n_iter, tol=tol, estimate_prior=fit_prior,
            prior_of=None if fit_prior or bool(self.prior_fitted) else default_prior,
            prior_extra=extra, floor=floor, method=self.method)
        history = list(out.history)
        if polish_iters:
            out = fit_structural_lbfgs(
                st, out.theta, groups, out.m0, out.P0, fit_prior=fit_prior,
                prior_of=None if fit_prior or bool(self.prior_fitted) else default_prior,
                prior_extra=extra, max_iter=int(polish_iters))
            history += out.history
        self._store_fit(out, fit_prior)
        return history

    @torch.no_grad()
    def _store_fit(self, out: StructuralEMResult, fit_prior: bool) -> None:
        """Take a fit's parameters (and, with ``fit_prior``, its prior mean and covariance)."""
        self.theta.copy_(out.theta.to(self.theta.dtype))
        if fit_prior:
            self.prior_mean.copy_(out.m0)
            self.prior_cov.copy_(out.P0)
            self.prior_fitted.fill_(True)

    def _window_moments(self, ys: list[Tensor] | Tensor, context: int, horizon: int,
                        stride: int | None) -> WindowMoments:
        if isinstance(ys, Tensor):
            ys = [ys]
        if not ys:
            raise DataError("need at least one training stream")
        groups = [self._channels_as_batch(y) for y in ys]  # (B, C, T, 1)
        if stride is None:  # about 8,000 windows: their overlap makes more of them redundant
            total = sum(g.shape[0] * max(g.shape[2] - context - horizon + 1, 0) for g in groups)
            stride = max(1, total // 8000)
        mom = window_moments(groups, context, horizon, stride)
        if bool((mom.count == 0).any()):
            empty = (mom.count == 0).nonzero().flatten().tolist()
            raise DataError(
                f"channels {empty} have no complete window of {context} + {horizon} steps in "
                f"the training streams"
            )
        return mom

    def fit_multistep(self, ys: list[Tensor] | Tensor, context: int, horizon: int, *,
                      stride: int | None = None, fit_prior: bool = True, max_iter: int = 200
                      ) -> list[float]:
        """Fit the parameters (and, with ``fit_prior``, the prior) so that forecasts from
        ``context`` steps have the least mean squared error over the next ``horizon`` steps of
        the training windows (every ``stride``-th start; default: about 8,000 windows), the
        multi-step ("amse") criterion of exponential smoothing
        (:func:`tsssm.kalman.fit.fit_structural_multistep`). The observation variance stays
        (the criterion does not see the overall scale of the variances): start from a
        likelihood fit (``fit_em``) and call :meth:`calibrate` for the forecast variance.
        Returns the criterion (mean over leads and channels) after each L-BFGS evaluation.
        """
        mom = self._window_moments(ys, context, horizon, stride)
        theta = self.theta.detach().to(self.compute_dtype)
        ssm = self.ssm()
        extra = self._prior_extra() if fit_prior or bool(self.prior_fitted) else None
        P0 = ssm.P0 - torch.diag_embed(extra) if extra is not None else ssm.P0
        out = fit_structural_multistep(self.structure, theta, mom, ssm.m0, P0, context,
                                       horizon, fit_prior=fit_prior, prior_extra=extra,
                                       max_iter=max_iter)
        self._store_fit(out, fit_prior)
        return out.history

    @torch.no_grad()
    def calibrate(self, ys: list[Tensor] | Tensor, context: int, horizon: int, *,
                  stride: int | None = None) -> Tensor:
        """Calibrate the forecast variance on windows of ``ys`` (e.g. the training streams):
        per channel and lead k, the factor that makes the model's variance equal to the mean
        squared error of its forecasts from ``context`` steps at lead k over the windows.
        Returns the factors (C, horizon); ``forecast`` applies them from then on.

        A forecast variance from the model alone is only right when the model is: these
        structural models are fitted to be good forecasters, not true descriptions of the
        data (e.g. a random-walk level makes long-horizon variances grow without bound).
        """
        mom = self._window_moments(ys, context, horizon, stride)
        self.var_scale = torch.ones(self.n_channels, 0, dtype=self.compute_dtype)
        ssm = self.ssm()
        mse = multistep_mse(forecast_maps(ssm, context, horizon, ssm.F.shape[:-2]), mom)
        probe = torch.zeros(1, context, self.n_channels, dtype=self.compute_dtype)
        model_var = self.forecast(probe, horizon).var[0].T.to(self.compute_dtype)  # (C, H)
        scale = (mse / model_var).clamp_min(1e-6)
        self.var_scale = scale
        return scale

    def smooth(self, y: Tensor) -> Gaussian:
        """Smoothed signal E[H x_t | all y] and its variance, (B, T, C) (offline analysis)."""
        sm = self.smooth_states(y)
        h = self.structure.natural_observation_row(self.compute_dtype, y.device)
        mean = (sm.mean @ h).transpose(1, 2)
        var = (h @ sm.cov @ h).transpose(1, 2)
        return Gaussian(mean.to(y.dtype), var.clamp_min(0).to(y.dtype))


class FitReport(NamedTuple):
    """What :func:`fit_forecaster` did: histories and seconds."""

    loglik: list[float]  # total log-likelihood of every EM iteration (and L-BFGS evaluation)
    multistep_mse: list[float]  # the multi-step criterion after every evaluation (or [])
    seconds: float


def fit_forecaster(net: KalmanForecaster, streams: list[Tensor] | Tensor, *, fit: str = "em",
                   em_iters: int = 50, em_segment: int | None = None, em_prior: bool = False,
                   em_polish: int = 0, multistep_iters: int = 200, calibrate: bool = False,
                   context: int | None = None, horizon: int | None = None) -> FitReport:
    """The closed-form fitting of ``model.fit=em`` / ``multistep`` on training streams
    (B_k, T_k, C): EM (``em_iters`` iterations, segments of ``em_segment`` steps, the prior
    too with ``em_prior``, then ``em_polish`` L-BFGS evaluations); with ``fit="multistep"``
    the multi-step criterion over ``horizon`` steps from ``context`` steps; with
    ``calibrate`` the forecast-variance calibration on the same windows. Call
    :meth:`KalmanForecaster.initialize` first."""
    import time

    if fit not in ("em", "multistep"):
        raise ConfigError(f"model.fit={fit!r}: this fitting handles em and multistep")
    if (fit == "multistep" or calibrate) and (context is None or horizon is None):
        raise ConfigError("the multi-step criterion and the calibration need the context "
                          "length and the horizon")
    start = time.perf_counter()
    loglik = net.fit_em(streams, n_iter=em_iters, segment=em_segment, fit_prior=em_prior,
                        polish_iters=em_polish)
    crit: list[float] = []
    if fit == "multistep":
        crit = net.fit_multistep(streams, context, horizon, fit_prior=em_prior,
                                 max_iter=multistep_iters)
    if calibrate:
        net.calibrate(streams, context, horizon)
    return FitReport(loglik, crit, time.perf_counter() - start)


def _segments(groups: list[Tensor], length: int) -> list[Tensor]:
    """Cut streams (B, C, T, 1) into consecutive segments (G, C, length, 1) plus the remainder
    (B, C, T mod length, 1) when it has at least two steps; segments with nothing observed
    are dropped."""
    out = []
    for g in groups:
        B, C, T, _ = g.shape
        k = T // length
        if k:
            seg = g[:, :, : k * length].reshape(B, C, k, length, 1).transpose(1, 2)
            out.append(seg.reshape(B * k, C, length, 1))
        if T - k * length >= 2:
            out.append(g[:, :, k * length :])
    kept = []
    for seg in out:
        any_obs = (~torch.isnan(seg)).flatten(1).any(1)
        if bool(any_obs.any()):
            kept.append(seg[any_obs].contiguous())
    if not kept:
        raise DataError("the training streams have no observed value")
    return kept


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
