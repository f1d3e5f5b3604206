"""Set-up shared by the Triton Kalman tests (tests/kalman/test_parallel_triton.py,
test_fused_triton.py, test_fused_grad.py): random SPD matrices and series with missing values, a
model copied to a dtype and device, the local linear trend, NaN-poisoned allocations and the
comparison of two filter results.

The suite imports test modules with ``--import-mode=importlib``, so this folder is on pytest's
``pythonpath`` (pyproject.toml) and the tests import this module by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from tsssm.kalman import LinearGaussianSSM

#: the per-step outputs of a filter result that the Triton filters must reproduce
FILTER_FIELDS = ("log_liks", "filtered_mean", "predicted_mean", "innovation", "nis",
                 "filtered_cov", "predicted_cov", "predicted_obs_mean", "predicted_obs_cov")


def spd(gen: torch.Generator, *shape: int, scale: float = 1.0, jitter: float = 0.2) -> Tensor:
    """A random symmetric positive definite float64 matrix (..., k, k): scale (A A'/k + jitter
    I)."""
    k = shape[-1]
    A = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return scale * (A @ A.mT / k + jitter * torch.eye(k, dtype=torch.float64))


def random_y(gen: torch.Generator, shape: tuple[int, ...], missing: float = 0.15,
             whole_step: int = 3) -> Tensor:
    """A random-walk-plus-noise float64 series (..., T, p): each value missing with probability
    ``missing`` and, where T > whole_step + 1, every channel of step ``whole_step``."""
    y = torch.randn(*shape, generator=gen, dtype=torch.float64).cumsum(-2) * 0.3
    y = y + torch.randn(*shape, generator=gen, dtype=torch.float64)
    y[torch.rand(*shape, generator=gen) < missing] = math.nan  # single channels
    if shape[-2] > whole_step + 1:
        y[..., whole_step, :] = math.nan  # a whole step
    return y


def to(ssm: LinearGaussianSSM, dtype: torch.dtype, device: str | torch.device = "cpu"
       ) -> LinearGaussianSSM:
    """The model's matrices in ``dtype`` on ``device``."""
    return ssm._replace(**{f: getattr(ssm, f).to(dtype=dtype, device=device)
                           for f in ("F", "H", "Q", "R", "m0", "P0", "c", "d")
                           if getattr(ssm, f) is not None})


def local_linear_trend(level_var: float = 0.5, slope_var: float = 0.01, obs_var: float = 2.0
                       ) -> LinearGaussianSSM:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return LinearGaussianSSM(
        F=t([[1.0, 1.0], [0.0, 1.0]]), H=t([[1.0, 0.0]]), Q=t([[level_var, 0.0], [0.0, slope_var]]),
        R=t([[obs_var]]), m0=t([0.0, 0.0]), P0=t([[10.0, 0.0], [0.0, 1.0]]),
    )


@contextmanager
def nan_filled_empty() -> Iterator[list[Tensor]]:
    """Inside the block torch.empty fills every floating tensor it makes with NaN (so an element
    a kernel leaves unwritten fails the test); yields the list of those tensors."""
    real = torch.empty
    made: list[Tensor] = []

    def nan_empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
            made.append(t)
        return t

    torch.empty = nan_empty
    try:
        yield made
    finally:
        torch.empty = real


def compare_filters(res, ref, rtol: float, atol: float) -> None:
    """Every FILTER_FIELDS output and the log-likelihood of ``res`` finite and close to ``ref``."""
    for name in FILTER_FIELDS:
        a, b = getattr(res, name), getattr(ref, name)
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: not finite (unwritten, or a NaN passed)"
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(res.loglik.double(), ref.loglik.double(), rtol=rtol, atol=atol)
