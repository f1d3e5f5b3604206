"""Prefix scans over the time axis, in plain tensor ops (O(log T) depth, batched).

Two tools used by the filters and smoothers:

- :func:`associative_scan`: inclusive prefix scan of any associative operator over a tuple of
  tensors whose time axis is dim 0 (odd-even recursion: about 2T operator applications, depth
  2 log2 T; every level is one batched call of the operator).
- :func:`linear_recurrence`: ``x_t = A_t x_{t-1} + b_t`` for all t at once; with a constant
  ``A`` it runs as chunked matrix products (blocks of L steps solved by one GEMM against the
  block-Toeplitz matrix of powers of A, then the same recurrence on the block carries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Elems = tuple[Tensor, ...]


def _interleave(even: Tensor, odd: Tensor) -> Tensor:
    """Merge ``even`` (results at 0, 2, 4, ...) and ``odd`` (1, 3, ...) along dim 0."""
    n_odd = odd.shape[0]
    head = torch.stack([even[:n_odd], odd], dim=1).reshape(2 * n_odd, *odd.shape[1:])
    if even.shape[0] > n_odd:
        return torch.cat([head, even[n_odd:]], dim=0)
    return head


def associative_scan(
    combine: Callable[[Elems, Elems], Elems], elems: Sequence[Tensor], reverse: bool = False
) -> Elems:
    """Inclusive scan ``out[t] = e[0] * e[1] * ... * e[t]``, ``*`` = ``combine(earlier, later)``.

    elems: tensors with the time axis at dim 0 (other axes are free; ``combine`` must broadcast
    over them). With ``reverse=True``: ``out[t] = e[t] * e[t+1] * ... * e[T-1]`` (same
    ``combine(earlier, later)`` argument order).
    """
    elems = tuple(elems)
    if reverse:
        flipped = tuple(torch.flip(e, dims=(0,)) for e in elems)
        out = _scan(lambda later, earlier: combine(earlier, later), flipped)
        return tuple(torch.flip(o, dims=(0,)) for o in out)
    return _scan(combine, elems)


def _scan(combine: Callable[[Elems, Elems], Elems], elems: Elems) -> Elems:
    T = elems[0].shape[0]
    if T < 2:
        return elems
    n_pairs = T // 2
    # reduce neighbouring pairs (0,1), (2,3), ...: prefix of the pairs = results at odd indices
    pairs = combine(
        tuple(e[0 : 2 * n_pairs : 2] for e in elems), tuple(e[1 : 2 * n_pairs : 2] for e in elems)
    )
    odd = _scan(combine, pairs)
    n_even_rest = (T - 1) // 2  # results at 2, 4, ...: previous odd result combined with e[2k]
    if n_even_rest > 0:
        rest = combine(tuple(o[:n_even_rest] for o in odd), tuple(e[2::2] for e in elems))
        even = tuple(torch.cat([e[:1], r], dim=0) for e, r in zip(elems, rest))
    else:
        even = tuple(e[:1] for e in elems)
    return tuple(_interleave(ev, od) for ev, od in zip(even, odd))


def _affine_combine(earlier: Elems, later: Elems) -> Elems:
    A1, b1 = earlier
    A2, b2 = later
    return A2 @ A1, (A2 @ b1.unsqueeze(-1)).squeeze(-1) + b2


def linear_recurrence(
    A: Tensor, b: Tensor, x0: Tensor | None = None, *, constant_A: bool = False
) -> Tensor:
    """Solve ``x_t = A_t x_{t-1} + b_t`` for t = 0..T-1 with ``x_{-1} = x0`` (zero if None).

    A: (..., T, n, n), or (..., n, n) when ``constant_A``; b: (..., T, n); x0: (..., n).
    Batch axes broadcast. Returns x: (..., T, n).
    """
    if constant_A:
        return _linear_recurrence_constant(A, b, x0)
    if x0 is not None:
        first = b[..., 0, :] + (A[..., 0, :, :] @ x0.unsqueeze(-1)).squeeze(-1)
        b = torch.cat([first.unsqueeze(-2), b[..., 1:, :].expand(*first.shape[:-1], -1, -1)], -2)
    # align the batch axes of A and b (they broadcast; A is often shared by many series)
    nd = max(A.ndim - 3, b.ndim - 2)
    A = A.reshape((1,) * (nd - (A.ndim - 3)) + A.shape)
    b = b.reshape((1,) * (nd - (b.ndim - 2)) + b.shape)
    _, x = associative_scan(_affine_combine, (A.movedim(-3, 0), b.movedim(-2, 0)))
    return x.movedim(0, -2)


def _matrix_powers(A: Tensor, k: int) -> Tensor:
    """[A^0, A^1, ..., A^k]: (k+1, ..., n, n), by repeated squaring-free multiplication."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    powers = [eye, A]
    for _ in range(k - 1):
        powers.append(powers[-1] @ A)
    return torch.stack(powers[: k + 1], dim=0)


def _linear_recurrence_constant(A: Tensor, b: Tensor, x0: Tensor | None) -> Tensor:
    """x_t = A x_{t-1} + b_t, x_{-1} = x0 (or 0), A constant in time: chunked products.

    Blocks of L steps are solved from a zero start by one GEMM against the block-Toeplitz matrix
    of powers of A; the block ends then follow the same recurrence with A^L (recursively), and
    each block adds A^(j+1) times the state before it.
    """
    T, n = b.shape[-2], b.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-2], b.shape[:-2])
    if x0 is not None:
        batch = torch.broadcast_shapes(batch, x0.shape[:-1])
    if T == 0:
        return b.expand(*batch, 0, n)
    L = max(2, min(32, 32 // n))  # block length: small (L n x L n) Toeplitz blocks
    L = min(L, T)
    n_blocks = T // L
    main = n_blocks * L
    powers = _matrix_powers(A, L)  # (L+1, ..., n, n)
    # Toeplitz block W[i, j] = A^(j-i) for i <= j (row-vector convention: x_row = b_row @ W)
    idx = torch.arange(L, device=b.device)
    lag = idx[None, :] - idx[:, None]  # (L, L): j - i
    W = powers[lag.clamp(min=0)]  # (L, L, ..., n, n)
    W = W * (lag >= 0).to(b.dtype).reshape(L, L, *([1] * (W.ndim - 2)))
    # W[i, j] as the (n x n) block mapping b_i (row) to x_j (row): b_i @ (A^(j-i))'
    W = W.movedim((0, 1), (-4, -3)).mT  # (..., L, L, n, n) with blocks transposed
    W = W.transpose(-3, -2).reshape(*W.shape[:-4], L * n, L * n)  # (..., L n, L n)
    blocks = b[..., :main, :].reshape(*b.shape[:-2], n_blocks, L * n)  # (..., nb, L n)
    local = (blocks @ W).reshape(*batch, n_blocks, L, n)  # each block from a zero start
    # the state before each block: x_before_k = A^L x_before_{k-1} + local_end_{k-1}
    if n_blocks == 1:
        before = (x0.expand(*batch, n) if x0 is not None else None)
        before = None if before is None else before.unsqueeze(-2)
    else:
        ends = _linear_recurrence_constant(powers[L], local[..., :-1, L - 1, :], x0)
        first = x0.expand(*batch, n) if x0 is not None else torch.zeros_like(ends[..., 0, :])
        before = torch.cat([first.unsqueeze(-2), ends], dim=-2)  # (..., nb, n)
    if before is not None:
        # x_{k, j} = local_{k, j} + A^(j+1) x_before_k
        V = powers[1:].movedim(0, -3).mT  # (..., L, n, n): (A^(j+1))'
        V = V.transpose(-3, -2).reshape(*V.shape[:-3], n, L * n)  # (..., n, L n)
        local = local + (before @ V).reshape(*batch, n_blocks, L, n)
    x = local.reshape(*batch, main, n)
    if main < T:
        rest = _linear_recurrence_constant(A, b[..., main:, :], x[..., -1, :])
        x = torch.cat([x, rest], dim=-2)
    return x
