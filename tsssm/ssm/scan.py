"""The selective scan entry point: input checks, the autograd Functions and the backend choice.

``selective_scan(u, delta, A, B, C, ...)`` computes mamba-ssm's selective scan (semantics and
shapes in :mod:`tsssm.ssm.scan_ref`). Two backends, both differentiable in every input,
``initial_state`` included:

- ``"triton"``: the fused kernels of :mod:`tsssm.ssm.scan_triton` (CUDA tensors only);
- ``"torch"``: the chunked torch path of :mod:`tsssm.ssm.scan_ref` (any device, float64 too);
- ``"auto"``: Triton for CUDA tensors when Triton is importable, torch otherwise; it says once,
  through logging, when it falls back to torch.

A is meant to be negative (``-exp(A_log)``); a positive A is accepted and computed as written, but
the state then grows exponentially and overflows float32 on long sequences.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from tsssm.errors import ConfigError, ModelError
from tsssm.ssm import scan_ref

__all__ = ["selective_scan", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_fallback_logged = False


def triton_available() -> bool:
    """True when the Triton kernels can be imported."""
    try:
        from tsssm.ssm import scan_triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    """Raise ModelError naming the offending argument when shapes, dtypes or devices disagree."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
             "delta_bias": delta_bias, "initial_state": initial_state}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ModelError(
                f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ModelError(
                f"selective_scan: {name} has dtype {t.dtype}; use float32, bfloat16, float16 "
                "(or float64 with backend='torch')"
            )
        if t.device != u.device:
            raise ModelError(
                f"selective_scan: {name} is on {t.device} but u is on {u.device}; "
                "move all inputs to one device"
            )
    if u.dim() != 3:
        raise ModelError(f"selective_scan: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, L = u.shape
    if L < 1:
        raise ModelError("selective_scan: u has an empty time axis (L = 0)")
    if delta.shape != u.shape:
        raise ModelError(
            f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}"
        )
    if z is not None and z.shape != u.shape:
        raise ModelError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ModelError(f"selective_scan: A must be (dim={dim}, N), got shape {_shape(A)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (batch, N, L)) or (
            t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (N, L)
        )
        if not ok:
            raise ModelError(
                f"selective_scan: {name} must be (batch={batch}, N={N}, L={L}) or "
                f"(batch, groups, N, L), got shape {_shape(t)}"
            )
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ModelError(
            f"selective_scan: B {_shape(B)} and C {_shape(C)} must use the same number of groups"
        )
    if B.dim() == 4 and dim % B.shape[1] != 0:
        raise ModelError(
            f"selective_scan: dim={dim} is not divisible by groups={B.shape[1]} (B's axis 1)"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ModelError(f"selective_scan: {name} must be (dim={dim},), got {_shape(t)}")
    if initial_state is not None and initial_state.shape != (batch, dim, N):
        raise ModelError(
            f"selective_scan: initial_state must be (batch={batch}, dim={dim}, N={N}), "
            f"got {_shape(initial_state)}"
        )


# --------------------------------------------------------------------------------------------
# Torch path
# --------------------------------------------------------------------------------------------


def _training(*tensors: Tensor | None) -> bool:
    """Whether autograd will record this call: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class ChunkedScanFn(torch.autograd.Function):
    """y = C·h for the discretised recurrence, by the torch path: the stepwise CPU path
    (``inner="step"``) or the chunked one; saves what that path's backward needs.

    Inputs in one float dtype: u, dt (b, d, L), A (d, N), B, C (b, G, N, L), h0 (b, d, N).
    Outputs y (b, d, L) and the final state (b, d, N).
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk, inner, training):  # type: ignore[override]
        inner = scan_ref.resolve_inner(inner, u.device)
        # needs_input_grad is True under no_grad too: ``training`` (grad mode on and an input
        # that requires grad, decided by the caller) keeps inference from saving states
        save = training and any(ctx.needs_input_grad)
        if inner == "step":
            y, h_final, saved = scan_ref.stepwise_scan_forward(
                u, dt, A, B, C, h0, chunk=chunk, save_states=save
            )
            ctx.mode = saved[0] if saved is not None else None
            extra = saved[1:] if saved is not None else ()
        else:
            y, h_final, saved = scan_ref.chunked_scan_forward(
                u, dt, A, B, C, h0, chunk=chunk, save_states=save, inner=inner
            )
            ctx.mode = "chunked"
            extra = (saved,) if saved is not None else ()
        ctx.save_for_backward(u, dt, A, B, C, h0, *extra)
        ctx.chunk, ctx.inner = chunk, inner
        return y, h_final

    @staticmethod
    def backward(ctx, dy, dh_final):  # type: ignore[override]
        u, dt, A, B, C, h0, *extra = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        if ctx.inner == "step":
            du, ddt, dA, dB, dC, dh0 = scan_ref.stepwise_scan_backward(
                dy.contiguous(), dh_final, u, dt, A, B, C, (ctx.mode, *extra), h0, chunk=ctx.chunk
            )
        else:
            du, ddt, dA, dB, dC, dh0 = scan_ref.chunked_scan_backward(
                dy.contiguous(), dh_final, u, dt, A, B, C, extra[0], chunk=ctx.chunk,
                inner=ctx.inner
            )
        return du, ddt, dA, dB, dC, dh0, None, None, None


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    chunk: int = scan_ref.DEFAULT_CHUNK,
    inner: str = scan_ref.DEFAULT_INNER,
) -> tuple[Tensor, Tensor]:
    """The chunked torch path; returns (out (b, d, L) in u's dtype, final state (b, d, N))."""
    cdt = scan_ref.compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, _ = u.shape
    N = A.shape[1]
    uc = u.to(cdt)
    dt = scan_ref.discretise_delta(delta, delta_bias, delta_softplus, cdt)  # (b, d, L)
    Bg = (B.unsqueeze(1) if B.dim() == 3 else B).to(cdt)  # (b, G, N, L)
    Cg = (C.unsqueeze(1) if C.dim() == 3 else C).to(cdt)
    if initial_state is None:
        h0 = torch.zeros(batch, dim, N, dtype=cdt, device=u.device)
    else:
        h0 = initial_state.to(cdt)
    y, h_final = ChunkedScanFn.apply(
        uc.contiguous(), dt.contiguous(), A.to(cdt).contiguous(), Bg.contiguous(),
        Cg.contiguous(), h0.contiguous(), int(chunk), inner,
        _training(u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), h_final


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


class TritonScanFn(torch.autograd.Function):
    """The fused Triton scan. Saves the inputs and the chunk-boundary states (b, n_chunks, d, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,  # type: ignore[override]
                training):
        from tsssm.ssm import scan_triton

        out, h_final, saved, block_l = scan_triton.scan_forward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
            save_states=training and any(ctx.needs_input_grad),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved)
        ctx.block_l = block_l
        ctx.delta_softplus = delta_softplus
        ctx.has_initial_state = initial_state is not None
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return out, h_final

    @staticmethod
    def backward(ctx, dout, dh_final):  # type: ignore[override]
        from tsssm.ssm import scan_triton

        u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        grads = scan_triton.scan_backward(
            dout, dh_final, u, delta, A, B, C, D, z, delta_bias, saved, ctx.block_l,
            ctx.delta_softplus,
        )
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = grads
        if not ctx.has_initial_state:
            dh0 = None
        elif dh0 is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, None, None


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The fused Triton path; returns (out (b, d, L) in u's dtype, final state (b, d, N) fp32)."""
    if u.dtype == torch.float64:
        raise ModelError("selective_scan: backend='triton' takes float32/bfloat16/float16, "
                         "not float64; use backend='torch' for float64")
    return TritonScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
        _training(u, delta, A, B, C, D, z, delta_bias, initial_state),
    )


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device, what: str = "selective_scan") -> str:
    """Pick "triton" or "torch" for tensors on ``device``; errors clearly on impossible asks."""
    global _fallback_logged
    if backend not in BACKENDS:
        raise ConfigError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise ModelError(
                f"{what}: backend='triton' needs CUDA tensors, got tensors on {device}; "
                "move them to a GPU or use backend='torch' (or 'auto')"
            )
        if not triton_available():
            raise ModelError(f"{what}: backend='triton' but Triton is not importable; "
                             "pip install 'tsssm[gpu]' or use backend='torch'")
        return "triton"
    if device.type == "cuda" and triton_available():
        return "triton"
    if not _fallback_logged:
        _fallback_logged = True
        why = "Triton is not importable" if device.type == "cuda" else f"tensors are on {device}"
        log.info("%s: backend='auto' uses the torch path (%s)", what, why)
    return "torch"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's semantics (see :mod:`tsssm.ssm.scan_ref`).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,); initial_state: (batch, dim, N).
    Returns out (batch, dim, L) in u's dtype, plus the final state (batch, dim, N) in float32
    (float64 for float64 inputs on the torch path) when ``return_final_state``.
    Feeding a sequence in pieces with ``initial_state``/``return_final_state`` gives the same
    result as one pass over the whole sequence.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    chosen = resolve_backend(backend, u.device)
    if chosen == "triton":
        out, h_final = selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
    else:
        out, h_final = selective_scan_torch(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
    return (out, h_final) if return_final_state else out
