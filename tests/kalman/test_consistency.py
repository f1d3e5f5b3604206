"""Internal consistency: dense joint density, parallel == sequential, batched == looped,
gradients, sampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.errors import DataError, ModelError, NumericalError
from tsssm.kalman import LinearGaussianSSM, kalman_filter, rts_smoother, sample
from tsssm.kalman.scan import associative_scan, linear_recurrence

METHODS = ["sequential", "loop", "sqrt", "parallel"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("tv", [(), ("F", "H", "Q", "R", "d", "c")])
def test_loglik_equals_dense_joint_density(oracle, method, missing, tv):
    rng = np.random.default_rng(10)
    T, n, p = 7, 3, 2
    model = oracle.random_model(rng, n, p, T=T, time_varying=tv, intercepts=True)
    y = rng.normal(size=(T, p))
    if missing:
        y[1, 0] = y[3] = y[6, 1] = np.nan
    res = kalman_filter(oracle.to_ssm(model, tv), oracle.t64(y), method=method)
    oracle.assert_close(res.loglik, oracle.dense_loglik(model, y, tv), rtol=1e-10)


def test_all_missing_gives_zero_loglik_and_prior_predictions(oracle):
    rng = np.random.default_rng(11)
    model = oracle.random_model(rng, 2, 2)
    y = np.full((5, 2), np.nan)
    res = kalman_filter(oracle.to_ssm(model), oracle.t64(y))
    assert float(res.loglik) == 0.0
    assert torch.isfinite(res.predicted_obs_mean).all() and (res.nis == 0).all()
    oracle.assert_close(res.filtered_mean[0], model["m0"])


def _long_problem(T: int, seed: int = 12):
    g = torch.Generator().manual_seed(seed)
    F = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    ssm = LinearGaussianSSM(
        F, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        torch.diag(torch.tensor([0.05, 0.001], dtype=torch.float64)),
        torch.tensor([[0.5]], dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 4.0,
    )
    _, y = sample(ssm, T, generator=g)
    y[torch.rand(T, generator=g) < 0.05] = float("nan")
    return ssm, y


@pytest.mark.parametrize("T", [1, 2, 3, 17, 500])
def test_parallel_equals_sequential(T):
    ssm, y = _long_problem(T)
    seq = kalman_filter(ssm, y, method="loop")
    par = kalman_filter(ssm, y, method="parallel")
    for name in ("filtered_mean", "filtered_cov", "predicted_mean", "predicted_cov", "log_liks"):
        a, b = getattr(par, name), getattr(seq, name)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max())), name
    assert abs(float(par.loglik - seq.loglik)) <= 1e-10 * abs(float(seq.loglik))
    s_seq = rts_smoother(ssm, seq, method="loop")
    s_par = rts_smoother(ssm, par, method="parallel")
    for a, b in zip(s_par, s_seq):
        scale = float(b.abs().max()) if b.numel() else 0.0
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-9 * scale)


def _assert_parallel_exact(y, ssm, **seq_kwargs):
    seq = kalman_filter(ssm, y, method="sequential", **seq_kwargs)
    par = kalman_filter(ssm, y, method="parallel")
    rel = abs(float(par.loglik - seq.loglik)) / abs(float(seq.loglik))
    assert rel <= 1e-9, rel
    scale = float(seq.filtered_mean.abs().max())
    assert torch.allclose(par.filtered_mean, seq.filtered_mean, rtol=1e-9, atol=1e-9 * scale)
    assert torch.allclose(par.filtered_cov, seq.filtered_cov, rtol=1e-9, atol=1e-12)


def test_parallel_loglik_exact_at_long_T():
    """The issue's bar: float64, T = 10^5, 1e-9 relative (dynamax drifts by hundreds of nats)."""
    ssm, y = _long_problem(100_000, seed=13)
    _assert_parallel_exact(torch.nan_to_num(y, nan=0.0), ssm)


@pytest.mark.slow
def test_parallel_loglik_exact_at_long_T_with_missing():
    """Same with 5% missing steps, against the full step-by-step recursion (slow: ~10 s)."""
    ssm, y = _long_problem(100_000, seed=13)
    _assert_parallel_exact(y, ssm, steady_state=False)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_loop_over_series(oracle, method):
    rng = np.random.default_rng(14)
    S, T, n, p = 3, 16, 3, 2
    models = [oracle.random_model(rng, n, p, intercepts=True) for _ in range(S)]
    ys = rng.normal(size=(S, T, p))
    ys[rng.random((S, T, p)) < 0.2] = np.nan
    stacked = {k: np.stack([m[k] for m in models]) for k in models[0]}
    batch = kalman_filter(oracle.to_ssm(stacked), oracle.t64(ys), method=method)
    sm_batch = rts_smoother(oracle.to_ssm(stacked), batch)
    shared = kalman_filter(oracle.to_ssm(models[0]), oracle.t64(ys), method=method)
    for i in range(S):
        one = kalman_filter(oracle.to_ssm(models[i]), oracle.t64(ys[i]), method=method)
        sm_one = rts_smoother(oracle.to_ssm(models[i]), one)
        for name in ("filtered_mean", "filtered_cov", "log_liks", "predicted_obs_cov", "nis"):
            oracle.assert_close(getattr(batch, name)[i], getattr(one, name).numpy(), rtol=1e-12,
                                what=name)
        oracle.assert_close(sm_batch.cov[i], sm_one.cov.numpy(), rtol=1e-12)
        # one model shared by all series (batch only on y)
        shared_one = kalman_filter(oracle.to_ssm(models[0]), oracle.t64(ys[i]), method=method)
        oracle.assert_close(shared.loglik[i], float(shared_one.loglik), rtol=1e-12)


@pytest.mark.parametrize("method", ["sequential", "loop", "parallel", "sqrt"])
def test_gradcheck_loglik(oracle, method):
    rng = np.random.default_rng(15)
    T, n, p = 5, 2, 2
    model = oracle.random_model(rng, n, p, intercepts=True)
    y = oracle.t64(rng.normal(size=(T, p)))
    y[2, 1] = float("nan")
    base = {k: oracle.t64(v) for k, v in model.items()}
    names = ["F", "H", "m0", "d", "c"]

    def fn(F, H, m0, d, c, Lq, Lr, Lp):
        ssm = LinearGaussianSSM(F, H, Lq @ Lq.mT + 0.1 * torch.eye(n, dtype=F.dtype),
                                Lr @ Lr.mT + 0.1 * torch.eye(p, dtype=F.dtype), m0,
                                Lp @ Lp.mT + 0.5 * torch.eye(n, dtype=F.dtype), d=d, c=c)
        res = kalman_filter(ssm, y, method=method)
        sm = rts_smoother(ssm, res)
        return res.loglik + 0.1 * sm.mean.sum() + 0.1 * sm.lag_one_cov.sum()

    inputs = [base[k].clone().requires_grad_(True) for k in names] + [
        torch.tensor(rng.normal(size=(k, k)), requires_grad=True) for k in (n, p, n)
    ]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradients_through_steady_state_shortcut():
    """The shortcut truncates the Riccati recursion at its fixed point; gradients stay right."""
    ssm, y = _long_problem(400, seed=16)
    y = torch.nan_to_num(y, nan=0.0)
    q = torch.tensor([0.05, 0.001], dtype=torch.float64, requires_grad=True)
    grads = []
    for steady in (True, False):
        ll = kalman_filter(ssm._replace(Q=torch.diag(q)), y, steady_state=steady).loglik
        grads.append(torch.autograd.grad(ll, q)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-8)


def test_sample_moments():
    """Sample mean and covariance of y_T match the filter's prior predictive moments."""
    ssm, _ = _long_problem(3)
    g = torch.Generator().manual_seed(17)
    _, y = sample(ssm, 6, batch_shape_=(40_000,), generator=g)
    empty = torch.full((6, 1), float("nan"), dtype=torch.float64)
    prior = kalman_filter(ssm, empty)
    mean, var = prior.predicted_obs_mean[:, 0], prior.predicted_obs_cov[:, 0, 0]
    z = (y[..., 0].mean(0) - mean) / (var / 40_000).sqrt()
    assert (z.abs() < 4.5).all(), z
    assert torch.allclose(y[..., 0].var(0), var, rtol=0.05)


def test_scan_primitives():
    g = torch.Generator().manual_seed(18)
    for T in (1, 2, 5, 64, 129, 1000):
        for n in (1, 3):
            A = torch.randn(T, n, n, generator=g, dtype=torch.float64) * 0.4
            b = torch.randn(2, T, n, generator=g, dtype=torch.float64)
            x0 = torch.randn(2, n, generator=g, dtype=torch.float64)
            x, ref = x0, []
            for t in range(T):
                x = (A[t] @ x.unsqueeze(-1)).squeeze(-1) + b[:, t]
                ref.append(x)
            ref = torch.stack(ref, -2)
            assert torch.allclose(linear_recurrence(A, b, x0), ref, atol=1e-12)
            Ac = A[0] / max(1.0, float(torch.linalg.matrix_norm(A[0], 2)))
            x, ref = x0, []
            for t in range(T):
                x = (Ac @ x.unsqueeze(-1)).squeeze(-1) + b[:, t]
                ref.append(x)
            ref = torch.stack(ref, -2)
            assert torch.allclose(linear_recurrence(Ac, b, x0, constant_A=True), ref, atol=1e-11)
    # a non-commutative operator: string concatenation order via matrix products
    M = torch.randn(37, 3, 3, generator=g, dtype=torch.float64)
    (out,) = associative_scan(lambda a, b: (b[0] @ a[0],), (M,))
    acc = M[0]
    for t in range(1, 37):
        acc = M[t] @ acc
        assert torch.allclose(out[t], acc, atol=1e-9)
    (rev,) = associative_scan(lambda a, b: (a[0] @ b[0],), (M,), reverse=True)
    acc = M[-1]
    for t in range(35, -1, -1):
        acc = M[t] @ acc
        assert torch.allclose(rev[t], acc, atol=1e-9)


def test_nan_never_passes(oracle):
    rng = np.random.default_rng(19)
    model = oracle.random_model(rng, 2, 1)
    y = oracle.t64(rng.normal(size=(10, 1)))
    bad = oracle.to_ssm(model)._replace(R=torch.tensor([[float("nan")]], dtype=torch.float64))
    for method in METHODS:
        with pytest.raises(NumericalError, match="not positive definite|not finite"):
            kalman_filter(bad, y, method=method)
    y_inf = y.clone()
    y_inf[3] = float("inf")
    with pytest.raises(DataError, match="inf"):
        kalman_filter(oracle.to_ssm(model), y_inf)


def test_clear_errors_for_bad_shapes(oracle):
    rng = np.random.default_rng(20)
    ssm = oracle.to_ssm(oracle.random_model(rng, 2, 2))
    with pytest.raises(DataError, match="channels"):
        kalman_filter(ssm, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(DataError, match="float32"):
        kalman_filter(ssm, torch.zeros(5, 2))
    with pytest.raises(ModelError, match="core shape"):
        kalman_filter(ssm._replace(R=torch.eye(3, dtype=torch.float64)),
                      torch.zeros(5, 2, dtype=torch.float64))
    with pytest.raises(ModelError, match="unknown filter method"):
        kalman_filter(ssm, torch.zeros(5, 2, dtype=torch.float64), method="magic")
    with pytest.raises(ModelError, match="CUDA"):
        kalman_filter(ssm, torch.zeros(5, 2, dtype=torch.float64), method="fused")
    with pytest.raises(DataError, match="time-varying"):
        kalman_filter(ssm._replace(F=ssm.F.expand(4, 2, 2), time_varying=("F",)),
                      torch.zeros(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("missing", [False, True])
def test_last_step_covariances_mode(p, missing):
    """covariances="last" changes nothing but the two state covariance fields."""
    g = torch.Generator().manual_seed(21)
    n = 3
    ssm = LinearGaussianSSM(
        torch.randn(n, n, dtype=torch.float64, generator=g) * 0.3,
        torch.randn(p, n, dtype=torch.float64, generator=g),
        torch.eye(n, dtype=torch.float64) * 0.1, torch.eye(p, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64),
    )
    y = torch.randn(4, 200, p, dtype=torch.float64, generator=g)
    if missing:
        y[torch.rand(4, 200, p, generator=g) < 0.2] = float("nan")
    full = kalman_filter(ssm, y)
    for method in ("sequential", "parallel"):
        last = kalman_filter(ssm, y, method=method, covariances="last")
        for name in full._fields:
            a, b = getattr(full, name), getattr(last, name)
            if name in ("predicted_cov", "filtered_cov"):
                a = a[..., -1:, :, :]
            assert a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-10), name
    with pytest.raises(ModelError, match="covariances='all'"):
        rts_smoother(ssm, last)
