"""The compiled CPU filter (tsssm.kalman.cpu_kernel) against the torch path it replaces."""

from __future__ import annotations

import pytest
import torch

from tsssm.errors import DataError, NumericalError
from tsssm.kalman import LinearGaussianSSM, cpu_kernel, kalman_filter, kalman_loglik
from tsssm.kalman.filter import _filter_compiled

needs_kernel = pytest.mark.skipif(cpu_kernel.library(torch.float64) is None,
                                  reason="no C compiler: the CPU kernel is not built")


def _model(nb: tuple[int, ...], n: int, dtype, g) -> LinearGaussianSSM:
    F = torch.randn(*nb, n, n, generator=g, dtype=torch.float64)
    F = 0.95 * F / torch.linalg.matrix_norm(F, 2).unsqueeze(-1).unsqueeze(-1)
    A = torch.randn(*nb, n, n, generator=g, dtype=torch.float64)
    Q = A @ A.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    H = torch.randn(*nb, 1, n, generator=g, dtype=torch.float64)
    R = 0.5 + torch.rand(*nb, 1, 1, generator=g, dtype=torch.float64)
    B = torch.randn(*nb, n, n, generator=g, dtype=torch.float64)
    P0 = B @ B.mT / n + torch.eye(n, dtype=torch.float64)
    m0 = torch.randn(*nb, n, generator=g, dtype=torch.float64)
    return LinearGaussianSSM(*(x.to(dtype) for x in (F, H, Q, R, m0, P0)))


def _torch_path(ssm, y, monkeypatch, **kw):
    with monkeypatch.context() as mp:
        mp.setenv("TSSSM_CPU_KERNEL", "0")
        return kalman_filter(ssm, y, **kw)


CASES = [((), (40,), 2), ((3,), (5, 3), 3), ((3,), (3,), 5), ((2, 1), (2, 4), 2), ((), (), 4)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("mb", "yb", "n"), CASES)
@pytest.mark.parametrize("steady", [True, False])
def test_kernel_equals_the_torch_filter(dtype, mb, yb, n, steady, monkeypatch):
    g = torch.Generator().manual_seed(hash((mb, yb, n)) % 1000)
    ssm = _model(mb, n, dtype, g)
    T = 300
    y = torch.randn(*yb, T, 1, generator=g, dtype=torch.float64).to(dtype)
    fast = _filter_compiled(ssm, y, None, steady, "all")
    assert fast is not None
    ref = _torch_path(ssm, y, monkeypatch, steady_state=steady)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for name in ref._fields:
        a, b = getattr(fast, name), getattr(ref, name)
        assert a.shape == b.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, **tol), name
    ll = kalman_loglik(ssm, y)
    assert torch.allclose(ll, ref.loglik, **tol)
    last = kalman_filter(ssm, y, covariances="last", steady_state=steady)
    assert last.filtered_cov.shape[-3] == 1
    assert torch.allclose(last.filtered_cov[..., 0, :, :], ref.filtered_cov[..., -1, :, :], **tol)


@needs_kernel
def test_kernel_hands_back_missing_values_and_rejects_inf(monkeypatch):
    g = torch.Generator().manual_seed(3)
    ssm = _model((), 2, torch.float64, g)
    y = torch.randn(6, 50, 1, generator=g, dtype=torch.float64)
    y[2, 10, 0] = float("nan")
    assert _filter_compiled(ssm, y, None, True, "all") is None  # the torch path handles it
    res = kalman_filter(ssm, y)
    ref = _torch_path(ssm, y, monkeypatch)
    assert torch.allclose(res.loglik, ref.loglik)
    assert torch.allclose(kalman_loglik(ssm, y), ref.loglik)
    y[2, 10, 0] = float("inf")
    with pytest.raises(DataError, match="inf"):
        kalman_loglik(ssm, y)


@needs_kernel
def test_kernel_reports_a_non_positive_innovation_variance():
    g = torch.Generator().manual_seed(4)
    ssm = _model((), 2, torch.float64, g)
    bad = ssm._replace(R=-10 * torch.ones(1, 1, dtype=torch.float64),
                       P0=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(NumericalError, match="not positive"):
        kalman_filter(bad, torch.randn(3, 20, 1, generator=g, dtype=torch.float64))


def test_gradients_take_the_torch_path(monkeypatch):
    """A parameter that needs a gradient: the differentiable path, same numbers."""
    g = torch.Generator().manual_seed(5)
    ssm = _model((2,), 3, torch.float64, g)
    y = torch.randn(4, 2, 60, 1, generator=g, dtype=torch.float64)
    Q = ssm.Q.clone().requires_grad_(True)
    ll = kalman_filter(ssm._replace(Q=Q), y).loglik.sum()
    (grad,) = torch.autograd.grad(ll, Q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(kalman_filter(ssm, y).loglik.sum(), ll.detach())
    assert _filter_compiled(ssm._replace(Q=Q), y, None, True, "all") is None


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TSSSM_CPU_KERNEL", "0")
    assert cpu_kernel.library(torch.float64) is None
