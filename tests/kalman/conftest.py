"""Shared helpers of the Kalman tests: random models and the statsmodels / dense oracles.

Tests reach them through the ``oracle`` fixture (the suite imports test modules with
``--import-mode=importlib``; plain helper modules live in tests/helpers, on pytest's
``pythonpath``). ``interpret``: run this test's Triton kernels in Triton's interpreter.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np
import pytest
import torch

from tsssm.kalman import LinearGaussianSSM

TV_ALLOWED = ("F", "H", "Q", "R", "d", "c")


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def random_spd(rng: np.random.Generator, k: int, *lead: int, jitter: float = 0.2) -> np.ndarray:
    A = rng.normal(size=(*lead, k, k))
    return A @ np.swapaxes(A, -1, -2) / k + jitter * np.eye(k)


def random_model(
    rng: np.random.Generator,
    n: int,
    p: int,
    *,
    T: int | None = None,
    time_varying: tuple[str, ...] = (),
    intercepts: bool = False,
) -> dict[str, np.ndarray]:
    """A stable random model as numpy arrays (time-varying fields carry a leading T axis)."""
    lead = {name: ((T,) if name in time_varying else ()) for name in TV_ALLOWED}
    F = rng.normal(size=(*lead["F"], n, n))
    F = 0.9 * F / np.linalg.norm(F, 2, axis=(-2, -1), keepdims=True)
    model = {
        "F": F,
        "H": rng.normal(size=(*lead["H"], p, n)),
        "Q": random_spd(rng, n, *lead["Q"]),
        "R": random_spd(rng, p, *lead["R"]),
        "m0": rng.normal(size=n),
        "P0": random_spd(rng, n, jitter=1.0),
    }
    if intercepts:
        model["d"] = rng.normal(size=(*lead["d"], p))
        model["c"] = 0.3 * rng.normal(size=(*lead["c"], n))
    return model


def to_ssm(model: dict[str, np.ndarray], time_varying: tuple[str, ...] = ()) -> LinearGaussianSSM:
    fields = {k: t64(v) for k, v in model.items()}
    return LinearGaussianSSM(**fields, time_varying=tuple(time_varying))


def statsmodels_smooth(model: dict[str, np.ndarray], y: np.ndarray, time_varying=()):
    """statsmodels' filter + smoother for our model (our F[t] leads INTO step t, theirs out of)."""
    # imported here: the GPU session runs the fused-filter tests where statsmodels may be absent
    from statsmodels.tsa.statespace.kalman_smoother import KalmanSmoother

    T, p = y.shape
    n = model["F"].shape[-1]
    ks = KalmanSmoother(k_endog=p, k_states=n, k_posdef=n, tolerance=0)
    ks.bind(np.array(y, dtype=float))

    def obs_side(name):  # indexed by the step it describes: same index
        x = model[name]
        return np.moveaxis(x, 0, -1) if name in time_varying else x

    def state_side(name):  # theirs[t] = ours[t + 1]; the last one is never used
        x = model[name]
        if name not in time_varying:
            return x
        return np.moveaxis(np.concatenate([x[1:], x[:1]], axis=0), 0, -1)

    ks["design"] = obs_side("H")
    ks["obs_cov"] = obs_side("R")
    ks["transition"] = state_side("F")
    ks["state_cov"] = state_side("Q")
    ks["selection"] = np.eye(n)
    if "d" in model:
        ks["obs_intercept"] = obs_side("d") if "d" in time_varying else model["d"]
    if "c" in model:
        ks["state_intercept"] = state_side("c") if "c" in time_varying else model["c"]
    ks.initialize_known(model["m0"], model["P0"])
    return ks.smooth()


def dense_loglik(model: dict[str, np.ndarray], y: np.ndarray, time_varying=()) -> float:
    """log p(observed y) from the joint Gaussian of all observations, built explicitly."""
    T, p = y.shape
    n = model["F"].shape[-1]

    def at(name, t):
        x = model.get(name)
        if x is None:
            return None
        return x[t] if name in time_varying else x

    # x_t = sum_j Phi[t, j] z_j + mean_t, with z_0 = x_0 - m0 ~ N(0, P0), z_j = w_j ~ N(0, Q_j)
    Phi = np.zeros((T, T, n, n))
    mean = np.zeros((T, n))
    mean[0] = model["m0"]
    Phi[0, 0] = np.eye(n)
    for t in range(1, T):
        F = at("F", t)
        Phi[t, :t] = np.einsum("ab,jbc->jac", F, Phi[t - 1, :t])
        Phi[t, t] = np.eye(n)
        mean[t] = F @ mean[t - 1] + (at("c", t) if "c" in model else 0.0)
    Z = np.zeros((T * n, T * n))
    Z[:n, :n] = model["P0"]
    for j in range(1, T):
        Z[j * n : (j + 1) * n, j * n : (j + 1) * n] = at("Q", j)
    G = Phi.transpose(0, 2, 1, 3).reshape(T * n, T * n)
    X_cov = G @ Z @ G.T
    Hbig = np.zeros((T * p, T * n))
    Rbig = np.zeros((T * p, T * p))
    y_mean = np.zeros((T, p))
    for t in range(T):
        Hbig[t * p : (t + 1) * p, t * n : (t + 1) * n] = at("H", t)
        Rbig[t * p : (t + 1) * p, t * p : (t + 1) * p] = at("R", t)
        y_mean[t] = at("H", t) @ mean[t] + (at("d", t) if "d" in model else 0.0)
    Y_cov = Hbig @ X_cov @ Hbig.T + Rbig
    flat = y.reshape(-1)
    obs = ~np.isnan(flat)
    if not obs.any():
        return 0.0
    from scipy.stats import multivariate_normal

    return float(
        multivariate_normal(y_mean.reshape(-1)[obs], Y_cov[np.ix_(obs, obs)]).logpdf(flat[obs])
    )


def assert_close(actual: torch.Tensor, expected, rtol: float = 1e-8, what: str = "") -> None:
    """Relative agreement, scaled by the magnitude of the expected array."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(np.abs(e).max(), 1e-300)
    err = np.abs(a - e).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


@pytest.fixture
def interpret(monkeypatch) -> None:
    """TRITON_INTERPRET=1 for this test: the kernels are generated and decorated on first use
    and the cache key holds the mode, so the suite can mix interpreted and compiled runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def oracle() -> ModuleType:
    """This module: random models, statsmodels / dense oracles, assert_close."""
    return sys.modules[__name__]
