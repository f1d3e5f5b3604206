"""The selective scan: its specification (a plain sequential loop) and a fast torch path.

Semantics are mamba-ssm's ``selective_scan_fn``::

    Δ   = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias    # (b, d, L)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t B_t) u_t                                      # (b, d, N)
    y_t = C_t · h_t + D u_t                                                         # (b, d)
    out = y ⊙ silu(z)   (if z is given)

Shapes: u, delta, z (b, d, L); A (d, N); B, C (b, N, L) or (b, G, N, L) where channel ``c`` uses
group ``c // (d // G)``; D, delta_bias (d,); h_0 = initial_state (b, d, N) or zeros.

Three implementations live here:

- :func:`selective_scan_ref` is the specification: one timestep at a time in float32 (float64 when
  any input is float64, for gradcheck), differentiable through plain autograd. It is the oracle of
  every test and is slow on purpose (L small steps).
- :func:`chunked_scan_forward` / :func:`chunked_scan_backward` are the torch path for GPUs without
  Triton: L is cut into chunks of ``chunk`` steps; inside a chunk the linear recurrence is solved
  over (chunk, b, d, N) tensors by a parallel (Hillis-Steele doubling) scan or a work-efficient
  loop, and only the state at each chunk boundary is kept. The backward recomputes each chunk's
  states from its boundary and runs the adjoint recurrence in reverse, so memory stays
  O(b·d·N·chunk) in training too.
- :func:`stepwise_scan_forward` / :func:`stepwise_scan_backward` are the CPU path: one timestep at
  a time over (b, d, N) slices that stay in cache, states laid out (b, G, N, d/G) so that every
  reduction over N or d is a contiguous one; see their docstrings. The autograd Function that
  wires these paths lives in ``scan.py``.

Decays: A is meant to be negative (``A = -exp(A_log)``), so every factor exp(Δ A) ≤ 1 and every
product of factors in the doubling scan stays in [0, 1]: nothing is ever exponentiated to a large
positive number. A positive A is accepted (the recurrence is still well defined) but the state then
grows like exp(Δ A t) and overflows float32 quickly; that is the caller's model, not a scan bug.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "selective_scan_ref",
    "selective_state_update_ref",
    "chunked_scan_forward",
    "chunked_scan_backward",
    "stepwise_scan_forward",
    "stepwise_scan_backward",
    "discretise_delta",
    "compute_dtype",
    "DEFAULT_CHUNK",
]

#: Chunk length of the torch fast path (measured on 2 CPU cores, see benchmarks/RESULTS.md).
DEFAULT_CHUNK = 64


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64 (gradcheck), else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def discretise_delta(
    delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> Tensor:
    """Δ = softplus(delta + bias) or delta + bias, in ``dtype``. delta (b, d, L), bias (d,)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _group_view(x: Tensor) -> Tensor:
    """B or C as (b, G, N, L) whatever its input layout."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def selective_scan_ref(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """The specification: a sequential loop over time, one state update per step.

    Returns ``out`` (b, d, L) in u's dtype, and with ``return_final_state`` also the state after
    the last step (b, d, N) in float32 (float64 if any input is float64).
    """
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    Bg, Cg = _group_view(B).to(cdt), _group_view(C).to(cdt)  # (b, G, N, L)
    per_group = dim // Bg.shape[1]
    uc = u.to(cdt)
    dt = discretise_delta(delta, delta_bias, delta_softplus, cdt)  # (b, d, L)
    Ac = A.to(cdt)  # (d, N)
    if initial_state is None:
        h = torch.zeros(batch, dim, N, dtype=cdt, device=u.device)
    else:
        h = initial_state.to(cdt)
    ys = []
    for t in range(L):
        B_t = Bg[..., t].repeat_interleave(per_group, dim=1)  # (b, d, N)
        C_t = Cg[..., t].repeat_interleave(per_group, dim=1)  # (b, d, N)
        decay = torch.exp(dt[:, :, t, None] * Ac)  # (b, d, N)
        h = decay * h + (dt[:, :, t] * uc[:, :, t])[..., None] * B_t
        ys.append((h * C_t).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return (out, h) if return_final_state else out


def selective_state_update_ref(
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
) -> tuple[Tensor, Tensor]:
    """One step of the recurrence, out of place: returns (out_t (b, d), new state (b, d, N)).

    state (b, d, N); u_t, delta_t, z_t (b, d); B_t, C_t (b, N) or (b, G, N).
    """
    cdt = compute_dtype(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    dim = u_t.shape[1]
    Bg = (B_t.unsqueeze(1) if B_t.dim() == 2 else B_t).to(cdt)  # (b, G, N)
    Cg = (C_t.unsqueeze(1) if C_t.dim() == 2 else C_t).to(cdt)
    per_group = dim // Bg.shape[1]
    dt = discretise_delta(delta_t[..., None], delta_bias, delta_softplus, cdt)[..., 0]  # (b, d)
    h = torch.exp(dt[..., None] * A.to(cdt)) * state.to(cdt) + (dt * u_t.to(cdt))[
        ..., None
    ] * Bg.repeat_interleave(per_group, dim=1)
    y = (h * Cg.repeat_interleave(per_group, dim=1)).sum(-1)  # (b, d)
    if D is not None:
        y = y + D.to(cdt) * u_t.to(cdt)
    if z_t is not None:
        y = y * F.silu(z_t.to(cdt))
    return y.to(u_t.dtype), h


# --------------------------------------------------------------------------------------------
# Fast torch path: chunks, a parallel scan inside each chunk, boundary states between chunks.
# Inside the fast path tensors are time-major, (T, b, d, N), so that every slice along time is
# one contiguous block (fast elementwise kernels on the CPU).
# --------------------------------------------------------------------------------------------


def _scan_doubling_(a: Tensor, x: Tensor, reverse: bool) -> Tensor:
    """In place: x_t ← x_t + a_t x_{t∓1} along dim 0, solved in log2(T) vectorised steps.

    Hillis-Steele doubling: after the step of stride k, (a_t, x_t) hold the composition of the 2k
    elements ending at t (starting at t when ``reverse``). Only products of factors a ≤ 1 appear:
    no division and no growing exponential. ``a`` is overwritten with partial products.
    """
    T = x.shape[0]
    k = 1
    while k < T:
        if not reverse:  # x_t += a_t x_{t-k};  a_t *= a_{t-k}
            x[k:] += a[k:] * x[:-k]
            if 2 * k < T:
                a[k:] *= a[:-k].clone()
        else:  # x_t += a_t x_{t+k};  a_t *= a_{t+k}
            x[:-k] += a[:-k] * x[k:]
            if 2 * k < T:
                a[:-k] *= a[k:].clone()
        k *= 2
    return x


def _scan_loop_(a: Tensor, x: Tensor, reverse: bool) -> Tensor:
    """In place: the same recurrence one step at a time (work-efficient; T small kernels)."""
    T = x.shape[0]
    steps = range(T - 2, -1, -1) if reverse else range(1, T)
    for t in steps:
        prev = x[t + 1] if reverse else x[t - 1]
        torch.addcmul(x[t], a[t], prev, out=x[t])
    return x


#: How the fast path solves the recurrence inside a chunk: "doubling" (parallel: log2(T) steps,
#: each over the whole chunk, ~log2(T)× the work) or "loop" (work-efficient: T steps, each over
#: one timestep). On 2 CPU cores the loop measured 4-9× faster (benchmarks/RESULTS.md): there
#: the extra work of the parallel form costs more than the T small kernels; on a GPU the
#: launches dominate and the doubling wins.
INNER_SOLVERS = {"doubling": _scan_doubling_, "loop": _scan_loop_}
#: "step" is not an inner solver of the chunk tensors but a separate CPU path
#: (:func:`stepwise_scan_forward`): the recurrence one timestep at a time on cache-sized slices.
INNER_CHOICES = ("auto", "step", *INNER_SOLVERS)
DEFAULT_INNER = "auto"


def resolve_inner(inner: str, device: torch.device) -> str:
    """'auto' → 'step' on the CPU, 'doubling' elsewhere."""
    if inner == "auto":
        return "step" if device.type == "cpu" else "doubling"
    if inner not in INNER_CHOICES:
        raise ValueError(f"inner must be one of {INNER_CHOICES}, got {inner!r}")
    return inner


def _linear_scan(a: Tensor, x: Tensor, h0: Tensor, inner: str, reverse: bool = False) -> Tensor:
    """h_t = a_t h_{t-1} + x_t along dim 0 (reverse: h_t = a_t h_{t+1} + x_t), boundary h0.

    a, x (T, ...); h0 (...). Consumes ``a`` and ``x`` (overwritten); returns h (T, ...).
    """
    end = -1 if reverse else 0
    x[end] += a[end] * h0
    return INNER_SOLVERS[resolve_inner(inner, x.device)](a, x, reverse)


def _time_major(x: Tensor) -> Tensor:
    """(b, ..., L) -> (L, b, ...) contiguous."""
    return x.movedim(-1, 0).contiguous()


def _chunk_tensors(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Decays a = exp(Δ A), inputs x = Δ u B (T, b, d, N) and Δu (T, b, d) of one chunk.

    u, dt (T, b, d); A (d, N); B (T, b, G, N) — time-major.
    """
    T, batch, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    a = torch.exp(dt[..., None] * A)  # (T, b, d, N)
    dtu = dt * u  # (T, b, d)
    x = dtu.view(T, batch, G, dim // G, 1) * B[:, :, :, None, :]  # (T, b, G, d/G, N)
    return a, x.view(T, batch, dim, N), dtu


def _chunk_spans(L: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``chunk`` steps of 0..L (the last one may be shorter): the
    one chunking of the forward passes' saved states and the backward passes' recomputation."""
    return [(s, min(s + chunk, L)) for s in range(0, L, chunk)]


def _per_group(h: Tensor, G: int) -> Tensor:
    """(T, b, d, N) viewed as (T, b, G, d/G, N)."""
    T, batch, dim, N = h.shape
    return h.view(T, batch, G, dim // G, N)


def chunked_scan_forward(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor,
    chunk: int = DEFAULT_CHUNK,
    save_states: bool = True,
    inner: str = DEFAULT_INNER,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Core of the fast path: y_t = C_t · h_t with h from the discretised recurrence.

    u, dt (b, d, L) with dt = Δ already discretised; A (d, N); B, C (b, G, N, L); h0 (b, d, N);
    all in one float dtype. Returns y (b, d, L), the final state (b, d, N) and, if
    ``save_states``, the state at the start of every chunk (n_chunks, b, d, N) for the backward.
    Peak memory: a few (chunk, b, d, N) tensors.
    """
    L = u.shape[-1]
    G = B.shape[1]
    uT, dtT, BT, CT = _time_major(u), _time_major(dt), _time_major(B), _time_major(C)
    yT = torch.empty_like(uT)  # (L, b, d)
    spans = _chunk_spans(L, chunk)
    saved = (
        torch.empty((len(spans), *h0.shape), dtype=h0.dtype, device=h0.device)
        if save_states
        else None
    )
    h = h0
    for i, (s, e) in enumerate(spans):
        if saved is not None:
            saved[i] = h
        a, x, _ = _chunk_tensors(uT[s:e], dtT[s:e], A, BT[s:e])
        hs = _linear_scan(a, x, h, inner)  # (T, b, d, N)
        yT[s:e] = (_per_group(hs, G) * CT[s:e, :, :, None, :]).sum(-1).flatten(2)
        h = hs[-1].clone()
    return yT.movedim(0, -1), h, saved


def chunked_scan_backward(
    dy: Tensor,
    dh_final: Tensor | None,
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    saved: Tensor,
    chunk: int = DEFAULT_CHUNK,
    inner: str = DEFAULT_INNER,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`chunked_scan_forward` w.r.t. (u, dt, A, B, C, h0).

    The adjoint g_t = ∂loss/∂h_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1}: a linear recurrence
    backwards in time, solved by the same scan run in reverse. Each chunk's states are recomputed
    from its saved boundary state. dy (b, d, L); dh_final (b, d, N) or None.
    """
    batch, dim, L = u.shape
    G = B.shape[1]
    uT, dtT, BT, CT, dyT = (_time_major(t) for t in (u, dt, B, C, dy))
    duT, ddtT = torch.empty_like(uT), torch.empty_like(dtT)  # (L, b, d)
    dBT, dCT = torch.empty_like(BT), torch.empty_like(CT)  # (L, b, G, N)
    dA = torch.zeros_like(A)
    # p = a_e g_e: what the chunk after this one sends back to our last state.
    p = torch.zeros_like(saved[0]) if dh_final is None else dh_final.to(saved.dtype)
    spans = _chunk_spans(L, chunk)
    for i in reversed(range(len(spans))):
        s, e = spans[i]
        h_start = saved[i]  # (b, d, N)
        a, x, dtu = _chunk_tensors(uT[s:e], dtT[s:e], A, BT[s:e])
        a_keep = a.clone()
        hs = _linear_scan(a, x, h_start, inner)  # (T, b, d, N); a, x consumed
        C_c, B_c = CT[s:e, :, :, None, :], BT[s:e, :, :, None, :]  # (T, b, G, 1, N)
        c = (dyT[s:e].view(e - s, batch, G, dim // G, 1) * C_c).view_as(hs)
        # g_t = c_t + a_{t+1} g_{t+1}; the carry p (= a_e g_e) enters at the last step.
        alpha = torch.cat([a_keep[1:], torch.ones_like(a_keep[:1])])
        g = _linear_scan(alpha, c, p, inner, reverse=True)  # (T, b, d, N)
        h_prev = torch.cat([h_start[None], hs[:-1]])  # h_{t-1}
        w = g * a_keep * h_prev  # ∂loss/∂(Δ_t A)  (T, b, d, N)
        # sum over t, b of w * Δ as one batched product per channel d (einsum's CPU path for
        # this contraction is ~4x slower on 2 cores)
        T_c = e - s
        dA += torch.bmm(w.permute(2, 3, 0, 1).reshape(dim, -1, T_c * batch),
                        dtT[s:e].permute(2, 0, 1).reshape(dim, T_c * batch, 1)).squeeze(-1)
        gB = (_per_group(g, G) * B_c).sum(-1).flatten(2)  # (T, b, d)
        ddtT[s:e] = (w * A).sum(-1) + gB * uT[s:e]
        duT[s:e] = gB * dtT[s:e]
        dBT[s:e] = (_per_group(g, G) * dtu.view(e - s, batch, G, dim // G, 1)).sum(3)
        dCT[s:e] = (_per_group(hs, G) * dyT[s:e].view(e - s, batch, G, dim // G, 1)).sum(3)
        p = a_keep[0] * g[0]
    return (duT.movedim(0, -1), ddtT.movedim(0, -1), dA, dBT.movedim(0, -1),
            dCT.movedim(0, -1), p)


# --------------------------------------------------------------------------------------------
# CPU path: one timestep at a time on cache-sized slices.
#
# On a CPU the chunk tensors above, (chunk, b, d, N), are tens of MB for a small Mamba (b 64,
# d 128, N 16: 33 MB at chunk 64); every op over them streams main memory, and the backward makes
# a dozen of them. Here every op touches one step's (b, d, N) slice (512 KB at that shape, in L2)
# and the states are laid out (b, G, N, d/G): the reductions over N (C·h, B·g) are batched
# (1 × N) @ (N × d/G) products and those over d (dB, dC) sums over the contiguous last axis, both
# far faster on a CPU than reducing a trailing axis of 16. Training keeps, while they fit in
# STEP_SAVE_ALL_BYTES, every step's state and decay exp(Δ A) (the backward then computes no
# exponential, the largest cost of a step); beyond that only the state at each chunk start, and
# the backward recomputes one chunk at a time as the chunked path does.
# --------------------------------------------------------------------------------------------

#: Largest size (bytes) of the per-step states and decays the CPU path keeps for the backward
#: (2 · L·b·d·N floats); longer sequences keep chunk-start states and recompute.
STEP_SAVE_ALL_BYTES = 256 * 2**20
#: The CPU path's step loops run on one intra-op thread (see _one_thread).
STEP_SINGLE_THREAD = True


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a loop of per-step ops (tens of microseconds each) on one intra-op thread, then
    restore the setting. A second thread saves little on ops that small, and when the cores are
    shared with other processes every op waits for a descheduled worker: measured on a busy
    2-core machine, a training step of the small Mamba forecaster took 5-7 s of CPU with two
    threads and 0.35-0.5 s with one (benchmarks/RESULTS.md)."""
    n = torch.get_num_threads()
    if STEP_SINGLE_THREAD and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if STEP_SINGLE_THREAD and n > 1:
            torch.set_num_threads(n)


def _steps_bg(x: Tensor, G: int) -> Tensor:
    """(b, d, L) -> (L, b, G, d/G), contiguous."""
    b, d, L = x.shape
    return x.reshape(b, G, d // G, L).permute(3, 0, 1, 2).contiguous()


def _state_bg(h: Tensor, G: int) -> Tensor:
    """(b, d, N) -> (b, G, N, d/G), contiguous."""
    b, d, N = h.shape
    return h.reshape(b, G, d // G, N).transpose(-1, -2).contiguous()


def _state_bdn(h: Tensor) -> Tensor:
    """(b, G, N, d/G) -> (b, d, N), contiguous."""
    b, G, N, dg = h.shape
    return h.transpose(-1, -2).reshape(b, G * dg, N).contiguous()


def _state_step_(a: Tensor, h: Tensor, h_prev: Tensor, dt_t: Tensor, At: Tensor, B_t: Tensor,
                 dtu_t: Tensor) -> Tensor:
    """One step of the CPU path's recurrence into given slices (b, G, N, dg): the decay
    a = exp(Δ_t A) and the state h = a h_prev + Δ_t u_t B_t (h may be h_prev: in place).
    dt_t, dtu_t (b, G, dg); At (G, N, dg); B_t (b, G, N). Returns h."""
    torch.mul(dt_t.unsqueeze(2), At, out=a)
    a.exp_()
    torch.mul(a, h_prev, out=h)
    return h.addcmul_(B_t.unsqueeze(3), dtu_t.unsqueeze(2))  # + Δu B


def stepwise_scan_forward(*args, **kwargs):
    """The CPU path's forward (see :func:`_stepwise_forward`), on one intra-op thread."""
    with _one_thread():
        return _stepwise_forward(*args, **kwargs)


def stepwise_scan_backward(*args, **kwargs):
    """The CPU path's backward (see :func:`_stepwise_backward`), on one intra-op thread."""
    with _one_thread():
        return _stepwise_backward(*args, **kwargs)


def _stepwise_forward(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor,
    chunk: int = DEFAULT_CHUNK,
    save_states: bool = True,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """Same contract as :func:`chunked_scan_forward` except for what it
    saves: ``("all", states, decays)`` — each (L, b, G, N, d/G), the state after every step and
    exp(Δ_t A) — while they fit in STEP_SAVE_ALL_BYTES, else ``("chunks", starts)`` with the state
    at the start of every chunk (n_chunks, b, G, N, d/G). None without ``save_states``.
    """
    b, d, L = u.shape
    G, N = B.shape[1], B.shape[2]
    dg = d // G
    uT, dtT = _steps_bg(u, G), _steps_bg(dt, G)  # (L, b, G, dg)
    dtuT = dtT * uT
    BT = B.permute(3, 0, 1, 2).contiguous()  # (L, b, G, N)
    CT = C.permute(3, 0, 1, 2).contiguous()
    At = A.reshape(G, dg, N).transpose(-1, -2).contiguous()  # (G, N, dg)
    yT = torch.empty_like(uT)  # (L, b, G, dg)
    h = _state_bg(h0, G)  # (b, G, N, dg)
    keep_all = save_states and 2 * L * h.numel() * h.element_size() <= STEP_SAVE_ALL_BYTES
    if keep_all:
        hs = torch.empty((L, *h.shape), dtype=h.dtype, device=h.device)
        decays = torch.empty_like(hs)
        saved: tuple | None = ("all", hs, decays)
    elif save_states:
        starts = torch.empty((-(-L // chunk), *h.shape), dtype=h.dtype, device=h.device)
        saved = ("chunks", starts)
    else:
        saved = None
    a = torch.empty_like(h)
    for t in range(L):
        if saved is not None and not keep_all and t % chunk == 0:
            starts[t // chunk] = h
        h = _state_step_(decays[t] if keep_all else a, hs[t] if keep_all else h, h, dtT[t], At,
                         BT[t], dtuT[t])
        torch.bmm(CT[t].view(b * G, 1, N), h.view(b * G, N, dg), out=yT[t].view(b * G, 1, dg))
    y = yT.permute(1, 2, 3, 0).reshape(b, d, L)
    return y, _state_bdn(h), saved


def _stepwise_backward(
    dy: Tensor,
    dh_final: Tensor | None,
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    saved: tuple,
    h0: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_stepwise_forward` w.r.t. (u, dt, A, B, C, h0); ``saved`` is what
    it returned, h0 its initial state. Same adjoint recurrence as :func:`chunked_scan_backward`,
    g_t = C_t dy_t + a_{t+1} g_{t+1}, one step at a time backwards."""
    b, d, L = u.shape
    G, N = B.shape[1], B.shape[2]
    dg = d // G
    uT, dtT, dyT = _steps_bg(u, G), _steps_bg(dt, G), _steps_bg(dy, G)  # (L, b, G, dg)
    dtuT = dtT * uT
    BT = B.permute(3, 0, 1, 2).contiguous()  # (L, b, G, N)
    CT = C.permute(3, 0, 1, 2).contiguous()
    At = A.reshape(G, dg, N).transpose(-1, -2).contiguous()  # (G, N, dg)
    gBT = torch.empty_like(uT)  # Σ_n g_t B_t          (L, b, G, dg)
    wAT = torch.empty_like(uT)  # Σ_n ∂loss/∂(Δ_t A) A
    dBT, dCT = torch.empty_like(BT), torch.empty_like(CT)  # (L, b, G, N)
    h_init = _state_bg(h0, G)
    g = torch.zeros_like(h_init) if dh_final is None else _state_bg(dh_final.to(h0.dtype), G)
    dA_acc = torch.zeros_like(h_init)  # Σ_t w_t Δ_t, summed over b at the end
    w = torch.empty_like(h_init)
    tmp = torch.empty_like(h_init)
    if saved[0] == "all":
        _, hs, decays = saved
        spans = [(0, L)]
    else:
        starts = saved[1]
        spans = _chunk_spans(L, chunk)
        hs = torch.empty((min(chunk, L), *h_init.shape), dtype=h0.dtype, device=h0.device)
        decays = torch.empty_like(hs)
    for i in reversed(range(len(spans))):
        s, e = spans[i]
        if saved[0] == "all":
            off, h_start = 0, h_init
        else:  # recompute this chunk's decays and states from its start
            off, h_start = s, starts[i]
            prev = h_start
            for j in range(e - s):
                prev = _state_step_(decays[j], hs[j], prev, dtT[s + j], At, BT[s + j],
                                    dtuT[s + j])
        for t in reversed(range(s, e)):
            j = t - off
            g.addcmul_(CT[t].unsqueeze(3), dyT[t].unsqueeze(2))  # g_t = C_t dy_t + a_{t+1} g_{t+1}
            torch.bmm(BT[t].view(b * G, 1, N), g.view(b * G, N, dg),
                      out=gBT[t].view(b * G, 1, dg))
            torch.mul(g, dtuT[t].unsqueeze(2), out=tmp)
            torch.sum(tmp, dim=-1, out=dBT[t])  # Σ over the group's channels
            torch.mul(hs[j], dyT[t].unsqueeze(2), out=tmp)
            torch.sum(tmp, dim=-1, out=dCT[t])
            h_prev = hs[j - 1] if j > 0 else h_start
            torch.mul(g, decays[j], out=w)
            w.mul_(h_prev)  # ∂loss/∂(Δ_t A) = g_t a_t h_{t-1}
            dA_acc.addcmul_(w, dtT[t].unsqueeze(2))
            torch.mul(w, At, out=tmp)
            torch.sum(tmp, dim=2, out=wAT[t])
            g.mul_(decays[j])  # what step t sends back to h_{t-1}
    duT = gBT * dtT
    ddtT = wAT.addcmul_(gBT, uT)
    dA = dA_acc.sum(0).transpose(-1, -2).reshape(d, N)  # (G, N, dg) -> (d, N)

    def back(x: Tensor) -> Tensor:  # (L, b, G, dg) -> (b, d, L)
        return x.permute(1, 2, 3, 0).reshape(b, d, L)

    return (back(duT), back(ddtT), dA, dBT.permute(1, 2, 3, 0), dCT.permute(1, 2, 3, 0),
            _state_bdn(g))
