"""Triton kernels of the selective scan (forward, backward, one-step update) and their launchers.

Semantics: :mod:`tsssm.ssm.scan_ref`. Layout: every program owns one batch row and a block of
BLOCK_D channels with all N states of each channel; it walks L in chunks of BLOCK_L steps, the state
(BLOCK_D, N) carried in registers from chunk to chunk. Inside a chunk, for each state n, the
recurrence h_t = a_t h_{t-1} + x_t over the (BLOCK_D, BLOCK_L) tile is one ``tl.associative_scan``
on (a, x) pairs. Nothing of size L·N is written: the forward writes ``out`` and, when training, the
state at the start of each chunk (b, n_chunks, d, N); the backward recomputes the chunk's states
from it and runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse scan.

Inputs may be float32, bfloat16 or float16; all arithmetic and the state are float32. Decays use
exp2 with A pre-scaled by log2(e). The kernels use only APIs shared by Triton 3.6 and 3.9 and run
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["scan_forward", "scan_backward", "state_update", "launch_config", "FWD_CONFIG",
           "BWD_CONFIG"]

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e)

#: Launch shapes. Chosen by the sweep in benchmarks/scan.py (H100, see benchmarks/RESULTS.md).
#: PREFETCH: the next chunk's u, delta and z are loaded while the current chunk is computed
#: (software pipelining by hand: their DRAM latency overlaps the N-state loop instead of starting
#: each chunk); 0 = load each chunk's inputs when it starts (the kernel before 2026-12-01).
FWD_CONFIG = {"BLOCK_D": 16, "BLOCK_L": 64, "num_warps": 4, "UNROLL": 4, "PREFETCH": 1}
#: Per input dtype ("float32", "bfloat16", "float16") overrides of FWD_CONFIG / BWD_CONFIG.
#: The inference forward, as measured on an H200 at L 16k (benchmarks/scan_bwd_session.sh,
#: 2026-12-01): float32 2-D B/C tiles without chunk prefetch, 3.26 vs 3.54 ms; bfloat16 2-D
#: B/C tiles, 2.28 ms as before (the sweep's best; float16 was not timed and keeps the default).
#: 2026-12-04 (H200, `scan_bwd_session.py --set carry` and `--set carry2`, L 16k): bfloat16 also
#: takes the carried state into the chunk scan (CARRY_IN_SCAN), 2.01 / 1.97 ms against 2.28 /
#: 2.26. float32 with it alone is slower (4.41 / 4.30 ms against 3.26 / 3.19: more than 128
#: registers, 3 programs per SM; held to 128, 3.44), but with 8 states per iteration and held
#: to 128 registers it is faster: 2.98 ms against 3.27 at L 16k, 11.9 against 12.9 at 64k
#: (device call 5, `benchmarks/device_runs/2026-12-04-carry.cmd`; bfloat16 with 8 states per
#: iteration: 3.73 ms, with 16: 2.11).
FWD_CONFIG_BY_DTYPE: dict[str, dict] = {
    "float32": {"BC_2D": 1, "PREFETCH": 0, "CARRY_IN_SCAN": 1, "UNROLL": 8, "MAXNREG": 128},
    "bfloat16": {"BC_2D": 1, "CARRY_IN_SCAN": 1}}
#: Overrides of the forward's shape when it saves chunk states for a backward (training), whose
#: BLOCK_L the backward inherits; per dtype in FWD_TRAIN_CONFIG_BY_DTYPE. Same session, with the
#: backward below: no chunk prefetch (float32 B/C vectors, 3.13 ms against 4.55 with prefetch;
#: bfloat16 2-D tiles, 2.64 ms), forward+backward 13.8 / 12.6 ms against 15.8 / 13.5 before.
#: 2026-12-04 (same sessions): CARRY_IN_SCAN with ptxas held to 128 registers (MAXNREG) in
#: both dtypes; with the backward below, forward+backward 11.6 / 12.5 ms (bf16 / fp32) against
#: 12.6 / 13.7 for the shapes before.
FWD_TRAIN_CONFIG: dict = {"CARRY_IN_SCAN": 1, "MAXNREG": 128}
#: (float32's training forward keeps 4 states per iteration, what was timed, over the inference
#: forward's 8.)
FWD_TRAIN_CONFIG_BY_DTYPE: dict[str, dict] = {"float32": {"BC_2D": 0, "PREFETCH": 0, "UNROLL": 4},
                                              "bfloat16": {"BC_2D": 1, "PREFETCH": 0}}
#: The backward walks the chunks the forward saved, so it reuses the forward's BLOCK_L.
#: PREFETCH as in the forward (u, delta, dout, z of the chunk before), off by default: the
#: backward's 1-warp programs are limited by registers, which prefetching raises.
#: Switches of both kernels (0 when absent): BC_2D loads each state's B_n, C_n as a
#: (BLOCK_D, BLOCK_L) tile with repeated rows in the tile's own layout, instead of a
#: (BLOCK_L,) vector that Triton then moves to that layout through shared memory with a
#: barrier (the repeated rows come from L1). The backward's STATE_PREFETCH loads the next
#: UNROLL states' A, B, C and saved state while the current ones are computed, so that their
#: L2 latency overlaps the scans instead of opening every state-loop iteration.
#: Default since 2026-12-01 (H200 sweep of benchmarks/scan_bwd_session.sh at L 16k, backward
#: alone): BC_2D + STATE_PREFETCH + one state per iteration, 10.0 ms bf16 / 10.6 ms fp32 against
#: 10.8 / 11.2 for the kernel before (UNROLL 2, neither switch); mamba-ssm's 9.5 / 10.9.
#: CARRY_IN_SCAN (both kernels): the state carried into a chunk enters its scan through the
#: first step (x_0 + a_0 h) instead of a fix-up after it (h_t + (Π a) h), so the scan's running
#: products of a are never used and not computed (forward inner loop: 604 -> 511 SASS
#: instructions per 4 states, bf16, compiled offline for sm_90). ROW_ATOMICS (backward): every
#: channel row adds its own dB/dC share atomically, instead of a sum over the block's channels
#: (shuffles) and a shared-memory layout change before fewer atomics: the kernel is bound by the
#: L1/TEX unit that both of those load (ncu, 2026-12-04).
#: Since 2026-12-04 (same sessions, backward alone at L 16k): both switches with 2 channels per
#: program, 9.40 ms bf16 / 9.70 ms fp32 against 9.99 / 10.6; mamba-ssm's 9.44 / 10.8.
BWD_CONFIG = {"BLOCK_D": 2, "num_warps": 1, "UNROLL": 1, "PREFETCH": 0, "BC_2D": 1,
              "STATE_PREFETCH": 1, "CARRY_IN_SCAN": 1, "ROW_ATOMICS": 1}
BWD_CONFIG_BY_DTYPE: dict[str, dict] = {}
#: dB/dC across dim blocks: True = float32 atomic adds into (b, G, N, L) (memory O(b·N·L), like
#: dB itself); False = per-block partial sums then one torch sum (deterministic, but
#: n_dblocks × the size of dB: 4 GiB at batch 8, dim 1024, L 16k); "auto" = partial sums while
#: their buffers take at most PARTIAL_MEMORY_FRACTION of the device's memory (PARTIAL_BYTES_MAX
#: off CUDA), atomics beyond.
BWD_ATOMIC_BC: bool | str = True
#: Memory order of those atomics. "relaxed" (red.global.add: no fence; the adds commute and
#: nothing reads dB/dC before the kernel ends) or "acq_rel" (Triton's default, a fence around
#: every add: how the atomics ran before 2026-12-01, ~1.7x slower backward on an H100).
ATOMIC_SEM = "relaxed"
PARTIAL_MEMORY_FRACTION = 0.125
PARTIAL_BYTES_MAX = 1 << 30
#: Reverse scan through ``reverse=True`` (False) or explicit ``tl.flip`` (True, slower; kept as a
#: fallback should a Triton release compile reverse scans differently).
BWD_REVERSE_VIA_FLIP = False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def launch_config(kind: str, dtype: torch.dtype, config: dict | None = None) -> dict:
    """The launch shape in use for ``kind`` ("fwd", "fwd_train" = a forward that saves states
    for the backward, "bwd") and input dtype: the module default, its per-dtype override (for
    "fwd_train" then FWD_TRAIN_CONFIG and its per-dtype override), then ``config``."""
    name = _dtype_name(dtype)
    if kind == "bwd":
        return {**BWD_CONFIG, **BWD_CONFIG_BY_DTYPE.get(name, {}), **(config or {})}
    cfg = {**FWD_CONFIG, **FWD_CONFIG_BY_DTYPE.get(name, {})}
    if kind == "fwd_train":
        cfg.update(FWD_TRAIN_CONFIG)
        cfg.update(FWD_TRAIN_CONFIG_BY_DTYPE.get(name, {}))
    elif kind != "fwd":
        raise ValueError(f"kind must be fwd, fwd_train or bwd, got {kind!r}")
    return {**cfg, **(config or {})}


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


# Only builtins and this module's own @triton.jit helpers are called inside the kernels, never
# Triton's library functions written in Triton (tl.sum, tl.flip, ...): those are decorated when
# triton.language is imported, so a process that imported Triton before setting TRITON_INTERPRET
# (Lightning does) would hold compiled-only versions of them, unusable by the interpreter.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rowsum(x):
    """Σ over axis 1 of a 2-D tile (what tl.sum(x, axis=1) computes)."""
    return tl.reduce(x, 1, _add)


@triton.jit
def _colsum(x):
    """Σ over axis 0 of a 2-D tile (what tl.sum(x, axis=0) computes)."""
    return tl.reduce(x, 0, _add)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _flip_cols(x, ROWS: tl.constexpr, COLS: tl.constexpr, LOG2_COLS: tl.constexpr):
    """x[:, ::-1] for a float32 (ROWS, COLS) tile, COLS = 2**LOG2_COLS (as tl.flip does it:
    view the column index as LOG2_COLS bits and swap each bit pair with an xor-reduction)."""
    y = tl.reshape(x.to(tl.int32, bitcast=True), [ROWS] + [2] * LOG2_COLS)
    for i in tl.static_range(LOG2_COLS):
        y = y ^ tl.reduce(y, 1 + i, _xor, keep_dims=True)
    return tl.reshape(y, [ROWS, COLS]).to(tl.float32, bitcast=True)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20; exp(x) alone where 1 + exp(x) rounds to 1.
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _affine_combine(a_l, x_l, a_r, x_r):
    # h -> a_l h + x_l, then h -> a_r h + x_r  (l earlier in time than r)
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _adjoint_combine(f_r, p_r, g_r, f_l, p_l, g_l):
    # Segments of the adjoint recurrence g_t = c_t + a_{t+1} g_{t+1}, summarised as
    # (f = a of the segment's first step, p = product of its other a's, g = its g at the start).
    # Called as combine(later-in-time segment, earlier-in-time segment), the order of a reverse
    # scan (= flip, forward scan, flip). Joining l then r: g = g_l + p_l f_r g_r.
    k = p_l * f_r
    return f_l, k * p_r, g_l + k * g_r


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_state(
    n, h, dt, dtu, offs_d, mask_d, offs_n, t, mask_t, offs_t, A_ptr, B_ptr, C_ptr, bc_row,
    N: tl.constexpr, L, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BC_2D: tl.constexpr,
    CARRY_IN_SCAN: tl.constexpr,
):
    """State n over one chunk: scan from h[:, n], return (C_n ⊙ h (D, L), h with column n set to
    the chunk-end state). n ≥ N (padding of N_PAD) loads a = 1, x = 0, C = 0: a no-op.
    BC_2D: B_n, C_n are loaded as (BLOCK_D, BLOCK_L) tiles with repeated rows, in the tile's
    own layout (no shared-memory conversion and barrier per load; see _bwd_loads)."""
    ok = n < N
    sel = offs_n[None, :] == n
    A_n = tl.load(A_ptr + offs_d * N + n, mask=mask_d & ok, other=0.0).to(tl.float32) * LOG2E
    if BC_2D:
        t2 = tl.full((BLOCK_D,), 0, dtype=tl.int32)[:, None] + t[None, :]  # (BLOCK_D, BLOCK_L)
        m2 = (tl.full((BLOCK_D,), 0, dtype=tl.int32) == 0)[:, None] & (mask_t & ok)[None, :]
        B_n = tl.load(B_ptr + bc_row + n * L + t2, mask=m2, other=0.0).to(tl.float32)
        C_n = tl.load(C_ptr + bc_row + n * L + t2, mask=m2, other=0.0).to(tl.float32)
    else:
        B_n = tl.load(B_ptr + bc_row + n * L + t, mask=mask_t & ok,
                      other=0.0).to(tl.float32)[None, :]
        C_n = tl.load(C_ptr + bc_row + n * L + t, mask=mask_t & ok,
                      other=0.0).to(tl.float32)[None, :]
    h_n = _rowsum(tl.where(sel, h, 0.0))  # (BLOCK_D,)
    a = tl.exp2(dt * A_n[:, None])
    x = dtu * B_n
    if CARRY_IN_SCAN:
        # the chunk's first step takes the carried state in (x_0 + a_0 h): the scan then
        # gives the states themselves and its running products of a go unused (not computed)
        x = tl.where(offs_t[None, :] == 0, x + a * h_n[:, None], x)
        _a_cum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_affine_combine)
    else:
        a_cum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_affine_combine)
        hs = hs + a_cum * h_n[:, None]  # (BLOCK_D, BLOCK_L) states of this chunk
    h_end = _rowsum(tl.where(offs_t[None, :] == BLOCK_L - 1, hs, 0.0))
    return hs * C_n, tl.where(sel, h_end[:, None], h)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, hlast_ptr, hsave_ptr,  # outputs
    dim, L, n_chunks, dims_per_group, n_groups,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, PREFETCH: tl.constexpr, BC_2D: tl.constexpr,
    CARRY_IN_SCAN: tl.constexpr,
):
    # u, dt, z, out: (b, d, L); A: (d, N); B, C: (b, G, N, L); D, bias: (d,); h0, hlast: (b, d, N);
    # hsave: (b, n_chunks, d, N) state at the start of each chunk. All contiguous.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N_PAD)
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    offs_t = tl.arange(0, BLOCK_L)
    grp = (pid_d * BLOCK_D) // dims_per_group  # a block never straddles groups (launcher)
    row = (pid_b * dim + offs_d.to(tl.int64)) * L  # (BLOCK_D,) start of each channel's row
    bc_row = (pid_b * n_groups + grp) * N * L
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]  # (BLOCK_D, N_PAD)

    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_D, N_PAD), 0.0, dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    if PREFETCH:  # chunk 0's inputs; each iteration then loads the next chunk's
        mask0 = mask_d[:, None] & (offs_t < L)[None, :]
        ptrs0 = row[:, None] + offs_t[None, :]
        u_next = tl.load(u_ptr + ptrs0, mask=mask0, other=0.0)
        dt_next = tl.load(dt_ptr + ptrs0, mask=mask0, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_ptr + ptrs0, mask=mask0, other=0.0)

    for c in range(0, n_chunks):
        t = c * BLOCK_L + offs_t  # (BLOCK_L,)
        mask_t = t < L
        mask = mask_d[:, None] & mask_t[None, :]
        ptrs = row[:, None] + t[None, :]  # (BLOCK_D, BLOCK_L)
        if SAVE:
            tl.store(hsave_ptr + (pid_b * n_chunks + c) * dim * N + offs_d[:, None] * N
                     + offs_n[None, :], h, mask=mask_dn)
        if PREFETCH:
            u_raw = u_next
            dt_raw = dt_next
            if HAS_Z:
                z_raw = z_next
            # past the last chunk every lane is masked: no memory traffic
            mask_nx = mask_d[:, None] & (t + BLOCK_L < L)[None, :]
            u_next = tl.load(u_ptr + ptrs + BLOCK_L, mask=mask_nx, other=0.0)
            dt_next = tl.load(dt_ptr + ptrs + BLOCK_L, mask=mask_nx, other=0.0)
            if HAS_Z:
                z_next = tl.load(z_ptr + ptrs + BLOCK_L, mask=mask_nx, other=0.0)
        else:
            u_raw = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
            dt_raw = tl.load(dt_ptr + ptrs, mask=mask, other=0.0)
        u = u_raw.to(tl.float32)
        dt = dt_raw.to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        # steps past L: a = 1, x = 0, so the state at the tile's end is the state at L - 1
        dt = tl.where(mask, dt, 0.0)
        dtu = dt * u
        y = tl.full((BLOCK_D, BLOCK_L), 0.0, dtype=tl.float32)
        for n0 in range(0, N_PAD, UNROLL):  # UNROLL independent states per iteration (ILP)
            for k in tl.static_range(UNROLL):
                y_n, h = _fwd_state(n0 + k, h, dt, dtu, offs_d, mask_d, offs_n, t, mask_t,
                                    offs_t, A_ptr, B_ptr, C_ptr, bc_row, N, L, BLOCK_D, BLOCK_L,
                                    BC_2D, CARRY_IN_SCAN)
                y += y_n
        if HAS_D:  # u is loaded again (cache hit) rather than held in registers over the loop
            y += Dv[:, None] * tl.load(u_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            if PREFETCH:
                z = z_raw.to(tl.float32)
            else:
                z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            y = y * z * _sigmoid(z)
        tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(hlast_ptr + state_off, h, mask=mask_dn)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_loads(
    n, offs_d, mask_d, t, mask_t, A_ptr, B_ptr, C_ptr, bc_row, hsave_ptr, hsave_off,
    N: tl.constexpr, L, BLOCK_D: tl.constexpr, BC_2D: tl.constexpr,
):
    """What state n of a chunk reads from memory: A[:, n] (BLOCK_D,) float32, B_n and C_n in
    their own dtype, and the saved chunk-start state h[:, n] (BLOCK_D,). B_n, C_n are
    (BLOCK_L,) vectors or, with BC_2D, (BLOCK_D, BLOCK_L) tiles whose rows repeat them (the
    tile's own layout, so no shared-memory layout conversion follows; the repeated rows are
    served by L1). n ≥ N loads nothing (masked)."""
    ok = n < N
    A_nat = tl.load(A_ptr + offs_d * N + n, mask=mask_d & ok, other=0.0).to(tl.float32)
    h_n = tl.load(hsave_ptr + hsave_off + n, mask=mask_d & ok, other=0.0)
    if BC_2D:
        t2 = tl.full((BLOCK_D,), 0, dtype=tl.int32)[:, None] + t[None, :]  # (BLOCK_D, BLOCK_L)
        m2 = (tl.full((BLOCK_D,), 0, dtype=tl.int32) == 0)[:, None] & (mask_t & ok)[None, :]
        B_n = tl.load(B_ptr + bc_row + n * L + t2, mask=m2, other=0.0)
        C_n = tl.load(C_ptr + bc_row + n * L + t2, mask=m2, other=0.0)
    else:
        B_n = tl.load(B_ptr + bc_row + n * L + t, mask=mask_t & ok, other=0.0)
        C_n = tl.load(C_ptr + bc_row + n * L + t, mask=mask_t & ok, other=0.0)
    return A_nat, B_n, C_n, h_n


@triton.jit
def _bwd_state(
    n, p, dA_acc, dt, dtu, dy, ones, offs_d, mask_d, offs_n, t, mask_t, offs_t,
    A_nat, B_raw, C_raw, h_n, dB_ptr, dC_ptr, dbc_row, N: tl.constexpr, L,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, LOG2_BLOCK_L: tl.constexpr,
    ATOMIC_BC: tl.constexpr, ATOMIC_SEM: tl.constexpr, REVERSE_VIA_FLIP: tl.constexpr,
    BC_2D: tl.constexpr, ROW_ATOMICS: tl.constexpr, CARRY_IN_SCAN: tl.constexpr,
):
    """State n over one chunk, from what :func:`_bwd_loads` read for it: recompute h from the
    saved chunk start, reverse-scan the adjoint g, write the dB, dC contributions; return the
    (D, L) tiles C_n ⊙ h, g ⊙ B_n and ∂loss/∂Δ through exp(Δ A_n), and p, dA_acc with column n
    updated. n ≥ N is a no-op."""
    ok = n < N
    sel = offs_n[None, :] == n
    if BC_2D:  # (BLOCK_D, BLOCK_L) tiles already
        B_n = B_raw.to(tl.float32)
        C_n = C_raw.to(tl.float32)
    else:
        B_n = B_raw.to(tl.float32)[None, :]
        C_n = C_raw.to(tl.float32)[None, :]
    p_n = _rowsum(tl.where(sel, p, 0.0))
    # recompute the chunk's states from its saved start
    a = tl.exp2(dt * (A_nat * LOG2E)[:, None])
    x = dtu * B_n
    if CARRY_IN_SCAN:  # as in _fwd_state; x itself stays as it was (w below needs it)
        x0 = tl.where(offs_t[None, :] == 0, x + a * h_n[:, None], x)
        _a_cum, hs = tl.associative_scan((a, x0), axis=1, combine_fn=_affine_combine)
    else:
        a_cum, hs = tl.associative_scan((a, x), axis=1, combine_fn=_affine_combine)
        hs = hs + a_cum * h_n[:, None]
    # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, the chunk's end fed by p (= a_e g_e)
    cdy = dy * C_n
    if REVERSE_VIA_FLIP:
        _f, pp, gg = tl.associative_scan(
            (_flip_cols(a, BLOCK_D, BLOCK_L, LOG2_BLOCK_L), ones,
             _flip_cols(cdy, BLOCK_D, BLOCK_L, LOG2_BLOCK_L)),
            axis=1, combine_fn=_adjoint_combine,
        )
        pp = _flip_cols(pp, BLOCK_D, BLOCK_L, LOG2_BLOCK_L)
        gg = _flip_cols(gg, BLOCK_D, BLOCK_L, LOG2_BLOCK_L)
    else:
        _f, pp, gg = tl.associative_scan(
            (a, ones, cdy), axis=1, combine_fn=_adjoint_combine, reverse=True
        )
    g = gg + pp * p_n[:, None]  # (BLOCK_D, BLOCK_L) ∂loss/∂h_t
    p_start = _rowsum(tl.where(offs_t[None, :] == 0, a * g, 0.0))
    # a_t h_{t-1} = h_t - x_t: ∂loss/∂(Δ_t A_n) = g_t a_t h_{t-1}
    w = g * (hs - x)
    dA_n = _rowsum(w * dt)
    if ATOMIC_BC and ROW_ATOMICS:
        # every channel row adds its own (BLOCK_D, BLOCK_L) share: no cross-thread sum over
        # the block's channels (its shuffles and the shared-memory layout change that feeds
        # the (BLOCK_L,) atomics load the L1/TEX unit that bounds this kernel)
        t2 = tl.full((BLOCK_D,), 0, dtype=tl.int32)[:, None] + t[None, :]
        m2 = mask_d[:, None] & (mask_t & ok)[None, :]
        tl.atomic_add(dB_ptr + dbc_row + n * L + t2, g * dtu, mask=m2, sem=ATOMIC_SEM)
        tl.atomic_add(dC_ptr + dbc_row + n * L + t2, hs * dy, mask=m2, sem=ATOMIC_SEM)
    elif ATOMIC_BC:
        dB_n = _colsum(g * dtu)  # (BLOCK_L,) summed over this block's channels
        dC_n = _colsum(hs * dy)
        tl.atomic_add(dB_ptr + dbc_row + n * L + t, dB_n, mask=mask_t & ok, sem=ATOMIC_SEM)
        tl.atomic_add(dC_ptr + dbc_row + n * L + t, dC_n, mask=mask_t & ok, sem=ATOMIC_SEM)
    else:
        tl.store(dB_ptr + dbc_row + n * L + t, _colsum(g * dtu), mask=mask_t & ok)
        tl.store(dC_ptr + dbc_row + n * L + t, _colsum(hs * dy), mask=mask_t & ok)
    p = tl.where(sel, p_start[:, None], p)
    dA_acc = tl.where(sel, dA_acc + dA_n[:, None], dA_acc)
    return hs * C_n, g * B_n, w * A_nat[:, None], p, dA_acc


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hsave_ptr, dout_ptr, dhlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, n_chunks, dims_per_group, n_groups, n_dblocks,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, ATOMIC_BC: tl.constexpr, ATOMIC_SEM: tl.constexpr,
    REVERSE_VIA_FLIP: tl.constexpr, LOG2_BLOCK_L: tl.constexpr, PREFETCH: tl.constexpr,
    STATE_PREFETCH: tl.constexpr, BC_2D: tl.constexpr, ROW_ATOMICS: tl.constexpr,
    CARRY_IN_SCAN: tl.constexpr,
):
    # Same tiling as the forward, chunks visited last to first. Outputs: du, ddt, dz (b, d, L) in
    # the inputs' dtype; dA (b, d, N), dD, dbias (b, d) per-batch partials; dB, dC either
    # (b, n_dblocks, N, L) per-block partials or (b, G, N, L) atomic targets; dh0 (b, d, N).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N_PAD)
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    offs_t = tl.arange(0, BLOCK_L)
    grp = (pid_d * BLOCK_D) // dims_per_group
    row = (pid_b * dim + offs_d.to(tl.int64)) * L
    bc_row = (pid_b * n_groups + grp) * N * L
    if ATOMIC_BC:  # noqa: SIM108 (a constexpr branch)
        dbc_row = bc_row
    else:
        dbc_row = (pid_b * n_dblocks + pid_d) * N * L
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]

    # p = a_{e} g_{e}: the adjoint that the step after the current chunk sends back to its end.
    if HAS_DHLAST:
        p = tl.load(dhlast_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        p = tl.full((BLOCK_D, N_PAD), 0.0, dtype=tl.float32)
    dA_acc = tl.full((BLOCK_D, N_PAD), 0.0, dtype=tl.float32)
    dD_acc = tl.full((BLOCK_D,), 0.0, dtype=tl.float32)
    dbias_acc = tl.full((BLOCK_D,), 0.0, dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    ones = tl.full((BLOCK_D, BLOCK_L), 1.0, dtype=tl.float32)

    if PREFETCH:  # the last chunk's inputs; each iteration then loads the chunk before
        t_last = (n_chunks - 1) * BLOCK_L + offs_t
        mask_last = mask_d[:, None] & (t_last < L)[None, :]
        ptrs_last = row[:, None] + t_last[None, :]
        dt_next = tl.load(dt_ptr + ptrs_last, mask=mask_last, other=0.0)
        u_next = tl.load(u_ptr + ptrs_last, mask=mask_last, other=0.0)
        dout_next = tl.load(dout_ptr + ptrs_last, mask=mask_last, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_ptr + ptrs_last, mask=mask_last, other=0.0)

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * BLOCK_L + offs_t
        mask_t = t < L
        mask = mask_d[:, None] & mask_t[None, :]
        ptrs = row[:, None] + t[None, :]
        if PREFETCH:
            dt_raw = dt_next
            u_raw = u_next
            dout_raw = dout_next
            if HAS_Z:
                z_raw = z_next
            mask_pv = mask_d[:, None] & (t >= BLOCK_L)[None, :]  # chunk c - 1 (full) if c > 0
            dt_next = tl.load(dt_ptr + ptrs - BLOCK_L, mask=mask_pv, other=0.0)
            u_next = tl.load(u_ptr + ptrs - BLOCK_L, mask=mask_pv, other=0.0)
            dout_next = tl.load(dout_ptr + ptrs - BLOCK_L, mask=mask_pv, other=0.0)
            if HAS_Z:
                z_next = tl.load(z_ptr + ptrs - BLOCK_L, mask=mask_pv, other=0.0)
        else:
            dt_raw = tl.load(dt_ptr + ptrs, mask=mask, other=0.0)
            u_raw = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
            dout_raw = tl.load(dout_ptr + ptrs, mask=mask, other=0.0)
            if HAS_Z:
                z_raw = tl.load(z_ptr + ptrs, mask=mask, other=0.0)
        dt_in = dt_raw.to(tl.float32)
        if HAS_BIAS:
            dt_in = dt_in + bias[:, None]
        if SOFTPLUS:  # noqa: SIM108 (a constexpr branch)
            dt = _softplus(dt_in)
        else:
            dt = dt_in
        dt = tl.where(mask, dt, 0.0)
        dtu = dt * u_raw.to(tl.float32)
        dout = dout_raw.to(tl.float32)
        if HAS_Z:
            z = z_raw.to(tl.float32)
            sig_z = _sigmoid(z)
            dy = dout * z * sig_z  # ∂loss/∂y where out = y silu(z)
        else:
            dy = dout
        y = tl.full((BLOCK_D, BLOCK_L), 0.0, dtype=tl.float32)
        gB = tl.full((BLOCK_D, BLOCK_L), 0.0, dtype=tl.float32)  # Σ_n g B_n
        ddt = tl.full((BLOCK_D, BLOCK_L), 0.0, dtype=tl.float32)
        hsave_off = (pid_b * n_chunks + c) * dim * N + offs_d * N  # (BLOCK_D,)
        if STATE_PREFETCH:  # states 0 (and 1) of this chunk; each iteration loads the next ones
            A0n, B0n, C0n, h0n = _bwd_loads(0, offs_d, mask_d, t, mask_t, A_ptr, B_ptr, C_ptr,
                                            bc_row, hsave_ptr, hsave_off, N, L, BLOCK_D, BC_2D)
            if UNROLL >= 2:
                A1n, B1n, C1n, h1n = _bwd_loads(1, offs_d, mask_d, t, mask_t, A_ptr, B_ptr,
                                                C_ptr, bc_row, hsave_ptr, hsave_off, N, L,
                                                BLOCK_D, BC_2D)
        for n0 in range(0, N_PAD, UNROLL):  # UNROLL independent states per iteration (ILP)
            if STATE_PREFETCH:
                A0, B0, C0, h0 = A0n, B0n, C0n, h0n
                # past the last state every lane is masked: no memory traffic
                A0n, B0n, C0n, h0n = _bwd_loads(n0 + UNROLL, offs_d, mask_d, t, mask_t, A_ptr,
                                                B_ptr, C_ptr, bc_row, hsave_ptr, hsave_off, N,
                                                L, BLOCK_D, BC_2D)
                if UNROLL >= 2:
                    A1, B1, C1, h1 = A1n, B1n, C1n, h1n
                    A1n, B1n, C1n, h1n = _bwd_loads(n0 + UNROLL + 1, offs_d, mask_d, t, mask_t,
                                                    A_ptr, B_ptr, C_ptr, bc_row, hsave_ptr,
                                                    hsave_off, N, L, BLOCK_D, BC_2D)
            else:
                A0, B0, C0, h0 = _bwd_loads(n0, offs_d, mask_d, t, mask_t, A_ptr, B_ptr, C_ptr,
                                            bc_row, hsave_ptr, hsave_off, N, L, BLOCK_D, BC_2D)
                if UNROLL >= 2:
                    A1, B1, C1, h1 = _bwd_loads(n0 + 1, offs_d, mask_d, t, mask_t, A_ptr, B_ptr,
                                                C_ptr, bc_row, hsave_ptr, hsave_off, N, L,
                                                BLOCK_D, BC_2D)
            y_n, gB_n, ddt_n, p, dA_acc = _bwd_state(
                n0, p, dA_acc, dt, dtu, dy, ones, offs_d, mask_d, offs_n, t, mask_t, offs_t,
                A0, B0, C0, h0, dB_ptr, dC_ptr, dbc_row, N, L, BLOCK_D, BLOCK_L, LOG2_BLOCK_L,
                ATOMIC_BC, ATOMIC_SEM, REVERSE_VIA_FLIP, BC_2D, ROW_ATOMICS,
                CARRY_IN_SCAN)
            y += y_n
            gB += gB_n
            ddt += ddt_n
            if UNROLL >= 2:
                y_n, gB_n, ddt_n, p, dA_acc = _bwd_state(
                    n0 + 1, p, dA_acc, dt, dtu, dy, ones, offs_d, mask_d, offs_n, t, mask_t,
                    offs_t, A1, B1, C1, h1, dB_ptr, dC_ptr, dbc_row, N, L, BLOCK_D, BLOCK_L,
                    LOG2_BLOCK_L, ATOMIC_BC, ATOMIC_SEM, REVERSE_VIA_FLIP, BC_2D, ROW_ATOMICS,
                    CARRY_IN_SCAN)
                y += y_n
                gB += gB_n
                ddt += ddt_n
        # u, dout, z are loaded again (cache hits) rather than held in registers over the loop
        u = tl.load(u_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        ddt += gB * u
        du = gB * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += _rowsum(tl.where(mask, dy * u, 0.0))
            y += Dv[:, None] * u
        if HAS_Z:
            dout = tl.load(dout_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            sig_z = _sigmoid(z)
            dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
            tl.store(dz_ptr + ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(dt_in)
        ddt = tl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += _rowsum(ddt)
        tl.store(du_ptr + ptrs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + ptrs, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)

    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    tl.store(dh0_ptr + state_off, p, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


# ------------------------------------------------------------------------------------------------
# One step (streaming)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _state_update_kernel(
    state_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, dims_per_group, n_groups,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    # state: (b, d, N) float32, updated in place; u, dt, z, out: (b, d); B, C: (b, G, N).
    # Rows of a block may belong to different groups (no restriction on BLOCK_D here).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = offs_d // dims_per_group  # (BLOCK_D,)
    bc = (pid_b * n_groups + grp[:, None]) * N + offs_n[None, :]  # (BLOCK_D, N_PAD)
    state_off = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]
    h = tl.load(state_ptr + state_off, mask=mask_dn, other=0.0)
    u = tl.load(u_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    B = tl.load(B_ptr + bc, mask=mask_dn, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + bc, mask=mask_dn, other=0.0).to(tl.float32)
    a = tl.exp2(dt[:, None] * (A.to(tl.float32) * LOG2E))
    h = a * h + (dt * u)[:, None] * B
    tl.store(state_ptr + state_off, h, mask=mask_dn)
    y = _rowsum(h * C)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(out_ptr + pid_b * dim + offs_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _groups_view(x: Tensor) -> Tensor:
    """B or C as a contiguous (b, G, N, L) tensor."""
    return (x.unsqueeze(1) if x.dim() == 3 else x).contiguous()


def _block_d(dim: int, n_groups: int, wanted: int) -> int:
    """BLOCK_D ≤ wanted (a power of two) such that no block straddles two groups."""
    if n_groups == 1:
        return min(wanted, triton.next_power_of_2(dim))
    per_group = dim // n_groups
    block = 1
    while block * 2 <= wanted and per_group % (block * 2) == 0:
        block *= 2
    return block


def _block_l(L: int, wanted: int) -> int:
    return max(16, min(wanted, triton.next_power_of_2(L)))


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests swap it for a NaN-filled one)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    return _empty(*t.shape, dtype=t.dtype, device=t.device)


#: The most states per loop iteration each kernel takes: the forward unrolls any power of two
#: with static_range; the backward's loop body spells out one or two states.
FWD_MAX_UNROLL = 16
BWD_MAX_UNROLL = 2


def _unroll(N: int, wanted: int, most: int) -> int:
    """States per loop iteration: a power of two ≤ most (FWD_MAX_UNROLL / BWD_MAX_UNROLL),
    never more than N_PAD, which it then divides."""
    unroll = 1
    while unroll * 2 <= min(wanted, most, triton.next_power_of_2(N)):
        unroll *= 2
    return unroll


def _launch_options(cfg: dict) -> dict:
    """Triton's launch options of a launch shape: num_warps, and MAXNREG (registers per thread
    that ptxas may use; 0 or absent: its own choice) as maxnreg. A cap of 128 keeps a 4-warp
    program at 4 per SM (65,536 registers) where ptxas would take a few more and drop to 3."""
    opts = {"num_warps": cfg["num_warps"]}
    if cfg.get("MAXNREG"):
        opts["maxnreg"] = int(cfg["MAXNREG"])
    return opts


def _dummy(ref: Tensor) -> Tensor:
    return torch.empty(1, dtype=torch.float32, device=ref.device)


def scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    save_states: bool = True,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Launch the forward. Returns out (b, d, L) in u's dtype, the final state (b, d, N) float32,
    the chunk-start states (b, n_chunks, d, N) float32 when ``save_states`` (else None) and the
    chunk length BLOCK_L they were saved at (the backward must use the same)."""
    cfg = launch_config("fwd_train" if save_states else "fwd", u.dtype, config)
    batch, dim, L = u.shape
    N = A.shape[1]
    Bg, Cg = _groups_view(B), _groups_view(C)
    n_groups = Bg.shape[1]
    block_d = _block_d(dim, n_groups, cfg["BLOCK_D"])
    block_l = _block_l(L, cfg["BLOCK_L"])
    n_chunks = triton.cdiv(L, block_l)
    u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
    out = _empty_like(u)
    hlast = _empty(batch, dim, N, dtype=torch.float32, device=u.device)
    hsave = (_empty(batch, n_chunks, dim, N, dtype=torch.float32, device=u.device)
             if save_states else None)
    dummy = _dummy(u)
    grid = (batch, triton.cdiv(dim, block_d))
    _scan_fwd_kernel[grid](
        u, delta, A, Bg, Cg,
        D.contiguous() if D is not None else dummy,
        z.contiguous() if z is not None else dummy,
        delta_bias.contiguous() if delta_bias is not None else dummy,
        initial_state.contiguous() if initial_state is not None else dummy,
        out, hlast, hsave if hsave is not None else dummy,
        dim, L, n_chunks, dim // n_groups, n_groups,
        N=N, N_PAD=triton.next_power_of_2(N), BLOCK_D=block_d, BLOCK_L=block_l,
        UNROLL=_unroll(N, cfg["UNROLL"], FWD_MAX_UNROLL),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
        SAVE=hsave is not None, PREFETCH=bool(cfg.get("PREFETCH", 0)),
        BC_2D=bool(cfg.get("BC_2D", 0)), CARRY_IN_SCAN=bool(cfg.get("CARRY_IN_SCAN", 0)),
        **_launch_options(cfg),
    )
    return out, hlast, hsave, block_l


def scan_backward(
    dout: Tensor,
    dh_last: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    hsave: Tensor,
    block_l: int,
    delta_softplus: bool,
    config: dict | None = None,
    atomic_bc: bool | str | None = None,
    reverse_via_flip: bool | None = None,
    atomic_sem: str | None = None,
) -> tuple[Tensor, ...]:
    """Launch the backward. Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), each in the
    dtype and shape of its input (None for absent optional inputs); dh0 float32 (b, d, N).
    ``hsave`` and ``block_l`` come from :func:`scan_forward`.
    """
    cfg = launch_config("bwd", u.dtype, config)
    atomic_bc = BWD_ATOMIC_BC if atomic_bc is None else atomic_bc
    atomic_sem = ATOMIC_SEM if atomic_sem is None else atomic_sem
    if atomic_sem not in ("relaxed", "acq_rel"):
        raise ValueError(f"atomic_sem must be 'relaxed' or 'acq_rel', got {atomic_sem!r}")
    reverse_via_flip = BWD_REVERSE_VIA_FLIP if reverse_via_flip is None else reverse_via_flip
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = hsave.shape[1]
    if triton.cdiv(L, block_l) != n_chunks:
        raise RuntimeError("scan_backward: hsave does not match block_l")
    Bg, Cg = _groups_view(B), _groups_view(C)
    n_groups = Bg.shape[1]
    block_d = _block_d(dim, n_groups, cfg["BLOCK_D"])
    n_dblocks = triton.cdiv(dim, block_d)
    if atomic_bc == "auto":
        limit = PARTIAL_BYTES_MAX
        if u.is_cuda:
            total = torch.cuda.get_device_properties(u.device).total_memory
            limit = PARTIAL_MEMORY_FRACTION * total
        atomic_bc = 2 * batch * n_dblocks * N * L * 4 > limit
    dev = u.device
    u, delta, A, dout = u.contiguous(), delta.contiguous(), A.contiguous(), dout.contiguous()
    du = _empty_like(u)
    ddelta = _empty_like(delta)
    dz = _empty_like(z) if z is not None else None
    f32 = torch.float32
    dA_part = _empty(batch, dim, N, dtype=f32, device=dev)
    if atomic_bc:
        dB_buf = torch.zeros(batch, n_groups, N, L, dtype=f32, device=dev)
        dC_buf = torch.zeros_like(dB_buf)
    else:
        dB_buf = _empty(batch, n_dblocks, N, L, dtype=f32, device=dev)
        dC_buf = _empty_like(dB_buf)
    dD_part = _empty(batch, dim, dtype=f32, device=dev) if D is not None else None
    dbias_part = _empty(batch, dim, dtype=f32, device=dev) if delta_bias is not None else None
    dh0 = _empty(batch, dim, N, dtype=f32, device=dev)
    dummy = _dummy(u)
    grid = (batch, n_dblocks)
    _scan_bwd_kernel[grid](
        u, delta, A, Bg, Cg,
        D.contiguous() if D is not None else dummy,
        z.contiguous() if z is not None else dummy,
        delta_bias.contiguous() if delta_bias is not None else dummy,
        hsave, dout,
        dh_last.contiguous() if dh_last is not None else dummy,
        du, ddelta, dz if dz is not None else dummy, dA_part, dB_buf, dC_buf,
        dD_part if dD_part is not None else dummy,
        dbias_part if dbias_part is not None else dummy, dh0,
        dim, L, n_chunks, dim // n_groups, n_groups, n_dblocks,
        N=N, N_PAD=triton.next_power_of_2(N), BLOCK_D=block_d, BLOCK_L=block_l,
        UNROLL=_unroll(N, cfg["UNROLL"], BWD_MAX_UNROLL),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_DHLAST=dh_last is not None, SOFTPLUS=bool(delta_softplus),
        ATOMIC_BC=bool(atomic_bc), ATOMIC_SEM=atomic_sem,
        REVERSE_VIA_FLIP=bool(reverse_via_flip), LOG2_BLOCK_L=block_l.bit_length() - 1,
        PREFETCH=bool(cfg.get("PREFETCH", 0)), STATE_PREFETCH=bool(cfg.get("STATE_PREFETCH", 0)),
        BC_2D=bool(cfg.get("BC_2D", 0)), ROW_ATOMICS=bool(cfg.get("ROW_ATOMICS", 0)),
        CARRY_IN_SCAN=bool(cfg.get("CARRY_IN_SCAN", 0)),
        **_launch_options(cfg),
    )
    if atomic_bc:
        dB, dC = dB_buf, dC_buf
    else:  # blocks of one group are consecutive: sum them per group
        blocks_per_group = n_dblocks // n_groups
        dB = dB_buf.view(batch, n_groups, blocks_per_group, N, L).sum(2)
        dC = dC_buf.view(batch, n_groups, blocks_per_group, N, L).sum(2)
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, dh0


def state_update(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor | None,
    z_t: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    block_d: int = 32,
) -> Tensor:
    """One step in place on ``state`` (b, d, N) float32 (contiguous); returns out_t (b, d)."""
    if not state.is_contiguous():
        raise ValueError("state_update: state must be contiguous (it is updated in place)")
    batch, dim, N = state.shape
    Bg = (B_t.unsqueeze(1) if B_t.dim() == 2 else B_t).contiguous()  # (b, G, N)
    Cg = (C_t.unsqueeze(1) if C_t.dim() == 2 else C_t).contiguous()
    n_groups = Bg.shape[1]
    out = _empty(batch, dim, dtype=u_t.dtype, device=u_t.device)
    dummy = _dummy(state)
    block_d = min(block_d, triton.next_power_of_2(dim))
    grid = (batch, triton.cdiv(dim, block_d))
    _state_update_kernel[grid](
        state, u_t.contiguous(), delta_t.contiguous(), A.contiguous(), Bg, Cg,
        D.contiguous() if D is not None else dummy,
        z_t.contiguous() if z_t is not None else dummy,
        delta_bias.contiguous() if delta_bias is not None else dummy,
        out, dim, dim // n_groups, n_groups,
        N=N, N_PAD=triton.next_power_of_2(N), BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z_t is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), num_warps=4,
    )
    return out
