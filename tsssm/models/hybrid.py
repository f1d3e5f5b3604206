"""Kalman–Mamba hybrids: the classical filter and a Mamba encoder in one forecaster.

Two designs, both channel-independent (every channel is its own univariate structural model and
its own sequence through Mamba encoders shared by the channels, as in :class:`KalmanForecaster`
and PatchTST), both following :class:`tsssm.models.base.Forecaster`. Each has two encoders: a
causal one for the one-step path (patches of ``step_patch_len`` steps, 1 by default: terms for
every step from everything before it) and one for the horizon path (patches of ``patch_len``
steps of the last ``input_len`` context steps, a flatten head over all of them, as PatchTST);
they share the Kalman part.

:class:`MambaKalmanFilter` (``model=hybrid_dssm``, a deep state space model). A causal Mamba
encoder reads the series' first differences (the local volatility that noise levels follow,
free of the level, which a network would learn by heart) and emits, for every step t from
y[:, :t] only, the log-scales of the filter's noise: Q_t = Q exp(a_t) (state noise) and
R_t = R exp(b_t) (observation noise) around the structural model's fitted Q and R. The exact
Kalman filter
(:func:`tsssm.kalman.kalman_filter`, Q and R declared time-varying) runs with them, so the
one-step predictive density IS the model's exact likelihood (prediction-error decomposition; the
terms of step t are fixed given y[:t]), missing values are skipped by the filter, and the state
(filter moments + encoder state) streams in chunks. Horizon forecast: the filter's forecast from
the last filtered state, with the noise scales of every future step and an observation input
term d_k (a correction of the filter's mean) emitted by a flatten head over the context's patch
tokens: mean_k = H F^k m_T + d_k, var_k = H F^k P_T F^k' H' + sum_j exp(a_j) H F^(k-j) Q
F^(k-j)' H' + R exp(b_k).

:class:`KalmanMambaResidual` (``model=hybrid_residual``, Kalman baseline + Mamba correction). A
structural Kalman model (:class:`KalmanForecaster`, its parameters trained end to end) forecasts
mean and variance; a Mamba encoder over the series and the filter's standardised innovations
predicts the correction of both at every step and every lead time: one step ahead,
mean_t = m_t + delta_t sd_t and var_t = v_t exp(gamma_t) with (delta_t, gamma_t) from the encoder
output before step t (causal); over the horizon, mean_k = w_k m_k + scale (skip_k + delta_k) and
var_k = v_k exp(gamma_k) (w_k a learned weight per lead, skip RLinear's linear map of the
normalised context, delta/gamma a flatten head over the context's patch tokens).

Both start as their Kalman part exactly (every correction is zero-initialised), so training can
only move away from the filter where the data reward it. With ``kalman_fit`` the Kalman part is
fitted before training as ``model=kalman_ett`` fits itself (:func:`tsssm.models.kalman.
fit_forecaster`: EM on context-length segments with a fitted prior, then the multi-step
criterion over the model's horizon), so the untrained hybrid forecasts the horizon means of that
model, number for number (the task validates that starting point as a candidate for the
restored weights: ``task.validate_start``). Horizon forecasts read the last
``input_len`` context steps (RevIN-normalised for the encoder; the filter runs on the whole
given context) and need ``state=None``. Horizon variances carry a fitted per-lead factor
(:class:`tsssm.models.heads.HorizonVarianceScale`, fitted on validation after training).

Inputs and time (``exog=Exog(u, dt)``, :mod:`tsssm.models.covariates`), as in the Mamba
forecaster: with ``n_inputs = K > 0`` the inputs are features of both encoders' tokens, the
observation gets a feedthrough ``y_t = H x_t + G u_t + v_t`` (the filter runs on ``y - G u``
and adds ``G u`` back, so the deep SSM's one-step density stays the model's exact likelihood),
and the horizon means add ``G u`` of the forecast rows and a causal linear response to the
inputs (unknown future inputs: the last one held, with a warning). With real time steps both
encoders scale their Δ by the real step over the nominal (median training) one and the causal
encoder's origins see ``log(dt / nominal)`` of the row they predict; the Kalman part itself
stays discrete (one transition per row). Without inputs and on an evenly spaced grid nothing
changes, bit for bit.

Numerics: the filters run in the Kalman part's dtype (float64 by default) and results come
back in float32; the encoder runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError, ModelError
from tsssm.kalman.filter import kalman_filter
from tsssm.kalman.forecast import forecast as kalman_forecast
from tsssm.kalman.forecast import forecast_invariant, transition_powers
from tsssm.kalman.ssm import LinearGaussianSSM, symmetrize
from tsssm.models.base import Exog, Gaussian
from tsssm.models.covariates import (
    add_exog_weights,
    check_n_inputs,
    checked_exog,
    horizon_inputs,
    lead_log_ratio,
    nominal_step,
    per_sequence,
    token_time_scale,
)
from tsssm.models.heads import HorizonVarianceScale
from tsssm.models.kalman import KalmanForecaster, KalmanState, fit_forecaster
from tsssm.models.mamba import MambaConfig, MambaStack, MambaStackState, detach_state
from tsssm.models.mamba_forecaster import _observed_mean_std

#: Variance floor in scaled data units.
MIN_VAR = 1e-4
#: Log-scales emitted by the encoder are clipped here (exp(±LOG_SCALE_LIMIT)).
LOG_SCALE_LIMIT = 12.0

__all__ = ["HybridState", "KalmanMambaResidual", "MambaKalmanFilter"]

#: how :meth:`_HybridBase.initialize` fits the Kalman part before training (``kalman_fit``):
#: the keys and defaults of :func:`tsssm.models.kalman.fit_forecaster` (``fit="none"``: moment
#: estimates only, then the legacy ``em_iters`` EM iterations on whole streams)
KALMAN_FIT_DEFAULTS: dict[str, Any] = {"fit": "none", "em_iters": 50, "em_segment": None,
                                       "em_prior": False, "em_polish": 0,
                                       "multistep_iters": 200}


# ---------------------------------------------------------------------------------- pieces


@dataclass
class EncoderState:
    """The causal encoder's carried state over B*C channel sequences."""

    encoder: MambaStackState | None  # per-layer state; None = zeros
    last_hidden: Tensor  # (B*C, d): output of the last complete patch (or the start vector)
    pending: Tensor  # (B, r, C, F), r < patch_len: features of the incomplete trailing patch
    pending_ratio: Tensor | None = None  # (B, r): their dt / nominal step (with time steps)

    def detach(self) -> EncoderState:
        return EncoderState(None if self.encoder is None else detach_state(self.encoder),
                            self.last_hidden.detach(), self.pending.detach(),
                            None if self.pending_ratio is None else self.pending_ratio.detach())


class HybridState(NamedTuple):
    """What ``one_step`` carries: the filter's moments and the encoder's state."""

    kalman: KalmanState  # filtered mean (B, C, n), cov (B, C, n, n) after the last step
    encoder: EncoderState
    last: Tensor | None = None  # (B, C): the last step's y (the deep SSM's difference input)

    @property
    def batch_size(self) -> int:
        return self.kalman.mean.shape[0]


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    return value


def _last_window(series: Tensor, length: int) -> Tensor:
    """The last ``length`` steps of (B, T, ...) with missing (NaN) steps padded on the left."""
    if series.shape[1] >= length:
        return series[:, series.shape[1] - length :]
    pad = series.new_full((series.shape[0], length - series.shape[1], *series.shape[2:]),
                          float("nan"))
    return torch.cat([pad, series], dim=1)


class ChannelPatchEncoder(nn.Module):
    """Mamba over every channel of a stream as its own sequence of patch tokens.

    Features (B, n*P, C, F) with NaN for missing -> tokens (B*C, n, 2*P*F) (values with NaN as
    0, then the missing-mask bits) -> embedding -> Mamba stack -> (B*C, n, d).
    """

    def __init__(self, n_features: int, patch_len: int, config: MambaConfig,
                 causal: bool = True) -> None:
        super().__init__()
        self.n_features, self.patch_len = n_features, patch_len
        self.embed = nn.Linear(2 * patch_len * n_features, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.mamba = MambaStack(config)
        if causal:  # the output that precedes the first patch of a stream (predicts its steps)
            self.start = nn.Parameter(torch.zeros(config.d_model))

    def tokens(self, feats: Tensor) -> Tensor:
        batch, steps, channels, n_feat = feats.shape
        missing = feats.isnan()
        x = torch.cat([feats.masked_fill(missing, 0.0), missing.to(feats.dtype)], dim=-1)
        n, p = steps // self.patch_len, self.patch_len
        x = x.permute(0, 2, 1, 3).reshape(batch * channels, n, p * 2 * n_feat)
        return x

    def forward(self, feats: Tensor, state: MambaStackState | None = None,
                ratio: Tensor | None = None) -> tuple[Tensor, MambaStackState]:
        """feats (B, n*P, C, F), time ratios dt / nominal (B, n*P) or None -> (hidden
        (B*C, n, d), encoder state)."""
        scale = per_sequence(token_time_scale(ratio, self.patch_len), feats.shape[2])
        return self.mamba(self.dropout(self.embed(self.tokens(feats))), state, scale)

    def causal(self, feats: Tensor, state: EncoderState, ratio: Tensor | None = None,
               lead_time: Tensor | None = None) -> tuple[Tensor, EncoderState, int]:
        """Per-step origins for one-step terms, causally: the steps of patch k are predicted from
        the output after patch k-1 (the first from the carried output).

        feats (B, T, C, F) (new steps), ratio (B, T) their dt / nominal step or None;
        ``lead_time`` (d,): origins move by log(ratio) of the first row they predict times it.
        Returns (origins (B*C, n_pred, d) covering the pending and new steps, the new state,
        r = number of pending steps before the new ones)."""
        r, p = state.pending.shape[1], self.patch_len
        series = torch.cat([state.pending.to(feats.dtype), feats], dim=1)  # (B, r+T, C, F)
        ratios = None
        if ratio is not None or state.pending_ratio is not None:
            b = feats.shape[0]
            old = (state.pending_ratio if state.pending_ratio is not None
                   else torch.ones(b, r, device=feats.device))
            new = ratio if ratio is not None else torch.ones(b, feats.shape[1],
                                                             device=feats.device)
            ratios = torch.cat([old.to(new.dtype), new], dim=1)  # (B, r+T)
        n_tok = series.shape[1] // p
        if n_tok > 0:
            hidden, enc = self(series[:, : n_tok * p], state.encoder,
                               None if ratios is None else ratios[:, : n_tok * p])
            last = hidden[:, -1]
        else:
            hidden = state.last_hidden.new_zeros(state.last_hidden.shape[0], 0,
                                                 state.last_hidden.shape[1])
            enc, last = state.encoder, state.last_hidden
        origins = torch.cat([state.last_hidden.unsqueeze(1), hidden], dim=1)
        n_pred = -(-series.shape[1] // p)
        origins = origins[:, :n_pred]
        lead = lead_log_ratio(ratios, p, n_pred)  # (B, n_pred)
        if lead is not None and lead_time is not None:
            origins = origins + per_sequence(lead, series.shape[2])[..., None] * lead_time
        new = EncoderState(enc, last, series[:, n_tok * p :],
                           None if ratios is None else ratios[:, n_tok * p :])
        return origins, new, r

    def initial_state(self, batch: int, channels: int, device: torch.device) -> EncoderState:
        return EncoderState(None, self.start.to(device).expand(batch * channels, -1),
                            torch.zeros(batch, 0, channels, self.n_features, device=device))


def _per_step(out: Tensor, batch: int, n_out: int, steps_per_token: int) -> Tensor:
    """Head output (B*C, k, S*n_out), step-major -> (B, k*S, C, n_out)."""
    bc, k, _ = out.shape
    channels = bc // batch
    out = out.reshape(batch, channels, k * steps_per_token, n_out)
    return out.permute(0, 2, 1, 3)


def _standardised(y: Tensor, pred: Gaussian) -> Tensor:
    """(y - mean) / sd with NaN where y is missing, and no NaN gradient: the missing entries
    are filled before the arithmetic, then marked again."""
    observed = ~y.isnan()
    filled = torch.where(observed, y, pred.mean.detach())
    z = (filled - pred.mean) / pred.var.sqrt()
    return torch.where(observed, z, torch.full_like(z, float("nan")))


def _kalman_fit(spec: dict | None) -> dict[str, Any]:
    """``model.kalman_fit`` with its defaults, checked."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(KALMAN_FIT_DEFAULTS))
    if unknown:
        raise ConfigError(f"model.kalman_fit has unknown keys {unknown}; allowed: "
                          f"{', '.join(KALMAN_FIT_DEFAULTS)}")
    out = {**KALMAN_FIT_DEFAULTS, **spec}
    if out["fit"] not in ("none", "em", "multistep"):
        raise ConfigError(f"model.kalman_fit.fit must be none, em or multistep, got "
                          f"{out['fit']!r}")
    for key in ("em_iters", "em_polish", "multistep_iters"):
        value = out[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"model.kalman_fit.{key} must be an integer >= 0, got {value!r}")
    return out


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class _HybridBase(nn.Module):
    """What both hybrids share: the Kalman part, the encoder, the horizon head, validation."""

    training_input = "windows"
    uses_exog = ("u", "dt")

    def __init__(self, n_channels: int, horizon: int, input_len: int, kalman: dict | None,
                 n_step_features: int, n_horizon_features: int, d_model: int, n_layers: int,
                 d_state: int, d_conv: int, expand: int, patch_len: int, step_patch_len: int,
                 dropout: float, head_dropout: float, linear_skip: bool, scan_backend: str,
                 em_iters: int, n_inputs: int = 0, kalman_fit: dict | None = None) -> None:
        super().__init__()
        self.kalman_fit = _kalman_fit(kalman_fit)
        self.n_inputs = check_n_inputs(n_inputs)
        n_step_features += n_inputs  # every channel's tokens also carry the inputs
        n_horizon_features += n_inputs
        _positive_int("n_channels", n_channels)
        _positive_int("horizon", horizon)
        _positive_int("input_len", input_len)
        _positive_int("patch_len", patch_len)
        _positive_int("step_patch_len", step_patch_len)
        if not 0.0 <= head_dropout < 1.0:
            raise ConfigError(f"model.head_dropout must be in [0, 1), got {head_dropout!r}")
        if not isinstance(em_iters, int) or em_iters < 0:
            raise ConfigError(f"model.em_iters must be an integer >= 0, got {em_iters!r}")
        self.n_channels, self.horizon, self.input_len = n_channels, horizon, input_len
        self.patch_len, self.step_patch_len = patch_len, step_patch_len
        self.linear_skip, self.em_iters = bool(linear_skip), em_iters
        kalman = dict(kalman or {})
        kalman.pop("_target_", None)
        comps = list(kalman.get("components", ["level", "seasonal"]))
        if "seasonal" in comps and kalman.get("seasonal_period") is None:
            comps.remove("seasonal")  # the data has no seasonal period (see KalmanPart)
        kalman["components"] = comps
        # the training windows of a time-invariant Kalman part take the batched window filter
        # (the same numbers as the sequential one, in a few dozen ops instead of ~12 per step)
        kalman.setdefault("method", "window")
        try:
            self.kalman = KalmanForecaster(n_channels, **kalman)
        except TypeError as err:
            raise ConfigError(f"model.kalman: {err}") from err
        self.config = MambaConfig(d_model=d_model, n_layers=n_layers, d_state=d_state,
                                  d_conv=d_conv, expand=expand, dropout=dropout,
                                  scan_backend=scan_backend)
        # One-step path: a causal encoder over patches of step_patch_len steps (1: terms for
        # every step from everything before it); its head emits 2 terms per step.
        self.step_encoder = ChannelPatchEncoder(n_step_features, step_patch_len, self.config)
        self.step_head = _zero_linear(d_model, step_patch_len * 2)
        # Horizon path: its own encoder over the patches of the normalised context.
        self.encoder = ChannelPatchEncoder(n_horizon_features, patch_len, self.config,
                                           causal=False)
        n_tok = -(-input_len // patch_len)  # a partial first patch is padded with missing steps
        self.head_dropout = nn.Dropout(head_dropout)
        #: horizon terms (3 per lead time) from every patch of the context, flattened
        self.horizon_head = _zero_linear(n_tok * d_model, 3 * horizon)
        if self.linear_skip:  # RLinear: normalised context -> horizon means (of the residual)
            self.skip = _zero_linear(input_len, horizon)
        #: weight of the filter's own horizon mean per lead time (normalised units)
        self.kalman_weight = nn.Parameter(torch.ones(horizon))
        self.var_calibration = HorizonVarianceScale(horizon)
        # input_gain (G (C, K): y_t = H x_t + G u_t + v_t), input_response, lead_time (the
        # causal encoder's origins move by log(dt / nominal) times it), nominal_step: last
        add_exog_weights(self, n_channels, horizon, n_inputs, d_model)

    # ------------------------------------------------------------------ shared helpers

    @property
    def runs_without_exog(self) -> bool:
        """Without inputs and without a time grid, exog changes nothing."""
        return self.n_inputs == 0 and bool(torch.isnan(self.nominal_step))

    @torch.no_grad()
    def initialize(self, y: Tensor, exog: Exog | None = None) -> None:
        """Data-based start of the Kalman part from training streams y (B, T, C): moment
        estimates, then either the fit of ``kalman_fit`` (``fit`` em / multistep: exactly
        what ``model.fit`` does for the Kalman model, with contexts of ``input_len`` steps and
        this model's horizon; no variance calibration: the hybrid's horizon variance has its
        own, fitted on validation) or, without one, ``em_iters`` EM iterations on the whole
        streams; the nominal time step is the median of ``exog.dt`` where the steps vary (see
        MambaForecaster.initialize; on an evenly spaced grid time steps are not used)."""
        self.nominal_step.fill_(nominal_step(exog))
        self.kalman.initialize(y)
        spec = self.kalman_fit
        if spec["fit"] != "none":
            # fitted step by step as the Kalman model fits itself (the window filter gives the
            # same numbers to ~1e-13, but 200 L-BFGS evaluations need not round alike)
            method, self.kalman.method = self.kalman.method, "sequential"
            try:
                with torch.enable_grad():  # the multi-step criterion is minimised by L-BFGS
                    fit_forecaster(self.kalman, [y], fit=spec["fit"], em_iters=spec["em_iters"],
                                   em_segment=spec["em_segment"], em_prior=spec["em_prior"],
                                   em_polish=spec["em_polish"],
                                   multistep_iters=spec["multistep_iters"], calibrate=False,
                                   context=self.input_len, horizon=self.horizon)
            finally:
                self.kalman.method = method
        elif self.em_iters:
            self.kalman.fit_em([y.to(self.kalman.compute_dtype)], n_iter=self.em_iters)

    def kalman_parameters(self) -> list[nn.Parameter]:
        """The Kalman part's trainable parameters (the task may give them their own learning
        rate, or freeze them: ``model.optimizer.kalman_lr``)."""
        return list(self.kalman.parameters())

    def _check_series(self, y: Tensor, name: str) -> Tensor:
        if not isinstance(y, Tensor) or y.ndim != 3 or y.shape[-1] != self.n_channels:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise DataError(
                f"{name} must be a tensor (batch, time, {self.n_channels} channels), got {shape}")
        if not y.is_floating_point():
            raise DataError(f"{name} must be floating point (NaN marks missing), got {y.dtype}")
        if torch.isinf(y).any():
            raise DataError(f"{name} contains ±inf; mark missing observations with NaN")
        return y.to(self.encoder.embed.weight.dtype)

    def _check_horizon(self, horizon: int, state: Any) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or not (
                1 <= horizon <= self.horizon):
            raise ModelError(
                f"forecast horizon must be an integer in [1, {self.horizon}] (the model's "
                f"horizon), got {horizon!r}; retrain with a larger model.horizon for longer ones")
        if state is not None:
            raise ModelError(
                "the hybrid's horizon forecast reads the last input_len context steps "
                "themselves: pass the full context with state=None")

    def _check_state(self, state: HybridState | None, y: Tensor) -> HybridState | None:
        if state is None:
            return None
        if not isinstance(state, HybridState):
            raise ModelError(f"state must be a HybridState returned by one_step, got "
                             f"{type(state).__name__}")
        if state.batch_size != y.shape[0]:
            raise ModelError(f"state was built for batch {state.batch_size} but the input has "
                             f"batch {y.shape[0]}; carry one state per set of streams")
        return state

    def _horizon_terms(self, context: Tensor, extra: Tensor | None = None,
                       u: Tensor | None = None, ratio: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The flatten head over the last input_len steps: RevIN-normalised values (and
        ``extra`` features (B, T, C, F') aligned with the context, the inputs u (B, T, K), the
        time ratios (B, T)) -> per lead time (delta, log-scale 1, log-scale 2) each (B, H, C),
        plus loc, scale (B, 1, C)."""
        window = _last_window(context, self.input_len)  # (B, L, C)
        loc, scale = _observed_mean_std(window)
        x = (window - loc) / scale
        feats = [x.unsqueeze(-1)]
        if extra is not None:
            feats.append(_last_window(extra, self.input_len))
        n_steps = -(-self.input_len // self.patch_len) * self.patch_len
        feats = _last_window(torch.cat(feats, dim=-1), n_steps)  # whole patches, NaN-padded
        if u is not None:  # inputs are never missing: the padding before a short context is 0
            u_win = _last_window(_last_window(u, self.input_len), n_steps).nan_to_num(0.0)
            feats = torch.cat([feats, u_win.unsqueeze(2).expand(-1, -1, self.n_channels, -1)
                               .to(x.dtype)], dim=-1)
        if ratio is not None:  # padded steps count as nominal
            ratio = _last_window(_last_window(ratio, self.input_len), n_steps).nan_to_num(1.0)
        hidden, _ = self.encoder(feats, None, ratio)  # (B*C, n_tok, d)
        out = self.horizon_head(self.head_dropout(hidden.flatten(1)))  # (B*C, 3H)
        batch = context.shape[0]
        out = out.reshape(batch, self.n_channels, 3, self.horizon).permute(2, 0, 3, 1)
        delta, g1, g2 = out.unbind(0)  # (B, H, C) each
        if self.linear_skip:
            delta = delta + self.skip(x.nan_to_num(0.0).transpose(1, 2)).transpose(1, 2)
        return delta, g1, g2, loc, scale

    def _as_kalman(self, y: Tensor) -> Tensor:
        """(B, T, C) -> (B, C, T, 1) in the Kalman dtype."""
        return y.to(self.kalman.compute_dtype).transpose(1, 2).unsqueeze(-1)

    def _kalman_matrices(self) -> LinearGaussianSSM:
        k = self.kalman
        return k.structure.to_ssm(k.theta.to(k.compute_dtype))

    def _combine_mean(self, kalman_mean: Tensor, delta: Tensor, loc: Tensor, scale: Tensor,
                      horizon: int) -> Tensor:
        """mean_k = loc + scale (w_k (m_k - loc) / scale + delta_k) = w_k m_k + (1-w_k) loc +
        scale delta_k, in data units, (B, h, C)."""
        w = self.kalman_weight[:horizon].view(1, horizon, 1)
        return w * kalman_mean + (1.0 - w) * loc + scale * delta[:, :horizon]

    def predict_window(self, context: Tensor, horizon: int, *, exog: Exog | None = None
                       ) -> tuple[Gaussian, Gaussian]:
        """One-step predictions over ``context`` (B, L, C) and the horizon forecast after it,
        sharing one filter pass (what a training window needs)."""
        one, fc = self._one_step_and_forecast(context, horizon, exog)
        return one, fc

    def forecast(self, context: Tensor, horizon: int, state: Any = None, *,
                 exog: Exog | None = None) -> Gaussian:
        """Predictive distribution (B, horizon, C) of the steps after ``context`` (B, L, C).

        exog: u over the context and the horizon when the future inputs are known, over the
        context only when not (the last input is held); dt over the context."""
        self._check_horizon(horizon, state)
        return self._one_step_and_forecast(context, horizon, exog)[1]

    # ------------------------------------------------------------------ inputs and time

    def _exog(self, y: Tensor, exog: Exog | None, what: str
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(u of these rows (B, T, K), u as given (B, T', K), ratio dt / nominal (B, T)); Nones
        without inputs / time."""
        u, ratio = checked_exog(exog, y, self.n_inputs, self.nominal_step, what)
        return (None if u is None else u[:, : y.shape[1]]), u, ratio

    def _feedthrough(self, u: Tensor | None) -> Tensor | None:
        """G u (B, T, C) of inputs (B, T, K), or None."""
        return None if u is None else u @ self.input_gain.t().to(u.dtype)

    def _with_input_means(self, mean: Tensor, u_all: Tensor | None, context_len: int,
                          horizon: int) -> Tensor:
        """Horizon means (B, h, C) plus G u of the forecast rows and the inputs' response."""
        if u_all is None:
            return mean
        v = horizon_inputs(self, u_all, context_len, horizon)  # (B, h+1, K)
        return mean + self._feedthrough(v[:, 1:]) + self.input_response(v, horizon)

    def _step_terms(self, feats: Tensor, u: Tensor | None, enc_state: EncoderState,
                    ratio: Tensor | None) -> tuple[Tensor, EncoderState]:
        """The one-step path: per-channel features (B, T, C, F) of these rows (and their inputs
        u, time ratios) through the causal encoder and the step head -> 2 terms per row and
        channel (B, T, C, 2), clamped to +-LOG_SCALE_LIMIT, and the encoder's new state."""
        origins, new_enc, r = self.step_encoder.causal(self._step_features(feats, u), enc_state,
                                                       ratio, self.lead_time)
        terms = _per_step(self.step_head(origins), feats.shape[0], 2, self.step_patch_len)
        return terms[:, r : r + feats.shape[1]].clamp(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT), new_enc

    def _step_features(self, feats: Tensor, u: Tensor | None) -> Tensor:
        """Per-channel features (B, T, C, F) with the inputs (B, T, K) appended to every
        channel."""
        if u is None:
            return feats
        return torch.cat([feats, u.unsqueeze(2).expand(-1, -1, self.n_channels, -1)
                          .to(feats.dtype)], dim=-1)

    def no_weight_decay(self) -> set[str]:
        return {name for name, p in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("A_log", "D", "bias", "start", "theta",
                                               "kalman_weight") or p.ndim < 2}


# --------------------------------------------------------------- Kalman baseline + correction


class KalmanMambaResidual(_HybridBase):
    """Structural Kalman forecast, corrected in mean and variance by a Mamba encoder over the
    series and the filter's standardised innovations (see the module docstring)."""

    def __init__(self, n_channels: int, horizon: int = 96, input_len: int = 96,
                 kalman: dict | None = None, d_model: int = 64, n_layers: int = 2,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, patch_len: int = 16,
                 step_patch_len: int = 1, dropout: float = 0.0, head_dropout: float = 0.0,
                 linear_skip: bool = True, scan_backend: str = "auto", em_iters: int = 0,
                 n_inputs: int = 0, kalman_fit: dict | None = None) -> None:
        super().__init__(n_channels, horizon, input_len, kalman, 2, 2, d_model, n_layers,
                         d_state, d_conv, expand, patch_len, step_patch_len, dropout,
                         head_dropout, linear_skip, scan_backend, em_iters, n_inputs,
                         kalman_fit)

    def _features(self, y: Tensor, pred: Gaussian) -> Tensor:
        """(values, standardised innovations) (B, T, C, 2); NaN where y is missing."""
        return torch.stack([y, _standardised(y, pred)], dim=-1)

    def _corrected_one_step(self, y: Tensor, kpred: Gaussian, enc_state: EncoderState,
                            u: Tensor | None = None, ratio: Tensor | None = None
                            ) -> tuple[Gaussian, EncoderState]:
        terms, new_enc = self._step_terms(self._features(y, kpred), u, enc_state, ratio)
        delta, gamma = terms.unbind(-1)  # (B, T, C)
        mean = kpred.mean + delta * kpred.var.sqrt()
        var = kpred.var * gamma.exp() + MIN_VAR
        return Gaussian(mean, var), new_enc

    def _kalman_one_step(self, y: Tensor, u: Tensor | None, kstate: KalmanState | None
                         ) -> tuple[Gaussian, KalmanState]:
        """The Kalman part on y - G u, its predictions with G u added back."""
        gu = self._feedthrough(u)
        kpred, kstate = self.kalman.one_step(y if gu is None else y - gu, kstate)
        if gu is not None:
            kpred = kpred._replace(mean=kpred.mean + gu)
        return kpred, kstate

    def one_step(self, y: Tensor, state: HybridState | None = None, *,
                 exog: Exog | None = None) -> tuple[Gaussian, HybridState]:
        """Predictive distribution of y[:, t] given y[:, :t] (and ``state``) for every t;
        exog: the inputs (B, T, K) and time steps (B, T) of these rows."""
        y = self._check_series(y, "y")
        state = self._check_state(state, y)
        u, _, ratio = self._exog(y, exog, "one_step")
        kpred, kstate = self._kalman_one_step(y, u, None if state is None else state.kalman)
        enc_state = (self.step_encoder.initial_state(y.shape[0], self.n_channels, y.device)
                     if state is None else state.encoder)
        dist, new_enc = self._corrected_one_step(y, kpred, enc_state, u, ratio)
        return dist, HybridState(kstate, new_enc)

    def _one_step_and_forecast(self, context: Tensor, horizon: int, exog: Exog | None = None
                               ) -> tuple[Gaussian, Gaussian]:
        context = self._check_series(context, "context")
        u, u_all, ratio = self._exog(context, exog, "forecast")
        kpred, kstate = self._kalman_one_step(context, u, None)
        enc0 = self.step_encoder.initial_state(context.shape[0], self.n_channels,
                                               context.device)
        one, _ = self._corrected_one_step(context, kpred, enc0, u, ratio)
        k_mean, k_var = self._kalman_forecast(kstate, horizon)  # (B, h, C) each
        z = _standardised(context, kpred)
        delta, gamma, _, loc, scale = self._horizon_terms(context, z.unsqueeze(-1), u, ratio)
        mean = self._with_input_means(k_mean, u_all, context.shape[1], horizon)
        mean = self._combine_mean(mean, delta, loc, scale, horizon)
        gamma = gamma[:, :horizon].clamp(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT)
        var = self.var_calibration(k_var * gamma.exp(), MIN_VAR)
        return one, Gaussian(mean, var)

    def _kalman_forecast(self, kstate: KalmanState, horizon: int) -> tuple[Tensor, Tensor]:
        ssm = self._kalman_matrices()
        try:
            fc = forecast_invariant(ssm, kstate.mean, kstate.cov, horizon)
            mean, cov = fc.mean, fc.cov
        except ModelError:  # a structure with intercepts: the step-by-step forecast
            fc = kalman_forecast(ssm, (kstate.mean, kstate.cov), horizon)
            mean, cov = fc.obs_mean, fc.obs_cov
        dtype = self.encoder.embed.weight.dtype
        return (mean[..., 0].transpose(1, 2).to(dtype),
                cov[..., 0, 0].transpose(1, 2).to(dtype))


# ------------------------------------------------------------ Mamba-parameterised Kalman filter


class MambaKalmanFilter(_HybridBase):
    """Deep state space model: a Mamba encoder emits the filter's noise levels at every step,
    the exact Kalman filter runs with them (see the module docstring)."""

    def __init__(self, n_channels: int, horizon: int = 96, input_len: int = 96,
                 kalman: dict | None = None, d_model: int = 64, n_layers: int = 2,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, patch_len: int = 16,
                 step_patch_len: int = 1, dropout: float = 0.0, head_dropout: float = 0.0,
                 linear_skip: bool = True, scan_backend: str = "auto", em_iters: int = 0,
                 n_inputs: int = 0, kalman_fit: dict | None = None) -> None:
        super().__init__(n_channels, horizon, input_len, kalman, 1, 1, d_model, n_layers,
                         d_state, d_conv, expand, patch_len, step_patch_len, dropout,
                         head_dropout, linear_skip, scan_backend, em_iters, n_inputs,
                         kalman_fit)

    # ------------------------------------------------------------------ the filter

    def _noise_terms(self, y: Tensor, enc_state: EncoderState, last: Tensor | None,
                     u: Tensor | None = None, ratio: Tensor | None = None
                     ) -> tuple[Tensor, EncoderState]:
        """(a_t, b_t) (B, T, C, 2): log-scales of Q and R at every step, from y[:, :t].

        The encoder reads the first differences y_t - y_(t-1) (NaN when either is missing):
        the local volatility that noise levels follow, free of the level itself (a network that
        reads levels learns them by heart). ``last`` (B, C): y of the step before this call."""
        prev = y.new_full(y[:, :1].shape, float("nan")) if last is None else last.unsqueeze(1)
        diff = y - torch.cat([prev.to(y.dtype), y[:, :-1]], dim=1)  # (B, T, C)
        return self._step_terms(diff.unsqueeze(-1), u, enc_state, ratio)

    def filter_ssm(self, terms: Tensor, kstate: KalmanState | None) -> LinearGaussianSSM:
        """The time-varying model of a call: batch (B, C), T steps, Q_t and R_t scaled by
        exp(terms). The prior is the Kalman part's (state None) or the carried state moved one
        step with this call's first Q."""
        k = self.kalman
        dt = k.compute_dtype
        base = self._kalman_matrices()  # (C, ...) time-invariant
        scales = terms.to(dt).exp().transpose(1, 2)  # (B, C, T, 2)
        Q = base.Q.unsqueeze(-3) * scales[..., 0, None, None]  # (B, C, T, n, n)
        R = base.R.unsqueeze(-3) * scales[..., 1, None, None]  # (B, C, T, 1, 1)
        if kstate is None:
            prior = k.ssm()
            m0, P0 = prior.m0, prior.P0
        else:
            m, P = kstate.mean.to(dt), kstate.cov.to(dt)
            m0 = (base.F @ m.unsqueeze(-1)).squeeze(-1)
            P0 = symmetrize(base.F @ P @ base.F.mT + Q[..., 0, :, :])
        return LinearGaussianSSM(base.F, base.H, Q, R, m0, P0, time_varying=("Q", "R"))

    def _filter(self, y: Tensor, state: HybridState | None, u: Tensor | None = None,
                ratio: Tensor | None = None) -> tuple[Gaussian, HybridState]:
        enc_state = (self.step_encoder.initial_state(y.shape[0], self.n_channels, y.device)
                     if state is None else state.encoder)
        terms, new_enc = self._noise_terms(y, enc_state, None if state is None else state.last,
                                           u, ratio)
        ssm = self.filter_ssm(terms, None if state is None else state.kalman)
        gu = self._feedthrough(u)  # the filter sees y - G u; G u comes back on its mean
        res = kalman_filter(ssm, self._as_kalman(y if gu is None else y - gu),
                            method=self.kalman.method, covariances="last")
        mean = res.predicted_obs_mean[..., 0].transpose(1, 2).to(y.dtype)  # (B, T, C)
        if gu is not None:
            mean = mean + gu
        var = res.predicted_obs_cov[..., 0, 0].transpose(1, 2).to(y.dtype)
        kstate = KalmanState(res.filtered_mean[..., -1, :], res.filtered_cov[..., -1, :, :])
        return Gaussian(mean, var), HybridState(kstate, new_enc, y[:, -1])

    def one_step(self, y: Tensor, state: HybridState | None = None, *,
                 exog: Exog | None = None) -> tuple[Gaussian, HybridState]:
        """Predictive distribution of y[:, t] given y[:, :t] (and ``state``) for every t: the
        filter's, with the encoder's noise levels. Its NLL is the exact negative
        log-likelihood. exog: the inputs (B, T, K) and time steps (B, T) of these rows."""
        y = self._check_series(y, "y")
        state = self._check_state(state, y)
        if y.shape[1] == 0:
            raise DataError("y has no time steps")
        u, _, ratio = self._exog(y, exog, "one_step")
        return self._filter(y, state, u, ratio)

    def noise_scales(self, y: Tensor) -> Tensor:
        """exp(a_t), exp(b_t) (B, T, C, 2): the factors on Q and R the encoder chose for every
        step of y (for inspection: the noise pattern the model recovered)."""
        y = self._check_series(y, "y")
        enc0 = self.step_encoder.initial_state(y.shape[0], self.n_channels, y.device)
        return self._noise_terms(y, enc0, None)[0].exp()

    # ------------------------------------------------------------------ the horizon

    def _one_step_and_forecast(self, context: Tensor, horizon: int, exog: Exog | None = None
                               ) -> tuple[Gaussian, Gaussian]:
        context = self._check_series(context, "context")
        u, u_all, ratio = self._exog(context, exog, "forecast")
        one, state = self._filter(context, None, u, ratio)
        delta, a, b, loc, scale = self._horizon_terms(context, None, u, ratio)
        a = a[:, :horizon].clamp(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT)
        b = b[:, :horizon].clamp(-LOG_SCALE_LIMIT, LOG_SCALE_LIMIT)
        k_mean, k_var = self._filter_forecast(state.kalman, a, b, horizon)
        k_mean = self._with_input_means(k_mean, u_all, context.shape[1], horizon)
        mean = self._combine_mean(k_mean, delta, loc, scale, horizon)
        var = self.var_calibration(k_var, MIN_VAR)
        return one, Gaussian(mean, var)

    def _filter_forecast(self, kstate: KalmanState, a: Tensor, b: Tensor, horizon: int
                         ) -> tuple[Tensor, Tensor]:
        """The filter's horizon moments with the future noise scales exp(a_k), exp(b_k)
        (B, h, C): all lead times at once (time-invariant F and H, see the module docstring)."""
        dt = self.kalman.compute_dtype
        base = self._kalman_matrices()
        h = base.H[..., 0, :]  # (C, n)
        G = (h.unsqueeze(-2).unsqueeze(-2) @ transition_powers(base.F, horizon))[..., 0, :]
        # G (C, h, n): H F^1 .. H F^h; Gq: H F^0 .. H F^(h-1)
        m, P = kstate.mean.to(dt), kstate.cov.to(dt)  # (B, C, n), (B, C, n, n)
        mean = torch.einsum("chn,bcn->bch", G, m)
        state_var = torch.einsum("chn,bcnm,chm->bch", G, P, G)
        Gq = torch.cat([h.unsqueeze(-2), G[:, :-1]], dim=-2)  # (C, h, n)
        q = torch.einsum("chn,cnm,chm->ch", Gq, base.Q, Gq)  # (C, h): noise of lag k
        lag = torch.arange(horizon, device=q.device)
        lags = lag.view(-1, 1) - lag.view(1, -1)  # (h, h): k - j
        toeplitz = torch.where(lags >= 0, q[:, lags.clamp(min=0)], q.new_zeros(()))  # (C,h,h)
        ea = a.to(dt).exp().transpose(1, 2)  # (B, C, h): scale on Q leading into step j
        noise_var = torch.einsum("ckj,bcj->bck", toeplitz, ea)
        r = base.R[..., 0, 0]  # (C,)
        obs_var = r.view(1, -1, 1) * b.to(dt).exp().transpose(1, 2)
        var = state_var + noise_var + obs_var  # (B, C, h)
        dtype = self.encoder.embed.weight.dtype
        return mean.transpose(1, 2).to(dtype), var.transpose(1, 2).to(dtype)

