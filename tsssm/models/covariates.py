"""Exogenous inputs and real time steps for the neural forecasters (Mamba, hybrids).

Pure helpers over :class:`tsssm.models.base.Exog` shared by
:mod:`tsssm.models.mamba_forecaster` and :mod:`tsssm.models.hybrid`:

- time: a model learns its nominal step (the median training step, ``initialize``, where the
  training steps vary: real time steps; evenly spaced training data give none); a row's
  ``dt / nominal`` scales the Δ of the Mamba scan (:func:`tsssm.models.mamba.time_scaled_delta`)
  and, as ``log(dt / nominal)``, tells the one-step head how far ahead the next row lies.
  Without a nominal step (a model built outside the pipeline, or a bundle from before time
  steps) or without ``dt``, or where every step is the nominal one, nothing changes: today's
  path, bit for bit.
- inputs: ``u`` (B, T, K) are features of the encoder tokens; :class:`InputResponse` adds a
  causal linear response of the horizon means to the inputs over the forecast (the last context
  input, held over the first forecast step, and the future inputs); unknown future inputs are
  the last input held (:func:`horizon_inputs`, which says so once).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from tsssm.errors import ConfigError, DataError
from tsssm.models.base import Exog

log = logging.getLogger("tsssm")


def exog_rows(exog: Exog | None, batch: int, rows: int, n_inputs: int, what: str
              ) -> tuple[Tensor | None, Tensor | None]:
    """The (u (B, rows, K) or None, dt (B, rows) or None) of a call over ``rows`` rows, checked.

    ``exog.u`` / ``exog.dt`` may cover more rows (a forecast's horizon); the first ``rows`` are
    returned. The inputs are required when ``n_inputs > 0`` and ignored otherwise."""
    u = dt = None
    if exog is not None and exog.dt is not None:
        dt = exog.dt
        if dt.ndim != 2 or dt.shape[0] != batch or dt.shape[1] < rows:
            raise DataError(f"{what}: time steps dt have shape {tuple(dt.shape)}, expected "
                            f"({batch}, {rows}) or longer")
        dt = dt[:, :rows]
        if rows and not bool(torch.isfinite(dt).all() and (dt > 0).all()):
            raise DataError(f"{what}: time steps dt must be finite and positive (the time "
                            "since the previous row; rows sorted, no duplicates)")
    if n_inputs:
        u = None if exog is None else exog.u
        if u is None:
            raise DataError(f"{what}: the model takes {n_inputs} inputs (data.inputs); pass them "
                            f"as exog=Exog(u=(B, T, {n_inputs}))")
        if u.ndim != 3 or u.shape[0] != batch or u.shape[1] < rows or u.shape[2] != n_inputs:
            raise DataError(f"{what}: inputs u have shape {tuple(u.shape)}, expected ({batch}, "
                            f"{rows} or more, {n_inputs})")
        if not bool(torch.isfinite(u).all()):
            raise DataError(f"{what}: inputs u must be finite (inputs are never missing)")
    return u, dt


def check_n_inputs(n_inputs: Any) -> int:
    """``model.n_inputs`` (the number of known inputs, data.inputs) checked: an integer >= 0."""
    if not isinstance(n_inputs, int) or isinstance(n_inputs, bool) or n_inputs < 0:
        raise ConfigError(f"model.n_inputs must be an integer >= 0, got {n_inputs!r}")
    return n_inputs


def checked_exog(exog: Exog | None, y: Tensor, n_inputs: int, nominal: Tensor, what: str
                 ) -> tuple[Tensor | None, Tensor | None]:
    """A neural forecaster's exog for a call over y (B, T, C), checked (:func:`exog_rows`):
    the inputs as given (B, T', K) in y's dtype (T' >= T: a forecast's horizon too) or None,
    and the time ratios dt / nominal (B, T) or None."""
    u, dt = exog_rows(exog, y.shape[0], y.shape[1], n_inputs, what)
    if u is not None:
        u = exog.u.to(y.dtype)
    return u, time_ratio(dt, nominal)


def add_exog_weights(module: nn.Module, n_channels: int, horizon: int, n_inputs: int,
                     d_model: int) -> None:
    """The weights of inputs and time steps, registered on ``module`` last and without random
    draws (a model without inputs is initialised as before, weight for weight):
    ``input_gain`` (C, K), the per-step feedthrough of the inputs into the one-step mean
    (y_t = H x_t + G u_t + v_t in a Kalman part), and ``input_response`` (with inputs only);
    ``lead_time`` (d_model,), how far the one-step origins move per log(dt / nominal) of the
    predicted row; the buffer ``nominal_step``, the median training time step (NaN: unknown,
    time steps are not used). Bundles from before time steps load with their defaults."""
    if n_inputs:
        module.input_gain = nn.Parameter(torch.zeros(n_channels, n_inputs))
        module.input_response = InputResponse(n_channels, horizon, n_inputs)
    module.lead_time = nn.Parameter(torch.zeros(d_model))
    module.register_buffer("nominal_step", torch.tensor(float("nan"), dtype=torch.float64))
    register_time_defaults(module, {"nominal_step": float("nan"), "lead_time": 0.0})


def nominal_step(exog: Exog | None) -> float:
    """The nominal time step learnt from training steps ``exog.dt`` (B, T): their median where
    they vary along a stream (real time steps, data.gaps=time), NaN (no time grid: time steps
    ignored) where every stream's steps are constant or absent. Under data.gaps=keep/mask/fill
    a stream carries its median step on every row, so such models stay on the grid of rows."""
    if exog is None or exog.dt is None or exog.dt.numel() == 0:
        return float("nan")
    dt = exog.dt.double().reshape(-1, exog.dt.shape[-1])
    if bool((dt == dt[:, :1]).all()):
        return float("nan")
    return float(dt.median())


def time_ratio(dt: Tensor | None, nominal: Tensor) -> Tensor | None:
    """dt / nominal step (B, T) float32, or None without a time grid (no dt, or no nominal step:
    NaN)."""
    if dt is None or bool(torch.isnan(nominal)):
        return None
    return (dt.double() / nominal.double().to(dt.device)).float()


def token_time_scale(ratio: Tensor | None, patch_len: int) -> Tensor | None:
    """Per token (B, n) the real time a token of ``patch_len`` rows spans over the nominal span
    (the mean ratio of its rows), from ``ratio`` (B, n*P); None where every row is nominal, so
    the scan takes today's exact path."""
    if ratio is None or ratio.shape[1] == 0 or bool((ratio == 1).all()):
        return None
    b, steps = ratio.shape
    return ratio.reshape(b, steps // patch_len, patch_len).mean(-1)


def lead_log_ratio(ratio: Tensor | None, patch_len: int, n_tokens: int) -> Tensor | None:
    """log(ratio) of the first row of each of ``n_tokens`` tokens (B, n) (how far the token's
    first row lies after the previous token), or None where all are nominal. ``ratio`` (B, >=
    (n-1)*P + 1)."""
    if ratio is None or n_tokens == 0:
        return None
    first = ratio[:, ::patch_len][:, :n_tokens]
    if bool((first == 1).all()):
        return None
    return first.log()


def per_sequence(x: Tensor | None, channels: int) -> Tensor | None:
    """(B, n, ...) per stream -> (B*C, n, ...) per channel sequence (stream-major), for
    channel-independent encoders; None stays None."""
    if x is None or channels == 1:
        return x
    return x.repeat_interleave(channels, dim=0)


def horizon_inputs(model: nn.Module, u: Tensor, context_len: int, horizon: int,
                   u_last: Tensor | None = None) -> Tensor:
    """The inputs driving a forecast: (B, horizon + 1, K) = the last context input (held over
    the first forecast step) and the inputs of the horizon rows.

    u (B, L or L + horizon, K) from ``exog.u``; with L rows only (future inputs unknown) the
    last input is held and a warning says so (once per model). ``u_last`` (B, K): the input
    before an empty context (a carried state)."""
    b, k = u.shape[0], u.shape[2]
    if context_len > 0:
        last = u[:, context_len - 1 : context_len]
    elif u_last is not None:
        last = u_last[:, None]
    else:
        raise DataError("forecast with an empty context and no carried inputs: pass the "
                        "context's inputs or the state of one_step")
    if u.shape[1] >= context_len + horizon:
        future = u[:, context_len : context_len + horizon]
    elif u.shape[1] == context_len:
        if not getattr(model, "_warned_hold", False):
            log.warning("%s: the inputs of the forecast horizon are unknown; holding the last "
                        "input (known setpoints: data.future_inputs=known)",
                        type(model).__name__)
            model._warned_hold = True
        future = last.expand(b, horizon, k)
    else:
        raise DataError(f"exog.u covers {u.shape[1]} rows; give the context's {context_len} "
                        f"or the context and horizon's {context_len + horizon}")
    return torch.cat([last.to(u.dtype), future], dim=1)


class InputResponse(nn.Module):
    """Causal linear response of the horizon means to the forecast's inputs, per channel:
    mean_k += sum_{j <= k} W[c, k, j] v_j, with v_0 the last context input (held over the first
    step) and v_j the input of forecast row j (a feedthrough at j = k). Zero at init."""

    def __init__(self, n_channels: int, horizon: int, n_inputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_channels, horizon, horizon + 1, n_inputs))
        lead = torch.arange(horizon).view(-1, 1)
        row = torch.arange(horizon + 1).view(1, -1)
        self.register_buffer("mask", (row <= lead + 1).float(), persistent=False)  # (H, H+1)

    def forward(self, v: Tensor, horizon: int) -> Tensor:
        """v (B, horizon + 1, K) -> (B, horizon, C)."""
        w = self.weight[:, :horizon, : horizon + 1] * self.mask[:horizon, : horizon + 1, None]
        return torch.einsum("chjk,bjk->bhc", w.to(v.dtype), v)


def register_time_defaults(module: nn.Module, names: dict[str, float]) -> None:
    """Let ``module`` load weights saved before it had the given buffers/parameters (bundles
    from before time steps): a missing entry gets its default (NaN nominal step = no time
    grid, zero lead-time weights = no effect), so old models behave as they did."""

    def fill(state_dict, prefix, *args, **kwargs):
        for name, value in names.items():
            key = prefix + name
            if key not in state_dict:
                current = getattr(module, name)
                state_dict[key] = torch.full_like(current, value)

    module._register_load_state_dict_pre_hook(fill)
