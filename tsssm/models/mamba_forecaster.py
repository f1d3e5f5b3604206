"""Mamba forecaster: a Mamba stack over (optionally patched) sensor series, Gaussian heads.

Input tokens. Missing entries (NaN) enter as 0 together with a missing-mask feature (1 where
missing), so the model can tell "zero" from "unknown". With ``patch_len = P`` one token covers P
consecutive steps (non-overlapping, aligned to the start of the stream); its features are the P
values and P mask bits of every channel it sees.

Channel modes.
- ``"mixing"``: one sequence per stream, a token holds all C channels; heads predict all C.
- ``"independent"``: every channel is its own sequence of 1-channel tokens through the same
  encoder and heads (PatchTST's channel independence): (B, T, C) runs as (B*C, T, 1). The state
  then holds B*C sequences.

``one_step`` (the anomaly score and the main training signal). The prediction for the steps of
token k comes from the encoder output of token k-1, so it depends on y[:, :kP] only: causal. The
first token's prediction comes from a learned start vector (or the carried state). With P > 1 a
step inside a patch is predicted from the patch boundary before it, not from the steps of its own
patch seen so far. The state carries the encoder state, the last encoder output and the steps of
an incomplete patch, so chunked calls equal one call for any chunk boundaries.
No instance normalisation here: causal running statistics would slowly absorb exactly the level
shifts and drifts the anomaly score should flag, and the pipeline already scales every channel
with statistics fitted on training data.

``forecast`` (direct multi-step). From the last encoder output after the context, one linear head
emits the next ``horizon + P - 1`` steps after the last complete patch; the steps of an incomplete
trailing patch are skipped, so the returned ``horizon`` steps always start right after the
context. With ``revin=True`` (state=None only) the context is normalised per stream and channel
by the mean and standard deviation of its observed entries, and the forecast is mapped back
(RevIN without the affine part: the embedding and the head are linear and learn it).

``head="flatten"`` (PatchTST's design, for fixed-length contexts such as the benchmark
protocol's 96 steps): the forecast has its own channel-independent encoder (a second Mamba stack
and embedding; the one-step path keeps ``channel_mode`` and ``patch_len``). It reads the last
``input_len`` context steps (shorter contexts are padded on the left with missing steps),
RevIN-normalised per channel, cut into ``ceil(input_len / forecast_patch_len)`` patches aligned
to the END of the context (a partial first patch is padded with missing steps); one linear map
from the encoder outputs of ALL those patches (flattened) gives the ``horizon`` means and
variances of the channel. ``linear_skip=True`` adds RLinear's path: a linear map from the
normalised ``input_len`` context values straight to the horizon means, shared by all channels;
the encoder then models what the linear map misses. The variance is softplus(head) x the
context's RevIN variance + a learned floor per lead time (in data units). This path needs
``state=None``.

Inputs and time (``exog=Exog(u, dt)``, :mod:`tsssm.models.covariates`). With ``n_inputs = K
> 0`` every token also carries the inputs of its steps (both encoders), the one-step mean gets a
per-step feedthrough ``G u_t`` and the horizon means a causal linear response to the last
context input and the inputs of the forecast rows (the future inputs when known; otherwise the
last input is held and a warning says so). With real time steps (``data.gaps=time``; the
nominal step is the median training step, set by ``initialize``) every token's Δ is scaled by
its real time span over the nominal one (a gap is a longer hold of the SSM state), and the
one-step origin of a token gets ``log(dt / nominal)`` of its first row times a learned vector
(how far ahead the next row lies; zero at init). Without inputs and on an evenly spaced grid
nothing changes, bit for bit. The state carries the inputs and steps of an incomplete patch and
the last input, so chunked calls still equal one call. The forecast rows are taken at the
nominal step (their own ``dt`` is not used).

Variance calibration: forecast variances are multiplied by ``var_calibration`` (one factor per
lead time, 1 until fitted), a component fitted after training on validation windows
(:func:`tsssm.tasks.calibrate.calibrate_horizon_variance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from tsssm.errors import ConfigError, DataError, ModelError
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
from tsssm.models.heads import GaussianHead, HorizonVarianceScale, positive_variance
from tsssm.models.mamba import MambaConfig, MambaStack, MambaStackState, detach_state

ChannelMode = Literal["mixing", "independent"]
HeadKind = Literal["last", "flatten"]

#: Variance floor in scaled data units (the pipeline scales channels to unit variance).
MIN_VAR = 1e-4
#: softplus^-1(0.01): the flatten head's additive variance starts at 1% of the data's variance.
_INV_SOFTPLUS_0_01 = math.log(math.expm1(0.01))
#: Added to the context variance before the square root in RevIN.
REVIN_EPS = 1e-5


@dataclass
class MambaForecasterState:
    """What ``one_step`` carries between calls. Batch ``B`` streams; ``B' = B`` (mixing) or
    ``B*C`` (independent)."""

    encoder: MambaStackState | None  # per-layer conv/SSM states over B' sequences; None = zeros
    last_hidden: Tensor  # (B', d_model): encoder output of the last complete token (or the start)
    pending: Tensor  # (B, r, C), r < patch_len: raw steps of the incomplete trailing patch
    pending_u: Tensor | None = None  # (B, r, K): their inputs (models with inputs)
    pending_ratio: Tensor | None = None  # (B, r): their dt / nominal step (with time steps)
    u_last: Tensor | None = None  # (B, K): the last input seen (held over the next step)

    @property
    def batch_size(self) -> int:
        return self.pending.shape[0]

    def detach(self) -> MambaForecasterState:
        """The same state cut from the autograd graph (for truncated backprop through time)."""
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return MambaForecasterState(
            None if self.encoder is None else detach_state(self.encoder),
            self.last_hidden.detach(),
            self.pending.detach(),
            cut(self.pending_u),
            cut(self.pending_ratio),
            cut(self.u_last),
        )


class MambaForecaster(nn.Module):
    """Probabilistic forecaster (tsssm.models.base.Forecaster) on a Mamba encoder."""

    training_input = "windows"
    uses_exog = ("u", "dt")

    def __init__(
        self,
        n_channels: int,
        d_model: int = 64,
        n_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        horizon: int = 24,
        channel_mode: ChannelMode = "mixing",
        patch_len: int = 1,
        revin: bool = True,
        dropout: float = 0.0,
        scan_backend: str = "auto",
        head: HeadKind = "last",
        input_len: int = 96,
        linear_skip: bool = False,
        head_dropout: float = 0.0,
        forecast_patch_len: int = 16,
        n_inputs: int = 0,
    ) -> None:
        super().__init__()
        check_n_inputs(n_inputs)
        for key, value in (("n_channels", n_channels), ("horizon", horizon)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if not isinstance(patch_len, int) or isinstance(patch_len, bool) or patch_len < 1:
            raise ConfigError(f"model.patch_len must be a positive integer, got {patch_len!r}")
        if channel_mode not in ("mixing", "independent"):
            raise ConfigError(
                f"model.channel_mode must be 'mixing' or 'independent', got {channel_mode!r}"
            )
        if head not in ("last", "flatten"):
            raise ConfigError(f"model.head must be 'last' or 'flatten', got {head!r}")
        if linear_skip and head != "flatten":
            raise ConfigError("model.linear_skip needs model.head=flatten (both read the last "
                              "model.input_len context steps)")
        if head == "flatten":
            if not isinstance(input_len, int) or isinstance(input_len, bool) or input_len < 1:
                raise ConfigError(f"model.input_len must be a positive integer, got {input_len!r}")
            if (not isinstance(forecast_patch_len, int) or isinstance(forecast_patch_len, bool)
                    or forecast_patch_len < 1):
                raise ConfigError(f"model.forecast_patch_len must be a positive integer, got "
                                  f"{forecast_patch_len!r}")
        if not 0.0 <= head_dropout < 1.0:
            raise ConfigError(f"model.head_dropout must be in [0, 1), got {head_dropout!r}")
        self.n_channels = n_channels
        self.horizon = horizon
        self.channel_mode = channel_mode
        self.head = head
        self.input_len = input_len
        self.linear_skip = bool(linear_skip)
        self.patch_len = patch_len
        self.revin = bool(revin)
        self.n_inputs = n_inputs
        self.config = MambaConfig(
            d_model=d_model,
            n_layers=n_layers,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dropout=dropout,
            scan_backend=scan_backend,
        )

        # Channels one token sees and one head predicts.
        c_tok = n_channels if channel_mode == "mixing" else 1
        self._c_tok = c_tok
        # values, missing-mask bits (and the inputs of the token's steps)
        self.embed = nn.Linear(patch_len * (2 * c_tok + n_inputs), d_model)
        self.embed_dropout = nn.Dropout(dropout)
        self.encoder = MambaStack(self.config)
        #: Encoder output that predicts the very first token of a stream.
        self.start = nn.Parameter(torch.zeros(d_model))
        self.step_head = GaussianHead(d_model, patch_len * c_tok, min_var=MIN_VAR)
        # Steps from the last complete patch: up to patch_len - 1 context steps, then the horizon.
        self._forecast_span = horizon + patch_len - 1
        if head == "last":
            self.forecast_head = GaussianHead(d_model, self._forecast_span * c_tok,
                                              min_var=MIN_VAR)
        else:  # its own channel-independent encoder; every patch of the context, flattened
            self.forecast_patch_len = forecast_patch_len
            self.forecast_embed = nn.Linear(forecast_patch_len * (2 + n_inputs), d_model)
            self.forecast_encoder = MambaStack(self.config)
            n_tok = -(-input_len // forecast_patch_len)  # a partial first patch is padded
            self.forecast_head = GaussianHead(n_tok * d_model, horizon, min_var=MIN_VAR)
        self.head_dropout = nn.Dropout(head_dropout)
        if head == "flatten":
            # A variance floor per lead time in data units, beside the part proportional to the
            # context's RevIN variance: a near-constant context must not promise a tiny error.
            self.var_offset = nn.Parameter(torch.full((horizon,), _INV_SOFTPLUS_0_01))
        if self.linear_skip:  # RLinear: input_len normalised values -> horizon means, per channel
            self.skip = nn.Linear(input_len, horizon)
        self.var_calibration = HorizonVarianceScale(horizon)
        # input_gain, input_response, lead_time, nominal_step: last, without random draws
        add_exog_weights(self, n_channels, horizon, n_inputs, d_model)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def initialize(self, y: Tensor, exog: Exog | None = None) -> None:
        """Learn the time grid from training streams: where their time steps (``exog.dt``
        (B, T)) vary (real steps, data.gaps=time), the nominal step is their median; evenly
        spaced training data (every gaps mode on a regular grid) leave the model on the grid
        of rows, and it ignores time steps (as data.gaps=keep means)."""
        self.nominal_step.fill_(nominal_step(exog))

    @property
    def runs_without_exog(self) -> bool:
        """Without inputs and without a time grid, exog changes nothing: callers (the batch
        scorer) may leave it out."""
        return self.n_inputs == 0 and bool(torch.isnan(self.nominal_step))

    def initial_state(self, batch: int, device: torch.device | None = None) -> MambaForecasterState:
        """The prior state: zero encoder state, the learned start, no pending steps."""
        device = self.start.device if device is None else device
        n_seq = batch * (1 if self.channel_mode == "mixing" else self.n_channels)
        return MambaForecasterState(
            encoder=None,
            last_hidden=self.start.to(device).expand(n_seq, -1),
            pending=torch.zeros(batch, 0, self.n_channels, device=device),
            pending_u=(torch.zeros(batch, 0, self.n_inputs, device=device) if self.n_inputs
                       else None),
        )

    def one_step(
        self, y: Tensor, state: MambaForecasterState | None = None, *,
        exog: Exog | None = None, validate: bool = True,
    ) -> tuple[Gaussian, MambaForecasterState]:
        """Predictive distribution of y[:, t] given y[:, :t] (and ``state``) for every t.

        y: (B, T, C), NaN = missing; exog: the inputs u (B, T, K) and time steps dt (B, T) of
        these rows (see the module docstring). Returns (Gaussian (B, T, C), state after the
        last step). ``validate=False`` skips the check for ±inf in y, which on a GPU waits for
        it: for a caller that checks what comes out (an inf makes its row's score non-finite:
        tsssm.scoring.scorer).
        """
        y = self._check_series(y, "y", validate)
        state = self._check_state(state, y)
        u, ratio = self._exog(y, exog, "one_step")
        u = None if u is None else u[:, : y.shape[1]]
        length, r, p = y.shape[1], state.pending.shape[1], self.patch_len
        series = torch.cat([state.pending.to(y.dtype), y], dim=1)  # (B, r+T, C)
        u_series = None if u is None else torch.cat([state.pending_u.to(u.dtype), u], dim=1)
        ratio_series = self._ratio_series(state, ratio, length)  # (B, r+T) or None
        n_tok = series.shape[1] // p

        hidden, encoder_state, last_hidden = self._encode(
            series[:, : n_tok * p], state, None if u_series is None else u_series[:, : n_tok * p],
            None if ratio_series is None else ratio_series[:, : n_tok * p])
        # Token k is predicted from the output of token k-1; the first from the carried one.
        origins = torch.cat([state.last_hidden.unsqueeze(1), hidden], dim=1)  # (B', n_tok+1, d)
        n_pred = -(-series.shape[1] // p)  # tokens touching the series: ceil((r+T)/P)
        origins = origins[:, :n_pred]
        lead = lead_log_ratio(ratio_series, p, n_pred)  # (B, n_pred): how far ahead each lies
        if lead is not None:
            origins = origins + self._per_sequence_rows(lead)[..., None] * self.lead_time
        dist = self.step_head(origins)  # (B', n_pred, P*c_tok)
        mean = self._tokens_to_series(dist.mean, y.shape[0])[:, r : r + length]  # (B, T, C)
        var = self._tokens_to_series(dist.var, y.shape[0])[:, r : r + length]
        if u is not None:  # feedthrough of the inputs of the predicted rows
            mean = mean + u.to(mean.dtype) @ self.input_gain.t()
        new_state = MambaForecasterState(
            encoder_state, last_hidden, series[:, n_tok * p :],
            None if u_series is None else u_series[:, n_tok * p :],
            None if ratio_series is None else ratio_series[:, n_tok * p :],
            (u[:, -1] if length else state.u_last) if u is not None else None,
        )
        return Gaussian(mean, var), new_state

    def forecast(
        self, context: Tensor, horizon: int, state: MambaForecasterState | None = None, *,
        exog: Exog | None = None,
    ) -> Gaussian:
        """Predictive distribution of the ``horizon`` steps after ``context`` (B, L, C).

        Returns Gaussian (B, horizon, C). With ``state`` (from ``one_step``) the context continues
        the carried stream and may be empty; RevIN then cannot be used (see module docstring).
        exog: u over the context and the horizon (B, L + horizon, K) when the future inputs are
        known, over the context only (B, L, K) when not (the last input is held); dt over the
        context (more rows are ignored).
        """
        if not isinstance(horizon, int) or not 1 <= horizon <= self.horizon:
            raise ModelError(
                f"forecast horizon must be an integer in [1, {self.horizon}] (the model's "
                f"horizon), got {horizon!r}; retrain with a larger model.horizon for longer ones"
            )
        context = self._check_series(context, "context")
        if self.head == "flatten":
            if state is not None:
                raise ModelError(
                    "forecast with a carried state needs model.head=last: the flatten head reads "
                    "the last input_len context steps themselves; pass the full context with "
                    "state=None"
                )
            return self._forecast_flatten(context, horizon, exog)
        if state is not None and self.revin:
            raise ModelError(
                "forecast with a carried state needs revin=False: RevIN normalises by statistics "
                "of the whole context, which a carried state has already consumed unnormalised; "
                "pass the full context with state=None or set model.revin=false"
            )
        state = self._check_state(state, context)
        batch, p = context.shape[0], self.patch_len
        u, ratio = self._exog(context, exog, "forecast")
        series = torch.cat([state.pending.to(context.dtype), context], dim=1)  # (B, r+L, C)
        u_series = (None if u is None else
                    torch.cat([state.pending_u.to(u.dtype), u[:, : context.shape[1]]], dim=1))
        ratio_series = self._ratio_series(state, ratio, context.shape[1])
        n_tok = series.shape[1] // p
        skip = series.shape[1] - n_tok * p  # steps of the incomplete trailing patch

        loc = scale = None
        if self.revin:
            loc, scale = _observed_mean_std(series)  # (B, 1, C) each
            series = (series - loc) / scale
        _, _, last_hidden = self._encode(
            series[:, : n_tok * p], state, None if u_series is None else u_series[:, : n_tok * p],
            None if ratio_series is None else ratio_series[:, : n_tok * p])
        if loc is not None:
            loc, scale = self._per_sequence(loc), self._per_sequence(scale)  # (B', 1, c_tok)
        dist = self.forecast_head(
            last_hidden.unsqueeze(1),
            loc=None if loc is None else loc.repeat(1, 1, self._forecast_span),
            scale=None if scale is None else scale.repeat(1, 1, self._forecast_span),
        )  # (B', 1, span*c_tok), channel fastest
        mean = self._tokens_to_series(dist.mean, batch, steps=self._forecast_span)
        var = self._tokens_to_series(dist.var, batch, steps=self._forecast_span)
        mean, var = mean[:, skip : skip + horizon], var[:, skip : skip + horizon]
        if u is not None:
            mean = mean + self._input_response(exog.u, context.shape[1], horizon, state.u_last)
        return Gaussian(mean, self.var_calibration(var - MIN_VAR, MIN_VAR))

    def _forecast_flatten(self, context: Tensor, horizon: int, exog: Exog | None = None
                          ) -> Gaussian:
        """The flatten head over the patches of the last input_len steps (see module doc)."""
        batch, channels = context.shape[0], self.n_channels
        window, loc, scale = self._last_window(context)  # (B, input_len, C), (B, 1, C) x2
        u, ratio = self._exog(context, exog, "forecast")
        p = self.forecast_patch_len
        n_tok = -(-self.input_len // p)
        n_steps = n_tok * p
        padded = window
        if n_steps > self.input_len:  # the first patch starts before the window: missing
            padded = torch.cat([window.new_full((batch, n_steps - self.input_len, channels),
                                                float("nan")), window], dim=1)
        missing = padded.isnan()
        feats = torch.stack([padded.masked_fill(missing, 0.0), missing.to(padded.dtype)], -1)
        tokens = feats.permute(0, 2, 1, 3).reshape(batch * channels, n_tok, p, 2)
        tokens = torch.cat([tokens[..., 0], tokens[..., 1]], dim=-1)  # (B*C, n_tok, 2P)
        time_scale = None
        if u is not None:  # the inputs of every step of the patch, shared by the channels
            u_win = _left_pad(_left_pad(u[:, : context.shape[1]], self.input_len, 0.0), n_steps,
                              0.0).reshape(batch, n_tok, p * self.n_inputs)
            tokens = torch.cat([tokens, per_sequence(u_win.to(tokens.dtype), channels)], -1)
        if ratio is not None:  # padded steps count as nominal
            ratio_win = _left_pad(_left_pad(ratio, self.input_len, 1.0), n_steps, 1.0)
            time_scale = per_sequence(token_time_scale(ratio_win, p), channels)
        hidden, _ = self.forecast_encoder(self.embed_dropout(self.forecast_embed(tokens)),
                                          time_scale=time_scale)
        flat = self.head_dropout(hidden.flatten(1))  # (B*C, n_tok*d)
        mean_n, raw_var = self.forecast_head.proj(flat).split(self.horizon, dim=-1)
        mean_n = mean_n.reshape(batch, channels, self.horizon).transpose(1, 2)  # (B, H, C)
        raw_var = raw_var.reshape(batch, channels, self.horizon).transpose(1, 2)
        if self.linear_skip:
            mean_n = mean_n + self._skip_path(window)
        mean = mean_n * scale + loc
        var = positive_variance(raw_var, 0.0, scale) + softplus(self.var_offset)[:, None]
        mean, var = mean[:, :horizon], var[:, :horizon]
        if u is not None:
            mean = mean + self._input_response(exog.u, context.shape[1], horizon)
        return Gaussian(mean, self.var_calibration(var, MIN_VAR))

    def _last_window(self, series: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The last input_len steps (left-padded with NaN), RevIN-normalised when revin is on.

        Returns (window (B, input_len, C), loc (B, 1, C), scale (B, 1, C)); loc 0 and scale 1
        without RevIN."""
        L = self.input_len
        if series.shape[1] >= L:
            window = series[:, series.shape[1] - L :]
        else:
            pad = series.new_full((series.shape[0], L - series.shape[1], series.shape[2]),
                                  float("nan"))
            window = torch.cat([pad, series], dim=1)
        if self.revin:
            loc, scale = _observed_mean_std(window)
            window = (window - loc) / scale
        else:
            loc = window.new_zeros(window.shape[0], 1, window.shape[2])
            scale = torch.ones_like(loc)
        return window, loc, scale

    def _skip_path(self, window: Tensor) -> Tensor:
        """RLinear: (B, input_len, C) normalised values (NaN = missing -> 0) -> (B, H, C)."""
        return self.skip(window.nan_to_num(0.0).transpose(1, 2)).transpose(1, 2)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that AdamW should not decay: SSM dynamics, norms, biases, start."""
        names = set()
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "D", "bias", "start") or param.ndim < 2:
                names.add(name)
        return names

    # ------------------------------------------------------------------ internals

    def _exog(self, y: Tensor, exog: Exog | None, what: str
              ) -> tuple[Tensor | None, Tensor | None]:
        """The call's inputs (B, T', K) (all rows given, for a forecast's horizon) or None and
        time ratios dt / nominal (B, T) or None."""
        return checked_exog(exog, y, self.n_inputs, self.nominal_step, what)

    def _ratio_series(self, state: MambaForecasterState, ratio: Tensor | None, length: int
                      ) -> Tensor | None:
        """The carried pending rows' ratios and this call's (B, r+T), None without time."""
        if ratio is None and state.pending_ratio is None:
            return None
        b, r = state.pending.shape[:2]
        device = state.pending.device
        pending = (state.pending_ratio if state.pending_ratio is not None
                   else torch.ones(b, r, device=device))
        new = ratio if ratio is not None else torch.ones(b, length, device=device)
        return torch.cat([pending.to(new.dtype), new], dim=1)

    def _per_sequence_rows(self, x: Tensor) -> Tensor:
        """(B, n, ...) per stream -> (B', n, ...) per encoder sequence."""
        return x if self.channel_mode == "mixing" else per_sequence(x, self.n_channels)

    def _input_response(self, u: Tensor, context_len: int, horizon: int,
                        u_last: Tensor | None = None) -> Tensor:
        """The horizon means' response to the forecast's inputs (B, horizon, C)."""
        v = horizon_inputs(self, u.to(self.embed.weight.dtype), context_len, horizon, u_last)
        return self.input_response(v, horizon)

    def _encode(
        self, series: Tensor, state: MambaForecasterState, u: Tensor | None = None,
        ratio: Tensor | None = None,
    ) -> tuple[Tensor, MambaStackState | None, Tensor]:
        """Complete patches (B, n*P, C) (their inputs (B, n*P, K), time ratios (B, n*P)) ->
        hidden (B', n, d), encoder state, last hidden (B', d)."""
        if series.shape[1] == 0:
            d = self.config.d_model
            return (
                state.last_hidden.new_zeros(state.last_hidden.shape[0], 0, d),
                (state.encoder),
                state.last_hidden,
            )
        tokens = self._series_to_tokens(series)
        if u is not None:  # every token also holds the inputs of its steps
            b, n = series.shape[0], series.shape[1] // self.patch_len
            tokens = torch.cat([tokens, self._per_sequence_rows(
                u.reshape(b, n, self.patch_len * self.n_inputs).to(tokens.dtype))], dim=-1)
        time_scale = token_time_scale(ratio, self.patch_len)
        if time_scale is not None:
            time_scale = self._per_sequence_rows(time_scale)
        tokens = self.embed_dropout(self.embed(tokens))  # (B', n, d)
        hidden, encoder_state = self.encoder(tokens, state.encoder, time_scale)
        return hidden, encoder_state, hidden[:, -1]

    def _series_to_tokens(self, series: Tensor) -> Tensor:
        """(B, n*P, C) with NaN -> tokens (B', n, 2*P*c_tok): values (NaN -> 0), then mask."""
        missing = series.isnan()
        values = series.masked_fill(missing, 0.0)
        feats = torch.stack([values, missing.to(values.dtype)], dim=0)  # (2, B, n*P, C)
        _, batch, steps, channels = feats.shape
        n, p = steps // self.patch_len, self.patch_len
        if self.channel_mode == "mixing":
            feats = feats.reshape(2, batch, n, p * channels)  # step-major, channel fastest
        else:
            feats = feats.permute(0, 1, 3, 2).reshape(2, batch * channels, n, p)
        return torch.cat([feats[0], feats[1]], dim=-1)

    def _tokens_to_series(self, out: Tensor, batch: int, steps: int | None = None) -> Tensor:
        """Head output (B', k, S*c_tok), step-major and channel fastest -> (B, k*S, C)."""
        steps = self.patch_len if steps is None else steps
        n_seq, k, _ = out.shape
        if self.channel_mode == "mixing":
            return out.reshape(batch, k * steps, self.n_channels)
        return out.reshape(batch, self.n_channels, k * steps).transpose(1, 2)

    def _per_sequence(self, stat: Tensor) -> Tensor:
        """(B, 1, C) per-channel statistics -> (B', 1, c_tok), matching the encoder's sequences."""
        if self.channel_mode == "mixing":
            return stat
        return stat.transpose(1, 2).reshape(-1, 1, 1)

    def _check_series(self, y: Tensor, name: str, validate: bool = True) -> Tensor:
        """Validate a (B, T, C) series and cast it to the model's dtype (float64 data is fine)."""
        if not isinstance(y, Tensor) or y.ndim != 3 or y.shape[-1] != self.n_channels:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise DataError(
                f"{name} must be a tensor (batch, time, {self.n_channels} channels), got {shape}"
            )
        if not y.is_floating_point():
            raise DataError(f"{name} must be floating point (NaN marks missing), got {y.dtype}")
        if validate and torch.isinf(y).any():
            raise DataError(
                f"{name} contains ±inf; mark missing observations with NaN and clip or drop "
                "infinite sensor readings before scaling"
            )
        return y.to(self.embed.weight.dtype)

    def _check_state(self, state: MambaForecasterState | None, y: Tensor) -> MambaForecasterState:
        if state is None:
            return self.initial_state(y.shape[0], y.device)
        if not isinstance(state, MambaForecasterState):
            raise ModelError(
                f"state must be a MambaForecasterState returned by MambaForecaster.one_step, got "
                f"{type(state).__name__}"
            )
        if state.batch_size != y.shape[0]:
            raise ModelError(
                f"state was built for batch {state.batch_size} but the input has batch "
                f"{y.shape[0]}; carry one state per set of streams"
            )
        return state


def _left_pad(x: Tensor, length: int, value: float) -> Tensor:
    """The last ``length`` rows of x (B, T, ...), padded on the left with ``value``."""
    if x.shape[1] >= length:
        return x[:, x.shape[1] - length :]
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)
    return torch.cat([pad, x], dim=1)


def _observed_mean_std(series: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(stream, channel) mean and std over observed entries: (B, T, C) -> (B, 1, C) each.

    A channel with no observation gets mean 0 and std 1 (the identity), never NaN.
    """
    observed = ~series.isnan()
    values = series.masked_fill(~observed, 0.0)
    count = observed.sum(dim=1, keepdim=True).to(series.dtype)  # (B, 1, C)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    var = ((values - mean) * observed).square().sum(dim=1, keepdim=True) / count.clamp(min=1)
    std = torch.sqrt(var + REVIN_EPS)
    has_data = count > 0
    return mean.masked_fill(~has_data, 0.0), std.masked_fill(~has_data, 1.0)
