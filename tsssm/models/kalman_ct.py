"""Continuous-time Kalman forecaster: sampled at the real times, driven by the known inputs.

Two kinds of model (both :class:`tsssm.kalman.ct.ContinuousLinearSSM`, discretised exactly for
every time step by zero-order hold):

- structural (``components``): every channel gets its own continuous-time components (level,
  trend, oscillator, ou; :class:`tsssm.kalman.ct_models.CTStructuralModel`) with its own
  parameters ``theta[c]``; the channels are a batch axis of the filter. Inputs drive the
  components with a gain per channel and input.
- physical (``physical``): one model over all channels, written out as matrices of expressions
  (:class:`tsssm.kalman.physical.PhysicalModel`), in the data's physical units (the pipeline's
  scalers are applied inside, see :meth:`set_units`).

Exogenous data (:class:`tsssm.models.base.Exog`): ``dt`` (B, T) the time since the previous row
(without it every step is the training median step), ``u`` (B, T, K) the inputs (required when
the model takes inputs). ``forecast`` puts the horizon's rows at their times (``dt`` over the
context and horizon, else the median step) and filters them as unobserved samples, which is
exactly the k-step prediction; the inputs of the horizon are used when given (known setpoints),
otherwise the last input is held and a warning says so.

Fitting (:meth:`identify`): maximum likelihood over whole training streams by L-BFGS to
convergence, from several starting frequencies for an oscillator; :meth:`parameter_report`
gives the estimates with standard errors (observed information, delta method for derived
quantities such as ``oscillator.k_over_m``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError
from tsssm.kalman.ct import ContinuousLinearSSM, ct_filter, input_block, zoh
from tsssm.kalman.ct_fit import (
    Segment,
    best_start,
    ct_standard_errors,
    derived_standard_errors,
    fit_ct_mle,
)
from tsssm.kalman.ct_models import CT_COMPONENTS, CTStructuralModel
from tsssm.kalman.physical import PhysicalModel, Units
from tsssm.kalman.ssm import symmetrize
from tsssm.models.base import Exog, Gaussian

log = logging.getLogger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: predictive variances are floored here (a noise-free model may predict a sample exactly)
MIN_VAR = 1e-10


class KalmanCTState(NamedTuple):
    """Filtered state after the last row of a ``one_step`` call."""

    mean: Tensor  # (B, C, n) structural, (B, n) physical
    cov: Tensor  # (B, C, n, n) / (B, n, n)
    u_last: Tensor | None  # (B, K) the last input: held over the next step


def _plain(x: Any) -> Any:
    """Config containers (any Mapping / non-string Sequence) as dicts and lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str):
        return [_plain(v) for v in x]
    return x


class KalmanCTForecaster(nn.Module):
    """Continuous-time Kalman model implementing tsssm.models.base.Forecaster, with Exog."""

    training_input = "streams"
    uses_exog = ("u", "dt")

    def __init__(
        self,
        n_channels: int,
        components: Sequence[str] = ("level",),
        n_inputs: int = 0,
        inputs_drive: Sequence[str] | None = None,
        feedthrough: bool = False,
        physical: Mapping[str, Any] | None = None,  # used when its "A" is set
        n_starts: int = 9,
        prior_scale: float = 10.0,
        dtype: str = "float64",
    ) -> None:
        super().__init__()
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ConfigError(f"model.n_channels must be a positive integer, got {n_channels!r}")
        if dtype not in _DTYPES:
            raise ConfigError(f"model.net.dtype must be float64 or float32, got {dtype!r}")
        if not isinstance(n_inputs, int) or n_inputs < 0:
            raise ConfigError(f"model.net.n_inputs must be >= 0, got {n_inputs!r}")
        self.n_channels = n_channels
        self.n_inputs = n_inputs
        self.n_starts = int(n_starts)
        self.compute_dtype = _DTYPES[dtype]
        self._warned_hold = False
        dt = self.compute_dtype
        spec = {k: v for k, v in _plain(physical or {}).items() if v is not None}
        if spec.get("A") is not None:
            for key in ("C", "Qc", "R"):
                if spec.get(key) is None:
                    raise ConfigError(f"model.net.physical.{key} must be set with "
                                      f"model.net.physical.A")
            self.physical: PhysicalModel | None = PhysicalModel(
                **spec, n_obs=n_channels, n_inputs=n_inputs, prior_scale=prior_scale)
            self.structure: CTStructuralModel | None = None
            self.theta = nn.Parameter(self.physical.theta0(dt))
            k = max(n_inputs, 1)
            self.register_buffer("y_mean", torch.zeros(n_channels, dtype=dt))
            self.register_buffer("y_std", torch.ones(n_channels, dtype=dt))
            self.register_buffer("u_mean", torch.zeros(k, dtype=dt))
            self.register_buffer("u_std", torch.ones(k, dtype=dt))
        else:
            comps = tuple(str(c) for c in components)
            bad = [c for c in comps if c not in CT_COMPONENTS]
            if bad or not comps:
                raise ConfigError(f"model.net.components has {bad or 'nothing'}; allowed: "
                                  f"{', '.join(CT_COMPONENTS)}")
            self.physical = None
            self.structure = CTStructuralModel(
                comps, n_inputs=n_inputs, feedthrough=bool(feedthrough), prior_scale=prior_scale,
                inputs_drive=None if inputs_drive is None else tuple(inputs_drive))
            theta = torch.full((n_channels, self.structure.n_params), -2.0, dtype=dt)
            for j, name in enumerate(self.structure.param_names):
                if name.startswith(("gain_", "feedthrough_")):
                    theta[:, j] = 0.0
            self.theta = nn.Parameter(theta)
            self.register_buffer("prior_mean", torch.zeros(n_channels, dtype=dt))
            self.register_buffer("prior_var", torch.ones(n_channels, dtype=dt))
        #: the step assumed where no time steps are given (the training median)
        self.register_buffer("default_step", torch.ones((), dtype=torch.float64))

    # ------------------------------------------------------------------------------ model
    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.physical or self.structure).param_names

    def units(self) -> Units:
        return Units(self.y_mean, self.y_std, self.u_mean[: self.n_inputs],
                     self.u_std[: self.n_inputs])

    def build(self, theta: Tensor) -> ContinuousLinearSSM:
        """The continuous model at parameters theta (structural: (..., C, P); physical (..., P))
        in the standardised units the data arrive in."""
        if self.physical is not None:
            return self.physical.to_ct(theta, self.units())
        return self.structure.to_ct(theta, level0=self.prior_mean, var0=self.prior_var)

    def ct_model(self) -> ContinuousLinearSSM:
        return self.build(self.theta.to(self.compute_dtype))

    @torch.no_grad()
    def set_units(self, y_mean, y_std, u_mean=None, u_std=None) -> None:
        """The scaling the pipeline applies (per channel, per input), for a physical model:
        its matrices are in the physical units. No effect on a structural model."""
        if self.physical is None:
            return
        dt = self.compute_dtype
        self.y_mean.copy_(torch.as_tensor(y_mean, dtype=dt))
        self.y_std.copy_(torch.as_tensor(y_std, dtype=dt))
        if self.n_inputs:
            self.u_mean[: self.n_inputs] = torch.as_tensor(u_mean, dtype=dt)
            self.u_std[: self.n_inputs] = torch.as_tensor(u_std, dtype=dt)

    # ------------------------------------------------------------------------------ layout
    def _layout(self, y: Tensor, exog: Exog | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """y (B, T, C) and exog -> the filter's (y, dt, u) in the model's layout and dtype.

        structural: y (B, C, T, 1), dt (B, 1, T), u (B, 1, T, K); physical: y (B, T, C),
        dt (B, T), u (B, T, K).
        """
        if y.ndim != 3 or y.shape[-1] != self.n_channels:
            raise DataError(f"expected y shaped (B, T, C={self.n_channels}), got "
                            f"{tuple(y.shape)}")
        if torch.isinf(y).any():
            raise DataError("y contains +-inf; mark missing values with NaN")
        B, T, _ = y.shape
        cd = self.compute_dtype
        dt = None if exog is None else exog.dt
        if dt is None:
            dt = self.default_step.to(device=y.device, dtype=cd).expand(B, T)
        elif tuple(dt.shape) != (B, T):
            raise DataError(f"time steps dt have shape {tuple(dt.shape)}, expected ({B}, {T})")
        dt = dt.to(device=y.device, dtype=cd)
        u = None if exog is None else exog.u
        if self.n_inputs:
            if u is None:
                raise DataError(f"the model takes {self.n_inputs} inputs (data.inputs); pass "
                                f"them as exog=Exog(u=(B, T, {self.n_inputs}))")
            if tuple(u.shape) != (B, T, self.n_inputs):
                raise DataError(f"inputs u have shape {tuple(u.shape)}, expected "
                                f"({B}, {T}, {self.n_inputs})")
            u = u.to(device=y.device, dtype=cd)
        else:
            u = None
        y = y.to(cd)
        if self.physical is not None:
            return y, dt, u
        return (y.transpose(1, 2).unsqueeze(-1), dt.unsqueeze(1),
                None if u is None else u.unsqueeze(1))

    def _continue_from(self, ct: ContinuousLinearSSM, state: KalmanCTState, dt0: Tensor
                       ) -> ContinuousLinearSSM:
        """The model whose prior is the state carried one step dt0 forward (with the held
        input): the first row of this call follows the last row of the previous one."""
        step = zoh(ct.A, dt0, ct.Qc, input_block(ct))  # dt0 (B, 1) or (B,)
        m, P = state.mean.to(ct.A.dtype), state.cov.to(ct.A.dtype)
        m0 = (step.F @ m.unsqueeze(-1)).squeeze(-1)
        if step.G is not None:
            parts = []
            if ct.B is not None:
                u = state.u_last.to(ct.A.dtype)
                parts.append(u if self.physical is not None else u.unsqueeze(1))
            if ct.a is not None:
                parts.append(torch.ones(*m0.shape[:-1], 1, dtype=m0.dtype, device=m0.device))
            v = torch.cat([p.expand(*m0.shape[:-1], p.shape[-1]) for p in parts], -1)
            m0 = m0 + (step.G @ v.unsqueeze(-1)).squeeze(-1)
        P0 = symmetrize(step.F @ P @ step.F.mT + step.Q)
        return ct._replace(m0=m0, P0=P0)

    # ------------------------------------------------------------------------------ protocol
    def one_step(self, y: Tensor, state: KalmanCTState | None = None, *,
                 exog: Exog | None = None) -> tuple[Gaussian, KalmanCTState]:
        """One-step predictive distribution of every y[:, t] (B, T, C), and the state."""
        if y.shape[1] == 0:
            raise DataError("y has no time steps")
        yk, dt, u = self._layout(y, exog)
        ct = self.ct_model()
        if state is not None:
            ct = self._continue_from(ct, state, dt[..., 0])
        res = ct_filter(ct, yk, dt, u, covariances="last")
        if self.physical is not None:
            mean = res.predicted_obs_mean
            var = torch.diagonal(res.predicted_obs_cov, dim1=-2, dim2=-1)
        else:
            mean = res.predicted_obs_mean[..., 0].transpose(1, 2)
            var = res.predicted_obs_cov[..., 0, 0].transpose(1, 2)
        u_last = None if u is None else (u[:, -1] if self.physical is not None else u[:, 0, -1])
        new = KalmanCTState(res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :],
                            u_last)
        return Gaussian(mean.to(y.dtype), var.clamp_min(MIN_VAR).to(y.dtype)), new

    def forecast(self, context: Tensor, horizon: int, state: KalmanCTState | None = None, *,
                 exog: Exog | None = None) -> Gaussian:
        """Predictive distribution (B, horizon, C) of the rows after ``context`` (B, L, C).

        exog: dt over L + horizon rows (the forecast times; over L only: the median step), u
        over L + horizon rows (known future inputs) or L rows (the last one is held).
        """
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise DataError(f"forecast horizon must be a positive integer, got {horizon!r}")
        B, L, C = context.shape
        total = L + horizon
        u = dt = None
        if exog is not None and exog.dt is not None:
            dt = exog.dt
            if dt.shape[1] == L:
                dt = torch.cat([dt, self.default_step.to(dt).expand(B, horizon)], 1)
            elif dt.shape[1] != total:
                raise DataError(f"exog.dt covers {dt.shape[1]} rows; give the context's {L} "
                                f"or the context and horizon's {total}")
        if self.n_inputs:
            if exog is None or exog.u is None:
                raise DataError(f"the model takes {self.n_inputs} inputs: pass exog.u")
            u = exog.u
            if u.shape[1] == L and L > 0:
                if not self._warned_hold:
                    log.warning("kalman_ct: the inputs of the forecast horizon are unknown; "
                                "holding the last input (known setpoints: data.future_inputs="
                                "known)")
                    self._warned_hold = True
                u = torch.cat([u, u[:, -1:].expand(B, horizon, u.shape[-1])], 1)
            elif u.shape[1] == L and state is not None and state.u_last is not None:
                u = state.u_last[:, None].expand(B, horizon, -1)
            elif u.shape[1] != total:
                raise DataError(f"exog.u covers {u.shape[1]} rows; give the context's {L} "
                                f"or the context and horizon's {total}")
        # the horizon's rows as unobserved samples at their times: the filter's predictions
        # there are the k-step forecasts
        empty = torch.full((B, horizon, C), float("nan"), dtype=context.dtype,
                           device=context.device)
        pred, _ = self.one_step(torch.cat([context, empty], 1), state, exog=Exog(u, dt))
        return Gaussian(pred.mean[:, L:], pred.var[:, L:])

    # ------------------------------------------------------------------------------ fitting
    @torch.no_grad()
    def initialize(self, y: Tensor, exog: Exog | None = None) -> None:
        """Data-based start and prior from training streams y (B, T, C) (NaN allowed).

        The median time step becomes the default step; for a structural model, per channel:
        starting parameters from moments of the series (averaged over streams), the prior level
        at the mean of the first observed values, the prior variance the channel's variance.
        """
        dt = None if exog is None else exog.dt
        if dt is not None and dt.numel():
            self.default_step.fill_(float(dt.double().median()))
        if self.structure is None:
            return
        B, T, C = y.shape
        steps = (self.default_step.expand(B, T) if dt is None else dt).to(self.compute_dtype)
        yk = y.to(self.compute_dtype).transpose(1, 2).unsqueeze(-1)  # (B, C, T, 1)
        theta = torch.zeros_like(self.theta, dtype=self.compute_dtype)
        for c in range(C):
            rows = (~torch.isnan(yk[:, c, :, 0])).any(-1)
            if not bool(rows.any()):
                raise DataError(f"channel {c} has no observed value in the training streams")
            yc = yk[rows, c]  # (B', T, 1)
            theta[c] = self.structure.initial_params(yc, steps[rows]).mean(0)
            vals = yc[~torch.isnan(yc)]
            first = [s[~torch.isnan(s)][0] for s in yc[..., 0]]
            self.prior_mean[c] = torch.stack(first).mean()
            self.prior_var[c] = vals.var().clamp_min(1e-8) if vals.numel() > 1 else 1.0
        self.theta.copy_(theta.to(self.theta.dtype))

    def segments(self, streams: Sequence[tuple[Tensor, Exog | None]]) -> list[Segment]:
        """Training streams [(y (B_k, T_k, C), Exog)] in the filter's layout."""
        return [Segment(*self._layout(y, exog)) for y, exog in streams]

    def identify(self, streams: Sequence[tuple[Tensor, Exog | None]], max_iter: int = 200
                 ) -> list[float]:
        """Maximum likelihood over whole training streams [(y (B_k, T_k, C), Exog)]: every
        channel's (or the physical model's) free parameters, by L-BFGS to convergence from the
        best of several starting points; ``theta`` in place. Returns the log-likelihood after
        each optimiser evaluation."""
        segs = self.segments(streams)
        theta0 = self.theta.detach().to(self.compute_dtype)
        if self.physical is not None:
            if self.physical.n_params == 0:
                return []
            res = fit_ct_mle(self.build, segs, theta0, max_iter=max_iter)
        else:
            # candidates (S, 1, C, P): the extra axis broadcasts against the streams' batch
            cands = self.structure.start_candidates(theta0, self.n_starts).unsqueeze(1)
            start = best_start(self.build, cands, segs)[0] if cands.shape[0] > 1 else theta0
            res = fit_ct_mle(self.build, segs, start, max_iter=max_iter)
        if not res.converged:
            log.warning("kalman_ct: L-BFGS stopped after %d evaluations without converging; "
                        "raise model.optimizer.max_iter", res.n_iter)
        with torch.no_grad():
            self.theta.copy_(res.theta.to(self.theta.dtype))
        return res.history

    def parameter_report(self, streams: Sequence[tuple[Tensor, Exog | None]],
                         channels: Sequence[str] | None = None,
                         inputs: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Estimates with standard errors: rows {"channel", "parameter", "estimate", "se"}
        (channel "model" for a physical model; gains named by their input when ``inputs``
        names them). A quantity the data do not identify (the information is not positive
        definite) gets se NaN and a warning."""
        segs = self.segments(streams)
        theta = self.theta.detach().to(self.compute_dtype)
        model = self.physical or self.structure
        se, cov = ct_standard_errors(self.build, theta, segs, strict=False)
        if bool(torch.isnan(se).any()):
            log.warning("kalman_ct: the observed information is not positive definite for %s: "
                        "some parameter is not identified by the data (or the fit did not "
                        "converge); no standard errors there",
                        "the model" if self.physical is not None else "channels " + ", ".join(
                            str(c) for c in torch.isnan(se).any(-1).nonzero().flatten().tolist()))
        est = derived_standard_errors(model.derived, theta, cov)
        values = {k: (e.value, e.se) for k, e in est.items()}
        def label(param: str) -> str:  # gain.oscillator[0] -> gain.oscillator.<input name>
            if inputs is not None and param.endswith("]"):
                head, _, j = param[:-1].rpartition("[")
                if j.isdigit() and int(j) < len(inputs):
                    return f"{head}.{inputs[int(j)]}"
            return param

        if self.physical is not None:
            return [{"channel": "model", "parameter": label(p), "estimate": float(v),
                     "se": float(e)} for p, (v, e) in values.items()]
        names = list(channels) if channels is not None else [
            str(c) for c in range(self.n_channels)]
        return [{"channel": name, "parameter": label(p), "estimate": float(v[c]),
                 "se": float(e[c])} for c, name in enumerate(names)
                for p, (v, e) in values.items()]
