"""One long sequence's selective scan as many segments side by side, exactly (inference).

A scan is sequential in time: one stream of ``dim`` channels gives a GPU ``dim / BLOCK_D``
programs (8 for Mamba's d_inner 128), each walking the whole length, and the other SMs idle. The
recurrence ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`` is linear in the state, so the sequence can
be cut into S segments and scanned as a batch of S:

1. every segment from a zero state: its own contribution ``g_s`` to the state at its end;
2. the state entering segment s: ``h_{s+1} = P_s h_s + g_s`` with ``P_s = exp(A Σ_seg Δ)`` (the
   segment's decay), S small steps from the carried initial state;
3. every segment again, from its true entering state: the outputs, and the final state.

Each output equals one pass over the whole sequence up to float rounding (the decay is formed
from the summed Δ in float64 rather than as a product of per-step factors). Two scans instead of
one, but ``S`` times the parallelism. Δ goes to both scans with softplus (and ``delta_bias``)
already applied, so the padding that fills the last segment (Δ = 0, u = 0) leaves the state
exactly unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import pad, softplus

from tsssm.ssm.scan import selective_scan


def segmented_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, delta_softplus: bool, initial_state: Tensor | None,
    segment: int, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``selective_scan(..., return_final_state=True)`` of u, delta, z (b, d, L), B, C (b, N, L)
    in segments of ``segment`` rows. Returns (out (b, d, L), final state (b, d, N): float32,
    float64 for float64 inputs, as the scan's)."""
    b, d, L = u.shape
    N = A.shape[1]
    dt = delta.to(torch.promote_types(delta.dtype, torch.float32))
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[:, None]
    if delta_softplus:
        dt = softplus(dt)
    dt = dt.to(u.dtype)
    S = -(-L // segment)
    extra = S * segment - L

    def split(t: Tensor) -> Tensor:  # (b, K, L) -> (b*S, K, segment)
        if extra:
            t = pad(t, (0, extra))  # zeros: Δ = 0 holds the state, u = 0 adds nothing
        k = t.shape[1]
        return t.reshape(b, k, S, segment).permute(0, 2, 1, 3).reshape(b * S, k, segment)

    us, dts, bs, cs = (split(t) for t in (u, dt, B, C))
    zs = None if z is None else split(z)
    _, own = selective_scan(us, dts, A, bs, cs, initial_state=None, return_final_state=True,
                            backend=backend)  # (b*S, d, N): each segment from zero
    sdt = torch.float64 if u.dtype == torch.float64 else torch.float32  # the state's dtype
    own = own.to(sdt).view(b, S, d, N)
    total = dts.view(b, S, d, segment).double().sum(-1)  # (b, S, d): Σ Δ over each segment
    decay = torch.exp(total[..., None] * A.double()).to(sdt)  # (b, S, d, N)
    h = torch.zeros(b, d, N, dtype=sdt, device=u.device) if initial_state is None \
        else initial_state.to(sdt)
    entering = torch.empty(b, S, d, N, dtype=sdt, device=u.device)
    for s in range(S):
        entering[:, s] = h
        h = decay[:, s] * h + own[:, s]
    out, final = selective_scan(us, dts, A, bs, cs, D=D, z=zs, initial_state=entering.view(
        b * S, d, N), return_final_state=True, backend=backend)
    out = out.view(b, S, d, segment).permute(0, 2, 1, 3).reshape(b, d, S * segment)[..., :L]
    return out, final.view(b, S, d, N)[:, -1]
