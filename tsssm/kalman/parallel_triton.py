"""Parallel-in-time Kalman filter on the GPU: a chunked associative scan in Triton kernels.

The same associative elements and operator as :mod:`tsssm.kalman.parallel` (Särkkä &
García-Fernández 2021), combined by three kernel launches instead of the odd-even recursion's
hundreds of small torch ops:

1. ``reduce``: program (block k of BLOCK_T steps, series s) builds the elements of its steps
   from y in registers and scans them with ``tl.associative_scan`` (the operator as a generated
   ``@triton.jit`` combine function over the elements' scalar entries); it writes the block's
   total, one element per block.
2. ``carry``: one program per series scans the block totals (chunks of BLOCK_C, each chunk's
   scan combined with the running carry): the inclusive prefix of every block.
3. ``final``: program (k, s) rebuilds and rescans its block and combines the prefix of the blocks
   before it with every step: the filtered mean and covariance of every step.

The elements are not stored between the passes (a few dozen scalars a step against y's one):
they are rebuilt from y. The log-likelihood and the other fields follow, as in the torch
parallel filter, from the filtered moments by the prediction-error decomposition
(:func:`tsssm.kalman.filter.finish`), not from accumulated normalising constants, so it equals
the sequential filter's to rounding.

Element of step t (``(A, b, C, eta, J)``, entries as scalars; C and J symmetric, upper triangle):
the prior of x_t given x_{t-1} = 0 is N(c, Q) (t = 0: N(m0, P0)); with Hm, Rm the masked H, R
of the step (rows of missing channels zeroed, the identity in R), U = Hm Pbar, S = U Hm' + Rm,
K = U' S^-1:  b = mbar + K v,  C = Pbar - K U - U' K' + K S K' (Joseph form, expanded),
A = F - K Hm F, eta = (Hm F)' S^-1 v, J = (Hm F)' S^-1 (Hm F); A = eta = J = 0 at t = 0.
Padding steps (t >= T) are the identity element (A = I, the rest 0).
Operator (earlier e1, later e2), X = (I + C1 J2)^-1 by Gauss-Jordan with partial pivoting
(M's eigenvalues are >= 1, see :func:`tsssm.kalman.parallel.filter_combine`):
A = A2 X A1, b = A2 X (b1 + C1 eta2) + b2, C = A2 X C1 A2' + C2,
eta = A1' X' (eta2 - J2 b1) + eta1, J = A1' X' J2 A1 + J1.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import os

import torch
import triton
import triton.language as tl

from tsssm.errors import ModelError
from tsssm.kalman.fused_triton import split_batched

#: Largest state / observation dimensions the kernels are generated for (the element has
#: n^2 + n (n + 1) + 2 n scalars: 14 for n = 2, 44 for n = 4).
MAX_STATE_DIM = 4
MAX_OBS_DIM = 4
#: Most series of one call (the second axis of the launch grid).
MAX_SERIES = 65_535
#: Launch defaults per dtype: steps per block, warps per block, block totals per carry chunk.
#: From the H200 sweep of 2026-12-02 (benchmarks/RESULTS.md, one LLT series): float64 256/4 had
#: the fastest kernels at 10^5 and 10^6 steps (0.071 / 0.47 ms). float32 data take the same shape:
#: their arithmetic is float64 too (the float32-arithmetic kernels of that sweep were fastest at
#: 512/4, 0.068 / 0.23 ms, but lost the likelihood at 10^6).
DEFAULTS = {
    torch.float64: dict(block_t=256, num_warps=4, block_c=256),
    torch.float32: dict(block_t=256, num_warps=4, block_c=256),
}
_PARAMS = ("F", "H", "Q", "R", "c", "d", "m0", "P0")


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """Everything the generated source depends on (the compile-cache key)."""

    n: int
    p: int
    dtype: str  # "fp32" | "fp64"
    batched: tuple[str, ...]  # parameters given per series
    has_c: bool
    has_d: bool


def n_components(n: int) -> int:
    """Scalars of one element: A (n*n), b (n), C (upper), eta (n), J (upper)."""
    return n * n + n + n * (n + 1) // 2 + n + n * (n + 1) // 2


def _layout(n: int) -> dict[str, dict]:
    """Index of every entry of an element in its flat tuple: A[i][j], b[i], C[i][j] (i <= j),
    eta[i], J[i][j] (i <= j); symmetric entries map (j, i) to the same index."""
    idx = 0
    out: dict[str, dict] = {"A": {}, "b": {}, "C": {}, "eta": {}, "J": {}}
    for i in range(n):
        for j in range(n):
            out["A"][(i, j)] = idx
            idx += 1
    for i in range(n):
        out["b"][i] = idx
        idx += 1
    for i in range(n):
        for j in range(i, n):
            out["C"][(i, j)] = out["C"][(j, i)] = idx
            idx += 1
    for i in range(n):
        out["eta"][i] = idx
        idx += 1
    for i in range(n):
        for j in range(i, n):
            out["J"][(i, j)] = out["J"][(j, i)] = idx
            idx += 1
    return out


class _Gen:
    """Straight-line code over scalar or (BLOCK,) values with folding of the constants 0 and 1.

    A value is a Python float (a constant) or the name of a generated variable."""

    def __init__(self, prefix: str, indent: int = 1) -> None:
        self.lines: list[str] = []
        self.prefix = prefix
        self.k = 0
        self.indent = indent

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def var(self, expr: str) -> str:
        name = f"{self.prefix}{self.k}"
        self.k += 1
        self.emit(f"{name} = {expr}")
        return name

    @staticmethod
    def lit(x) -> str:
        return repr(float(x)) if isinstance(x, float) else x

    def mul(self, a, b):
        if a == 0.0 or b == 0.0:
            return 0.0
        if a == 1.0:
            return b
        if b == 1.0:
            return a
        if isinstance(a, float) and isinstance(b, float):
            return a * b
        return self.var(f"{self.lit(a)} * {self.lit(b)}")

    def add(self, terms, minus=()):
        """sum(terms) - sum(minus)."""
        const = sum(t for t in terms if isinstance(t, float)) - sum(
            t for t in minus if isinstance(t, float))
        names = [t for t in terms if not isinstance(t, float)]
        neg = [t for t in minus if not isinstance(t, float)]
        if not names and not neg:
            return float(const)
        expr = " + ".join(names) if names else ""
        if neg:
            expr = (expr or "0.0") + " - (" + " + ".join(neg) + ")"
        if const != 0.0:
            expr = f"{expr} + {const!r}"
        return self.var(expr)

    def dot(self, xs, ys):
        return self.add([self.mul(x, y) for x, y in zip(xs, ys)])

    def div(self, a, b):
        if a == 0.0:
            return 0.0
        if b == 1.0:
            return a
        return self.var(f"{self.lit(a)} / {self.lit(b)}")

    def where(self, cond: str, a, b):
        if isinstance(a, float) and isinstance(b, float) and a == b:
            return a
        return self.var(f"tl.where({cond}, {self.lit(a)}, {self.lit(b)})")

    def abs(self, a):
        return abs(a) if isinstance(a, float) else self.var(f"tl.abs({a})")


def _matmul(g: _Gen, X, Y):
    """(a x k) @ (k x b) of nested lists of values."""
    k, b = len(Y), len(Y[0])
    return [[g.dot([X[i][m] for m in range(k)], [Y[m][j] for m in range(k)]) for j in range(b)]
            for i in range(len(X))]


def _transpose(X):
    return [list(r) for r in zip(*X)]


def _inverse(g: _Gen, M):
    """M^-1 by Gauss-Jordan elimination with partial pivoting (row swaps through tl.where)."""
    n = len(M)
    if n == 1:
        return [[g.div(1.0, M[0][0])]]
    rows = [list(M[r]) + [1.0 if c == r else 0.0 for c in range(n)] for r in range(n)]
    for k in range(n):
        for r in range(k + 1, n):  # bring the largest |pivot| of column k to row k
            sw = g.var(f"{g.lit(g.abs(rows[r][k]))} > {g.lit(g.abs(rows[k][k]))}")
            for c in range(k, 2 * n):
                a, b = rows[k][c], rows[r][c]
                rows[k][c], rows[r][c] = g.where(sw, b, a), g.where(sw, a, b)
        inv = g.div(1.0, rows[k][k])
        for c in range(k + 1, 2 * n):
            rows[k][c] = g.mul(rows[k][c], inv)
        rows[k][k] = 1.0
        for r in range(n):
            if r == k:
                continue
            f = rows[r][k]
            for c in range(k + 1, 2 * n):
                rows[r][c] = g.add([rows[r][c]], [g.mul(f, rows[k][c])])
            rows[r][k] = 0.0
    return [rows[r][n:] for r in range(n)]


def _unpack(names: list[str], n: int):
    lay = _layout(n)
    A = [[names[lay["A"][(i, j)]] for j in range(n)] for i in range(n)]
    b = [names[lay["b"][i]] for i in range(n)]
    C = [[names[lay["C"][(i, j)]] for j in range(n)] for i in range(n)]
    eta = [names[lay["eta"][i]] for i in range(n)]
    J = [[names[lay["J"][(i, j)]] for j in range(n)] for i in range(n)]
    return A, b, C, eta, J


def _pack(n: int, A, b, C, eta, J) -> list:
    out = []
    out += [A[i][j] for i in range(n) for j in range(n)]
    out += [b[i] for i in range(n)]
    out += [C[i][j] for i in range(n) for j in range(i, n)]
    out += [eta[i] for i in range(n)]
    out += [J[i][j] for i in range(n) for j in range(i, n)]
    return out


def _combine_source(n: int) -> str:
    """``_combine(x..., y...)``: the filter operator (x earlier, y later) on flat elements."""
    K = n_components(n)
    xs = [f"x{i}" for i in range(K)]
    ys = [f"y{i}" for i in range(K)]
    g = _Gen("c")
    A1, b1, C1, eta1, J1 = _unpack(xs, n)
    A2, b2, C2, eta2, J2 = _unpack(ys, n)
    CJ = _matmul(g, C1, J2)
    M = [[g.add([CJ[i][j], 1.0]) if i == j else CJ[i][j] for j in range(n)] for i in range(n)]
    X = _inverse(g, M)
    XA1 = _matmul(g, X, A1)
    A = _matmul(g, A2, XA1)
    u = [g.add([b1[i], g.dot(C1[i], eta2)]) for i in range(n)]
    Xu = [g.dot(X[i], u) for i in range(n)]
    b = [g.add([g.dot(A2[i], Xu), b2[i]]) for i in range(n)]
    XC1 = _matmul(g, X, C1)
    G = _matmul(g, XC1, _transpose(A2))  # X C1 A2'
    C = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            C[i][j] = C[j][i] = g.add([g.dot(A2[i], [G[k][j] for k in range(n)]), C2[i][j]])
    XT = _transpose(X)
    w_in = [g.add([eta2[i]], [g.dot(J2[i], b1)]) for i in range(n)]
    w = [g.dot(XT[i], w_in) for i in range(n)]
    A1T = _transpose(A1)
    eta = [g.add([g.dot(A1T[i], w), eta1[i]]) for i in range(n)]
    V = _matmul(g, _matmul(g, XT, J2), A1)  # X' J2 A1
    J = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            J[i][j] = J[j][i] = g.add([g.dot(A1T[i], [V[k][j] for k in range(n)]), J1[i][j]])
    outs = _pack(n, A, b, C, eta, J)
    lines = ["@triton.jit", "def _combine(" + ", ".join(xs + ys) + "):"]
    lines += g.lines
    lines.append("    return " + ", ".join(g.lit(o) for o in outs))
    return "\n".join(lines) + "\n"


def _ldl_solve(g: _Gen, S, rhs_cols):
    """S^-1 r for every column r of ``rhs_cols`` (lists of p values): unit-lower LDL' of the
    symmetric positive definite p x p S, no square roots."""
    p = len(S)
    L = [[0.0] * p for _ in range(p)]
    D = [0.0] * p
    E = [[0.0] * p for _ in range(p)]  # E[i][k] = L[i][k] D[k]
    for j in range(p):
        D[j] = g.add([S[j][j]], [g.mul(L[j][k], E[j][k]) for k in range(j)])
        iD = g.div(1.0, D[j])
        for i in range(j + 1, p):
            L[i][j] = g.mul(g.add([S[j][i]], [g.mul(L[i][k], E[j][k]) for k in range(j)]), iD)
            E[i][j] = g.mul(L[i][j], D[j])
        L[j][j] = 1.0
        D[j] = (D[j], iD)
    out = []
    for r in rhs_cols:
        e = []
        for i in range(p):
            e.append(g.add([r[i]], [g.mul(L[i][k], e[k]) for k in range(i)]))
        z = [g.mul(e[i], D[i][1]) for i in range(p)]
        x = [0.0] * p
        for i in reversed(range(p)):
            x[i] = g.add([z[i]], [g.mul(L[k][i], x[k]) for k in range(i + 1, p)])
        out.append(x)
    return out


def _elements_code(spec: ParallelSpec, g: _Gen) -> list:
    """Code of the elements of the block's steps (vectors over BLOCK_T); returns the flat list
    of component values. Expects in scope: y{k} (NaN = missing or padding), first, valid, and
    the parameter scalars F_i_j, H_k_j, Q_i_j, R_k_l, c_i, d_k, m0_i, P0_i_j."""
    n, p = spec.n, spec.p
    ob = [f"ob{k}" for k in range(p)]
    for k in range(p):
        g.emit(f"ob{k} = y{k} == y{k}  # observed (not NaN)")
    notfirst = g.var("tl.where(first, 0.0, 1.0)")
    Pbar = [[g.where("first", f"P0_{min(i, j)}_{max(i, j)}", f"Q_{min(i, j)}_{max(i, j)}")
             if j >= i else None for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i):
            Pbar[i][j] = Pbar[j][i]
    mbar = [g.where("first", f"m0_{i}", f"c_{i}" if spec.has_c else 0.0) for i in range(n)]
    Hm = [[g.where(ob[k], f"H_{k}_{j}", 0.0) for j in range(n)] for k in range(p)]
    F = [[f"F_{i}_{j}" for j in range(n)] for i in range(n)]
    U = _matmul(g, Hm, Pbar)  # (p, n)
    S = [[None] * p for _ in range(p)]
    for k in range(p):
        for l in range(k, p):
            hu = g.dot(U[k], Hm[l])
            if k == l:
                S[k][l] = g.where(ob[k], g.add([hu, f"R_{k}_{k}"]), 1.0)
            else:
                S[k][l] = S[l][k] = g.where(f"{ob[k]} & {ob[l]}", g.add([hu, f"R_{k}_{l}"]), 0.0)
    v = []
    for k in range(p):
        yk = g.where(ob[k], f"y{k}" if not spec.has_d else g.var(f"y{k} - d_{k}"), 0.0)
        v.append(g.add([yk], [g.dot(Hm[k], mbar)]))
    HF = _matmul(g, Hm, F)  # (p, n)
    sols = _ldl_solve(g, S, [[U[k][i] for k in range(p)] for i in range(n)]
                      + [v] + [[HF[k][j] for k in range(p)] for j in range(n)])
    KT = [[sols[i][k] for i in range(n)] for k in range(p)]  # K' (p, n) = S^-1 U
    z = sols[n]  # S^-1 v
    G = [[sols[n + 1 + j][k] for j in range(n)] for k in range(p)]  # S^-1 HF (p, n)
    b = [g.add([mbar[i], g.dot([KT[k][i] for k in range(p)], v)]) for i in range(n)]
    KS = [[g.dot([KT[l][i] for l in range(p)], [S[l][k] for l in range(p)]) for k in range(p)]
          for i in range(n)]
    C = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            ku = [g.mul(KT[k][i], U[k][j]) for k in range(p)] + [
                g.mul(KT[k][j], U[k][i]) for k in range(p)]
            kskt = g.dot(KS[i], [KT[k][j] for k in range(p)])
            C[i][j] = C[j][i] = g.add([Pbar[i][j], kskt], ku)
    A = [[g.mul(g.add([F[i][j]], [g.dot([KT[k][i] for k in range(p)], [HF[k][j]
                                                                       for k in range(p)])]),
                notfirst) for j in range(n)] for i in range(n)]
    eta = [g.mul(g.dot([HF[k][j] for k in range(p)], z), notfirst) for j in range(n)]
    J = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            J[i][j] = J[j][i] = g.mul(g.dot([HF[k][i] for k in range(p)],
                                            [G[k][j] for k in range(p)]), notfirst)
    flat = _pack(n, A, b, C, eta, J)
    # padding steps: the identity element
    zeros = [[0.0] * n for _ in range(n)]
    ident = _pack(n, [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)],
                  [0.0] * n, zeros, [0.0] * n, zeros)
    out = []
    for val, idv in zip(flat, ident):
        # every component a (BLOCK_T,) tensor (the scan wants tensors of one shape)
        out.append(g.var(f"tl.where(valid, {g.lit(val)}, {g.lit(idv)}) + zero"))
    return out


def _kernel_args(spec: ParallelSpec) -> list[str]:
    args = ["y_ptr"]
    for name in _PARAMS:
        if (name == "c" and not spec.has_c) or (name == "d" and not spec.has_d):
            continue
        args.append(f"{name}_ptr")
    return args


def _param_loads(spec: ParallelSpec, g: _Gen) -> None:
    n, p = spec.n, spec.p

    def load(name: str, var: str, idx: int, size: int) -> None:
        off = f"s64 * {size} + {idx}" if name in spec.batched else str(idx)
        g.emit(f"{var} = tl.load({name}_ptr + {off}).to(tl.float64)")

    for i in range(n):
        for j in range(n):
            load("F", f"F_{i}_{j}", i * n + j, n * n)
    for k in range(p):
        for j in range(n):
            load("H", f"H_{k}_{j}", k * n + j, p * n)
    for i in range(n):
        for j in range(i, n):
            load("Q", f"Q_{i}_{j}", i * n + j, n * n)
            load("P0", f"P0_{i}_{j}", i * n + j, n * n)
    for k in range(p):
        for l in range(k, p):
            load("R", f"R_{k}_{l}", k * p + l, p * p)
    for i in range(n):
        load("m0", f"m0_{i}", i, n)
    if spec.has_c:
        for i in range(n):
            load("c", f"c_{i}", i, n)
    if spec.has_d:
        for k in range(p):
            load("d", f"d_{k}", k, p)


def _block_prologue(spec: ParallelSpec, g: _Gen) -> None:
    DT = "tl.float64"  # the arithmetic is float64 for float32 data too (see parallel_filter_arrays)
    g.emit("pb = tl.program_id(0)  # block of steps")
    g.emit("s64 = tl.program_id(1).to(tl.int64)  # series")
    g.emit("t = pb * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) steps")
    g.emit("valid = t < T")
    g.emit("first = t == 0")
    g.emit(f"zero = tl.full((BLOCK_T,), 0.0, {DT})")
    g.emit(f"yrow = y_ptr + (s64 * T + t) * {spec.p}")
    for k in range(spec.p):
        g.emit(f"y{k} = tl.load(yrow + {k}, mask=valid, other=NAN).to(tl.float64)")
    _param_loads(spec, g)


def _kernel_source(spec: ParallelSpec) -> str:
    n = spec.n
    K = n_components(n)
    lay = _layout(n)
    src = [_combine_source(n)]
    # The plain add of a reduction (a builtin-only kernel, see fused_triton's note on tl.sum).
    src.append("@triton.jit\ndef _add(a, b):\n    return a + b\n")
    comps = [f"e{i}" for i in range(K)]
    scans = [f"r{i}" for i in range(K)]

    # 1. reduce: the total of every block
    g = _Gen("u")
    _block_prologue(spec, g)
    el = _elements_code(spec, g)
    for c, e in zip(comps, el):
        g.emit(f"{c} = {e}")
    g.emit(f"{', '.join(scans)}, = tl.associative_scan(({', '.join(comps)},), 0, _combine)")
    g.emit("last = tl.arange(0, BLOCK_T) == BLOCK_T - 1")
    g.emit(f"aggrow = agg_ptr + (s64 * NB + pb) * {K}")
    for i, r in enumerate(scans):
        g.emit(f"tl.store(aggrow + {i} + tl.arange(0, BLOCK_T) * 0, {r}, mask=last)")
    src.append('@triton.jit(do_not_specialize=["T", "NB"])')
    src.append("def _reduce(" + ", ".join(_kernel_args(spec))
               + ", agg_ptr, T, NB, NAN, BLOCK_T: tl.constexpr):")
    src += g.lines
    src.append("")

    # 2. carry: inclusive prefix of the block totals, one program per series
    g = _Gen("v")
    DT = "tl.float64"
    g.emit("s64 = tl.program_id(0).to(tl.int64)")
    g.emit("j = tl.arange(0, BLOCK_C)")
    g.emit(f"sz = (tl.program_id(0) * 0).to({DT})  # scalar 0")
    ident_diag = {lay["A"][(i, i)] for i in range(n)}
    for i in range(K):
        g.emit(f"k{i} = sz + {1.0 if i in ident_diag else 0.0!r}")
    g.emit("for j0 in range(0, NB, BLOCK_C):")
    g.indent = 2
    g.emit("m = j0 + j < NB")
    g.emit(f"row = agg_ptr + (s64 * NB + j0 + j) * {K}")
    for i in range(K):
        other = 1.0 if i in ident_diag else 0.0
        g.emit(f"e{i} = tl.load(row + {i}, mask=m, other={other!r})")
    g.emit(f"{', '.join(scans)}, = tl.associative_scan(({', '.join(comps)},), 0, _combine)")
    outs = [f"o{i}" for i in range(K)]
    g.emit(f"{', '.join(outs)}, = _combine({', '.join(f'k{i}' for i in range(K))}, "
           f"{', '.join(scans)})")
    g.emit(f"prow = pre_ptr + (s64 * NB + j0 + j) * {K}")
    for i in range(K):
        g.emit(f"tl.store(prow + {i}, o{i}, mask=m)")
    g.emit("lastc = j == BLOCK_C - 1")
    for i in range(K):
        g.emit(f"k{i} = tl.reduce(tl.where(lastc, o{i}, 0.0), 0, _add)")
    src.append('@triton.jit(do_not_specialize=["NB"])')
    src.append("def _carry(agg_ptr, pre_ptr, NB, BLOCK_C: tl.constexpr):")
    src += g.lines
    src.append("")

    # 3. final: rescan each block, combine the prefix of the earlier blocks, write the moments
    g = _Gen("w")
    _block_prologue(spec, g)
    el = _elements_code(spec, g)
    for c, e in zip(comps, el):
        g.emit(f"{c} = {e}")
    g.emit(f"{', '.join(scans)}, = tl.associative_scan(({', '.join(comps)},), 0, _combine)")
    g.emit("has = pb > 0")
    g.emit(f"crow = pre_ptr + (s64 * NB + pb - 1) * {K}")
    for i in range(K):
        other = 1.0 if i in ident_diag else 0.0
        g.emit(f"k{i} = tl.load(crow + {i}, mask=has, other={other!r})")
    g.emit(f"{', '.join(outs)}, = _combine({', '.join(f'k{i}' for i in range(K))}, "
           f"{', '.join(scans)})")
    g.emit(f"mrow = mean_ptr + (s64 * T + t) * {n}")
    for i in range(n):
        g.emit(f"tl.store(mrow + {i}, o{lay['b'][i]}, mask=valid)")
    g.emit(f"crow2 = cov_ptr + (s64 * T + t) * {n * n}")
    for i in range(n):
        for j in range(n):
            g.emit(f"tl.store(crow2 + {i * n + j}, o{lay['C'][(i, j)]}, mask=valid)")
    src.append('@triton.jit(do_not_specialize=["T", "NB"])')
    src.append("def _final(" + ", ".join(_kernel_args(spec))
               + ", pre_ptr, mean_ptr, cov_ptr, T, NB, NAN, BLOCK_T: tl.constexpr):")
    src += g.lines
    return "\n".join(src) + "\n"


def kernel_source(spec: ParallelSpec) -> str:
    """The generated Triton source for ``spec`` (for reading and debugging)."""
    return _kernel_source(spec)


@functools.lru_cache(maxsize=32)
def _kernels(spec: ParallelSpec, interpret: bool):
    """(reduce, carry, final) kernels of ``spec``, defined once per spec and mode (``interpret``
    is in the key: triton.jit picks the interpreter when the function is decorated)."""
    source = _kernel_source(spec)
    filename = f"<tsssm.kalman.parallel_triton:n{spec.n}p{spec.p}{spec.dtype}:{abs(hash(spec)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"triton": triton, "tl": tl, "__name__": f"{__name__}._generated"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["_reduce"], namespace["_carry"], namespace["_final"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parallel_filter_arrays(
    y: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered means (S, T, n) and covariances (S, T, n, n) by the chunked scan.

    y: (S, T, p) float32/float64, NaN where missing. params: F (n, n), H (p, n), Q (n, n),
    R (p, p), m0 (n,), P0 (n, n), optionally c (n,), d (p,), each shared or with a leading S
    axis, y's dtype and device. The elements and their combinations are computed in float64
    for float32 data too (results stored in y's dtype): the information-form elements of a
    non-stationary model grow with the block length (J ~ t^3 for a local linear trend), which
    float32 does not resolve (H200, 10^6 steps: loglik off by 73 % with float32 arithmetic).
    ``block_t`` (steps per program, a power of two), ``num_warps``,
    ``block_c`` (block totals per chunk of the carry pass): launch options, defaults per dtype
    in ``DEFAULTS``.
    """
    S, T, p = y.shape
    n = params["F"].shape[-1]
    if S > MAX_SERIES:
        raise ModelError(f"parallel Triton filter: {S} series; the launch grid takes up to "
                         f"{MAX_SERIES} (filter them in groups)")
    if n > MAX_STATE_DIM or p > MAX_OBS_DIM:
        raise ModelError(f"parallel Triton filter: generated for n <= {MAX_STATE_DIM}, p <= "
                         f"{MAX_OBS_DIM}; the model has n={n}, p={p}")
    d = DEFAULTS[y.dtype]
    block_t = block_t or d["block_t"]
    num_warps = num_warps or d["num_warps"]
    block_c = block_c or d["block_c"]
    batched, flat = split_batched(params)
    spec = ParallelSpec(n=n, p=p, dtype="fp32" if y.dtype == torch.float32 else "fp64",
                        batched=tuple(batched), has_c="c" in flat, has_d="d" in flat)
    reduce_k, carry_k, final_k = _kernels(spec, _interpreting())
    y = y.detach().contiguous()
    nb = triton.cdiv(T, block_t)
    K = n_components(n)
    mean = torch.empty(S, T, n, dtype=y.dtype, device=y.device)
    cov = torch.empty(S, T, n, n, dtype=y.dtype, device=y.device)
    args = [y] + [flat[a[:-4]] for a in _kernel_args(spec)[1:]]
    # block totals and prefixes in float64 whatever y's dtype (the elements are)
    pre = torch.empty(max(S * nb * K, 1), dtype=torch.float64, device=y.device)
    if nb > 1:
        agg = torch.empty(S * nb * K, dtype=torch.float64, device=y.device)
        reduce_k[(nb, S)](*args, agg, T, nb, float("nan"), BLOCK_T=block_t, num_warps=num_warps)
        carry_k[(S,)](agg, pre, nb, BLOCK_C=block_c, num_warps=num_warps)
    final_k[(nb, S)](*args, pre, mean, cov, T, nb, float("nan"), BLOCK_T=block_t,
                     num_warps=num_warps)
    return mean, cov


def eligible(ssm, y: torch.Tensor, u: torch.Tensor | None) -> str | None:
    """None when the Triton parallel filter can run this call, else the reason it cannot."""
    from tsssm.kalman.ssm import is_time_invariant

    if ssm.B is not None or u is not None:
        return "controls (B, u)"
    if not is_time_invariant(ssm):
        return "time-varying matrices"
    if y.dtype not in (torch.float32, torch.float64):
        return f"dtype {y.dtype}"
    n, p = ssm.F.shape[-1], ssm.H.shape[-2]
    if n > MAX_STATE_DIM or p > MAX_OBS_DIM:
        return f"n={n}, p={p} (generated for n <= {MAX_STATE_DIM}, p <= {MAX_OBS_DIM})"
    if torch.is_grad_enabled() and (y.requires_grad or any(
            getattr(ssm, f) is not None and getattr(ssm, f).requires_grad for f in _PARAMS)):
        return "a gradient is needed (the kernels have no backward)"
    if y.device.type != "cuda" and not _interpreting():
        return "not a CUDA tensor"
    return None
