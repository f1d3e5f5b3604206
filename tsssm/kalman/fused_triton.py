"""Fused Kalman filter for many series on the GPU: Triton kernels and their launchers only.

One program filters a block of ``BLOCK_S`` series, one series per GPU thread, with the state
mean and the covariance held in registers for the whole sequence; y is read once and each
requested result written once. For thousands of streams that makes it a memory-bound pass
(on an H100, 10,000 x 10,000 steps: 2-3x the memory floor; what is left is the latency of the
per-step chain of one thread per series, see benchmarks/RESULTS.md). The readable
specification of the arithmetic is the sequential filter (``tsssm.kalman.filter``); this module
must give the same numbers.

Why code generation. The matrices are tiny (n <= 8 states, p <= 4 observations) and every
entry lives in its own register, so the kernel body is straight-line scalar code over
``(BLOCK_S,)`` vectors: P[i][j] is the variable ``P_i_j``. Triton has no arrays of tensors, so
``_kernel_source`` writes that code out for one (n, p, options) and ``_kernel`` compiles it once
and caches it. Entries of F and H that are 0, +1 or -1 in every series (the structure of trend,
seasonal and AR models) are compiled in: no load, no multiply, no term; likewise zeros of Q.
The pattern is read from the matrices at each call and is part of the cache key, so a change of
values only recompiles, never computes wrongly.

Memory access. y (S, T, p) is series-major: a thread's next values are contiguous, its
neighbours' T*p elements away, so each thread loads 16 bytes at a time: a chunk of 4 (float32)
or 2 (float64) steps as a ``(BLOCK_S, VEC)`` tile whose rows sit in one thread, taken apart with
``tl.split`` (no data crosses threads), loaded ``prefetch`` chunks ahead. This needs T to be a
multiple of the chunk; otherwise (and for large models, see ``vectorize``) one element at a time.
The outputs are written time-major, (T, S, ...), so that each step's results of a warp's 32
series are one contiguous run (a series-major layout made every store touch 32 cache lines and
ran 2x slower); they are returned as (S, T, ...) views.

Steady state. With time-invariant matrices and no missing values the covariance recursion
converges; once it has (to the sequential filter's 64-ulp test) for all series of a block, the
block skips it and reuses the converged gain, going back to the full update for any chunk
with a missing value (``steady_state``).

Per step, for the predicted state (m, P) and observation y_t (NaN = missing, per entry):
    v = y - H m - d, zero where missing          U = H P, rows of missing entries zeroed
    S = U H' + R, rows/cols of missing entries replaced by those of the identity
    S = L D L'  (unit-lower LDL', no square roots)          e = L^-1 v
    NIS = sum e_k^2 / D_k      loglik_t = -(n_obs log 2 pi + sum log D_k + NIS) / 2
    K' = S^-1 U  (L^-1, D^-1, L'^-1)                       m_f = m + K v
    P_f = P - K U - U' K' + (K S) K'   (the Joseph form (I-KH) P (I-KH)' + K R K' expanded:
          first-order insensitive to rounding in K, like the factored form; upper triangle only,
          mirrored, so exactly symmetric)
    m = F m_f + c              P = F P_f F' + Q
Missing entries thus contribute nothing (zero gain column, unit pivot, log 1 = 0).
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import math
import os
import threading
import weakref
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from tsssm.errors import ModelError, NumericalError

#: Largest state and observation dimensions the fused kernel is generated for.
MAX_STATE_DIM = 8
MAX_OBS_DIM = 4
#: Results the kernel writes on request (names of ``FilterResult`` fields), with their per-step
#: width in elements for (n, p). Writing covariances costs n*n elements a step: request them only
#: when needed, the memory traffic is the running time.
KERNEL_OUTPUTS = {
    "log_liks": lambda n, p: 1,  # (S, T)
    "filtered_mean": lambda n, p: n,  # (S, T, n)
    "predicted_mean": lambda n, p: n,  # (S, T, n)
    "innovation": lambda n, p: p,  # (S, T, p), 0 where y is missing
    "nis": lambda n, p: 1,  # (S, T), 0 where nothing is observed
    "filtered_cov": lambda n, p: n * n,  # (S, T, n, n)
    "predicted_cov": lambda n, p: n * n,  # (S, T, n, n)
}
DEFAULT_OUTPUTS = ("log_liks", "filtered_mean", "innovation", "nis")
_PARAMS = ("F", "H", "Q", "R", "c", "d", "m0", "P0")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything the generated source depends on (the compile-cache key)."""

    n: int
    p: int
    dtype: str  # "fp32" | "fp64"
    batched: tuple[str, ...]  # parameters given per series (loaded per thread)
    has_c: bool
    has_d: bool
    F_code: tuple[tuple[int, ...], ...]  # (n, n) entry codes of F, see _entry_codes
    H_code: tuple[tuple[int, ...], ...]  # (p, n)
    Q_nz: tuple[tuple[bool, ...], ...]  # (n, n) entries of Q nonzero in some series
    outputs: tuple[str, ...]
    joseph: bool
    vectorize: bool  # y read 16 bytes at a time (needs T % VEC == 0)
    chunk_mult: int = 1  # steps unrolled per loop iteration: VEC * chunk_mult
    prefetch: int = 1  # chunks of y loaded ahead
    tail: bool = False  # T % CH != 0: a last, partial chunk with element-wise masks
    fast_log: bool = False  # lg2.approx through inline PTX (compiled float32 only)
    steady: bool = False  # skip the covariance recursion once it has converged (see below)
    y_time_major: bool = False  # y stored (T, S, p): a warp's loads of one step coalesce
    # y prefetch without loop-carried copies: the loop body is unrolled over the PREFETCH slots
    # and each slot is reloaded right after its chunk is consumed (see _kernel_source)
    rotate: bool = False
    ll_chunk: bool = False  # float32 log-likelihood terms summed per chunk, then into float64
    # outputs stored series-major (S, T, ...), a full chunk's values of a thread in 16-byte
    # stores after the chunk (element stores in the tail); covariance outputs excluded
    out_series: bool = False

    @property
    def chunk_stores(self) -> bool:
        return self.out_series and self.vectorize

    @property
    def vec16(self) -> int:
        """Elements in 16 bytes."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def vec(self) -> int:
        """Elements of one y row per load (1 when not vectorised)."""
        return self.vec16 if self.vectorize else 1

    @property
    def chunk(self) -> int:
        """Steps per loop iteration (unrolled); T need not be a multiple of it."""
        return self.vec * self.chunk_mult


def vector_steps(dtype: torch.dtype) -> int:
    """16-byte loads of y need T to be a multiple of this (4 in float32, 2 in float64)."""
    return 4 if dtype == torch.float32 else 2


class _Src:
    """Accumulates generated lines with indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.indent = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.indent + line if line else "")


def _sum(terms: list[str]) -> str:
    return " + ".join(terms) if terms else "zero"


def _times(code: int, coef: str, x: str) -> str | None:
    """coef * x for an entry code: None for a structural zero, no multiply for +-1."""
    if code == 0:
        return None
    if code == 1:
        return x
    if code == -1:
        return f"(-{x})"
    return f"{coef} * {x}"


def _terms(items) -> list[str]:
    return [t for t in items if t is not None]


def _emit_split(src: _Src, tile: str, names: list[str], vec: int) -> None:
    """(BLOCK_S, vec) tile -> vec (BLOCK_S,) vectors, all within one thread."""
    if vec == 1:
        src(f"{names[0]} = {tile}")
    elif vec == 2:
        src(f"{names[0]}, {names[1]} = tl.split({tile})")
    else:  # 4: reshape to (BLOCK_S, 2, 2): [:, i, j] = tile[:, 2 i + j]
        src(f"_sa, _sb = tl.split(tl.reshape({tile}, (BLOCK_S, 2, 2)))")
        src(f"{names[0]}, {names[2]} = tl.split(_sa)")
        src(f"{names[1]}, {names[3]} = tl.split(_sb)")


def _join_expr(names: list[str]) -> str:
    """1, 2 or 4 (BLOCK_S,) vectors -> one (BLOCK_S, k) tile (inverse of _emit_split)."""
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"tl.join({names[0]}, {names[1]})"
    a, b, c, d = names
    return f"tl.reshape(tl.join(tl.join({a}, {c}), tl.join({b}, {d})), (BLOCK_S, 4))"


def _group(w: int, vec16: int) -> int:
    """Elements per store of a w-wide output row: the largest power of two <= 16 bytes
    that divides w (so that Triton can prove the alignment of every store)."""
    g = 1
    while g * 2 <= vec16 and w % (g * 2) == 0:
        g *= 2
    return g


def _max_expr(items: list[str]) -> str:
    out = items[0]
    for x in items[1:]:
        out = f"tl.maximum({out}, {x})"
    return out


def _steady_tol(dtype: str) -> float:
    """Relative change of the predicted covariance below which it counts as converged: 64 ulps,
    as in the sequential filter's steady-state shortcut."""
    return 64.0 * (2.0**-23 if dtype == "fp32" else 2.0**-52)


def _kernel_args(spec: KernelSpec) -> list[str]:
    args = ["y_ptr"]
    for name in _PARAMS:
        if (name == "c" and not spec.has_c) or (name == "d" and not spec.has_d):
            continue
        args.append(f"{name}_ptr")
    args.append("llsum_ptr")
    if spec.steady:
        args.append("nsteady_ptr")
    args += [f"{o}_ptr" for o in spec.outputs]
    return args


def _kernel_source(spec: KernelSpec, name: str) -> str:
    n, p, vec, ch = spec.n, spec.p, spec.vec, spec.chunk
    DT = "tl.float32" if spec.dtype == "fp32" else "tl.float64"
    widths = {o: KERNEL_OUTPUTS[o](n, p) for o in spec.outputs}
    Fc, Hc = spec.F_code, spec.H_code
    src = _Src()
    # S and ONE are never specialised: S may be 1 (one long series) and must stay a tensor;
    # ONE hides from the compiler that the series of a w=1 output are adjacent, which would
    # make it regroup them across threads for wider stores (they are coalesced already).
    src('@triton.jit(do_not_specialize=["S", "ONE"])')
    # NAN: a runtime float argument (a NaN global would fail Triton's check that globals are
    # unchanged since compilation, NaN != NaN); masked loads fill with it, i.e. "missing".
    src(f"def {name}(" + ", ".join(_kernel_args(spec))
        + ", S, T, TQ, NAN, ONE, BLOCK_S: tl.constexpr):")
    src.indent = 1
    src(f'"""Generated: n={n} p={p} {spec.dtype} outputs={",".join(spec.outputs)}."""')
    # Only builtins of triton.language (no tl.zeros, tl.sum: those are @jit functions whose
    # interpreted or compiled form is fixed when triton is imported), so the kernel runs in
    # whichever mode TRITON_INTERPRET selects when it is generated.
    src("rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) one series each")
    src("rmask = rows < S")
    src("r64 = rows.to(tl.int64)")
    src("S64 = S.to(tl.int64)")
    src(f"zero = tl.full((BLOCK_S,), 0.0, {DT})")
    src("izero = tl.full((BLOCK_S,), 0, tl.int32)")
    # y (S, T, p) is series-major: TQ * VEC tells the compiler that rows are 16-byte aligned.
    src(f"Trow = TQ * {vec}" if spec.vectorize else "Trow = T")
    if spec.y_time_major:  # y (T, S, p): element loads, one run of 32 series per warp and step
        src(f"y_rp = y_ptr + r64 * {p}  # (BLOCK_S,)")
    elif vec > 1:
        src(f"cols = tl.arange(0, {vec})")
        src(f"y_rp = y_ptr + (r64 * Trow * {p})[:, None] + cols[None, :]  # (BLOCK_S, VEC)")
    else:
        src(f"y_rp = y_ptr + r64 * Trow * {p}  # (BLOCK_S,)")
    mask2 = "rmask[:, None]" if vec > 1 else "rmask"
    # Outputs (T, S, w) are time-major: at each step a warp writes one contiguous run.
    # With out_series they are (S, T, w): a thread's chunk of CH steps is one contiguous run.
    groups = {}
    if spec.out_series:
        src(f"Tout = TQ * {vec}" if spec.vectorize else "Tout = T")
    for stream, w in widths.items():
        g = _group(w, spec.vec16)
        groups[stream] = g
        if spec.out_series:
            src(f"{stream}_ts = {w}  # elements per step")
            row = f"r64 * Tout * {w}"
            if g == 1:
                src(f"{stream}_rp = {stream}_ptr + {row}")
            else:
                src(f"{stream}_rp = {stream}_ptr + ({row})[:, None] + tl.arange(0, {g})[None, :]")
            if spec.chunk_stores:
                src(f"{stream}_rc = {stream}_ptr + ({row})[:, None] + "
                    f"tl.arange(0, {spec.vec16})[None, :]")
            continue
        src(f"{stream}_ts = S64 * {w}  # elements per step")
        if g == 1:
            src(f"{stream}_rp = {stream}_ptr + r64 * " + ("ONE" if w == 1 else str(w)))
        else:
            src(f"{stream}_rp = {stream}_ptr + (r64 * {w})[:, None] + tl.arange(0, {g})[None, :]")

    # --- parameters -----------------------------------------------------------------------
    def load_param(pname: str, var: str, idx: int, size: int, carried: bool = False) -> None:
        if pname in spec.batched:
            src(f"{var} = tl.load({pname}_ptr + r64 * {size} + {idx}, mask=rmask, other=0.0)")
        elif carried:  # loop-carried values must be (BLOCK_S,) tensors from the start
            src(f"{var} = zero + tl.load({pname}_ptr + {idx})")
        else:
            src(f"{var} = tl.load({pname}_ptr + {idx})")

    for i in range(n):
        for j in range(n):
            if Fc[i][j] == 2:
                load_param("F", f"F_{i}_{j}", i * n + j, n * n)
    for k in range(p):
        for j in range(n):
            if Hc[k][j] == 2:
                load_param("H", f"H_{k}_{j}", k * n + j, p * n)
    for i in range(n):
        for j in range(i, n):
            if spec.Q_nz[i][j]:
                load_param("Q", f"Q_{i}_{j}", i * n + j, n * n)
    for k in range(p):
        for l in range(k, p):
            load_param("R", f"R_{k}_{l}", k * p + l, p * p)
    if spec.has_c:
        for i in range(n):
            load_param("c", f"c_{i}", i, n)
    if spec.has_d:
        for k in range(p):
            load_param("d", f"d_{k}", k, p)
    # Carried state: the predicted mean and covariance (upper triangle) of the current step.
    for i in range(n):
        load_param("m0", f"m_{i}", i, n, carried=True)
    for i in range(n):
        for j in range(i, n):
            load_param("P0", f"P_{i}_{j}", i * n + j, n * n, carried=True)
    src("acc = tl.full((BLOCK_S,), 0.0, tl.float64)  # total log-likelihood, float64 always")

    def P(i: int, j: int) -> str:
        return f"P_{min(i, j)}_{max(i, j)}"

    def log(x: str) -> str:
        if spec.fast_log:  # MUFU.LG2 (rel. error ~2^-22) instead of libdevice's polynomial
            return (f'(tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [{x}], '
                    f"dtype=tl.float32, is_pure=True, pack=1) * {math.log(2.0)!r})")
        return f"tl.log({x})"

    def store(stream: str, vals: list[str], tj: str, masked: bool) -> None:
        if spec.chunk_stores and not masked:
            return  # stored per chunk (emit_chunk)
        g = groups[stream]
        src(f"off = ({tj}) * {stream}_ts")
        valid = f"rmask & (izero + ({tj}) < T)" if masked else "rmask"
        mask = f"({valid})[:, None]" if g > 1 else valid
        for k in range(0, len(vals), g):
            src(f"tl.store({stream}_rp + (off + {k}), {_join_expr(vals[k:k + g])}, mask={mask})")

    def store_step_outputs(s: str, tj: str, masked: bool, cov: Callable[[int, int], str]
                           ) -> None:
        """Store the requested per-step outputs of step ``s``; ``cov(a, b)`` (a <= b) names the
        filtered covariance entry (the steady path keeps one shared covariance)."""
        if "log_liks" in widths:
            store("log_liks", [f"ll{s}"], tj, masked)
        if "filtered_mean" in widths:
            store("filtered_mean", [f"mf{i}{s}" for i in range(n)], tj, masked)
        if "innovation" in widths:
            store("innovation", [f"v{k}{s}" for k in range(p)], tj, masked)
        if "nis" in widths:
            store("nis", [f"nis{s}"], tj, masked)
        if "filtered_cov" in widths:
            vals = [cov(min(i, jj), max(i, jj)) for i in range(n) for jj in range(n)]
            store("filtered_cov", vals, tj, masked)

    def emit_step(j: int, ynames: list[str], t0: str, masked: bool, last: bool = False) -> None:
        """One filter step at time t0 + j; y values are in ynames[k]. ``last``: the last step
        of a full chunk, whose covariance quantities are kept for the steady-state path."""
        s = f"_{j}"  # suffix keeping names of different steps apart (readability only)
        tj = f"{t0} + {j}"
        if "predicted_mean" in widths:
            if spec.chunk_stores:
                for i in range(n):
                    src(f"pm{i}{s} = m_{i}")
            store("predicted_mean", [f"m_{i}" for i in range(n)], tj, masked)
        if "predicted_cov" in widths:
            store("predicted_cov", [P(i, jj) for i in range(n) for jj in range(n)], tj, masked)
        for k in range(p):
            src(f"ob{k}{s} = {ynames[k]} == {ynames[k]}  # observed (not NaN)")
            hm = _terms(_times(Hc[k][i], f"H_{k}_{i}", f"m_{i}") for i in range(n))
            if spec.has_d:
                hm.append(f"d_{k}")
            src(f"v{k}{s} = tl.where(ob{k}{s}, {ynames[k]} - ({_sum(hm)}), 0.0)")
        for k in range(p):
            for jj in range(n):
                terms = _terms(_times(Hc[k][i], f"H_{k}_{i}", P(i, jj)) for i in range(n))
                src(f"U{k}_{jj}{s} = tl.where(ob{k}{s}, {_sum(terms)}, 0.0)")
        for k in range(p):
            for l in range(k, p):
                terms = _terms(_times(Hc[l][i], f"H_{l}_{i}", f"U{k}_{i}{s}") for i in range(n))
                expr = f"{_sum(terms)} + R_{k}_{l}"
                if k == l:
                    src(f"S{k}_{l}{s} = tl.where(ob{k}{s}, {expr}, 1.0)")
                else:
                    src(f"S{k}_{l}{s} = tl.where(ob{k}{s} & ob{l}{s}, {expr}, 0.0)")
        # LDL' of S: S = L D L', L unit lower; E_j_k = L_j_k D_k.
        for jj in range(p):
            terms = [f"L{jj}_{k}{s} * E{jj}_{k}{s}" for k in range(jj)]
            src(f"D{jj}{s} = S{jj}_{jj}{s}" + (f" - ({_sum(terms)})" if terms else ""))
            src(f"iD{jj}{s} = 1.0 / D{jj}{s}")
            for i in range(jj + 1, p):
                terms = [f"L{i}_{k}{s} * E{jj}_{k}{s}" for k in range(jj)]
                rest = f" - ({_sum(terms)})" if terms else ""
                src(f"L{i}_{jj}{s} = (S{jj}_{i}{s}{rest}) * iD{jj}{s}")
                src(f"E{i}_{jj}{s} = L{i}_{jj}{s} * D{jj}{s}")
        # e = L^-1 v ; NIS and log-likelihood of this step.
        for i in range(p):
            terms = [f"L{i}_{k}{s} * e{k}{s}" for k in range(i)]
            src(f"e{i}{s} = v{i}{s}" + (f" - ({_sum(terms)})" if terms else ""))
        nis = " + ".join(f"e{i}{s} * e{i}{s} * iD{i}{s}" for i in range(p))
        src(f"nis{s} = {nis}")
        src(f"logdet{s} = " + " + ".join(log(f"D{i}{s}") for i in range(p)))
        nobs = " + ".join(f"ob{k}{s}.to({DT})" for k in range(p))
        src(f"ll{s} = -0.5 * (nis{s} + logdet{s}) - {_HALF_LOG_2PI!r} * ({nobs})")
        if not spec.ll_chunk:
            src(f"acc += ll{s}.to(tl.float64)")
        # Gain K' = S^-1 U: W = L^-1 U, Z = D^-1 W, K' = L'^-1 Z.   KT{k}_{i} = K[i][k].
        for k in range(p):
            for i in range(n):
                terms = [f"L{k}_{l}{s} * W{l}_{i}{s}" for l in range(k)]
                src(f"W{k}_{i}{s} = U{k}_{i}{s}" + (f" - ({_sum(terms)})" if terms else ""))
        for k in reversed(range(p)):
            for i in range(n):
                terms = [f"L{l}_{k}{s} * KT{l}_{i}{s}" for l in range(k + 1, p)]
                rest = f" - ({_sum(terms)})" if terms else ""
                src(f"KT{k}_{i}{s} = W{k}_{i}{s} * iD{k}{s}{rest}")
        # Filtered mean and covariance.
        for i in range(n):
            kv = " + ".join(f"KT{k}_{i}{s} * v{k}{s}" for k in range(p))
            src(f"mf{i}{s} = m_{i} + ({kv})")
        if spec.joseph:
            for i in range(n):
                for k in range(p):
                    terms = [f"KT{l}_{i}{s} * S{min(l, k)}_{max(l, k)}{s}" for l in range(p)]
                    src(f"KS{i}_{k}{s} = {_sum(terms)}")
        for i in range(n):
            for jj in range(i, n):
                ku = [f"KT{k}_{i}{s} * U{k}_{jj}{s}" for k in range(p)]
                if spec.joseph:
                    ku += [f"KT{k}_{jj}{s} * U{k}_{i}{s}" for k in range(p)]
                    kskt = " + ".join(f"KS{i}_{k}{s} * KT{k}_{jj}{s}" for k in range(p))
                    src(f"Pf{i}_{jj}{s} = {P(i, jj)} - ({' + '.join(ku)}) + ({kskt})")
                else:
                    src(f"Pf{i}_{jj}{s} = {P(i, jj)} - ({' + '.join(ku)})")
        # Step outputs, written as soon as they exist.
        store_step_outputs(s, tj, masked, cov=lambda a, b: f"Pf{a}_{b}{s}")
        if last and spec.steady:  # keep this step's gain quantities for the steady path
            for k in range(p):
                for i in range(n):
                    src(f"fK{k}_{i} = KT{k}_{i}{s}")
                for i in range(k):
                    src(f"fL{k}_{i} = L{k}_{i}{s}")
                src(f"fiD{k} = iD{k}{s}")
            src(f"flogdet = logdet{s}")
            if "filtered_cov" in widths:
                for i in range(n):
                    for jj in range(i, n):
                        src(f"fPf{i}_{jj} = Pf{i}_{jj}{s}")
            for i in range(n):
                for jj in range(i, n):
                    src(f"Pold{i}_{jj} = P_{i}_{jj}")
        # Predict the next step: m = F m_f + c, P = F P_f F' + Q.
        for i in range(n):
            terms = _terms(_times(Fc[i][k], f"F_{i}_{k}", f"mf{k}{s}") for k in range(n))
            if spec.has_c:
                terms.append(f"c_{i}")
            src(f"m_{i} = {_sum(terms)}")
        for i in range(n):
            if not any(Fc[i]):
                continue
            for jj in range(n):
                terms = _terms(
                    _times(Fc[i][k], f"F_{i}_{k}", f"Pf{min(k, jj)}_{max(k, jj)}{s}")
                    for k in range(n)
                )
                src(f"FP{i}_{jj}{s} = {_sum(terms)}")
        for i in range(n):
            for jj in range(i, n):
                terms = []
                if any(Fc[i]):  # else row i of F P_f is zero
                    terms = _terms(
                        _times(Fc[jj][k], f"F_{jj}_{k}", f"FP{i}_{k}{s}") for k in range(n)
                    )
                if spec.Q_nz[i][jj]:
                    terms.append(f"Q_{i}_{jj}")
                src(f"P_{i}_{jj} = {_sum(terms)}")
        if last and spec.steady:
            # Converged when the predicted covariance repeated to 64 ulps of its largest entry
            # (the sequential filter's test); padding rows count as converged.
            dev = [f"tl.abs(P_{i}_{jj} - Pold{i}_{jj})" for i in range(n) for jj in range(i, n)]
            big = [f"tl.abs(Pold{i}_{jj})" for i in range(n) for jj in range(i, n)]
            src(f"pdev = {_max_expr(dev)}")
            src(f"pscale = {_max_expr(big)}")
            src(f"conv = ((pdev <= {_steady_tol(spec.dtype)!r} * pscale) | (rows >= S))"
                ".to(tl.int32)")

    def emit_step_steady(j: int, ynames: list[str], t0: str) -> None:
        """A step with the converged gain: the covariance recursion is skipped, every entry of
        y is observed (checked for the whole chunk), P and the gain stay as they are."""
        s = f"_{j}"
        tj = f"{t0} + {j}"
        if "predicted_mean" in widths:
            if spec.chunk_stores:
                for i in range(n):
                    src(f"pm{i}{s} = m_{i}")
            store("predicted_mean", [f"m_{i}" for i in range(n)], tj, False)
        if "predicted_cov" in widths:
            store("predicted_cov", [P(i, jj) for i in range(n) for jj in range(n)], tj, False)
        for k in range(p):
            hm = _terms(_times(Hc[k][i], f"H_{k}_{i}", f"m_{i}") for i in range(n))
            if spec.has_d:
                hm.append(f"d_{k}")
            src(f"v{k}{s} = {ynames[k]} - ({_sum(hm)})")
        for i in range(p):
            terms = [f"fL{i}_{k} * e{k}{s}" for k in range(i)]
            src(f"e{i}{s} = v{i}{s}" + (f" - ({_sum(terms)})" if terms else ""))
        src(f"nis{s} = " + " + ".join(f"e{i}{s} * e{i}{s} * fiD{i}" for i in range(p)))
        src(f"ll{s} = -0.5 * (nis{s} + flogdet) - {_HALF_LOG_2PI * p!r}")
        if not spec.ll_chunk:
            src(f"acc += ll{s}.to(tl.float64)")
        for i in range(n):
            kv = " + ".join(f"fK{k}_{i} * v{k}{s}" for k in range(p))
            src(f"mf{i}{s} = m_{i} + ({kv})")
        store_step_outputs(s, tj, False, cov=lambda a, b: f"fPf{a}_{b}")
        for i in range(n):
            terms = _terms(_times(Fc[i][k], f"F_{i}_{k}", f"mf{k}{s}") for k in range(n))
            if spec.has_c:
                terms.append(f"c_{i}")
            src(f"m_{i} = {_sum(terms)}")

    def emit_chunk(tiles: list[str], t0: str, masked: bool) -> None:
        """CH steps; tiles[g] holds y elements g*VEC .. g*VEC+VEC-1 of this chunk."""
        yn = [f"y{f}" for f in range(ch * p)]
        for g, tile in enumerate(tiles):
            _emit_split(src, tile, yn[g * vec:(g + 1) * vec], vec)
        if spec.steady and not masked:
            # Steady path for this chunk when the block had converged and all of its y here
            # is observed (a block-wide vote: the branch is uniform across the program).
            miss = " | ".join(f"({y} != {y})" for y in yn)
            src(f"miss = (({miss}) & rmask).to(tl.int32)")
            src("anymiss = tl.reduce(miss, 0, _max_i32)")
            src("if steady_on * (1 - anymiss) > 0:")
            src.indent += 1
            for j in range(ch):
                emit_step_steady(j, yn[j * p:(j + 1) * p], t0)
            src(f"nsteady += {ch}")
            src.indent -= 1
            src("else:")
            src.indent += 1
            for j in range(ch):
                emit_step(j, yn[j * p:(j + 1) * p], t0, masked, last=j == ch - 1)
            src("steady_on = tl.reduce(conv, 0, _min_i32) * (1 - anymiss)")
            src.indent -= 1
        else:
            for j in range(ch):
                emit_step(j, yn[j * p:(j + 1) * p], t0, masked)
        if spec.ll_chunk:  # both branches define ll_0 .. ll_{CH-1}
            src("acc += (" + " + ".join(f"ll_{j}" for j in range(ch)) + ").to(tl.float64)")
        if spec.chunk_stores and not masked:
            # the chunk's values of each output, contiguous per series: 16-byte stores
            per_step = {
                "log_liks": lambda j: [f"ll_{j}"],
                "filtered_mean": lambda j: [f"mf{i}_{j}" for i in range(n)],
                "predicted_mean": lambda j: [f"pm{i}_{j}" for i in range(n)],
                "innovation": lambda j: [f"v{k}_{j}" for k in range(p)],
                "nis": lambda j: [f"nis_{j}"],
            }
            gc = spec.vec16
            for stream, w in widths.items():
                vals = [v for j in range(ch) for v in per_step[stream](j)]
                for k in range(0, ch * w, gc):
                    src(f"tl.store({stream}_rc + ({t0} * {w} + {k}), "
                        f"{_join_expr(vals[k:k + gc])}, mask=rmask[:, None])")

    ngroups = ch * p // vec  # y loads per chunk: (BLOCK_S, VEC) tiles or (BLOCK_S,) vectors

    def y_load(chunk_expr: str) -> str:
        # Whole-chunk validity as a (BLOCK_S,) mask: constant along the row, so the load stays
        # a 16-byte vector (and the interpreter wants tensor, not scalar, operands of `&`).
        valid = f"rmask & (izero + ({chunk_expr}) < nfull)"
        mask = f"({valid})[:, None]" if vec > 1 else valid
        if spec.y_time_major:  # element g of the chunk: step g // p, channel g % p
            return ("tl.load(y_rp + ((" + chunk_expr + f") * {ch} + {{step}}) * S64 * {p} + "
                    "{chan}, mask=" + mask + ", other=NAN)")
        return f"tl.load(y_rp + ({chunk_expr}) * {ch * p} + {{g}}, mask={mask}, other=NAN)"

    def y_fmt(template: str, g: int) -> str:
        return template.format(g=g * vec, step=(g * vec) // p, chan=(g * vec) % p)

    # --- main loop over full chunks, y prefetched PREFETCH chunks ahead --------------------
    src("nfull = T // " + str(ch))
    if spec.steady:  # state of the steady path, carried through the loop
        src("steady_on = tl.program_id(0) * 0  # int32 scalar: 1 once the block has converged")
        src("nsteady = tl.program_id(0) * 0  # steps taken on the steady path (diagnostic)")
        for k in range(p):
            for i in range(n):
                src(f"fK{k}_{i} = zero")
            for i in range(k):
                src(f"fL{k}_{i} = zero")
            src(f"fiD{k} = zero")
        src("flogdet = zero")
        if "filtered_cov" in widths:
            for i in range(n):
                for jj in range(i, n):
                    src(f"fPf{i}_{jj} = zero")
    D = spec.prefetch
    for dd in range(D):
        for g in range(ngroups):
            src(f"yt{dd}_{g} = " + y_fmt(y_load(str(dd)), g))
    if spec.rotate:
        # The body is unrolled over the D slots: slot dd holds chunk cs * D + dd and is reloaded
        # with chunk (cs + 1) * D + dd as soon as its chunk is done, so no register copy waits
        # on a load in flight (the copies ``yt0 = yt1`` of the loop below do: a move reads its
        # source, so the load of the chunk D ahead must have landed by the loop's back edge).
        src(f"nsup = nfull // {D}")
        src("for cs in range(0, nsup):")
        src.indent += 1
        for dd in range(D):
            src(f"t0 = (cs * {D} + {dd}) * {ch}")
            emit_chunk([f"yt{dd}_{g}" for g in range(ngroups)], "t0", masked=False)
            for g in range(ngroups):
                src(f"yt{dd}_{g} = " + y_fmt(y_load(f"cs * {D} + {D + dd}"), g))
        src.indent -= 1
        for dd in range(D - 1):  # the last nfull % D full chunks, already in the slots
            src(f"if nsup * {D} + {dd} < nfull:")
            src.indent += 1
            src(f"t0 = (nsup * {D} + {dd}) * {ch}")
            emit_chunk([f"yt{dd}_{g}" for g in range(ngroups)], "t0", masked=False)
            src.indent -= 1
    else:
        src("for ci in range(0, nfull):")
        src.indent += 1
        src(f"t0 = ci * {ch}")
        for g in range(ngroups):
            src(f"cur_{g} = yt0_{g}")
        for dd in range(D - 1):
            for g in range(ngroups):
                src(f"yt{dd}_{g} = yt{dd + 1}_{g}")
        for g in range(ngroups):
            src(f"yt{D - 1}_{g} = " + y_fmt(y_load(f"ci + {D}"), g))
        emit_chunk([f"cur_{g}" for g in range(ngroups)], "t0", masked=False)
        src.indent -= 1
    # --- tail: the last T % CH steps, element-wise masks ----------------------------------
    if spec.tail:
        src(f"if nfull * {ch} < T:")
        src.indent += 1
        src(f"t0 = nfull * {ch}")
        for g in range(ngroups):
            if spec.y_time_major:
                st, ck = g // p, g % p
                src(f"tail_{g} = tl.load(y_rp + (t0 + {st}) * S64 * {p} + {ck}, "
                    f"mask=rmask & (izero + (t0 + {st}) < T), other=NAN)")
                continue
            idx = f"t0 * {p} + {g * vec}" + (" + cols[None, :]" if vec > 1 else " + izero")
            src(f"tail_{g} = tl.load(y_rp + (t0 * {p} + {g * vec}), "
                f"mask={mask2} & ({idx} < T * {p}), other=NAN)")
        emit_chunk([f"tail_{g}" for g in range(ngroups)], "t0", masked=True)
        src.indent -= 1
    src("tl.store(llsum_ptr + rows, acc, mask=rmask)")
    if spec.steady:
        src("tl.store(nsteady_ptr + tl.program_id(0), nsteady)")
    if spec.steady:  # combine functions of the block-wide votes
        src.indent = 0
        for name, op in (("_max_i32", "maximum"), ("_min_i32", "minimum")):
            src("")
            src("")
            src("@triton.jit")
            src(f"def {name}(a, b):")
            src(f"    return tl.{op}(a, b)")
    return "\n".join(src.lines) + "\n"


@functools.lru_cache(maxsize=64)
def _kernel(spec: KernelSpec, interpret: bool):
    """Define (once per spec and mode) the generated kernel; Triton reads its source through
    linecache. ``interpret`` is part of the key because ``triton.jit`` picks the interpreter or
    the compiler from TRITON_INTERPRET when the function is decorated."""
    name = f"_kalman_fused_n{spec.n}_p{spec.p}_{spec.dtype}"
    source = _kernel_source(spec, name)
    filename = f"<tsssm.kalman.fused_triton:{name}:{abs(hash(spec)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    # __name__ becomes the functions' __module__, which Triton reads when it compiles calls.
    namespace = {"triton": triton, "tl": tl, "__name__": f"{__name__}._generated"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace[name]


def kernel_source(spec: KernelSpec) -> str:
    """The generated Triton source for ``spec`` (for reading and debugging)."""
    return _kernel_source(spec, "kernel")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _nonzero_pattern(M: torch.Tensor) -> tuple[tuple[bool, ...], ...]:
    """Entries nonzero in any series: (..., a, b) -> (a, b) nested tuple (one host sync)."""
    nz = (M != 0).reshape(-1, *M.shape[-2:]).any(dim=0)
    return tuple(tuple(bool(v) for v in row) for row in nz.tolist())


def _codes_tensor(M: torch.Tensor) -> torch.Tensor:
    """(a, b) int64 entry codes of (..., a, b) on M's device (see _entry_codes)."""
    M = M.reshape(-1, *M.shape[-2:])
    codes = torch.full(M.shape[-2:], 2, dtype=torch.int64, device=M.device)
    codes[(M == -1).all(dim=0)] = -1
    codes[(M == 1).all(dim=0)] = 1
    codes[(M == 0).all(dim=0)] = 0
    return codes


def _structure_codes(F: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """The entry codes of F and H and the nonzero pattern of Q, flat in one int64 tensor on
    their device (no host sync; ``_structure_of`` reads it)."""
    n = F.shape[-1]
    qnz = (Q != 0).reshape(-1, n, n).any(dim=0).to(torch.int64)
    return torch.cat([_codes_tensor(F).reshape(-1), _codes_tensor(H).reshape(-1),
                      qnz.reshape(-1)])


def _structure_of(codes: torch.Tensor, n: int, p: int) -> dict:
    """F_code, H_code and Q_nz of the kernel spec from ``_structure_codes`` (one host sync)."""
    flat = codes.tolist()
    Fc, Hc, Qn = flat[:n * n], flat[n * n:n * n + p * n], flat[n * n + p * n:]
    return dict(
        F_code=tuple(tuple(int(v) for v in Fc[i * n:(i + 1) * n]) for i in range(n)),
        H_code=tuple(tuple(int(v) for v in Hc[k * n:(k + 1) * n]) for k in range(p)),
        Q_nz=tuple(tuple(bool(v) for v in Qn[i * n:(i + 1) * n]) for i in range(n)),
    )


def _structure(F: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> dict:
    """F_code, H_code and Q_nz of the kernel spec with one read of the device (three reads
    cost ~3 syncs a call, a visible share of a 1-2 ms filter)."""
    return _structure_of(_structure_codes(F, H, Q), F.shape[-1], H.shape[-2])


class StructureMemo:
    """The structure (``_structure``) last read for a model's F, H, Q, by the identity of those
    tensor objects, so that a filter call can launch without first waiting for the device to
    report it (on the H200's host that read was ~0.7 of a 2 ms call's ~1 ms host share).

    A hit is a guess, never trusted: ``fused_kalman_filter`` recomputes the codes on the device
    beside the kernel and compares them with the remembered ones in the same device read as its
    log-likelihood check; if they differ (the values were changed in place, or a tensor took a
    freed one's identity) it reads the structure and filters again. So the memo can make a call
    faster, never its result different. Entries hold weak references and at most ``size`` are
    kept."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._entries: dict[tuple[int, int, int], tuple] = {}
        self._lock = threading.Lock()  # scoring may filter from several threads

    def get(self, F: torch.Tensor, H: torch.Tensor, Q: torch.Tensor
            ) -> tuple[dict, torch.Tensor] | None:
        key = (id(F), id(H), id(Q))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            refs, structure, codes = entry
            if any(r() is not t for r, t in zip(refs, (F, H, Q))):
                self._entries.pop(key, None)
                return None
        return structure, codes

    def put(self, F: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, structure: dict,
            codes: torch.Tensor) -> None:
        key = (id(F), id(H), id(Q))
        refs = tuple(weakref.ref(t) for t in (F, H, Q))
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))  # the oldest
            self._entries[key] = (refs, structure, codes)


#: the launcher's memo of model structures (see StructureMemo: verified at every call)
STRUCTURES = StructureMemo()


def _entry_codes(M: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Per entry of (..., a, b): 0 if zero in every series, 1 / -1 if +1 / -1 in every series,
    else 2 (a general value, loaded at run time). One host sync."""
    return tuple(tuple(int(v) for v in row) for row in _codes_tensor(M).tolist())


_CORE = {"F": 2, "H": 2, "Q": 2, "R": 2, "c": 1, "d": 1, "m0": 1, "P0": 2}


def split_batched(params: dict[str, torch.Tensor | None]
                  ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The names of the per-series parameters (one dim more than the model's core shape) and
    every given parameter detached and contiguous, as the kernels' launchers read them."""
    batched, flat = [], {}
    for name, value in params.items():
        if value is None:
            continue
        if value.dim() == _CORE[name] + 1:
            batched.append(name)
        flat[name] = value.detach().contiguous()
    return batched, flat


def flat_params(ssm, batch: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The model's matrices as the launchers take them: shared ones in their core shape, per-series
    ones expanded and flattened to a leading S = prod(batch)."""
    from tsssm.kalman.ssm import CORE_NDIM, batch_shape_of

    S = math.prod(batch)
    out = {}
    for name in _CORE:
        value = getattr(ssm, name)
        if value is None:
            continue
        core = value.shape[value.ndim - CORE_NDIM[name]:]
        if len(batch_shape_of(ssm, name)) == 0:
            out[name] = value  # shared by all series
        else:
            out[name] = value.expand(*batch, *core).reshape(S, *core)
    return out


def fused_filter_arrays(
    y: torch.Tensor,
    params: dict[str, torch.Tensor | None],
    *,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    joseph: bool = True,
    num_warps: int = 1,
    chunk_mult: int = 1,
    prefetch: int | None = None,
    vectorize: bool | None = None,
    fast_log: bool = True,
    steady_state: bool = True,
    y_layout: str = "auto",
    rotate: bool | None = None,
    ll_chunk: bool | None = None,
    series_per_thread: int = 1,
    out_layout: str = "time",
    structure: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the fused filter on flat arrays (the launcher behind ``fused_kalman_filter``).

    y: (S, T, p) float32/float64, NaN for missing entries. params: F (n, n), H (p, n),
    Q (n, n), R (p, p), m0 (n,), P0 (n, n) and optionally c (n,), d (p,); each either shared
    by all series (these shapes) or one per series (a leading S axis), same dtype and device as
    y. Returns ``{"loglik": (S,)}`` and each of ``outputs`` (keys of ``KERNEL_OUTPUTS``),
    shaped (S, T, ...), in y's dtype. Forward only: no gradients (FusedFilterFn, through
    ``fused_kalman_filter``, adds the backward). The outputs are stored
    time-major, (T, S, ...), so that every step's results of a warp's 32 series form one
    contiguous run; they are returned as (S, T, ...) views of that memory (not contiguous:
    ``.contiguous()`` copies them series-major).
    ``num_warps`` (32 series per warp), ``chunk_mult`` (steps unrolled per loop iteration, in
    units of 16 bytes of y) and ``prefetch`` (chunks of y loaded ahead) are tuning knobs.
    ``prefetch``, ``rotate`` and ``ll_chunk`` left at None take the measured best for the
    launch: with 16-byte reads of series-major y and n * n * p <= 4, 4 chunks ahead, rotated,
    per-chunk sums (H200, 2026-12-04, 10^4 x 10^4 local linear trend, float32: kernel 1.10 ms
    = 1.94x the memory floor against 1.19 ms for 1 chunk ahead; benchmarks/RESULTS.md);
    otherwise 1, False, False.
    ``structure``: F_code, H_code and Q_nz if the caller knows them (``fused_kalman_filter``
    passes its memo's guess and checks it); None reads them from the matrices (one host sync).
    ``vectorize``: 16-byte accesses over chunks of 4 (float32) or 2 (float64) steps; None picks
    them for small models (``n * n * p <= 16``) when T allows. Large models take one step per
    iteration with element-wise accesses, because compile time grows steeply with the size of
    the unrolled loop body (Triton's coalescing pass: ~2 s for n=2, minutes for n=6 p=2 when
    vectorised; seconds without) and their arithmetic, not memory, bounds them anyway.
    ``fast_log``: the per-step log of compiled float32 kernels through the MUFU.LG2 unit
    (relative error ~2^-22, like the float32 arithmetic around it) instead of libdevice.
    ``y_layout``: how the kernel reads y. "series": (S, T, p) rows, 16 bytes of one series per
    load (a warp's 32 loads land T*p elements apart); "time": (T, S, p), element loads of which
    a warp's 32 of one step are one contiguous run (y is copied to that layout unless it is a
    time-major view already, e.g. ``y_tm.transpose(0, 1)`` of a contiguous (T, S, p) tensor);
    "auto": "series", a time-major view copied to rows first (H200, 2026-12-01, 10^4 x 10^4
    local linear trend, float32: series 1.97 ms, time 4.92 ms even for a view read in place,
    the copy ~0.2 ms; benchmarks/RESULTS.md).
    ``rotate``: with ``prefetch`` > 1, unroll the loop over the prefetch slots so that each slot
    is reloaded in place (no register copies of loads in flight; see the loop in
    ``_kernel_source``). ``ll_chunk``: sum a chunk's float32 log-likelihood terms before adding
    them to the float64 total (one conversion and float64 add per chunk instead of per step).
    ``series_per_thread``: 1, 2 or 4 series per GPU thread (BLOCK_S = 32 * num_warps * it):
    independent recursions a thread interleaves.
    ``out_layout``: "time" (outputs stored (T, S, ...), returned as views) or "series" (stored
    (S, T, ...), contiguous; a thread writes a whole chunk of steps of its series in 16-byte
    stores; not for covariance outputs).
    ``steady_state``: once the predicted covariance of every series of a block repeats (to 64
    ulps of its largest entry, the sequential filter's test) at the end of a fully observed
    chunk, later chunks without missing values skip the covariance recursion and reuse the
    converged gain; a chunk with a missing value goes back to the full update. The result is
    the same to a few ulps; ``result["steady_steps"]`` (one count per block of series) says how
    many steps took the short path.
    """
    S, T, p = y.shape
    n = params["F"].shape[-1]
    dtype = y.dtype
    unknown = [o for o in outputs if o not in KERNEL_OUTPUTS]
    if unknown:
        raise ModelError(
            f"fused Kalman filter: unknown outputs {unknown}; choose from {list(KERNEL_OUTPUTS)}"
        )
    if T * max(n * n, p) >= 2**31:
        raise ModelError(f"fused Kalman filter: T={T} is too long for 32-bit offsets per series")
    batched, flat = split_batched(params)
    vec = vector_steps(dtype)
    if vectorize is None:
        vectorize = n * n * p <= 16
    vectorize = vectorize and T % vec == 0
    if y_layout not in ("auto", "series", "time"):
        raise ModelError(f"fused Kalman filter: y_layout must be auto, series or time, got "
                         f"{y_layout!r}")
    y_time_major = y_layout == "time"
    if y_time_major:
        vectorize = False
        y_arg = y.detach().transpose(0, 1).contiguous()  # (T, S, p); no copy for such a view
    else:
        y_arg = y.detach().contiguous()
    # the launch the defaults below were measured with: 16-byte reads, a model of at most 4
    # matrix entries (local linear trend); larger models keep the shorter loop body, whose
    # compile time grows steeply with its size (see vectorize)
    tuned = vectorize and n * n * p <= 4
    prefetch = (4 if tuned else 1) if prefetch is None else prefetch
    rotate = tuned if rotate is None else rotate
    ll_chunk = tuned if ll_chunk is None else ll_chunk
    spec = KernelSpec(
        n=n,
        p=p,
        dtype="fp32" if dtype == torch.float32 else "fp64",
        batched=tuple(batched),
        has_c="c" in flat,
        has_d="d" in flat,
        **(structure if structure is not None else _structure(flat["F"], flat["H"], flat["Q"])),
        outputs=tuple(outputs),
        joseph=joseph,
        vectorize=vectorize,
        chunk_mult=chunk_mult,
        prefetch=prefetch,
        fast_log=fast_log and dtype == torch.float32 and not _interpreting(),
        steady=steady_state,
        y_time_major=y_time_major,
        rotate=rotate and prefetch > 1,
        ll_chunk=ll_chunk,
        out_series=out_layout == "series",
    )
    spec = dataclasses.replace(spec, tail=T % spec.chunk != 0)
    shapes = {  # time-major storage
        "log_liks": (T, S),
        "filtered_mean": (T, S, n),
        "predicted_mean": (T, S, n),
        "innovation": (T, S, p),
        "nis": (T, S),
        "filtered_cov": (T, S, n, n),
        "predicted_cov": (T, S, n, n),
    }
    if spec.out_series:  # (S, T, ...)
        shapes = {o: (S, T, *shp[2:]) for o, shp in shapes.items()}
    stored = {o: torch.empty(shapes[o], device=y.device, dtype=dtype) for o in outputs}
    llsum = torch.empty(S, device=y.device, dtype=torch.float64)
    if out_layout not in ("time", "series"):
        raise ModelError(f"fused Kalman filter: out_layout must be time or series, got "
                         f"{out_layout!r}")
    if out_layout == "series" and any(o.endswith("_cov") for o in outputs):
        raise ModelError("fused Kalman filter: out_layout='series' writes means, innovations, "
                         "log_liks and nis only; request covariances with out_layout='time'")
    if series_per_thread not in (1, 2, 4):
        raise ModelError(f"fused Kalman filter: series_per_thread must be 1, 2 or 4, got "
                         f"{series_per_thread}")
    block_s = 32 * num_warps * series_per_thread  # a (BLOCK_S,) vector wraps around the threads
    nsteady = torch.zeros(triton.cdiv(S, block_s), device=y.device, dtype=torch.int32)
    if S > 0:
        args = {"y_ptr": y_arg, "llsum_ptr": llsum, "nsteady_ptr": nsteady}
        args.update({f"{k}_ptr": v for k, v in flat.items()})
        args.update({f"{o}_ptr": stored[o] for o in outputs})
        _kernel(spec, _interpreting())[(triton.cdiv(S, block_s),)](
            *[args[a] for a in _kernel_args(spec)],
            S,
            T,
            T // vec if vectorize else T,
            math.nan,
            1,
            BLOCK_S=block_s,
            num_warps=num_warps,
        )
    if spec.out_series:
        result = {o: stored[o] for o in outputs}
    else:
        result = {o: stored[o].transpose(0, 1) for o in outputs}  # (S, T, ...) views
    result["loglik"] = llsum.to(dtype)
    result["steady_steps"] = nsteady
    result["spec"] = spec
    return result


class FusedFilterFn(torch.autograd.Function):
    """The fused filter with its generated adjoint kernel as the backward
    (:mod:`tsssm.kalman.fused_adjoint`).

    forward(options, y (S, T, p), F, H, Q, R, c, d, m0, P0) with the parameters flat as
    ``fused_filter_arrays`` takes them (shared, or a leading S axis; c, d may be None);
    ``options`` = (kernel outputs, keyword options of fused_filter_arrays). Returns the
    log-likelihood (S,) and the kernel outputs in that order, (S, T, ...) views of time-major
    storage. The outputs always include predicted_mean and predicted_cov: the backward reads the
    predicted state of every step from them.
    """

    @staticmethod
    def forward(ctx, options, y, *params):  # type: ignore[override]
        outputs, kw = options
        named = dict(zip(_GRAD_PARAMS, params))
        out = fused_filter_arrays(y, {k: v for k, v in named.items() if v is not None},
                                  outputs=outputs, **kw)
        ctx.outputs = outputs
        ctx.spec = out["spec"]
        ctx.present = tuple(k for k, v in named.items() if v is not None)
        ctx.save_for_backward(y, out["predicted_mean"], out["predicted_cov"],
                              *[named[k] for k in ctx.present])
        return (out["loglik"], *[out[o] for o in outputs])

    @staticmethod
    def backward(ctx, g_loglik, *g_outs):  # type: ignore[override]
        from tsssm.kalman import fused_adjoint as fa

        y, pm, pc, *present = ctx.saved_tensors
        named = dict(zip(ctx.present, present))
        spec = ctx.spec
        needs = dict(zip(_GRAD_PARAMS, ctx.needs_input_grad[2:]))
        diff = tuple(k for k in fa.PARAM_ORDER if needs.get(k) and k in named)
        cotangents = {}
        for name, g in zip(ctx.outputs, g_outs):
            if g is not None and name in fa.GRAD_OUTPUTS:
                cotangents[name] = g.transpose(0, 1).contiguous()  # (T, S, ...) time-major
        want_dy = bool(ctx.needs_input_grad[1])
        aspec = fa.AdjointSpec(
            n=spec.n, p=spec.p, dtype=spec.dtype, batched=spec.batched, diff=diff,
            has_c=spec.has_c, has_d=spec.has_d, F_code=spec.F_code, H_code=spec.H_code,
            Q_nz=spec.Q_nz, cotangents=tuple(sorted(cotangents)),
            loglik_cotangent=g_loglik is not None, want_dy=want_dy,
            prefetch=fa.ADJOINT_PREFETCH,
        )
        dy_tm, gparam = fa.adjoint_arrays(
            aspec, y.transpose(0, 1).contiguous(), pm.transpose(0, 1), pc.transpose(0, 1),
            {k: v.detach().contiguous() for k, v in named.items()},
            {k: cotangents[k] for k in aspec.cotangents},
            None if g_loglik is None else g_loglik.contiguous(), _interpreting(),
        )
        grads = []
        n, p = spec.n, spec.p
        col = 0
        offsets = {}
        for name in fa.PARAM_ORDER:
            size = math.prod(fa.param_shape(name, n, p))
            offsets[name] = (col, size)
            col += size
        for name in _GRAD_PARAMS:
            if name not in diff:
                grads.append(None)
                continue
            start, size = offsets[name]
            g = gparam[:, start:start + size].reshape(-1, *fa.param_shape(name, n, p))
            if name not in spec.batched:
                g = g.sum(0)
            grads.append(g)
        dy = dy_tm.transpose(0, 1) if dy_tm is not None else None
        return (None, dy, *grads)


#: Parameter order of FusedFilterFn.forward.
_GRAD_PARAMS = ("F", "H", "Q", "R", "c", "d", "m0", "P0")


def fused_kalman_filter(
    ssm,
    y: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    outputs: tuple[str, ...] | str = DEFAULT_OUTPUTS,
    joseph: bool = True,
    num_warps: int = 1,
    chunk_mult: int = 1,
    prefetch: int | None = None,
    vectorize: bool | None = None,
    fast_log: bool = True,
    steady_state: bool = True,
    y_layout: str = "auto",
    rotate: bool | None = None,
    ll_chunk: bool | None = None,
    series_per_thread: int = 1,
    out_layout: str = "time",
):
    """The Kalman filter as one fused Triton kernel: ``kalman_filter(..., method="fused")``.

    ssm: a time-invariant ``LinearGaussianSSM`` with n <= 8 states and p <= 4 channels, without
    controls (B, u); its matrices may carry batch axes that broadcast with y's. y (..., T, p),
    NaN for missing entries, CUDA float32/float64 (CPU tensors only under TRITON_INTERPRET=1).

    Returns a ``FilterResult`` holding ``loglik`` and the fields named in ``outputs``; the other
    fields are None. The default, ``DEFAULT_OUTPUTS`` (log_liks, filtered_mean, innovation,
    nis), keeps the memory traffic near y's own; ``outputs="all"`` fills every field (covariances
    are written per step and per series: T*n*n elements each). Besides ``KERNEL_OUTPUTS``,
    ``outputs`` may name ``predicted_obs_mean``, ``predicted_obs_cov`` and ``observed``, which are
    derived from kernel outputs with torch. Per-step fields are (..., T, ...) views of
    time-major storage (not contiguous). Differentiable: when grad mode is on and y or a
    matrix of the model requires grad, the backward is the generated adjoint kernel
    (:mod:`tsssm.kalman.fused_adjoint`, one pass over time in reverse), and the forward then
    also writes the predicted states, which that pass reads. Raises NumericalError, naming the
    series, when a log-likelihood is not finite. The keyword options after ``outputs`` are
    passed to ``fused_filter_arrays`` (tuning, ``steady_state``, ``y_layout``).
    """
    from tsssm.kalman.filter import FilterResult
    from tsssm.kalman.ssm import is_time_invariant, validate

    if ssm.B is not None or u is not None:
        raise ModelError(
            "method='fused' does not take controls (B, u); use method='sequential' or 'parallel'"
        )
    if not is_time_invariant(ssm):
        raise ModelError(
            f"method='fused' needs time-invariant matrices, but {ssm.time_varying} vary in "
            f"time; use method='sequential' or 'parallel'"
        )
    if not isinstance(y, torch.Tensor) or y.ndim < 2 or y.shape[-2] == 0:
        raise ModelError("method='fused': y must be a tensor (..., T, p) with T >= 1")
    # Shapes, dtypes and devices, checked on one step of y: validate() also scans y for inf,
    # a whole extra pass over memory; here an inf shows up as a non-finite loglik instead.
    batch = validate(ssm, y[..., :1, :], scan_values=False)  # no device sync before the launch
    n, p = ssm.F.shape[-1], ssm.H.shape[-2]
    if y.dtype not in (torch.float32, torch.float64):
        raise ModelError(f"method='fused' supports float32 and float64, got {y.dtype}")
    if n > MAX_STATE_DIM or p > MAX_OBS_DIM:
        raise ModelError(
            f"method='fused' is generated for up to {MAX_STATE_DIM} states and {MAX_OBS_DIM} "
            f"channels, the model has n={n}, p={p}; use method='sequential' or 'parallel'"
        )
    if y.device.type != "cuda" and not _interpreting():
        raise ModelError(
            "method='fused' runs a Triton kernel on CUDA tensors (CPU only under "
            "TRITON_INTERPRET=1); use method='sequential' on the CPU"
        )
    derived = ("predicted_obs_mean", "predicted_obs_cov", "observed")
    if outputs == "all":
        outputs = (*KERNEL_OUTPUTS, *derived)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in KERNEL_OUTPUTS and o not in derived]
    if unknown:
        raise ModelError(
            f"method='fused': unknown outputs {unknown}; choose from "
            f"{[*KERNEL_OUTPUTS, *derived]} or 'all'"
        )
    kernel_outputs = [o for o in outputs if o in KERNEL_OUTPUTS]
    if "predicted_obs_mean" in outputs and "predicted_mean" not in kernel_outputs:
        kernel_outputs.append("predicted_mean")
    if "predicted_obs_cov" in outputs and "predicted_cov" not in kernel_outputs:
        kernel_outputs.append("predicted_cov")

    T = y.shape[-2]
    S = math.prod(batch)
    y_flat = y.expand(*batch, T, p).reshape(S, T, p)
    params = flat_params(ssm, batch)
    kw = dict(joseph=joseph, num_warps=num_warps, chunk_mult=chunk_mult, prefetch=prefetch,
              vectorize=vectorize, fast_log=fast_log, steady_state=steady_state,
              y_layout=y_layout, rotate=rotate, ll_chunk=ll_chunk,
              series_per_thread=series_per_thread, out_layout=out_layout)
    differentiable = torch.is_grad_enabled() and (
        y.requires_grad or any(v.requires_grad for v in params.values()))
    if differentiable:  # the backward reads every step's predicted state
        for o in ("predicted_mean", "predicted_cov"):
            if o not in kernel_outputs:
                kernel_outputs.append(o)

    def run(structure: dict) -> dict:
        options = {**kw, "structure": structure}
        if differentiable:
            res = FusedFilterFn.apply((tuple(kernel_outputs), options), y_flat,
                                      *[params.get(k) for k in _GRAD_PARAMS])
            return {"loglik": res[0], **dict(zip(kernel_outputs, res[1:]))}
        return fused_filter_arrays(y_flat, params, outputs=tuple(kernel_outputs), **options)

    # The kernel is compiled for the structure of F, H, Q. A model seen before launches on its
    # remembered structure without waiting for the device; the codes computed now are compared
    # with it in the same device read as the log-likelihood check, and a difference (values
    # changed in place) means the structure is read and the filter run again (StructureMemo).
    # The check's ops are queued after the kernel, so that the host issues them (~0.7 ms on the
    # H200's host) while the kernel runs instead of before it.
    def read_and_remember(codes: torch.Tensor) -> dict:  # one host sync
        structure = _structure_of(codes, n, p)
        STRUCTURES.put(ssm.F, ssm.H, ssm.Q, structure, codes)
        return structure

    def run_read(codes: torch.Tensor) -> tuple[dict, torch.Tensor, bool]:
        """The filter on the structure read from ``codes``, its non-finite log-likelihoods
        and whether there are any (two host syncs)."""
        out = run(read_and_remember(codes))
        bad = ~torch.isfinite(out["loglik"])
        return out, bad, bool(bad.any())

    memo = STRUCTURES.get(ssm.F, ssm.H, ssm.Q)
    if memo is None:
        out, bad, any_bad = run_read(_structure_codes(params["F"], params["H"], params["Q"]))
    else:
        structure, remembered = memo
        out = run(structure)
        codes = _structure_codes(params["F"], params["H"], params["Q"])  # after the launch
        changed = ((codes != remembered).any() if codes.shape == remembered.shape
                   else torch.ones((), dtype=torch.bool, device=codes.device))
        bad = ~torch.isfinite(out["loglik"])
        any_bad, differs = (bool(v) for v in torch.stack([bad.any(), changed]).tolist())
        if differs:  # the structure changed behind the memo: filter again with the one read now
            out, bad, any_bad = run_read(codes)
    loglik = out["loglik"]
    if any_bad:
        series = bad.nonzero()[:5, 0].tolist()
        has_inf = bool(torch.isinf(y_flat[series]).any())
        raise NumericalError(
            f"method='fused': the log-likelihood is not finite for series {series} (flat index "
            f"into the batch {tuple(batch)})"
            + ("; y contains +-inf there: mark missing values with NaN" if has_inf else
               "; the innovation covariance H P H' + R is not positive definite there: check "
               "that R is positive definite and the parameters finite")
        )
    fields = {name: None for name in FilterResult._fields}
    fields["loglik"] = loglik.reshape(batch)
    for o in kernel_outputs:
        fields[o] = out[o].reshape(*batch, *out[o].shape[1:])
    if "predicted_obs_mean" in outputs:
        obs_mean = (ssm.H.unsqueeze(-3) @ fields["predicted_mean"].unsqueeze(-1)).squeeze(-1)
        fields["predicted_obs_mean"] = obs_mean if ssm.d is None else obs_mean + ssm.d.unsqueeze(-2)
    if "predicted_obs_cov" in outputs:
        H = ssm.H.unsqueeze(-3)
        cov = H @ fields["predicted_cov"] @ H.mT + ssm.R.unsqueeze(-3)
        fields["predicted_obs_cov"] = 0.5 * (cov + cov.mT)
    if "observed" in outputs:
        fields["observed"] = ~torch.isnan(y.expand(*batch, T, p))
    for o in ("predicted_mean", "predicted_cov"):  # requested only for a derived field
        if o not in outputs:
            fields[o] = None
    return FilterResult(**fields)
