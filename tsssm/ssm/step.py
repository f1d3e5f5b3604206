"""Step mode: advance the selective scan's state by one timestep (live streams).

``selective_state_update(state, u_t, delta_t, A, B_t, C_t, ...)`` is one step of the recurrence of
:mod:`tsssm.ssm.scan_ref`::

    Δ = softplus(delta_t + delta_bias) (or delta_t + delta_bias)
    state ← exp(Δ A) ⊙ state + (Δ B_t) u_t ;   out_t = C_t · state + D u_t ;  out_t *= silu(z_t)

Like mamba-ssm it updates ``state`` **in place** and returns ``out_t``; ``state`` must therefore
be a float32 (or float64) tensor that autograd does not track (streaming is inference). For a
differentiable step, call ``selective_scan`` on a length-1 sequence with ``initial_state`` and
``return_final_state=True``. Feeding samples one at a time gives what the scan gives on the whole
sequence (tests/ssm/test_step.py checks it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsssm.errors import ModelError
from tsssm.ssm import scan_ref
from tsssm.ssm.scan import _shape, resolve_backend

__all__ = ["selective_state_update"]


def _validate_step(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None,
    z_t: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    what = "selective_state_update"
    if state.dim() != 3:
        raise ModelError(f"{what}: state must be (batch, dim, N), got {_shape(state)}")
    batch, dim, N = state.shape
    if state.dtype not in (torch.float32, torch.float64):
        raise ModelError(
            f"{what}: state must be float32 (it is updated in place), got {state.dtype}"
        )
    if state.requires_grad:
        raise ModelError(
            f"{what}: state requires grad but is updated in place; use selective_scan with "
            "initial_state and return_final_state=True to differentiate through a step"
        )
    for name, t in (("u_t", u_t), ("delta_t", delta_t), ("z_t", z_t)):
        if t is not None and t.shape != (batch, dim):
            raise ModelError(f"{what}: {name} must be (batch={batch}, dim={dim}), got {_shape(t)}")
    if A.shape != (dim, N):
        raise ModelError(f"{what}: A must be (dim={dim}, N={N}), got {_shape(A)}")
    for name, t in (("B_t", B_t), ("C_t", C_t)):
        ok = (t.dim() == 2 and t.shape == (batch, N)) or (
            t.dim() == 3 and t.shape[0] == batch and t.shape[2] == N and dim % t.shape[1] == 0
        )
        if not ok:
            raise ModelError(
                f"{what}: {name} must be (batch={batch}, N={N}) or (batch, groups, N) with dim "
                f"divisible by groups, got {_shape(t)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ModelError(f"{what}: {name} must be (dim={dim},), got {_shape(t)}")
    for name, t in (("u_t", u_t), ("delta_t", delta_t), ("A", A), ("B_t", B_t), ("C_t", C_t),
                    ("D", D), ("z_t", z_t), ("delta_bias", delta_bias)):
        if t is not None and t.device != state.device:
            raise ModelError(f"{what}: {name} is on {t.device} but state is on {state.device}")


@torch.no_grad()
def selective_state_update(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None = None,
    z_t: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Advance ``state`` (b, d, N) by one timestep in place; return out_t (b, d) in u_t's dtype.

    u_t, delta_t, z_t: (b, d); A: (d, N); B_t, C_t: (b, N) or (b, groups, N); D, delta_bias (d,).
    ``backend``: "triton" (CUDA), "torch", or "auto" (Triton on CUDA tensors, torch otherwise).
    """
    _validate_step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    chosen = resolve_backend(backend, state.device, what="selective_state_update")
    if chosen == "triton" and state.dtype == torch.float32:
        from tsssm.ssm import scan_triton

        return scan_triton.state_update(
            state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, bool(delta_softplus)
        )
    out, new_state = scan_ref.selective_state_update_ref(
        state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus
    )
    state.copy_(new_state)
    return out
