"""model=ensemble's parts: the exact simplex solver against an independent optimiser, the
weights fitted on validation windows only (and minimising their error), the linear pool's
moments, streaming through the members' states, and the bundle."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from tsssm.anomaly.thresholds import QuantileThreshold
from tsssm.bundle import Bundle, load_bundle, save_bundle
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ModelError
from tsssm.models.base import Gaussian
from tsssm.models.ensemble import (
    ENSEMBLE_TARGET,
    Ensemble,
    EnsembleState,
    check_member_config,
    linear_pool,
    net_config_problem,
)
from tsssm.tasks.combine import (
    ErrorProducts,
    fit_combination,
    fit_scheme,
    quadratic_error,
    simplex_weights,
    split_origins,
)
from tsssm.tasks.evaluate import forecast_origins

KALMAN = "tsssm.models.kalman.KalmanForecaster"
CONTEXT, H = 16, 6


def _scipy_simplex(G: np.ndarray) -> float:
    """The oracle: SLSQP from several starts on min w'Gw, w >= 0, sum w = 1 (its value)."""
    K = len(G)
    best = np.inf
    rng = np.random.default_rng(1)
    for start in [np.full(K, 1 / K), *np.eye(K), *rng.dirichlet(np.ones(K), 5)]:
        res = minimize(lambda w: w @ G @ w, start, jac=lambda w: 2 * G @ w, method="SLSQP",
                       bounds=[(0, 1)] * K,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                       options={"ftol": 1e-14, "maxiter": 500})
        best = min(best, float(res.x @ G @ res.x))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_simplex_weights_are_the_constrained_minimiser(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 6))
    n = int(rng.integers(K, 40))  # n < K gives a singular G
    n = n if seed % 3 else K - 1
    E = rng.normal(size=(n, K)) * rng.uniform(0.2, 3.0, K) + rng.normal(size=(n, 1))
    G = E.T @ E
    w = simplex_weights(G)
    assert w.shape == (K,) and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w @ G @ w <= _scipy_simplex(G) * (1 + 1e-7) + 1e-12


def test_simplex_weights_brute_force_two_members():
    rng = np.random.default_rng(3)
    E = rng.normal(size=(200, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]])
    G = E.T @ E
    grid = np.linspace(0, 1, 100_001)
    values = grid**2 * G[0, 0] + 2 * grid * (1 - grid) * G[0, 1] + (1 - grid) ** 2 * G[1, 1]
    w = simplex_weights(G)
    assert w[0] == pytest.approx(grid[np.argmin(values)], abs=1e-4)
    # a dominated member gets exactly zero
    G2 = np.array([[1.0, 1.0], [1.0, 4.0]])  # member 2 = member 1 + independent noise
    np.testing.assert_array_equal(simplex_weights(G2), [1.0, 0.0])


def test_schemes_minimise_their_own_criterion():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(5, 50, 3)) * np.array([[1, 2, 3], [3, 2, 1], [1, 1, 1], [2, 1, 2],
                                                 [1, 3, 1]])[:, None]  # (H, n, K)
    G = np.einsum("hnj,hnk->hjk", E, E)
    one, per = fit_scheme(G, "one"), fit_scheme(G, "per_lead")
    assert np.allclose(one, one[0]) and not np.allclose(per, per[0])
    # per lead is the best of all weightings lead by lead; one vector the best single one
    assert quadratic_error(G, per) <= quadratic_error(G, one) + 1e-9
    for h in range(5):
        assert per[h] @ G[h] @ per[h] == pytest.approx(_scipy_simplex(G[h]), rel=1e-6)
    blocks = fit_scheme(G, "blocks", blocks=2)
    assert quadratic_error(G, per) <= quadratic_error(G, blocks) <= quadratic_error(G, one) + 1e-9


def test_split_origins_leaves_a_gap_of_one_horizon():
    origins = np.arange(100, 200)
    fit, gap, hold = split_origins(origins, 0.3, horizon=6)
    assert len(hold) == 30 and len(gap) == 6 and len(fit) == 64
    assert fit[-1] + 6 <= hold[0]  # no fitting target row is a held-out target row
    np.testing.assert_array_equal(np.concatenate([fit, gap, hold]), origins)


# -- the linear pool ------------------------------------------------------------------------
def test_linear_pool_has_the_mixture_moments():
    rng = np.random.default_rng(0)
    K, B, T, C = 3, 2, 5, 4
    mu = rng.normal(size=(K, B, T, C))
    var = rng.uniform(0.1, 2.0, size=(K, B, T, C))
    w = np.array([0.2, 0.5, 0.3])
    preds = [Gaussian(torch.tensor(mu[k]), torch.tensor(var[k])) for k in range(K)]
    got = linear_pool(preds, torch.tensor(w))
    # the mixture's moments straight from their definition: E[y] and E[y^2] - E[y]^2
    m1 = np.einsum("k,kbtc->btc", w, mu)
    m2 = np.einsum("k,kbtc->btc", w, var + mu**2)
    np.testing.assert_allclose(got.mean.numpy(), m1, rtol=1e-12)
    np.testing.assert_allclose(got.var.numpy(), m2 - m1**2, rtol=1e-10)
    assert got.cov is None
    # ... and by sampling the mixture
    n = 400_000
    comp = rng.choice(K, size=n, p=w)
    draws = mu[comp, 0, 0, 0] + np.sqrt(var[comp, 0, 0, 0]) * rng.normal(size=n)
    assert draws.var() == pytest.approx(got.var[0, 0, 0].item(), rel=0.02)
    # one weight set per step: each step pooled with its own row
    W = rng.dirichlet(np.ones(K), size=T)  # (T, K)
    got_t = linear_pool(preds, torch.tensor(W))
    for t in range(T):
        row = linear_pool([Gaussian(p.mean[:, t:t + 1], p.var[:, t:t + 1]) for p in preds],
                          torch.tensor(W[t]))
        np.testing.assert_allclose(got_t.var[:, t:t + 1].numpy(), row.var.numpy(), rtol=1e-12)
    # full covariances pool to the mixture's covariance, whose diagonal is the pooled variance
    A = rng.normal(size=(K, B, T, C, C))
    cov = A @ np.swapaxes(A, -1, -2) + np.eye(C)
    full = [Gaussian(torch.tensor(mu[k]), torch.tensor(np.diagonal(cov[k], 0, -2, -1).copy()),
                     torch.tensor(cov[k])) for k in range(K)]
    pooled = linear_pool(full, torch.tensor(w))
    expect = np.einsum("k,kbtij->btij", w, cov + mu[..., :, None] * mu[..., None, :]) \
        - m1[..., :, None] * m1[..., None, :]
    np.testing.assert_allclose(pooled.cov.numpy(), expect, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diagonal(pooled.cov.numpy(), 0, -2, -1), pooled.var.numpy(),
                               rtol=1e-9)


# -- an ensemble of two Kalman models on synthetic data -------------------------------------
MEMBERS = [
    {"name": "level", "net": {"_target_": KALMAN, "components": ["level"]}},
    {"name": "trend", "net": {"_target_": KALMAN, "components": ["level", "trend"]}},
    {"name": "ar", "net": {"_target_": KALMAN, "components": ["level", "ar"]}},
]


def _ensemble(members=MEMBERS) -> Ensemble:
    torch.manual_seed(0)
    ens = Ensemble(n_channels=2, members=members, horizon=H)
    with torch.no_grad():  # different noise levels: the members forecast differently
        for i, m in enumerate(ens.members):
            m.theta.add_(torch.randn_like(m.theta) * 0.5 + i * 0.7)
    return ens.eval()


def _data(seed=0, test=None):
    rng = np.random.default_rng(seed)
    t = np.arange(900)
    values = np.stack([np.sin(t / 9) + 0.01 * t, np.cos(t / 5)], 1)
    values = values + np.cumsum(rng.normal(scale=0.1, size=(900, 2)), 0)
    values = values.astype(np.float32)
    if test is not None:
        values[700:] = test
    part = SimpleNamespace(stream=SimpleNamespace(values=values),
                           rows=lambda s: {"train": (0, 500), "val": (500, 700),
                                           "test": (700, 900)}[s],
                           exog=lambda start=0, stop=None: (None, None))
    return SimpleNamespace(parts=[part])


def test_fitted_weights_minimise_the_validation_error_and_never_see_test():
    ens, data = _ensemble(), _data()
    fit = fit_combination(ens, data, CONTEXT, H, weights="per_lead", holdout=0.0)
    W = ens.horizon_weights.numpy()
    assert W.shape == (H, 3) and (W >= 0).all()
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    # the oracle: every member's validation forecasts, and per lead the best convex weights
    # by SLSQP on the squared error itself
    part = data.parts[0]
    means, target = [], None
    for m in ens.members:
        pred, target, _ = forecast_origins(m, part.stream.values, part.rows("val"), CONTEXT, H, 1)
        means.append(pred.mean.double().numpy())
    E = np.stack(means) - target[None]  # (K, N, H, C)
    for h in range(H):
        e = E[:, :, h].reshape(3, -1)
        G = e @ e.T
        assert W[h] @ G @ W[h] <= _scipy_simplex(G) * (1 + 1e-7)
    # the pooled mean's validation MSE is what the fit reports, and no member alone beats it
    pooled = np.einsum("hk,knhc->nhc", W, np.stack(means))
    assert fit.val_mse == pytest.approx(((pooled - target) ** 2).mean(), rel=1e-9)
    assert fit.val_mse <= ((E**2).mean(axis=(1, 2, 3))).min() + 1e-12
    # the test rows changed beyond recognition: the same weights, to the last bit
    other = _ensemble()
    fit_combination(other, _data(test=1e3), CONTEXT, H, weights="per_lead", holdout=0.0)
    np.testing.assert_array_equal(other.horizon_weights.numpy(), W)
    np.testing.assert_array_equal(other.step_weights.numpy(), ens.step_weights.numpy())


def test_auto_chooses_the_scheme_on_held_out_validation_windows_only():
    ens = _ensemble()
    fit = fit_combination(ens, _data(), CONTEXT, H, weights="auto", holdout=0.3)
    assert set(fit.holdout_mse) == {"one", "per_lead", "blocks"}
    assert fit.scheme == min(fit.holdout_mse, key=fit.holdout_mse.get)
    assert fit.holdout_windows == round(0.3 * (200 - H + 1))
    again = _ensemble()
    fit2 = fit_combination(again, _data(test=np.nan), CONTEXT, H, weights="auto", holdout=0.3)
    assert fit2.scheme == fit.scheme and fit2.holdout_mse == fit.holdout_mse
    np.testing.assert_array_equal(again.horizon_weights.numpy(), ens.horizon_weights.numpy())


def test_error_products_skip_missing_targets():
    acc = ErrorProducts.zeros(2, 2)
    means = np.ones((2, 1, 2, 1))
    target = np.array([[[0.0], [np.nan]]])
    acc.add(means, target)
    np.testing.assert_array_equal(acc.n, [1, 0])
    np.testing.assert_array_equal(acc.G[1], 0.0)
    np.testing.assert_array_equal(acc.G[0], 1.0)


@torch.no_grad()
def test_forecast_is_the_pool_of_the_members_forecasts():
    ens, data = _ensemble(), _data()
    fit_combination(ens, data, CONTEXT, H, weights="per_lead", holdout=0.0)
    ctx = torch.from_numpy(data.parts[0].stream.values[None, 100:116])
    got = ens.forecast(ctx, H)
    each = [m.forecast(ctx, H) for m in ens.members]
    W = ens.horizon_weights
    mean = sum(W[:, k].view(1, H, 1) * each[k].mean.double() for k in range(3))
    second = sum(W[:, k].view(1, H, 1) * (each[k].var.double() + each[k].mean.double() ** 2)
                 for k in range(3))
    np.testing.assert_allclose(got.mean.numpy(), mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.var.numpy(), (second - mean**2).numpy(), rtol=1e-4)
    with pytest.raises(ModelError, match="horizon"):
        ens.forecast(ctx, H + 1)


@torch.no_grad()
def test_one_step_in_chunks_equals_the_whole_stream():
    ens = _ensemble()
    ens.set_weights(torch.full((H, 3), 1 / 3, dtype=torch.float64),
                    torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), "one")
    y = torch.from_numpy(_data().parts[0].stream.values[None, :300].copy())
    y[0, 40:45, 1] = float("nan")  # missing values are skipped by every member
    whole, state = ens.one_step(y)
    assert isinstance(state, EnsembleState) and len(state.members) == 3
    a, s = ens.one_step(y[:, :117])
    b, s = ens.one_step(y[:, 117:250], s)
    c, _ = ens.one_step(y[:, 250:], s)
    for field in ("mean", "var"):
        chunked = torch.cat([getattr(a, field), getattr(b, field), getattr(c, field)], 1)
        torch.testing.assert_close(chunked, getattr(whole, field), rtol=1e-6, atol=1e-7)
    assert torch.isfinite(whole.mean).all() and (whole.var > 0).all()
    with pytest.raises(ModelError, match="state"):
        ens.one_step(y, state=("not", "it"))


@torch.no_grad()
def test_bundle_round_trip_keeps_members_and_weights(tmp_path):
    ens, data = _ensemble(), _data()
    fit_combination(ens, data, CONTEXT, H, weights="per_lead", holdout=0.0)
    ens.var_calibration.set(torch.linspace(0.5, 2.0, H))
    net_cfg = {"_target_": ENSEMBLE_TARGET, "_recursive_": False, "_convert_": "all",
               "horizon": H, "scheme": "per_lead", "members": MEMBERS}
    values = data.parts[0].stream.values
    bundle = Bundle(model=ens, net_config=net_cfg, model_name="ensemble", channels=["a", "b"],
                    scaler=StandardScaler.fit([values[:500]], ["a", "b"]),
                    per_stream_scaling=False, threshold=QuantileThreshold(0.99).fit(
                        np.arange(100.0)), score_kind="nll", data_config={})
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b")).model
    assert isinstance(loaded, Ensemble) and loaded.names == ["level", "trend", "ar"]
    ctx = torch.from_numpy(values[None, 100:116])
    for x, y in zip(ens.forecast(ctx, H), loaded.forecast(ctx, H)):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(loaded.horizon_weights, ens.horizon_weights, rtol=0, atol=0)

    # a member that names a class outside tsssm is refused before anything is built
    import json
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    meta["net_config"]["members"][1]["net"]["_target_"] = "os.system"
    (tmp_path / "b" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="not a tsssm model class"):
        load_bundle(tmp_path / "b")


def test_members_are_checked():
    with pytest.raises(ModelError, match="twice"):
        Ensemble(2, [MEMBERS[0], MEMBERS[0]], horizon=H)
    with pytest.raises(ModelError, match="ensemble itself"):
        Ensemble(2, [{"name": "e", "net": {"_target_": ENSEMBLE_TARGET}}], horizon=H)
    with pytest.raises(ModelError, match="empty"):
        Ensemble(2, [], horizon=H)
    with pytest.raises(ValueError, match="simplex|summing"):
        _ensemble().set_weights(torch.ones(H, 3), torch.ones(3) / 3, "one")


def test_net_config_problem_is_the_one_check_for_bundles_and_members():
    # the checker names the first problem; bundle and member messages word it (tsssm.bundle)
    assert net_config_problem(MEMBERS[0]["net"]) is None
    assert net_config_problem([1]) == ("mapping", None)
    assert net_config_problem({"_target_": "os.system"}) == ("target", "os.system")
    assert net_config_problem({"x": 1}) == ("target", None)
    net = {"_target_": "tsssm.models.kalman.KalmanForecaster", "a": 1, "b": {"_target_": "x"}}
    assert net_config_problem(net) == ("nested", "b")
    # an ensemble is a tsssm model (a bundle may hold one) but never a member
    assert net_config_problem({"_target_": ENSEMBLE_TARGET}) is None
    with pytest.raises(ModelError, match="ensemble member 'e': net.b names a class"):
        check_member_config("e", net)
    with pytest.raises(ModelError, match="ensemble member 'e': its net config must be a mapping"):
        check_member_config("e", None)
