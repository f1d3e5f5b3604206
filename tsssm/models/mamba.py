"""Mamba encoder: selective state space blocks in a pre-norm residual stack, with carried state.

A block (``MambaBlock``) maps ``(B, L, d_model) -> (B, L, d_model)``:

1. ``in_proj`` to ``2 * d_inner``: the SSM branch ``x`` and the gate ``z``;
2. a causal depthwise conv1d (kernel ``d_conv``) on ``x``, then SiLU;
3. ``x_proj`` to the input-dependent ``dt`` (rank ``dt_rank``), ``B`` and ``C`` (``d_state`` each);
4. ``dt_proj`` lifts ``dt`` to ``d_inner`` channels; its bias is passed to the scan as
   ``delta_bias`` and softplus is applied inside the scan (so the fused kernel does it);
5. the selective scan with ``A = -exp(A_log)`` and skip ``D``, gated by ``silu(z)``;
6. ``out_proj`` back to ``d_model``.

Irregular sampling: ``forward(x, state, time_scale)`` takes ``time_scale`` (B, L), each token's
real time step over the nominal one. Δ is then ``softplus(dt_proj(x) + bias) * time_scale``,
computed before the scan (the scan runs with softplus off; the kernels are unchanged), so the
state decays and integrates its input over the real interval (zero-order hold of the
continuous system ``h' = A h + B x``): a gap is a longer hold, not a silent jump. The causal
conv still mixes the last ``d_conv`` tokens by position. ``time_scale=None`` is today's path
(softplus inside the scan) bit for bit.

Recurrent inference: every block carries ``MambaBlockState`` = the last ``d_conv - 1`` inputs of
the conv (``conv``) and the SSM state (``ssm``, float32). ``forward(x, state)`` returns the new
state, and running a sequence in chunks with the state carried equals one pass over it (up to
float rounding): the conv sees the carried inputs as its left context instead of zero padding,
and the scan starts from the carried SSM state. A call with ``L == 1`` takes the single-step path
(``selective_state_update``) when autograd is off, which is what a streaming loop hits. A long
sequence in inference on a GPU (scoring a file in chunks of 2^20 rows) is scanned in segments side
by side, exactly (``SEGMENT_ROWS``, tsssm.ssm.segmented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import silu

from tsssm.errors import ConfigError, ModelError
from tsssm.ssm import selective_scan, selective_state_update
from tsssm.ssm.segmented import segmented_scan

_BACKENDS = ("auto", "torch", "triton")
#: inference scans of one long sequence (scoring a stream) run in segments of this many steps
#: side by side (exact: tsssm.ssm.segmented), on these devices, when batch * d_inner is below
#: SEGMENT_LANES (a wide batch keeps the GPU busy already)
SEGMENT_ROWS = 8192
SEGMENT_DEVICES = ("cuda",)
SEGMENT_LANES = 8192


@dataclass
class MambaConfig:
    """Hyper-parameters of a Mamba stack. Defaults follow the Mamba paper's block."""

    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    #: rank of the Δ projection; "auto" = ceil(d_model / 16).
    dt_rank: int | str = "auto"
    #: Δ at init is log-uniform in [dt_min, dt_max], floored at dt_init_floor.
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    scan_backend: str = "auto"

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "d_state", "d_conv", "expand"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if self.dt_rank != "auto" and (
            not isinstance(self.dt_rank, int) or isinstance(self.dt_rank, bool) or self.dt_rank < 1
        ):
            raise ConfigError(
                f"model.dt_rank must be a positive integer or 'auto', got {self.dt_rank!r}"
            )
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ConfigError(
                f"model.dt_min/dt_max must satisfy 0 < dt_min <= dt_max, "
                f"got {self.dt_min!r}, {self.dt_max!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.scan_backend not in _BACKENDS:
            raise ConfigError(
                f"model.scan_backend must be one of {_BACKENDS}, got {self.scan_backend!r}"
            )

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)


class MambaBlockState(NamedTuple):
    """What one block carries between calls."""

    conv: Tensor  # (B, d_inner, d_conv - 1): the last d_conv - 1 conv inputs, oldest first
    ssm: Tensor  # (B, d_inner, d_state), float32


#: One ``MambaBlockState`` per layer, bottom first.
MambaStackState = tuple[MambaBlockState, ...]


def time_scaled_delta(delta: Tensor, bias: Tensor, time_scale: Tensor) -> Tensor:
    """Δ over the real time step: softplus(delta + bias) * time_scale.

    delta (B, D, L), bias (D,), time_scale (B, L) -> (B, D, L) float32, for a scan with
    ``delta_softplus=False`` and no ``delta_bias``."""
    raw = delta.float() + bias.float()[:, None]
    return torch.nn.functional.softplus(raw) * time_scale.float()[:, None, :]


def _project(weight: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """A linear map (weight (D_out, D_in), bias (D_out,)) along the channel axis of a
    channels-first x (B, D_in, L): (B, D_out, L). One sequence (a long stream scored): one
    matrix product that writes that layout contiguous, whatever x's strides (a transposed x is
    a transposed operand, not a copy). A batch (training windows): ``linear`` over time-major
    rows, returned as a view (a broadcast matmul would copy x first)."""
    if x.shape[0] != 1:
        return torch.nn.functional.linear(x.transpose(1, 2), weight, bias).transpose(1, 2)
    if bias is None:
        return (weight @ x[0]).unsqueeze(0)
    return torch.addmm(bias[:, None], weight, x[0]).unsqueeze(0)


def _inverse_softplus(x: Tensor) -> Tensor:
    """y such that softplus(y) = x, for x > 0 (stable for small x)."""
    return x + torch.log(-torch.expm1(-x))


class MambaBlock(nn.Module):
    """One selective SSM mixer: (B, L, d_model) -> (B, L, d_model), with carried state."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        d_model, d_inner, n = config.d_model, config.d_inner, config.d_state
        dt_rank = config.resolved_dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, n, config.d_conv, dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=config.proj_bias)
        # No padding here: the causal left context is the carried conv state (zeros at the start).
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, kernel_size=config.d_conv, groups=d_inner, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=config.proj_bias)

        # S4D-real: A[:, n] = -(n + 1) for every channel; stored as log so A stays negative.
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """Δ init: unit-variance weights; bias = softplus⁻¹(Δ) with Δ ~ logU[dt_min, dt_max]."""
        cfg = self.config
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(_inverse_softplus(dt))

    @property
    def A(self) -> Tensor:
        return -torch.exp(self.A_log.float())  # (d_inner, N)

    def zero_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaBlockState:
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return MambaBlockState(conv, ssm)

    def forward(
        self, x: Tensor, state: MambaBlockState | None = None, time_scale: Tensor | None = None
    ) -> tuple[Tensor, MambaBlockState]:
        """x: (B, L, d_model) -> (y (B, L, d_model), state after the last step).

        time_scale (B, L): real time step / nominal step of every token (None: all nominal)."""
        batch, length, _ = x.shape
        if state is None:
            state = self.zero_state(batch, x.device, x.dtype)
        # Channels-first (B, D, L); for one long sequence each projection is one GEMM that writes
        # that layout, so the conv, the scan and the elementwise ops read contiguous rows along
        # time, not a transposed view (on a long GPU sequence those reads cost more than the
        # scan: tsssm.scoring's profile).
        xz = _project(self.in_proj.weight, x.transpose(1, 2), self.in_proj.bias)
        # xz: (B, 2*d_inner, L)
        u, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each

        # Causal depthwise conv: the carried inputs are the left context.
        u_ext = torch.cat([state.conv.to(u.dtype), u], dim=2)  # (B, d_inner, d_conv-1+L)
        new_conv = u_ext[:, :, u_ext.shape[2] - (self.d_conv - 1) :]
        u = silu(self.conv1d(u_ext))  # (B, d_inner, L)

        x_dbl = _project(self.x_proj.weight, u)  # (B, dt_rank + 2N, L)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = _project(self.dt_proj.weight, dt)  # (B, d_inner, L); the bias: in the scan
        bias, softplus_inside = self.dt_proj.bias.float(), True
        if time_scale is not None:  # Δ over the real step, formed before the scan
            delta, bias, softplus_inside = time_scaled_delta(delta, bias, time_scale), None, False

        # Streaming steps take the single-step update; under autograd a step is a scan of length 1
        # (differentiable, and free of the update's in-place state write).
        if length == 1 and not torch.is_grad_enabled():
            y, new_ssm = self._step(u, delta, b, c, z, state.ssm, bias, softplus_inside)
        elif self._segments(u):  # a long sequence in inference: segments side by side
            y, new_ssm = segmented_scan(u, delta, self.A, b, c, self.D.float(), z, bias,
                                        softplus_inside, state.ssm, SEGMENT_ROWS,
                                        self.config.scan_backend)
        else:
            y, new_ssm = selective_scan(
                u,
                delta,
                self.A,
                b,
                c,
                D=self.D.float(),
                z=z,
                delta_bias=bias,
                delta_softplus=softplus_inside,
                initial_state=state.ssm,
                return_final_state=True,
                backend=self.config.scan_backend,
            )
        out = self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
        return out, MambaBlockState(new_conv, new_ssm)

    @staticmethod
    def _segments(u: Tensor) -> bool:
        """Whether this scan runs in segments (tsssm.ssm.segmented): without autograd, on a
        SEGMENT_DEVICES device, for a sequence of at least 2 * SEGMENT_ROWS steps whose batch
        leaves the device idle."""
        return (not torch.is_grad_enabled() and u.device.type in SEGMENT_DEVICES
                and u.shape[2] >= 2 * SEGMENT_ROWS and u.shape[0] * u.shape[1] < SEGMENT_LANES)

    def _step(
        self, u: Tensor, delta: Tensor, b: Tensor, c: Tensor, z: Tensor, ssm: Tensor,
        bias: Tensor | None, softplus_inside: bool,
    ) -> tuple[Tensor, Tensor]:
        """One timestep through selective_state_update; tensors carry a trailing L = 1 axis."""
        # The update writes the state in place; the caller's state must stay valid.
        new_ssm = ssm.clone()
        y = selective_state_update(
            new_ssm,
            u[..., 0],
            delta[..., 0],
            self.A,
            b[..., 0],
            c[..., 0],
            D=self.D.float(),
            z_t=z[..., 0],
            delta_bias=bias,
            delta_softplus=softplus_inside,
            backend=self.config.scan_backend,
        )
        return y.unsqueeze(-1), new_ssm  # (B, d_inner, 1), (B, d_inner, N)


class MambaLayer(nn.Module):
    """Pre-norm residual layer: x + dropout(block(rmsnorm(x)))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.block = MambaBlock(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, state: MambaBlockState | None = None, time_scale: Tensor | None = None
    ) -> tuple[Tensor, MambaBlockState]:
        y, new_state = self.block(self.norm(x), state, time_scale)
        return x + self.dropout(y), new_state


class MambaStack(nn.Module):
    """``n_layers`` pre-norm Mamba layers and a final RMSNorm: (B, L, d_model) -> same."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MambaLayer(config) for _ in range(config.n_layers))
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self._rescale_residual_projections()

    @torch.no_grad()
    def _rescale_residual_projections(self) -> None:
        # Each layer adds to the residual stream; shrinking out_proj by 1/sqrt(n_layers) keeps the
        # stream's variance at init independent of depth (the GPT-2 / Mamba recipe).
        for layer in self.layers:
            layer.block.out_proj.weight /= math.sqrt(self.config.n_layers)

    def zero_state(
        self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> MambaStackState:
        return tuple(layer.block.zero_state(batch, device, dtype) for layer in self.layers)

    def forward(
        self, x: Tensor, state: MambaStackState | None = None, time_scale: Tensor | None = None
    ) -> tuple[Tensor, MambaStackState]:
        """x: (B, L, d_model) -> (y (B, L, d_model), per-layer state after the last step).

        time_scale (B, L): every token's real time step / nominal step, the same for every
        layer (None: evenly spaced, today's path)."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ModelError(
                f"Mamba stack expects input (batch, length, {self.config.d_model}), "
                f"got shape {tuple(x.shape)}"
            )
        if state is not None and len(state) != len(self.layers):
            raise ModelError(
                f"Mamba state has {len(state)} layers but the model has {len(self.layers)}; "
                "pass the state returned by this model (or None to start fresh)"
            )
        if state is not None and state[0].ssm.shape[0] != x.shape[0]:
            raise ModelError(
                f"Mamba state was built for batch {state[0].ssm.shape[0]} but the input has "
                f"batch {x.shape[0]}; carry one state per stream"
            )
        if time_scale is not None and tuple(time_scale.shape) != tuple(x.shape[:2]):
            raise ModelError(
                f"Mamba time_scale must be (batch, length) = {tuple(x.shape[:2])}, got "
                f"{tuple(time_scale.shape)}"
            )
        if x.shape[1] == 0:
            return self.norm_f(x), (
                state if state is not None else self.zero_state(x.shape[0], x.device, x.dtype)
            )
        new_states = []
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[i], time_scale)
            new_states.append(layer_state)
        return self.norm_f(x), tuple(new_states)


def detach_state(state: MambaStackState) -> MambaStackState:
    """The same state cut from the autograd graph (truncated backpropagation through time)."""
    return tuple(MambaBlockState(s.conv.detach(), s.ssm.detach()) for s in state)
