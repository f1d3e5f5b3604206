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
    # Σ Δ over each segment (b, S, d), accumulated in float64 without a float64 copy of Δ
    total = dts.view(b, S, d, segment).sum(-1, dtype=torch.float64)
    decay = torch.exp(total[..., None] * A.double())  # (b, S, d, N)
    h0 = None if initial_state is None else initial_state.double()
    entering = _entering_states(decay, own.double().view(b, S, d, N), h0).to(sdt)
    out, final = selective_scan(us, dts, A, bs, cs, D=D, z=zs, initial_state=entering.view(
        b * S, d, N), return_final_state=True, backend=backend)
    out = out.view(b, S, d, segment).permute(0, 2, 1, 3).reshape(b, d, S * segment)[..., :L]
    return out, final.view(b, S, d, N)[:, -1]


def _entering_states(decay: Tensor, own: Tensor, h0: Tensor | None) -> Tensor:
    """The state entering every segment (b, S, d, N) of ``h_{s+1} = decay_s h_s + own_s`` from
    h_0 = ``h0`` (b, d, N) (None: zeros), as a log-depth scan (Hillis-Steele: ceil(log2 S)
    rounds of a few whole-tensor ops instead of 3 S tiny launches, which on a GPU cost more
    host time than the two scans' device time). decay, own (b, S, d, N), float64 here."""
    S = decay.shape[1]
    reach, acc = decay, own  # after the rounds: products of decays, states from zero
    k = 1
    while k < S:
        acc = torch.cat([acc[:, :k], reach[:, k:] * acc[:, :-k] + acc[:, k:]], 1)
        reach = torch.cat([reach[:, :k], reach[:, k:] * reach[:, :-k]], 1)
        k *= 2
    # acc[:, s] / reach[:, s]: the state after segment s from zero / the decay up to it
    if h0 is not None:
        acc = acc + reach * h0[:, None]
        first = h0[:, None]
    else:
        first = torch.zeros_like(acc[:, :1])
    return torch.cat([first, acc[:, :-1]], 1)
