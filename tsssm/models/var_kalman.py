"""Multivariate Kalman detector: a VAR(p) of all channels around a frozen mean, read through
observation noise, with a full noise covariance across channels.

Model (C channels, state ``x_t = [u_t, u_{t-1}, ..., u_{t-p+1}]`` of deviations from the mean)::

    u_t = A_1 u_{t-1} + ... + A_p u_{t-p} + w_t,   w_t ~ N(0, Q)      Q full (C, C)
    y_t = mu + u_t + v_t,                           v_t ~ N(0, R)      R diagonal

i.e. a VARMA(p, p)-like process: strongly correlated sensors (SKAB's pump: current, pressure, flow)
share one noise covariance, so the innovation covariance ``H P H' + R`` of the filter is full and
the joint one-step predictive distribution (``Gaussian.cov``) scores a fault as a break of the
channels' relations, not only as a large value.

Why this detects what a local-level model misses: ``mu`` is the normal operating point, fitted on
training rows and then **frozen**: nothing in the state can follow a fault's level shift, so the
innovations stay biased for as long as the fault lasts (a structural model's level absorbs the
shift after a few steps and its innovations spike only at the onset). The windowed ``"shift"``
score (tsssm.anomaly.scores) adds these biased innovations up.

Fitting: ``initialize`` sets ``mu`` to the training mean and the coefficients to the least-squares
VAR(p) fit; then maximum likelihood (the Gaussian NLL of ``one_step`` with the full covariance is
exactly the filter's negative log-likelihood, so the Lightning task's loss is the MLE objective).
The noise covariance is parametrised by its Cholesky factor (log-diagonal), the observation
variances by their logs. The prior of the first state is the stationary covariance of the
least-squares VAR (fixed at ``initialize``; it only affects the first few steps).

Numerics run in ``dtype`` (float64 by default) through :mod:`tsssm.kalman`; outputs come back in
the input's dtype.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError
from tsssm.kalman.filter import kalman_filter
from tsssm.kalman.forecast import forecast as kalman_forecast
from tsssm.kalman.models import stationary_covariance
from tsssm.kalman.ssm import LinearGaussianSSM, symmetrize
from tsssm.models.base import Gaussian

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: relative jitter on the noise covariance: keeps it positive definite however small it gets
_JITTER = 1e-9


class VARKalmanState(NamedTuple):
    """Filtered state after the last step of a ``one_step`` call."""

    mean: Tensor  # (B, n)
    cov: Tensor  # (B, n, n)


def _lagged(y: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Design (rows, C*order) of lags 1..order and targets (rows, C) of one stream (T, C),
    keeping rows where the target and every lag are observed."""
    T, C = y.shape
    if order >= T:
        return np.zeros((0, C * order)), np.zeros((0, C))
    X = np.concatenate([y[order - k - 1 : T - k - 1] for k in range(order)], axis=1)
    Y = y[order:]
    ok = ~(np.isnan(X).any(1) | np.isnan(Y).any(1))
    return X[ok], Y[ok]


class VARKalmanForecaster(nn.Module):
    """VAR(p) + observation noise, full covariance (tsssm.models.base.Forecaster)."""

    training_input = "streams"

    def __init__(
        self,
        n_channels: int,
        order: int = 1,
        obs_noise: bool = True,
        method: Literal["sequential", "parallel", "loop"] = "sequential",
        dtype: Literal["float64", "float32"] = "float64",
    ) -> None:
        super().__init__()
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ConfigError(f"model.n_channels must be a positive integer, got {n_channels!r}")
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
            raise ConfigError(f"model.order must be an integer in 1..8, got {order!r}")
        if method not in ("sequential", "parallel", "loop"):
            raise ConfigError(f"model.method must be sequential, parallel or loop, got {method!r}")
        if dtype not in _DTYPES:
            raise ConfigError(f"model.dtype must be float64 or float32, got {dtype!r}")
        C = n_channels
        self.n_channels = C
        self.order = order
        self.obs_noise = bool(obs_noise)
        self.method = method
        self.compute_dtype = _DTYPES[dtype]
        dt = self.compute_dtype
        coef = torch.zeros(C, C * order, dtype=dt)
        coef[:, :C] = 0.5 * torch.eye(C, dtype=dt)
        self.coef = nn.Parameter(coef)  # [A_1 ... A_p]
        self.noise_tril = nn.Parameter(torch.zeros(C, C, dtype=dt))  # strictly lower part used
        self.log_noise_diag = nn.Parameter(torch.full((C,), -0.5, dtype=dt))
        self.log_obs_var = nn.Parameter(torch.full((C,), -3.0, dtype=dt),
                                        requires_grad=self.obs_noise)
        self.register_buffer("mu", torch.zeros(C, dtype=dt))
        self.register_buffer("prior_cov", torch.eye(C * order, dtype=dt))

    # ------------------------------------------------------------------------------ matrices
    @property
    def n_states(self) -> int:
        return self.n_channels * self.order

    def noise_cov(self) -> Tensor:
        """Q (C, C) of the VAR innovations."""
        L = torch.tril(self.noise_tril, -1) + torch.diag(self.log_noise_diag.exp())
        Q = L @ L.mT
        return Q + _JITTER * torch.diagonal(Q).mean() * torch.eye(
            self.n_channels, dtype=Q.dtype, device=Q.device)

    def obs_var(self) -> Tensor:
        """diag(R) (C,); a tiny floor without observation noise."""
        if not self.obs_noise:
            return torch.full_like(self.log_obs_var, 1e-8)
        return self.log_obs_var.exp()

    def ssm(self, state: VARKalmanState | None = None) -> LinearGaussianSSM:
        """The companion-form model; its prior is the state after ``state`` (one step on)."""
        C, n, dt = self.n_channels, self.n_states, self.compute_dtype
        coef = self.coef.to(dt)
        F = torch.cat([coef, torch.eye(n - C, n, dtype=dt, device=coef.device)], 0) \
            if self.order > 1 else coef
        Q = torch.zeros(n, n, dtype=dt, device=coef.device)
        Q[:C, :C] = self.noise_cov()
        H = torch.eye(C, n, dtype=dt, device=coef.device)
        R = torch.diag(self.obs_var())
        if state is None:
            m0 = torch.zeros(n, dtype=dt, device=coef.device)
            P0 = self.prior_cov.to(dt)
        else:
            m, P = state.mean.to(dt), state.cov.to(dt)
            m0 = (F @ m.unsqueeze(-1)).squeeze(-1)
            P0 = symmetrize(F @ P @ F.mT + Q)
        return LinearGaussianSSM(F, H, Q, R, m0, P0, d=self.mu.to(dt))

    def _check(self, y: Tensor, what: str) -> Tensor:
        if y.ndim != 3 or y.shape[-1] != self.n_channels:
            raise DataError(f"expected {what} shaped (B, T, C={self.n_channels}), got "
                            f"{tuple(y.shape)}")
        if bool(torch.isinf(y).any()):
            raise DataError(f"{what} contains +-inf; mark missing values with NaN")
        return y.to(self.compute_dtype)

    # ------------------------------------------------------------------------------ protocol
    def one_step(self, y: Tensor, state: VARKalmanState | None = None
                 ) -> tuple[Gaussian, VARKalmanState]:
        """Joint one-step predictive distribution of every y[:, t] (B, T, C), and the state."""
        if y.shape[1] == 0:
            raise DataError("y has no time steps")
        yk = self._check(y, "y")
        res = kalman_filter(self.ssm(state), yk, method=self.method, covariances="last")
        cov = res.predicted_obs_cov  # (B, T, C, C)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        new_state = VARKalmanState(res.filtered_mean[..., -1, :],
                                   res.filtered_cov[..., -1, :, :].expand(
                                       y.shape[0], self.n_states, self.n_states))
        dt = y.dtype
        return Gaussian(res.predicted_obs_mean.to(dt), var.to(dt), cov.to(dt)), new_state

    def forecast(self, context: Tensor, horizon: int, state: VARKalmanState | None = None
                 ) -> Gaussian:
        """Joint predictive distribution (B, horizon, C[, C]) of the steps after ``context``."""
        if context.shape[1] > 0:
            _, state = self.one_step(context, state)
        B = context.shape[0]
        if state is None:  # no context: the prior is the first forecast step
            ssm = self.ssm()
            m = ssm.m0.expand(B, -1)
            P = ssm.P0.expand(B, -1, -1)
            # step 1 is the prior itself; forecast() applies F before its first step, so steps
            # 2..horizon are its first horizon-1 steps from the prior
            first = (ssm.H @ m.unsqueeze(-1)).squeeze(-1) + ssm.d
            fc = kalman_forecast(ssm, (m, P), horizon)
            mean = torch.cat([first.unsqueeze(1), fc.obs_mean[:, :-1]], 1)
            cov0 = symmetrize(ssm.H @ P @ ssm.H.mT + ssm.R).unsqueeze(1)
            cov = torch.cat([cov0, fc.obs_cov[:, :-1]], 1)
        else:
            ssm = self.ssm()
            fc = kalman_forecast(ssm, (state.mean.to(self.compute_dtype),
                                       state.cov.to(self.compute_dtype)), horizon)
            mean, cov = fc.obs_mean, fc.obs_cov
        dt = context.dtype
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        return Gaussian(mean.to(dt), var.to(dt), cov.to(dt))

    # ------------------------------------------------------------------------------ fitting
    @torch.no_grad()
    def initialize(self, y: Tensor | list[Tensor]) -> None:
        """The frozen mean, a least-squares VAR(p) and its noise from training streams.

        y: (B, T, C) NaN-padded streams, or a list of (B_k, T_k, C). ``mu`` is the mean of the
        observed training values; the coefficients solve the least-squares VAR on the centred
        streams (rows with any missing lag skipped; a small ridge keeps it well posed); the
        residual covariance is split into the VAR noise (95%) and the observation noise (5%, on
        the diagonal). The prior covariance of the state is the least-squares VAR's stationary
        covariance (identity when that VAR is not stable).
        """
        groups = [y] if isinstance(y, Tensor) else list(y)
        streams = [s for g in groups for s in self._check(g, "training data").cpu().numpy()]
        C, p = self.n_channels, self.order
        values = np.concatenate([s.reshape(-1, C) for s in streams])
        observed = ~np.isnan(values)
        if bool((observed.sum(0) < 2).any()):
            empty = np.flatnonzero(observed.sum(0) < 2).tolist()
            raise DataError(f"channels {empty} have fewer than two observed training values")
        mu = np.nanmean(values, axis=0)
        design = [_lagged(s - mu, p) for s in streams]
        X = np.concatenate([d[0] for d in design])
        Y = np.concatenate([d[1] for d in design])
        if len(X) <= C * p:
            raise DataError(
                f"the VAR({p}) needs more than {C * p} training rows with every lag observed; "
                f"got {len(X)}: lower model.net.order or give more training data")
        ridge = 1e-6 * np.trace(X.T @ X) / (C * p)
        coef = np.linalg.solve(X.T @ X + ridge * np.eye(C * p), X.T @ Y).T  # (C, C*p)
        resid = Y - X @ coef.T
        sigma = np.cov(resid.T).reshape(C, C) + 1e-8 * np.eye(C)
        dt = self.compute_dtype
        noise = 0.95 * sigma if self.obs_noise else sigma
        L = np.linalg.cholesky(noise)
        self.coef.copy_(torch.as_tensor(coef, dtype=dt))
        self.noise_tril.copy_(torch.as_tensor(np.tril(L, -1), dtype=dt))
        self.log_noise_diag.copy_(torch.as_tensor(np.log(np.diag(L)), dtype=dt))
        self.log_obs_var.copy_(torch.as_tensor(np.log(0.05 * np.diag(sigma) + 1e-12), dtype=dt))
        self.mu.copy_(torch.as_tensor(mu, dtype=dt))
        self.prior_cov.copy_(self._stationary_prior(values - mu))

    def _stationary_prior(self, centred: np.ndarray) -> Tensor:
        F = self.ssm().F
        n = self.n_states
        if bool((torch.linalg.eigvals(F).abs() < 0.999).all()):
            P = stationary_covariance(F, self.ssm().Q)
            if bool((torch.linalg.eigvalsh(P) > 0).all()):
                return P
        var = np.nanvar(centred, axis=0)
        return torch.diag(torch.as_tensor(np.tile(np.maximum(var, 1e-6), self.order),
                                          dtype=self.compute_dtype))[:n, :n]

    def log_likelihood(self, y: Tensor) -> Tensor:
        """Exact log-likelihood of streams y (B, T, C): (B,)."""
        return kalman_filter(self.ssm(), self._check(y, "y"), method=self.method,
                             covariances="last").loglik
