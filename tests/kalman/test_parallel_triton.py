"""The Triton parallel-in-time filter (chunked associative scan) against the sequential filter.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1 per test; small blocks so
that several blocks and several carry chunks are crossed). GPU tests (-m gpu) run the compiled
kernels. Every run writes into outputs (and scratch buffers) poisoned with NaN, so an element a
kernel skips fails the test; models are fresh random ones, with missing values.
"""

from __future__ import annotations

import pytest
import torch
from triton_cases import compare_filters, local_linear_trend, nan_filled_empty, spd, to
from triton_cases import random_y as _random_y

from tsssm.errors import ModelError
from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.kalman.parallel import parallel_kalman_filter
from tsssm.kalman.parallel_triton import ParallelSpec, kernel_source, n_components


def random_model(gen, n, p, batch=(), with_cd=True) -> LinearGaussianSSM:
    F = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    F = 0.97 * F / torch.linalg.matrix_norm(F, ord=2)[..., None, None]
    H = torch.randn(*batch, p, n, generator=gen, dtype=torch.float64)
    c = 0.1 * torch.randn(*batch, n, generator=gen, dtype=torch.float64) if with_cd else None
    d = 0.1 * torch.randn(*batch, p, generator=gen, dtype=torch.float64) if with_cd else None
    return LinearGaussianSSM(F, H, spd(gen, *batch, n, n, scale=0.3),
                             spd(gen, *batch, p, p, scale=0.5),
                             torch.randn(*batch, n, generator=gen, dtype=torch.float64),
                             spd(gen, *batch, n, n), d=d, c=c)


def random_y(gen, shape, missing=0.15) -> torch.Tensor:
    return _random_y(gen, shape, missing, whole_step=4)


def poisoned(ssm, y, **kw):
    """parallel_kalman_filter(backend="triton") with every float buffer it allocates filled
    with NaN first."""
    with nan_filled_empty() as made:
        res = parallel_kalman_filter(ssm, y, backend="triton", **kw)
    assert made, "the launcher allocated nothing"
    return res


def compare(res, ref, tol):
    compare_filters(res, ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# interpreter (CPU, default tier)


@pytest.mark.parametrize(
    ("n", "p", "batch", "T", "block_t", "block_c", "f32"),
    [
        (2, 1, (2,), 45, 8, 2, True),  # 6 blocks, a partial last block, 3 carry chunks
        (3, 2, (2,), 20, 8, 2, False),  # per-series matrices, partly missing steps, 3 blocks
        (1, 1, (), 33, 32, 1, True),  # shared scalar model, one series, T just over a block
        (2, 2, (2,), 16, 16, 1, False),  # one block: no carry pass
        pytest.param(4, 2, (2,), 40, 8, 4, True, marks=pytest.mark.slow),
    ],
)
def test_matches_sequential(interpret, n, p, batch, T, block_t, block_c, f32):
    gen = torch.Generator().manual_seed(100 * n + T)
    ssm = random_model(gen, n, p, batch=batch)
    y = random_y(gen, (*batch, T, p) if batch else (1, T, p))
    ref = kalman_filter(ssm, y, steady_state=False)
    compare(poisoned(ssm, y, block_t=block_t, block_c=block_c, num_warps=1), ref, 1e-10)
    if not f32:
        return
    ref32 = kalman_filter(to(ssm, torch.float32), y.float(), steady_state=False)
    res32 = poisoned(to(ssm, torch.float32), y.float(), block_t=block_t, block_c=block_c)
    compare(res32, ref, 5e-3)
    torch.testing.assert_close(res32.loglik, ref32.loglik, rtol=1e-4, atol=1e-3)


def test_local_linear_trend_long(interpret):
    """The benchmark's model (an unbounded trend: covariances far from the data's scale)."""
    ssm = local_linear_trend()
    gen = torch.Generator().manual_seed(4)
    y = random_y(gen, (1, 130, 1), missing=0.02) * 20
    ref = kalman_filter(ssm, y)
    compare(poisoned(ssm, y, block_t=32, block_c=2), ref, 1e-9)


def test_dispatch_and_errors(interpret, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    ssm = random_model(gen, 2, 1)
    y = random_y(gen, (1, 12, 1))
    # "auto" keeps CPU tensors on the torch path even under the interpreter
    import tsssm.kalman.parallel_triton as pt

    calls = []
    real = pt.parallel_filter_arrays
    monkeypatch.setattr(pt, "parallel_filter_arrays", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    kalman_filter(ssm, y, method="parallel")
    assert not calls
    parallel_kalman_filter(ssm, y, backend="triton", block_t=8)
    assert calls
    with pytest.raises(ModelError, match="backend must be one of"):
        parallel_kalman_filter(ssm, y, backend="cuda")
    tv = ssm._replace(F=ssm.F.expand(12, 2, 2).clone(), time_varying=("F",))
    with pytest.raises(ModelError, match="cannot run this call: time-varying"):
        parallel_kalman_filter(tv, y, backend="triton")
    kalman_filter(tv, y, method="parallel")  # the torch path takes it
    big = random_model(gen, 5, 1)
    with pytest.raises(ModelError, match="n=5"):
        parallel_kalman_filter(big, y, backend="triton")
    # a gradient: "auto" and the torch path work, the Triton backend says why not
    Q = ssm.Q.clone().requires_grad_()
    with pytest.raises(ModelError, match="gradient"):
        parallel_kalman_filter(ssm._replace(Q=Q), y, backend="triton")


def test_generated_source_shape():
    """Every component of the element has a place; the sources differ by spec."""
    assert [n_components(n) for n in (1, 2, 3, 4)] == [5, 14, 27, 44]
    a = kernel_source(ParallelSpec(2, 1, "fp64", (), False, False))
    b = kernel_source(ParallelSpec(2, 1, "fp64", ("F",), True, True))
    assert "def _combine(" in a and "def _reduce(" in a and "def _final(" in a
    assert a != b and "s64 * 4" in b


# ------------------------------------------------------------------------------------------------
# GPU (compiled)


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "p", "batched", "T", "launch"),
    [
        (2, 1, False, 5003, [dict(), dict(block_t=128, num_warps=2), dict(block_t=1024,
                                                                          num_warps=8)]),
        (3, 2, True, 2001, [dict()]),
        (1, 1, False, 70_001, [dict(block_t=512, block_c=64)]),  # 137 blocks, 3 carry chunks
        (4, 2, False, 1000, [dict(block_t=128)]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_matches_sequential(n, p, batched, T, launch, dtype):
    dev = _gpu()
    gen = torch.Generator().manual_seed(T + n)
    S = 3
    ssm = random_model(gen, n, p, batch=(S,) if batched else ())
    y = random_y(gen, (S, T, p))
    ref = kalman_filter(to(ssm, torch.float64, dev), y.to(dev), steady_state=False)
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    for kw in launch:
        res = poisoned(to(ssm, dtype, dev), y.to(dev, dtype), **kw)
        compare(res, ref, tol)


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    dev = _gpu()
    gen = torch.Generator().manual_seed(3)
    ssm = to(local_linear_trend(), torch.float64, dev)
    y = random_y(gen, (1, 10_000, 1), missing=0.0).to(dev)
    ref = kalman_filter(ssm, y)
    res = kalman_filter(ssm, y, method="parallel")
    rel = float((res.loglik - ref.loglik).abs() / ref.loglik.abs())
    assert rel < 1e-12, rel
