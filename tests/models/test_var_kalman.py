"""The multivariate Kalman detector (VAR(p) + observation noise, full covariance): its
likelihood equals statsmodels' VARMAX, chunking is exact, its loss is its likelihood, fitting
recovers a simulated VAR, forecasts continue the filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.anomaly.scores import anomaly_scores, gaussian_nll
from tsssm.kalman.models import stationary_covariance
from tsssm.models.var_kalman import VARKalmanForecaster


def _simulate(T=400, B=3, C=3, seed=0, obs_sd=0.3):
    rng = np.random.default_rng(seed)
    A = np.array([[0.6, 0.2, 0.0], [-0.1, 0.5, 0.1], [0.0, 0.3, 0.4]])[:C, :C]
    L = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0.5, -0.3, 0.7]])[:C, :C]
    mu = np.array([1.0, -2.0, 0.5])[:C]
    ys = []
    for _ in range(B):
        u = np.zeros(C)
        rows = []
        for _ in range(T + 50):
            u = A @ u + L @ rng.normal(size=C)
            rows.append(mu + u + obs_sd * rng.normal(size=C))
        ys.append(rows[50:])
    return torch.tensor(np.array(ys)), A, L @ L.T, mu


def _model_from(A, Q, R, mu):
    C = A.shape[0]
    m = VARKalmanForecaster(C, order=1)
    with torch.no_grad():
        m.coef.copy_(torch.tensor(A))
        Lq = np.linalg.cholesky(Q)
        m.noise_tril.copy_(torch.tensor(np.tril(Lq, -1)))
        m.log_noise_diag.copy_(torch.tensor(np.log(np.diag(Lq))))
        m.log_obs_var.copy_(torch.tensor(np.log(R)))
        m.mu.copy_(torch.tensor(mu))
        m.prior_cov.copy_(stationary_covariance(m.ssm().F, m.ssm().Q))
    return m


def test_log_likelihood_equals_statsmodels_varmax():
    from statsmodels.tsa.statespace.varmax import VARMAX

    y, A, Q, mu = _simulate(T=150, B=1)
    R = np.array([0.09, 0.2, 0.05])
    model = _model_from(A, Q, R, mu)
    endog = y[0].numpy().copy()
    endog[10, 1] = np.nan  # a missing channel
    endog[20] = np.nan  # a missing step
    ref = VARMAX(endog, order=(1, 0), trend="c", measurement_error=True,
                 error_cov_type="unstructured")
    Lq = np.linalg.cholesky(Q)
    params = dict(zip([f"intercept.y{i + 1}" for i in range(3)], (np.eye(3) - A) @ mu))
    params.update({f"L1.y{j + 1}.y{i + 1}": A[i, j] for i in range(3) for j in range(3)})
    for i in range(3):
        for j in range(i + 1):
            name = f"sqrt.var.y{i + 1}" if i == j else f"sqrt.cov.y{j + 1}.y{i + 1}"
            params[name] = Lq[i, j]
    params.update({f"measurement_variance.y{i + 1}": R[i] for i in range(3)})
    vec = np.array([params[n] for n in ref.param_names])
    expected = ref.loglike(vec)
    got = model.log_likelihood(torch.from_numpy(endog)[None])
    assert float(got[0].detach()) == pytest.approx(expected, rel=1e-9)
    # and the task's loss (joint NLL of one_step over observed entries) is that likelihood
    yy = torch.from_numpy(endog)[None]
    pred, _ = model.one_step(yy)
    n_obs = int((~torch.isnan(yy)).sum())
    assert float(gaussian_nll(yy, pred)) * n_obs == pytest.approx(-expected, rel=1e-9)


def test_one_step_gives_the_joint_covariance_and_chunking_is_exact():
    y, A, Q, mu = _simulate(T=120, B=2)
    model = _model_from(A, Q, np.array([0.1, 0.1, 0.1]), mu)
    y = y.clone()
    y[1, 30:33, 0] = float("nan")
    full, _ = model.one_step(y)
    assert full.cov is not None and full.cov.shape == (2, 120, 3, 3)
    torch.testing.assert_close(full.var, torch.diagonal(full.cov, dim1=-2, dim2=-1))
    assert bool((torch.linalg.eigvalsh(full.cov) > 0).all())
    first, state = model.one_step(y[:, :47])
    second, _ = model.one_step(y[:, 47:], state)
    torch.testing.assert_close(torch.cat([first.mean, second.mean], 1), full.mean)
    torch.testing.assert_close(torch.cat([first.cov, second.cov], 1), full.cov)
    assert torch.isfinite(anomaly_scores(y, full, "mahalanobis")).all()


def test_forecast_continues_the_filter():
    y, A, Q, mu = _simulate(T=80, B=2)
    model = _model_from(A, Q, np.array([0.1, 0.2, 0.1]), mu)
    fc = model.forecast(y[:, :60], horizon=5)
    nxt, _ = model.one_step(y[:, :61])
    torch.testing.assert_close(fc.mean[:, 0], nxt.mean[:, 60])
    torch.testing.assert_close(fc.cov[:, 0], nxt.cov[:, 60])
    assert fc.mean.shape == (2, 5, 3) and fc.cov.shape == (2, 5, 3, 3)
    # far ahead the forecast reverts to the frozen mean
    far = model.forecast(y[:, :60], horizon=200)
    torch.testing.assert_close(far.mean[:, -1], torch.tensor(mu).expand(2, 3), atol=1e-6,
                               rtol=0)
    prior = model.forecast(y[:, :0], horizon=3)  # no context: the stationary prior
    torch.testing.assert_close(prior.mean, torch.tensor(mu).expand(2, 3, 3))


def test_initialize_and_maximum_likelihood_recover_the_var():
    y, A, Q, mu = _simulate(T=1500, B=2, obs_sd=0.0)
    model = VARKalmanForecaster(3, order=1, obs_noise=False)
    model.initialize(y)
    np.testing.assert_allclose(model.mu.numpy(), mu, atol=0.2)
    np.testing.assert_allclose(model.coef.detach().numpy(), A, atol=0.06)
    np.testing.assert_allclose(model.noise_cov().detach().numpy(), Q, atol=0.15)
    # a few L-BFGS steps on the exact likelihood only improve it
    with_noise = VARKalmanForecaster(3, order=2)
    with_noise.initialize(y)
    before = float(with_noise.log_likelihood(y).sum())
    opt = torch.optim.LBFGS([p for p in with_noise.parameters() if p.requires_grad],
                            max_iter=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        pred, _ = with_noise.one_step(y)
        loss = gaussian_nll(y, pred)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(with_noise.log_likelihood(y).sum()) > before


def test_initialize_needs_data_and_rejects_bad_config():
    from tsssm.errors import ConfigError, DataError

    with pytest.raises(ConfigError):
        VARKalmanForecaster(3, order=0)
    with pytest.raises(DataError, match="rows"):
        VARKalmanForecaster(3, order=2).initialize(torch.randn(1, 5, 3))
    with pytest.raises(DataError):
        VARKalmanForecaster(3).one_step(torch.randn(1, 5, 2))
