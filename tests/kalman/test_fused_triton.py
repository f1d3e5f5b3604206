"""The fused Triton Kalman filter against the torch filter (the specification) and statsmodels.

CPU tests run the kernel in Triton's interpreter (TRITON_INTERPRET=1, set per test: the kernels
are generated and decorated on first use, and the cache key holds the mode, so the suite can mix
interpreted and compiled runs in one process). GPU tests (-m gpu) run the compiled kernel.
Every run writes into outputs poisoned with NaN, so an element the kernel skips fails the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from triton_cases import compare_filters, local_linear_trend, nan_filled_empty, spd, to
from triton_cases import random_y as _random_y

from tsssm.errors import ModelError, NumericalError
from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.kalman.fused_triton import (
    KERNEL_OUTPUTS,
    fused_filter_arrays,
    fused_kalman_filter,
    vector_steps,
)


def random_model(gen, n, p, batch=(), with_cd=True, sparse=False) -> LinearGaussianSSM:
    """Stable random model in float64; ``sparse`` zeroes some entries of F, H and Q."""
    F = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    H = torch.randn(*batch, p, n, generator=gen, dtype=torch.float64)
    Q = spd(gen, *batch, n, n, scale=0.3)
    if sparse:
        F[..., 0, n - 1] = 0.0
        H[..., 0, 0] = 0.0
        Q = torch.diag_embed(torch.diagonal(Q, dim1=-2, dim2=-1))
    F = 0.95 * F / torch.linalg.matrix_norm(F, ord=2)[..., None, None]  # stable over long T
    R = spd(gen, *batch, p, p, scale=0.5)
    m0 = torch.randn(*batch, n, generator=gen, dtype=torch.float64)
    P0 = spd(gen, *batch, n, n)
    c = 0.1 * torch.randn(*batch, n, generator=gen, dtype=torch.float64) if with_cd else None
    d = 0.1 * torch.randn(*batch, p, generator=gen, dtype=torch.float64) if with_cd else None
    return LinearGaussianSSM(F, H, Q, R, m0, P0, d=d, c=c)


def random_y(gen, shape, missing=0.2) -> torch.Tensor:
    return _random_y(gen, shape, missing, whole_step=2)


def poisoned_run(ssm, y, **kw):
    """fused_kalman_filter with every kernel output pre-filled with NaN."""
    with nan_filled_empty() as poisoned:
        res = fused_kalman_filter(ssm, y, outputs="all", **kw)
    assert poisoned, "the launcher allocated no outputs"
    return res


def compare(res, ref, rtol: float, atol: float) -> None:
    compare_filters(res, ref, rtol, atol)
    assert torch.equal(res.observed, ref.observed)


# ------------------------------------------------------------------------------------------------
# interpreter (CPU, default tier)


@pytest.mark.parametrize(
    ("n", "p", "batch", "T", "sparse"),
    [
        (2, 1, (3,), 13, False),  # T not a multiple of the 16-byte vector: element path
        (3, 2, (5,), 10, True),  # per-series matrices, structural zeros, partial missing
        (4, 3, (), 12, False),  # shared matrices, multivariate
    ],
)
def test_matches_sequential_float64(interpret, n, p, batch, T, sparse):
    gen = torch.Generator().manual_seed(1000 * n + T)
    ssm = random_model(gen, n, p, batch=batch, sparse=sparse)
    y = random_y(gen, (*batch, T, p) if batch else (4, T, p))
    ref = kalman_filter(ssm, y)
    # 16-byte chunks and element-wise steps; chunk_mult=2: full chunks plus a tail chunk
    for vectorize, chunk_mult in [(True, 1), (True, 2), (False, 1)]:
        res = poisoned_run(ssm, y, chunk_mult=chunk_mult, vectorize=vectorize)
        compare(res, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("T", "chunk_mult", "prefetch", "p"), [(13, 1, 1, 1), (13, 4, 2, 1),
                                                                (10, 2, 3, 2)])
def test_time_major_y_matches_sequential(interpret, T, chunk_mult, prefetch, p):
    """y read time-major (coalesced per step): full chunks, a tail, prefetch deeper than T."""
    gen = torch.Generator().manual_seed(T + chunk_mult)
    ssm = random_model(gen, 2, p, batch=(5,))
    y = random_y(gen, (5, T, p))
    ref = kalman_filter(ssm, y)
    res = poisoned_run(ssm, y, y_layout="time", chunk_mult=chunk_mult, prefetch=prefetch)
    compare(res, ref, rtol=1e-10, atol=1e-10)
    y_tm = y.transpose(0, 1).contiguous().transpose(0, 1)  # a time-major view
    params = {k: getattr(ssm, k) for k in ("F", "H", "Q", "R", "m0", "P0", "c", "d")}
    for layout, time_major in (("time", True), ("auto", False)):  # auto: rows (faster on GPU)
        out = fused_filter_arrays(y_tm, params, y_layout=layout)
        assert out["spec"].y_time_major is time_major
        torch.testing.assert_close(out["loglik"], ref.loglik, rtol=1e-10, atol=1e-10)
    with pytest.raises(ModelError, match="y_layout"):
        fused_filter_arrays(y, {k: getattr(ssm, k) for k in ("F", "H", "Q", "R", "m0", "P0")},
                            y_layout="rows")


@pytest.mark.parametrize("joseph", [True, False])
def test_matches_sequential_float32(interpret, joseph):
    gen = torch.Generator().manual_seed(7 + joseph)
    ssm = random_model(gen, 3, 2, batch=(6,))
    y = random_y(gen, (6, 16, 2))
    ref = kalman_filter(ssm, y)
    res = poisoned_run(to(ssm, torch.float32), y.float(), joseph=joseph, vectorize=joseph)
    assert res.loglik.dtype == torch.float32
    compare(res, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_structural_entries_and_per_series_values(interpret, dtype):
    """Entries of F and H that are 0 or +-1 in every series are compiled in; any other value,
    even where some series have 0 or 1, must be loaded per series."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    F = t([[1.0, 1, 0, 0], [0, 1, 0, 0], [0, 0, -1, -1], [0, 0, 1, 0]]).repeat(4, 1, 1)
    F[1, 0, 1] = 0.0  # one series differs: entry (0, 1) must be a run-time value
    F[2, 1, 1] = -1.0
    H = t([[1.0, 0, 1, 0]]).repeat(4, 1, 1)
    H[3, 0, 3] = 1.0
    ssm = LinearGaussianSSM(F, H, torch.diag(t([0.5, 0.01, 0.1, 0.0])), t([[2.0]]),
                            t([0.0, 0, 0, 0]), torch.diag(t([10.0, 1, 5, 5])))
    gen = torch.Generator().manual_seed(21)
    y = random_y(gen, (4, 12, 1), missing=0.2)
    ref = kalman_filter(ssm, y)
    res = poisoned_run(to(ssm, dtype), y.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    compare(res, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steady_state_path(interpret, dtype):
    """Complete data: blocks switch to the converged gain; a missing value at t=250 (one
    series) sends its block back to the full update until it converges again."""
    ssm = local_linear_trend()
    gen = torch.Generator().manual_seed(17)
    y = random_y(gen, (3, 400, 1), missing=0.0)
    y[..., 2, :] = 0.5  # random_y leaves a gap at t=2; here everything is observed
    y[1, 250, 0] = math.nan
    ref = kalman_filter(ssm, y)
    res = fused_filter_arrays(
        y.to(dtype), {k: getattr(ssm, k).to(dtype) for k in ("F", "H", "Q", "R", "m0", "P0")},
        outputs=tuple(KERNEL_OUTPUTS),
    )
    assert 0 < int(res["steady_steps"].sum()) < 400 - 8
    off = fused_filter_arrays(
        y.to(dtype), {k: getattr(ssm, k).to(dtype) for k in ("F", "H", "Q", "R", "m0", "P0")},
        outputs=tuple(KERNEL_OUTPUTS), steady_state=False,
    )
    assert int(off["steady_steps"].sum()) == 0
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for out in (res, off):
        for name in KERNEL_OUTPUTS:
            torch.testing.assert_close(out[name].double(), getattr(ref, name), rtol=tol,
                                       atol=tol, msg=name)
        torch.testing.assert_close(out["loglik"].double(), ref.loglik, rtol=tol, atol=tol)


@pytest.mark.parametrize(("kw", "dtypes"), [
    # unrolled slots; nfull % 2 = 1 chunk left in a slot
    (dict(rotate=True, prefetch=2), (torch.float64, torch.float32)),
    (dict(rotate=True, prefetch=3, chunk_mult=2, ll_chunk=True), (torch.float32,)),
    (dict(series_per_thread=2, ll_chunk=True), (torch.float64,)),
    (dict(series_per_thread=4, rotate=True, prefetch=4), (torch.float32,)),
])
def test_launch_knobs_match_sequential(interpret, kw, dtypes):
    """The prefetch rotation, per-chunk log-likelihood sums and several series per thread give
    the sequential filter's numbers: steady path, a missing value, a tail (T % chunk != 0)."""
    ssm = local_linear_trend()
    gen = torch.Generator().manual_seed(23)
    y = random_y(gen, (40, 94, 1), missing=0.0)
    y[..., 2, :] = 0.5
    y[3, 50, 0] = math.nan
    ref = kalman_filter(ssm, y)
    for dtype in dtypes:
        tol = 1e-10 if dtype == torch.float64 else 2e-4
        res = poisoned_run(to(ssm, dtype), y.to(dtype), **kw)
        compare(res, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [dict(), dict(rotate=True, prefetch=3, ll_chunk=True),
                                dict(vectorize=False)])
def test_series_major_outputs_match_sequential(interpret, kw):
    """out_layout="series": chunk-wide 16-byte stores per series (element stores in the tail
    and without vectorisation); contiguous (S, T, ...) results; poisoned outputs."""
    ssm = local_linear_trend()
    gen = torch.Generator().manual_seed(29)
    y = random_y(gen, (40, 94, 1), missing=0.0)
    y[3, 50, 0] = math.nan
    ref = kalman_filter(ssm, y)
    outs = ("log_liks", "filtered_mean", "predicted_mean", "innovation", "nis")
    real = torch.empty

    def nan_empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = nan_empty
    try:
        res = fused_kalman_filter(ssm, y, outputs=outs, out_layout="series", **kw)
    finally:
        torch.empty = real
    for name in outs:
        assert getattr(res, name).is_contiguous(), name
        torch.testing.assert_close(getattr(res, name), getattr(ref, name), rtol=1e-10,
                                   atol=1e-10, msg=name)
    torch.testing.assert_close(res.loglik, ref.loglik, rtol=1e-10, atol=1e-10)
    with pytest.raises(ModelError, match="out_layout='series'"):
        fused_kalman_filter(ssm, y, outputs=("filtered_cov",), out_layout="series")


def test_local_linear_trend_matches_statsmodels(interpret):
    kf_mod = pytest.importorskip("statsmodels.tsa.statespace.kalman_filter")
    gen = torch.Generator().manual_seed(3)
    ssm = local_linear_trend()
    y = random_y(gen, (2, 24, 1), missing=0.15)
    res = poisoned_run(ssm, y)
    for s in range(2):
        kf = kf_mod.KalmanFilter(k_endog=1, k_states=2, k_posdef=2)
        kf.bind(y[s].numpy().copy())
        kf["design"], kf["transition"] = ssm.H.numpy(), ssm.F.numpy()
        kf["selection"], kf["state_cov"], kf["obs_cov"] = np.eye(2), ssm.Q.numpy(), ssm.R.numpy()
        kf.initialize_known(ssm.m0.numpy(), ssm.P0.numpy())
        f = kf.filter()
        np.testing.assert_allclose(res.loglik[s].item(), f.llf_obs.sum(), rtol=1e-10)
        np.testing.assert_allclose(res.log_liks[s].numpy(), f.llf_obs, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.filtered_mean[s].numpy(), f.filtered_state.T, rtol=1e-9,
                                   atol=1e-10)


def test_broadcast_batch_and_subset_outputs(interpret):
    gen = torch.Generator().manual_seed(11)
    ssm = random_model(gen, 2, 1, batch=(3,))  # model batch (3,), y batch (2, 3)
    y = random_y(gen, (2, 3, 8, 1))
    res = fused_kalman_filter(ssm, y)  # default outputs
    ref = kalman_filter(ssm, y)
    assert res.filtered_cov is None and res.predicted_cov is None
    for name in ("log_liks", "filtered_mean", "innovation", "nis", "loglik"):
        torch.testing.assert_close(getattr(res, name), getattr(ref, name), rtol=1e-10, atol=1e-10)


def test_arrays_launcher_shapes(interpret):
    gen = torch.Generator().manual_seed(5)
    ssm = random_model(gen, 2, 2, with_cd=False)
    y = random_y(gen, (3, 2 * vector_steps(torch.float64), 2))
    params = {"F": ssm.F, "H": ssm.H, "Q": ssm.Q, "R": ssm.R, "m0": ssm.m0, "P0": ssm.P0}
    out = fused_filter_arrays(y, params, outputs=tuple(KERNEL_OUTPUTS))
    ref = kalman_filter(ssm, y)
    for name in KERNEL_OUTPUTS:
        torch.testing.assert_close(out[name], getattr(ref, name), rtol=1e-10, atol=1e-10)


def test_bad_inputs_raise_clear_errors(interpret):
    gen = torch.Generator().manual_seed(9)
    ssm = random_model(gen, 2, 1)
    y = random_y(gen, (4, 8, 1), missing=0.0)
    with pytest.raises(ModelError, match="time-invariant"):
        fused_kalman_filter(ssm._replace(H=ssm.H.expand(8, 1, 2), time_varying=("H",)), y)
    with pytest.raises(ModelError, match="controls"):
        fused_kalman_filter(ssm._replace(B=torch.ones(2, 1, dtype=torch.float64)), y,
                            torch.ones(4, 8, 1, dtype=torch.float64))
    big = random_model(gen, 9, 1)
    with pytest.raises(ModelError, match="up to 8 states"):
        fused_kalman_filter(big, y)
    with pytest.raises(ModelError, match="unknown outputs"):
        fused_kalman_filter(ssm, y, outputs=("smoothed_mean",))
    y_inf = y.clone()
    y_inf[2, 5, 0] = math.inf
    with pytest.raises(NumericalError, match=r"series \[2\].*inf"):
        fused_kalman_filter(ssm, y_inf)
    neg = ssm._replace(R=-torch.ones(1, 1, dtype=torch.float64), P0=torch.zeros(2, 2,
                                                                                 dtype=torch.float64))
    with pytest.raises(NumericalError, match="not positive definite"):
        fused_kalman_filter(neg, y)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ssm = local_linear_trend()
    with pytest.raises(ModelError, match="CUDA"):
        fused_kalman_filter(ssm, torch.zeros(1, 4, 1, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# GPU (-m gpu): the compiled kernel at sizes that exercise many programs and both paths


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


#: (n, p, batched, dtype, T, launch options) of the GPU cases, one launch per case: each compiles
#: its own kernel with every output (up to ~60 s on the H200's host), so one case per launch
#: lets ``-n`` spread them (the seven launches of the first model were one case taking 441 s)
_GPU_CASES = [
    # T=1000: 16-byte path (when the model is small); T=1003: element path
    *[(2, 1, False, torch.float32, 1000, kw) for kw in (
        {}, dict(chunk_mult=2, prefetch=3), dict(num_warps=2, prefetch=1),
        dict(y_layout="time", chunk_mult=4, prefetch=4),
        dict(rotate=False, prefetch=1, ll_chunk=False),  # the launch before 2026-12-04
        dict(series_per_thread=2),
        dict(rotate=True, prefetch=3, chunk_mult=2, series_per_thread=2, ll_chunk=True))],
    (2, 1, False, torch.float32, 1003, {}),
    (2, 1, False, torch.float32, 1003, dict(y_layout="time", chunk_mult=2, prefetch=2)),
    (2, 1, False, torch.float64, 1003, {}),
    (4, 1, True, torch.float32, 1003, {}),
    (4, 1, True, torch.float64, 1000, {}),
    (3, 2, False, torch.float32, 1000, {}),
    (3, 2, False, torch.float32, 1000, dict(vectorize=True)),
    (3, 2, False, torch.float64, 1003, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "p", "batched", "dtype", "T", "kw"), _GPU_CASES)
def test_gpu_matches_sequential(n, p, batched, dtype, T, kw):
    dev = _gpu()
    S = 300  # not a multiple of the 32 series per warp
    gen = torch.Generator().manual_seed(T + 10 * n + p)
    ssm = random_model(gen, n, p, batch=(S,) if batched else (), sparse=n == 4)
    y = random_y(gen, (S, T, p), missing=0.1)
    ref = kalman_filter(to(ssm, torch.float64, dev), y.to(dev))
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    res = poisoned_run(to(ssm, dtype, dev), y.to(dev, dtype), **kw)
    compare(res, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_steady_state_path(dtype):
    """Complete data (steady path taken), one missing value in series 40 at t=1500."""
    dev = _gpu()
    ssm = local_linear_trend()
    gen = torch.Generator().manual_seed(5)
    y = random_y(gen, (300, 2000, 1), missing=0.0)
    y[..., 2, :] = 0.5
    y[40, 1500, 0] = math.nan
    ref = kalman_filter(to(ssm, torch.float64, dev), y.to(dev))
    params = {k: getattr(ssm, k).to(dev, dtype) for k in ("F", "H", "Q", "R", "m0", "P0")}
    res = fused_filter_arrays(y.to(dev, dtype), params, outputs=tuple(KERNEL_OUTPUTS))
    assert int(res["steady_steps"].sum()) > 0
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    for name in KERNEL_OUTPUTS:
        torch.testing.assert_close(res[name].double(), getattr(ref, name), rtol=tol, atol=tol,
                                   msg=name)
    torch.testing.assert_close(res["loglik"].double(), ref.loglik, rtol=tol, atol=tol)


def test_structure_memo_launches_without_a_read_and_catches_in_place_changes(interpret,
                                                                             monkeypatch):
    """A model seen before launches on its remembered structure (no host read before the
    kernel); a structure changed in place behind the memo's back (through .data, which no
    version counter sees) is caught by the check after the kernel and filtered again."""
    from tsssm.kalman import fused_triton as ft

    gen = torch.Generator().manual_seed(5)
    ssm = local_linear_trend()  # F = [[1, 1], [0, 1]]: codes 1 and 0, compiled in
    y = random_y(gen, (3, 12, 1))
    reads = []
    real = ft._structure_of
    monkeypatch.setattr(ft, "_structure_of", lambda *a: reads.append(1) or real(*a))
    first = poisoned_run(ssm, y)
    assert len(reads) == 1
    again = poisoned_run(ssm, y)
    assert len(reads) == 1  # the memo's structure, verified after the kernel
    torch.testing.assert_close(again.loglik, first.loglik, rtol=0, atol=0)
    ssm.F.data[0, 1] = 0.5  # the structure's +1 entry is now a general value
    res = poisoned_run(ssm, y)
    assert len(reads) == 2  # caught, read, filtered again
    compare(res, kalman_filter(ssm, y), rtol=1e-10, atol=1e-10)
    poisoned_run(ssm, y)
    assert len(reads) == 2  # and remembered


def test_structure_memo_keeps_the_newest_and_never_a_dead_tensors():
    from tsssm.kalman.fused_triton import StructureMemo

    memo = StructureMemo(size=2)
    mats = [tuple(torch.eye(2) for _ in range(3)) for _ in range(3)]
    for k, (F, H, Q) in enumerate(mats):
        memo.put(F, H, Q, {"k": k}, torch.tensor([k]))
    assert memo.get(*mats[0]) is None  # evicted: the oldest of three with room for two
    assert memo.get(*mats[1])[0] == {"k": 1} and memo.get(*mats[2])[0] == {"k": 2}
    F, H, Q = mats[2]
    assert memo.get(torch.eye(2), H, Q) is None  # another tensor object: no guess
    del mats, F
    import gc

    gc.collect()
    assert all(memo.get(torch.eye(2), torch.eye(2), torch.eye(2)) is None for _ in range(2))
