"""Structural models (against statsmodels' UnobservedComponents / SARIMAX) and fitting."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from tsssm.errors import ConfigError, NumericalError
from tsssm.kalman import kalman_filter, sample
from tsssm.kalman.fit import fit_em, fit_mle, standard_errors, structural_loglik
from tsssm.kalman.models import StructuralModel, coefficients_to_pacf, pacf_to_coefficients


def test_pacf_transform_is_stationary_and_invertible():
    g = torch.Generator().manual_seed(30)
    raw = torch.randn(200, 4, generator=g, dtype=torch.float64) * 2
    phi = pacf_to_coefficients(raw)
    companion = torch.zeros(200, 4, 4, dtype=torch.float64)
    companion[:, 0, :] = phi
    companion[:, 1:, :-1] = torch.eye(3, dtype=torch.float64)
    assert (torch.linalg.eigvals(companion).abs() < 1).all()
    assert torch.allclose(coefficients_to_pacf(phi), raw, atol=1e-8)


def _uc_matrices(model: sm.tsa.UnobservedComponents, params: np.ndarray) -> dict[str, np.ndarray]:
    model.update(params)
    ssm = model.ssm
    sel = ssm["selection"]
    return {
        "F": ssm["transition"], "H": ssm["design"], "R": ssm["obs_cov"],
        "Q": sel @ ssm["state_cov"] @ sel.T,
    }


@pytest.mark.parametrize(
    ("ours", "uc_kwargs"),
    [
        (dict(components=("level",)), dict(level="local level")),
        (dict(components=("level", "trend")), dict(level="local linear trend")),
        (dict(components=("level", "seasonal"), seasonal_period=5, seasonal_kind="dummy"),
         dict(level="local level", seasonal=5)),
        (dict(components=("level", "trend", "seasonal"), seasonal_period=12, seasonal_harmonics=3),
         dict(level="local linear trend", freq_seasonal=[{"period": 12, "harmonics": 3}])),
        (dict(components=("level", "seasonal"), seasonal_period=6),
         dict(level="local level", freq_seasonal=[{"period": 6, "harmonics": 3}])),
    ],
)
def test_structural_matrices_match_unobserved_components(ours, uc_kwargs):
    model = StructuralModel(**ours)
    rng = np.random.default_rng(31)
    theta = torch.tensor(rng.normal(size=model.n_params), dtype=torch.float64)
    ssm = model.to_ssm(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uc = sm.tsa.UnobservedComponents(rng.normal(size=30), **uc_kwargs)
    # theirs: sigma2.irregular first, then the components in our order
    var = np.exp(theta.numpy())
    ref = _uc_matrices(uc, np.concatenate([var[-1:], var[:-1]]))
    if ref["F"].shape[-1] == model.n_states + 1:
        # an even period's Nyquist harmonic: statsmodels keeps its never-observed second state
        # (sin(pi) = 0), we drop it; the observed process is the same
        keep = np.arange(model.n_states)
        ref = {"F": ref["F"][np.ix_(keep, keep)], "H": ref["H"][:, keep],
               "Q": ref["Q"][np.ix_(keep, keep)], "R": ref["R"]}
    for name in ("F", "H", "Q", "R"):
        np.testing.assert_allclose(getattr(ssm, name).numpy(), ref[name], atol=1e-12,
                                   err_msg=name)


def test_arma_matches_sarimax():
    model = StructuralModel(components=("ar",), ar_order=2)
    arma = StructuralModel(components=("ar", "level"), ar_order=2)  # order of names is free
    assert arma.n_states == 3
    theta = torch.tensor([0.8, -0.4, np.log(0.7), np.log(0.3)], dtype=torch.float64)
    rng = np.random.default_rng(32)
    y = rng.normal(size=(120, 1))
    y[[5, 50, 51]] = np.nan
    ours = float(structural_loglik(model, theta, torch.tensor(y), prior="default"))
    phi = pacf_to_coefficients(theta[:2]).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sar = sm.tsa.SARIMAX(y, order=(2, 0, 0), measurement_error=True)
        ref = sar.loglike(np.array([*phi, 0.3, 0.7]))
    assert abs(ours - ref) <= 1e-9 * abs(ref)
    # ARMA(2, 1): the MA part (invertible by construction)
    m21 = StructuralModel(components=("arma",), ar_order=2, ma_order=1)
    theta21 = torch.tensor([0.5, 0.2, -0.6, np.log(0.9), np.log(0.2)], dtype=torch.float64)
    ours21 = float(structural_loglik(m21, theta21, torch.tensor(y), prior="default"))
    ma = -pacf_to_coefficients(theta21[2:3]).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sar21 = sm.tsa.SARIMAX(y, order=(2, 0, 1), measurement_error=True)
        ref21 = sar21.loglike(np.array([*pacf_to_coefficients(theta21[:2]).numpy(), *ma, 0.2,
                                        0.9]))
    assert abs(ours21 - ref21) <= 1e-9 * abs(ref21)


def test_bad_structure_is_a_config_error():
    with pytest.raises(ConfigError, match="seasonal_period"):
        StructuralModel(components=("level", "seasonal"))
    with pytest.raises(ConfigError, match="unknown"):
        StructuralModel(components=("level", "cycle"))
    with pytest.raises(ConfigError, match="harmonics"):
        StructuralModel(components=("seasonal",), seasonal_period=4, seasonal_harmonics=3)


def _simulate_local_level(theta_true: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    model = StructuralModel(components=("level",))
    ssm = model.to_ssm(theta_true)
    _, y = sample(ssm, T, generator=torch.Generator().manual_seed(seed))
    return y


def test_mle_recovers_parameters_within_standard_errors():
    model = StructuralModel(components=("level",))
    truth = torch.tensor([[np.log(0.5), np.log(1.0)], [np.log(0.1), np.log(2.0)],
                          [np.log(1.0), np.log(0.3)]], dtype=torch.float64)
    y = torch.stack([_simulate_local_level(th, 600, seed=40 + i) for i, th in enumerate(truth)])
    fit = fit_mle(model, y)  # three series at once
    assert fit.converged
    se = standard_errors(model, fit.theta, y)
    assert torch.isfinite(se).all() and (se > 0).all()
    z = (fit.theta - truth) / se
    assert (z.abs() < 3.5).all(), z
    # the optimum: gradient ~ 0 and no better point nearby
    ll = structural_loglik(model, fit.theta, y)
    for delta in (0.05, -0.05):
        assert (structural_loglik(model, fit.theta + delta, y) <= ll + 1e-9).all()


def test_adam_reaches_the_lbfgs_optimum():
    model = StructuralModel(components=("level",))
    truth = torch.tensor([np.log(0.3), np.log(1.0)], dtype=torch.float64)
    _, y = sample(model.to_ssm(truth), 200, batch_shape_=(2,),
                  generator=torch.Generator().manual_seed(41))
    lb = fit_mle(model, y)
    ad = fit_mle(model, y, optimizer="adam", max_iter=150, lr=0.1, tol=1e-12)
    assert torch.allclose(ad.loglik, lb.loglik, rtol=1e-4)
    assert (lb.loglik >= ad.loglik - 1e-6).all()


def test_nonfinite_likelihood_names_the_series():
    model = StructuralModel(components=("level",))
    y = torch.randn(3, 50, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    theta0 = model.initial_params(y)
    theta0[1, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"series \(1,\)|series 1"):
        fit_mle(model, y, theta0)


def test_em_increases_the_likelihood_every_iteration(oracle):
    rng = np.random.default_rng(43)
    truth = oracle.random_model(rng, 2, 3, intercepts=True)
    ssm_true = oracle.to_ssm(truth)
    _, y = sample(ssm_true, 150, batch_shape_=(2,), generator=torch.Generator().manual_seed(43))
    y[:, rng.random(150) < 0.1] = float("nan")  # whole steps
    y[0, rng.random(150) < 0.15, 1] = float("nan")  # single channels
    start = oracle.to_ssm(oracle.random_model(np.random.default_rng(44), 2, 3, intercepts=True))
    res = fit_em(start, y, n_iter=12)
    ll = res.logliks.sum(-1)  # pooled over the two series (the model has no batch axis)
    diffs = ll[1:] - ll[:-1]
    assert (diffs >= -1e-8 * ll.abs()[1:]).all(), diffs
    assert float(ll[-1] - ll[0]) > 1.0
    # per-series models (a batch axis on the model): each series' likelihood increases
    batched = start._replace(**{k: getattr(start, k).expand(2, *getattr(start, k).shape)
                                for k in ("F", "H", "Q", "R", "m0", "P0", "d", "c")})
    res_b = fit_em(batched, y, n_iter=8, diagonal_R=True)
    d = res_b.logliks[1:] - res_b.logliks[:-1]
    assert (d >= -1e-8 * res_b.logliks.abs()[1:]).all(), d
    assert torch.isfinite(kalman_filter(res_b.ssm, y).loglik).all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(components=("level", "seasonal", "arma"), seasonal_period=4, seasonal_kind="dummy",
          ar_order=2, ma_order=1),
     dict(components=("level", "trend"), observation="full", n_obs=3)],
)
def test_structural_loglik_gradcheck(kwargs):
    model = StructuralModel(**kwargs)
    g = torch.Generator().manual_seed(45)
    y = torch.randn(2, 10, model.n_obs, dtype=torch.float64, generator=g)
    y[0, 3] = float("nan")
    theta = (0.3 * torch.randn(2, model.n_params, dtype=torch.float64, generator=g))
    theta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: structural_loglik(model, t, y), (theta,),
                                    eps=1e-6, atol=1e-6, fast_mode=True)
    assert model.initial_params(y).shape == (2, model.n_params)
