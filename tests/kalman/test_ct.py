"""Continuous-time models: ZOH discretisation against scipy, gradients, and the filter on
irregular grids against the discrete model built step by step (and the dense joint Gaussian)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from scipy.signal import cont2discrete

from tsssm.errors import DataError, ModelError
from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.kalman.ct import (
    ContinuousLinearSSM,
    continuous_lyapunov,
    ct_filter,
    ct_forecast,
    ct_loglik,
    ct_sample,
    ct_smoother,
    discretize,
    discretize_steps,
    steps_from_times,
    zoh,
)
from tsssm.kalman.ct_fit import Segment, ct_standard_errors, derived_standard_errors, fit_ct_mle
from tsssm.kalman.ct_models import CTStructuralModel

t64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731


def random_ct(rng, n, p, k, *, stable=True):
    A = rng.normal(size=(n, n))
    if stable:
        A = A - (np.abs(np.linalg.eigvals(A)).max() + 0.3) * np.eye(n)
    L = rng.normal(size=(n, n))
    Lr = rng.normal(size=(p, p))
    return {
        "A": A, "B": rng.normal(size=(n, k)), "a": 0.3 * rng.normal(size=n),
        "Qc": L @ L.T / n + 0.1 * np.eye(n), "C": rng.normal(size=(p, n)),
        "D": rng.normal(size=(p, k)), "d": rng.normal(size=p),
        "R": Lr @ Lr.T / p + 0.2 * np.eye(p), "m0": rng.normal(size=n),
        "P0": L.T @ L / n + np.eye(n),
    }


def to_ct(m):
    return ContinuousLinearSSM(**{k: t64(v) for k, v in m.items()})


def van_loan(A, Qc, dt):
    n = A.shape[0]
    E = sla.expm(np.block([[-A, Qc], [np.zeros((n, n)), A.T]]) * dt)
    F = E[n:, n:].T
    return F, F @ E[:n, n:]


def relerr(a, b):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


# ------------------------------------------------------------------------------ discretisation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zoh_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n, k = 3, 2
    m = random_ct(rng, n, 1, k)
    A = m["A"] / np.linalg.norm(m["A"], 1)  # ||A|| dt <= 2: plain Van Loan is accurate there
    Bc = np.concatenate([m["B"], m["a"][:, None]], 1)
    steps = np.array([0.05, 0.5, 1.0, 2.0])
    d = zoh(t64(A), t64(steps), t64(m["Qc"]), t64(Bc))  # batched over the steps
    for i, dt in enumerate(steps):
        Fd, Gd, *_ = cont2discrete((A, Bc, np.eye(n), np.zeros((n, k + 1))), dt, method="zoh")
        F_vl, Q_vl = van_loan(A, m["Qc"], dt)
        assert relerr(d.F[i], Fd) < 1e-10
        assert relerr(d.G[i], Gd) < 1e-10
        assert relerr(d.F[i], F_vl) < 1e-10
        assert relerr(d.Q[i], Q_vl) < 1e-10
        assert torch.equal(d.Q[i], d.Q[i].mT)


def test_zoh_long_steps_stay_exact():
    """Steps with ||A|| dt up to 200 are discretised at halved steps and doubled back: Q still
    equals the exact P - F P F' (P stationary), where one Van Loan exponential loses digits."""
    rng = np.random.default_rng(3)
    m = random_ct(rng, 3, 1, 1)
    A, Qc = m["A"], m["Qc"]
    P = sla.solve_continuous_lyapunov(A, -Qc)
    for dt in (5.0, 20.0, 60.0):
        d = zoh(t64(A), t64(dt), t64(Qc))
        F = sla.expm(A * dt)
        assert relerr(d.F, F) < 1e-10 or np.abs(d.F.numpy() - F).max() < 1e-14
        assert relerr(d.Q, P - F @ P @ F.T) < 1e-10
    assert np.isfinite(zoh(t64(A), t64(1e4), t64(Qc)).Q.numpy()).all()


def test_zoh_gradcheck():
    rng = np.random.default_rng(4)
    m = random_ct(rng, 2, 1, 1)
    A = t64(m["A"]).requires_grad_(True)
    Qc = t64(m["Qc"]).requires_grad_(True)
    Bc = t64(m["B"]).requires_grad_(True)
    for dt in (0.7, 9.0):  # 9.0: through the halving and doubling
        step = torch.tensor(dt, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda A, Q, B, s: tuple(zoh(A, s, Q, B)),
                                        (A, Qc, Bc, step))


def test_discretize_gradcheck_through_the_cache():
    rng = np.random.default_rng(5)
    m = random_ct(rng, 2, 1, 1)
    dt = t64(rng.choice([0.5, 1.0, 2.0], size=(3, 7)))
    u = t64(rng.normal(size=(3, 7, 1)))
    # random projections of the outputs: a few scalars, every entry weighted
    wF, wQ, wc = (t64(rng.normal(size=s)) for s in ((3, 7, 2, 2), (3, 7, 2, 2), (3, 7, 2)))

    def f(A, Qc, B):
        ct = to_ct(m)._replace(A=A, Qc=Qc, B=B)
        ssm = discretize(ct, dt, u)
        return (ssm.F * wF).sum(), (ssm.Q * wQ).sum(), (ssm.c * wc).sum()

    args = tuple(t64(m[k]).requires_grad_(True) for k in ("A", "Qc", "B"))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_discretize_steps_gathers_per_distinct_step():
    """Model batch (C,) against grids (B, 1, T): every entry equals its own discretisation."""
    rng = np.random.default_rng(6)
    C, B_, T = 2, 3, 9
    ms = [random_ct(rng, 2, 1, 1) for _ in range(C)]
    ct = ContinuousLinearSSM(**{k: torch.stack([t64(m[k]) for m in ms]) for k in ms[0]})
    dt = t64(rng.choice([0.5, 1.0, 2.0, 3.5], size=(B_, 1, T)))
    d = discretize_steps(ct, dt)
    assert d.F.shape == (B_, C, T, 2, 2) and d.G.shape == (B_, C, T, 2, 2)
    for b in range(B_):
        for c in range(C):
            for t in range(T):
                one = zoh(ct.A[c], dt[b, 0, t], ct.Qc[c], torch.cat([ct.B[c], ct.a[c, :, None]], 1))
                assert torch.allclose(d.F[b, c, t], one.F, rtol=0, atol=1e-14)
                assert torch.allclose(d.Q[b, c, t], one.Q, rtol=0, atol=1e-14)
                assert torch.allclose(d.G[b, c, t], one.G, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ filtering
def stepwise_discrete(m, times, u):
    """The discrete model for the grid, built step by step with scipy (numpy arrays)."""
    T, n = len(times), m["A"].shape[0]
    Bc = np.concatenate([m["B"], m["a"][:, None]], 1)
    F = np.zeros((T, n, n))
    Q = np.zeros((T, n, n))
    c = np.zeros((T, n))
    d = np.zeros((T, m["C"].shape[0]))
    F[0] = np.eye(n)
    for t in range(T):
        d[t] = m["D"] @ u[t] + m["d"]
        if t == 0:
            continue
        dt = times[t] - times[t - 1]
        Fd, Gd, *_ = cont2discrete((m["A"], Bc, np.eye(n), np.zeros((n, Bc.shape[1]))), dt,
                                   method="zoh")
        F[t] = Fd
        Q[t] = van_loan(m["A"], m["Qc"], dt)[1]
        c[t] = Gd @ np.append(u[t - 1], 1.0)  # ZOH: the input sampled at the step's start
    return {"F": F, "H": m["C"], "Q": Q, "R": m["R"], "m0": m["m0"], "P0": m["P0"], "c": c,
            "d": d}


@pytest.mark.parametrize("seed", [0, 1])
def test_irregular_grid_loglik_equals_stepwise_discrete_model(seed, oracle):
    rng = np.random.default_rng(seed)
    n, p, k, T = 3, 2, 2, 40
    m = random_ct(rng, n, p, k)
    m["A"] = m["A"] / np.linalg.norm(m["A"], 1)
    times = np.cumsum(rng.choice([0.5, 1.0, 2.0], size=T))
    u = rng.normal(size=(T, k))
    y = rng.normal(size=(T, p))
    y[rng.random(size=(T, p)) < 0.15] = np.nan
    disc = stepwise_discrete(m, times, u)
    tv = ("F", "Q", "c", "d")
    ref = kalman_filter(LinearGaussianSSM(**{k_: t64(v) for k_, v in disc.items()},
                                          time_varying=tv), t64(y))
    dense = oracle.dense_loglik(disc, y, time_varying=tv)
    dt = steps_from_times(t64(times))
    for method in ("sequential", "parallel", "loop"):
        res = ct_filter(to_ct(m), t64(y), dt, t64(u), method=method)
        assert abs(float(res.loglik - ref.loglik)) < 1e-10 * abs(float(ref.loglik)), method
        oracle.assert_close(res.filtered_mean, ref.filtered_mean, rtol=1e-10, what=method)
    assert abs(float(ct_loglik(to_ct(m), t64(y), dt, t64(u))) - dense) < 1e-10 * abs(dense)


def test_constant_step_equals_evenly_sampled_filter():
    rng = np.random.default_rng(7)
    n, p, T, step = 2, 1, 200, 0.8
    m = random_ct(rng, n, p, 1)
    m = {k: v for k, v in m.items() if k not in ("B", "D", "a")}
    ct = to_ct(m)
    y = t64(rng.normal(size=(4, T, p)))
    dt = torch.full((T,), step, dtype=torch.float64)
    d = zoh(ct.A, torch.tensor(step, dtype=torch.float64), ct.Qc)
    even = LinearGaussianSSM(d.F, ct.C, d.Q, ct.R, ct.m0, ct.P0, d=ct.d)
    ref = kalman_filter(even, y)  # time-invariant: the steady-state sequential filter
    for method in ("sequential", "parallel"):
        res = ct_filter(ct, y, dt, method=method)
        err = (res.loglik - ref.loglik).abs().max() / ref.loglik.abs().max()
        assert float(err) < 1e-10, method


def test_smoother_matches_statsmodels_on_the_irregular_grid(oracle):
    rng = np.random.default_rng(8)
    m = random_ct(rng, 2, 1, 1)
    T = 30
    times = np.cumsum(rng.choice([0.5, 1.0, 2.0], size=T))
    u = rng.normal(size=(T, 1))
    y = rng.normal(size=(T, 1))
    y[5:8] = np.nan
    sm = ct_smoother(to_ct(m), t64(y), steps_from_times(t64(times)), t64(u))
    disc = stepwise_discrete(m, times, u)
    ref = oracle.statsmodels_smooth(disc, y, time_varying=("F", "Q", "c", "d"))
    oracle.assert_close(sm.mean, ref.smoothed_state.T, rtol=1e-8, what="smoothed mean")
    oracle.assert_close(sm.cov, np.moveaxis(ref.smoothed_state_cov, -1, 0), rtol=1e-8,
                        what="smoothed cov")


def test_forecast_at_arbitrary_times_equals_filtering_missing_samples():
    """A forecast to times s + dt_1, s + dt_1 + dt_2, ... is what the filter predicts at
    unobserved samples placed there."""
    rng = np.random.default_rng(9)
    m = random_ct(rng, 3, 2, 1)
    ct = to_ct(m)
    T, h = 25, 4
    dt = t64(np.concatenate([[0.0], rng.choice([0.5, 1.0, 2.0], size=T - 1)]))
    ahead = t64([0.3, 1.7, 0.05, 4.0])
    u = t64(rng.normal(size=(T + h, 1)))
    y = t64(rng.normal(size=(T, 2)))
    res = ct_filter(ct, y, dt, u[:T])
    fc = ct_forecast(ct, res, ahead, u[T - 1:])
    y_ext = torch.cat([y, torch.full((h, 2), float("nan"), dtype=torch.float64)])
    ext = ct_filter(ct, y_ext, torch.cat([dt, ahead]), u)
    assert torch.allclose(fc.obs_mean, ext.predicted_obs_mean[T:], rtol=1e-10, atol=1e-12)
    assert torch.allclose(fc.obs_cov, ext.predicted_obs_cov[T:], rtol=1e-10, atol=1e-12)
    assert torch.allclose(fc.state_mean, ext.predicted_mean[T:], rtol=1e-10, atol=1e-12)


def test_sample_and_errors():
    rng = np.random.default_rng(10)
    ct = to_ct(random_ct(rng, 2, 1, 1))
    dt = torch.full((50,), 0.5, dtype=torch.float64)
    u = torch.zeros(50, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, y = ct_sample(ct, dt, u, batch_shape_=(3,), generator=g)
    assert x.shape == (3, 50, 2) and y.shape == (3, 50, 1) and torch.isfinite(y).all()
    with pytest.raises(DataError, match="negative"):
        ct_loglik(ct, y, -dt, u)
    with pytest.raises(DataError, match="pass u"):
        ct_loglik(ct, y, dt)
    with pytest.raises(DataError, match="cannot be missing"):
        ct_loglik(ct, y, dt, torch.full_like(u, float("nan")))
    with pytest.raises(ModelError, match="core shape"):
        discretize(ct._replace(C=torch.zeros(1, 3, dtype=torch.float64)), dt, u)


# ------------------------------------------------------------------------------ components
def test_components_have_their_closed_forms():
    dt = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    q, qs, theta_ou, var_ou = 0.3, 0.02, 0.7, 0.5
    lvl = CTStructuralModel(("level", "trend"))
    th = t64([math.log(q), math.log(qs), 0.0])
    d = discretize_steps(lvl.to_ct(th), dt)
    for i, s in enumerate(dt.tolist()):
        Q = qs * np.array([[s**3 / 3, s**2 / 2], [s**2 / 2, s]]) + q * np.diag([s, 0.0])
        assert np.allclose(d.Q[i].numpy(), Q, rtol=1e-12, atol=1e-15)
        assert np.allclose(d.F[i].numpy(), [[1.0, s], [0.0, 1.0]], atol=1e-15)
    ou = CTStructuralModel(("ou",))
    th = t64([math.log(theta_ou), math.log(var_ou), 0.0])
    d = discretize_steps(ou.to_ct(th), dt)
    s = dt.numpy()
    assert np.allclose(d.F[:, 0, 0].numpy(), np.exp(-theta_ou * s), rtol=1e-13)
    assert np.allclose(d.Q[:, 0, 0].numpy(),
                       var_ou / (2 * theta_ou) * (1 - np.exp(-2 * theta_ou * s)), rtol=1e-12)
    assert math.isclose(float(ou.derived(th)["ou.sd"]), math.sqrt(var_ou / (2 * theta_ou)))
    osc = CTStructuralModel(("oscillator",))
    w2, g, qf = 0.4, 0.15, 0.02
    ct = osc.to_ct(t64([math.log(w2), math.log(g), math.log(qf), 0.0]))
    assert np.allclose(ct.A.numpy(), [[0, 1], [-w2, -g]])
    P = np.diag([qf / (2 * g * w2), qf / (2 * g)])  # stationary law of the damped oscillator
    assert np.allclose(ct.P0.numpy(), P, rtol=1e-12)
    assert np.allclose(continuous_lyapunov(ct.A, ct.Qc).numpy(), P, rtol=1e-12)


def test_inputs_enter_the_driven_state_and_feedthrough():
    model = CTStructuralModel(("level", "oscillator"), n_inputs=2, feedthrough=True)
    assert model.param_names[-5:] == ("gain_oscillator_0", "gain_oscillator_1",
                                      "feedthrough_0", "feedthrough_1", "log_var_obs")
    th = torch.zeros(3, model.n_params, dtype=torch.float64)
    th[:, 4:6] = t64([1.5, -2.0])
    th[:, 6:8] = t64([0.25, 0.5])
    ct = model.to_ct(th)
    assert ct.B.shape == (3, 3, 2) and ct.D.shape == (3, 1, 2)
    assert torch.equal(ct.B[0, 2], t64([1.5, -2.0])) and ct.B[0, :2].abs().sum() == 0
    assert torch.equal(ct.D[1, 0], t64([0.25, 0.5]))


def test_mle_recovers_an_ou_process_within_three_standard_errors():
    torch.manual_seed(0)
    model = CTStructuralModel(("ou",))
    truth = t64([math.log(0.5), math.log(0.8), math.log(0.1**2)])
    g = torch.Generator().manual_seed(3)
    T = 1500
    dt = t64(np.random.default_rng(3).choice([0.5, 1.0, 2.0], size=T))
    _, y = ct_sample(model.to_ct(truth), dt, generator=g)
    segs = [Segment(y, dt)]
    res = fit_ct_mle(model.to_ct, segs, model.initial_params(y, dt))
    assert res.converged
    _, cov = ct_standard_errors(model.to_ct, res.theta, segs)
    est = derived_standard_errors(model.derived, res.theta, cov)
    true = model.derived(truth)
    for name in ("ou.rate", "ou.sd"):
        z = abs(float(est[name].value - true[name])) / float(est[name].se)
        assert z < 3, (name, float(est[name].value), float(true[name]), z)
