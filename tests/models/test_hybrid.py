"""Kalman–Mamba hybrids: the Forecaster protocol, start = Kalman part, chunked = whole, step =
batch, causality, gradients into the Mamba part, NaN, and fits of simulated state spaces whose
truth is known."""

from __future__ import annotations

import math

import pytest
import torch

from tsssm.errors import ConfigError, DataError, ModelError
from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.models.base import Forecaster, Gaussian
from tsssm.models.heads import gaussian_nll
from tsssm.models.hybrid import MIN_VAR, HybridState, KalmanMambaResidual, MambaKalmanFilter

KINDS = [KalmanMambaResidual, MambaKalmanFilter]
ATOL = 2e-5


def _model(cls, seed=0, perturb=True, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(horizon=6, input_len=8, d_model=16, n_layers=1, d_state=4, patch_len=4,
                scan_backend="torch",
                kalman={"components": ["level", "seasonal"], "seasonal_period": 4})
    args.update(kw)
    model = cls(3, **args)
    if perturb:  # the corrections start at zero; give them something to carry
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 1 and bool((p == 0).all()):
                    p.normal_(0.0, 0.2)
    return model.eval()


def _series(batch=2, length=19, seed=1, nan_frac=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    y = torch.sin(2 * math.pi * t / 4)[None, :, None] + 0.3 * torch.randn(
        batch, length, 3, generator=g)
    if nan_frac:
        y[torch.rand(y.shape, generator=g) < nan_frac] = float("nan")
    return y


def _close(a: Gaussian, b: Gaussian, atol=ATOL) -> None:
    torch.testing.assert_close(a.mean, b.mean, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.var, b.var, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("cls", KINDS)
def test_protocol_and_shapes(cls):
    model = _model(cls)
    assert isinstance(model, Forecaster) and model.training_input == "windows"
    y = _series()
    with torch.no_grad():
        dist, state = model.one_step(y)
        fc = model.forecast(y, 5)
    assert isinstance(state, HybridState)
    assert dist.mean.shape == dist.var.shape == (2, 19, 3)
    assert fc.mean.shape == fc.var.shape == (2, 5, 3)
    for t in (*dist, *fc):
        assert t is None or torch.isfinite(t).all()  # cov: None for independent channels
    assert (dist.var > 0).all() and (fc.var >= MIN_VAR).all()


@pytest.mark.parametrize("cls", KINDS)
def test_starts_as_its_kalman_part(cls):
    """Every correction is zero-initialised: the untrained hybrid IS its Kalman filter, one step
    ahead and over the horizon (variance up to the floor)."""
    model = _model(cls, perturb=False)
    y = _series(nan_frac=0.1)
    model.initialize(y)
    with torch.no_grad():
        dist, _ = model.one_step(y)
        base, _ = model.kalman.one_step(y)
        fc = model.forecast(y, 6)
        kfc = model.kalman.forecast(y, 6)
    torch.testing.assert_close(dist.mean, base.mean, atol=1e-5, rtol=1e-5)
    extra = MIN_VAR if cls is KalmanMambaResidual else 0.0
    torch.testing.assert_close(dist.var, base.var + extra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fc.mean, kfc.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fc.var, kfc.var + MIN_VAR, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("bounds", [[1], [4, 5, 6, 13], [2, 9, 10, 11, 12, 18]])
def test_chunked_one_step_equals_one_call(cls, bounds):
    model = _model(cls)
    y = _series(nan_frac=0.2)
    with torch.no_grad():
        full, full_state = model.one_step(y)
        state, parts = None, []
        for lo, hi in zip([0, *bounds], [*bounds, y.shape[1]]):
            dist, state = model.one_step(y[:, lo:hi], state)
            parts.append(dist)
    _close(Gaussian(torch.cat([p.mean for p in parts], 1), torch.cat([p.var for p in parts], 1)),
           full)
    torch.testing.assert_close(state.kalman.mean, full_state.kalman.mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", KINDS)
def test_step_by_step_equals_batch(cls):
    model = _model(cls, patch_len=4, **({"step_patch_len": 2} if cls is MambaKalmanFilter
                                        else {}))
    y = _series(length=11, nan_frac=0.15)
    with torch.no_grad():
        full, _ = model.one_step(y)
        state, means, variances = None, [], []
        for t in range(y.shape[1]):
            dist, state = model.one_step(y[:, t : t + 1], state)
            means.append(dist.mean)
            variances.append(dist.var)
    _close(Gaussian(torch.cat(means, 1), torch.cat(variances, 1)), full)


@pytest.mark.parametrize("cls", KINDS)
def test_one_step_is_causal(cls):
    model = _model(cls, **({"step_patch_len": 1} if cls is MambaKalmanFilter else {}))
    y = _series(length=16)
    with torch.no_grad():
        base, _ = model.one_step(y)
        for t in (0, 5, 11):
            y2 = y.clone()
            y2[:, t, 1] += 5.0
            pert, _ = model.one_step(y2)
            assert torch.equal(pert.mean[:, : t + 1], base.mean[:, : t + 1]), t
            assert torch.equal(pert.var[:, : t + 1], base.var[:, : t + 1]), t
            assert (pert.mean[:, t + 1 :, 1] - base.mean[:, t + 1 :, 1]).abs().amax() > 1e-4


@pytest.mark.parametrize("cls", KINDS)
def test_predict_window_shares_one_pass(cls):
    model = _model(cls)
    y = _series(length=14, nan_frac=0.1)
    with torch.no_grad():
        one, fc = model.predict_window(y, 6)
        _close(one, model.one_step(y)[0])
        _close(fc, model.forecast(y, 6))


@pytest.mark.parametrize("cls", KINDS)
def test_gradients_flow_into_the_mamba_part(cls):
    """From the zero-initialised start: after one optimiser step every parameter, the encoder's
    included, receives a nonzero gradient from the window loss."""
    model = _model(cls, perturb=False).train()
    y = _series(length=14)
    model.initialize(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        one, fc = model.predict_window(y[:, :8], 6)
        (gaussian_nll(one, y[:, :8]) + gaussian_nll(fc, y[:, 8:])).backward()
        opt.step()
    for name, p in model.named_parameters():
        if name == "lead_time":  # used with real time steps only (test_mamba_exog.py)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    mamba = [n for n, _ in model.named_parameters() if ".mamba." in n]
    assert mamba


@pytest.mark.parametrize("cls", KINDS)
def test_missing_inputs_give_finite_outputs_and_gradients(cls):
    model = _model(cls).train()
    y = _series(length=14, nan_frac=0.3)
    y[0, :, 2] = float("nan")  # a channel never observed
    y[1, 2:9] = float("nan")  # a gap in every channel
    one, fc = model.predict_window(y[:, :8], 6)
    dist, _ = model.one_step(y)
    target = _series(length=14, seed=5)
    (gaussian_nll(one, target[:, :8]) + gaussian_nll(fc, target[:, 8:])
     + gaussian_nll(dist, target)).backward()
    for t in (*one, *fc, *dist):
        assert t is None or torch.isfinite(t).all()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cls", KINDS)
def test_short_and_long_contexts(cls):
    """The horizon head reads the last input_len steps: a shorter context is padded as missing,
    a longer one filtered whole and read at its end."""
    model = _model(cls)
    with torch.no_grad():
        for length in (3, 8, 21):
            fc = model.forecast(_series(length=length), 6)
            assert torch.isfinite(fc.mean).all() and (fc.var > 0).all()
        odd = _model(cls, input_len=10)  # a partial first patch (10 = 2 x 4 + 2)
        fc = odd.forecast(_series(length=12), 6)
        assert torch.isfinite(fc.mean).all() and (fc.var > 0).all()


@pytest.mark.parametrize("cls", KINDS)
def test_bad_input_is_a_clear_error(cls):
    model = _model(cls)
    with pytest.raises(DataError, match="3 channels"):
        model.one_step(torch.randn(2, 5, 4))
    with pytest.raises(DataError, match="inf"):
        model.one_step(torch.tensor([[[1.0, float("inf"), 0.0]]]))
    with pytest.raises(ModelError, match="horizon"):
        model.forecast(torch.randn(2, 8, 3), 7)
    _, state = model.one_step(torch.randn(2, 5, 3))
    with pytest.raises(ModelError, match="state=None"):
        model.forecast(torch.randn(2, 8, 3), 3, state)
    with pytest.raises(ModelError, match="batch 2"):
        model.one_step(torch.randn(1, 5, 3), state)
    with pytest.raises(ConfigError, match="patch_len"):
        cls(3, input_len=10, patch_len=0)
    with pytest.raises(ConfigError, match="kalman"):
        cls(3, kalman={"colour": "blue"})


def test_seasonal_component_needs_a_period():
    """Without a seasonal period (e.g. SKAB) the hybrid's Kalman part drops the seasonal block."""
    model = KalmanMambaResidual(2, kalman={"components": ["level", "seasonal"],
                                           "seasonal_period": None})
    assert model.kalman.structure.components == ("level",)


# ------------------------------------------------------------------ simulated truths


def _regime_noise_data(batch: int, length: int, seed: int, block: int = 16):
    """Local level (q = 0.01) observed with noise whose variance switches between 0.05 and 1.0
    in blocks of 16 steps (random phase per series): the regime shows in the recent past."""
    g = torch.Generator().manual_seed(seed)
    q, r_lo, r_hi = 0.01, 0.05, 1.0
    phase = torch.randint(0, 2 * block, (batch, 1), generator=g)
    t = torch.arange(length)[None, :]
    noisy = ((t + phase) // block) % 2 == 1  # (B, T)
    r = torch.where(noisy, r_hi, r_lo).double()
    level = torch.cumsum(math.sqrt(q) * torch.randn(batch, length, generator=g,
                                                    dtype=torch.float64), 1)
    y = level + r.sqrt() * torch.randn(batch, length, generator=g, dtype=torch.float64)
    return y.unsqueeze(-1).float(), r, q


def _oracle_nll(y: torch.Tensor, r: torch.Tensor, q: float) -> float:
    """Per-observation NLL of the true model (the filter with the true R_t)."""
    B, T, _ = y.shape
    ssm = LinearGaussianSSM(
        F=torch.ones(1, 1, dtype=torch.float64), H=torch.ones(1, 1, dtype=torch.float64),
        Q=torch.full((1, 1), q, dtype=torch.float64), R=r.reshape(B, T, 1, 1),
        m0=torch.zeros(1, dtype=torch.float64), P0=torch.full((1, 1), 10.0, dtype=torch.float64),
        time_varying=("R",))
    return float(-kalman_filter(ssm, y.double()).loglik.sum() / (B * T))


def test_deep_ssm_recovers_a_noise_pattern(one_thread):
    """Data from a local level model whose observation noise switches between two regimes: the
    Mamba-parameterised filter, trained by the filter's exact likelihood, beats the
    constant-noise maximum-likelihood filter (EM) by > 0.1 nats per observation on fresh series,
    gets within 0.25 nats of the true model, and sets R_t high in the noisy regime and low in the
    calm one (truth: 20x; asked: > 4x)."""
    y, r, q = _regime_noise_data(64, 96, seed=0, block=12)
    torch.manual_seed(0)
    model = MambaKalmanFilter(1, horizon=2, input_len=16, d_model=8, n_layers=1, d_state=8,
                              patch_len=8, scan_backend="torch", linear_skip=False,
                              kalman={"components": ["level"]}, em_iters=20)
    model.initialize(y)  # moments, then EM: the constant-noise MLE filter
    y_test, r_test, _ = _regime_noise_data(32, 96, seed=1, block=12)
    with torch.no_grad():
        constant = float(gaussian_nll(model.one_step(y_test)[0], y_test))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(70):
        opt.zero_grad()
        gaussian_nll(model.one_step(y)[0], y).backward()
        opt.step()
    with torch.no_grad():
        learned = float(gaussian_nll(model.one_step(y_test)[0], y_test))
        scales = model.noise_scales(y_test)[..., 0, 1]  # (B, T): factor on R
    oracle = _oracle_nll(y_test, r_test, q)
    assert learned < constant - 0.1, (learned, constant)
    assert learned - oracle < 0.25, (learned, oracle)
    r_eff = scales * model.kalman.theta.detach()[0, -1].exp().float()
    noisy = r_test > 0.5
    warm = torch.arange(96) >= 16
    hi, lo = r_eff[noisy & warm].median(), r_eff[~noisy & warm].median()
    assert hi > 4 * lo, (hi, lo)


def _square_wave_data(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    phase = torch.randint(0, 8, (batch, 1), generator=g)
    t = torch.arange(length)[None, :]
    wave = torch.where(((t + phase) // 4) % 2 == 0, 1.0, -1.0)
    level = torch.cumsum(0.05 * torch.randn(batch, length, generator=g), 1)
    return (level + wave + 0.2 * torch.randn(batch, length, generator=g)).unsqueeze(-1)


def test_residual_hybrid_learns_what_its_kalman_part_cannot(one_thread):
    """A local level plus a square wave of period 8 (random phase), noise sd 0.2: the level-only
    Kalman part cannot predict the wave; the Mamba correction learns it from the past. On fresh
    series the one-step NLL drops far below the filter's, to near the true model's."""
    y = _square_wave_data(32, 64, seed=0)
    torch.manual_seed(0)
    model = KalmanMambaResidual(1, horizon=4, input_len=16, d_model=16, n_layers=1, d_state=8,
                                patch_len=1, scan_backend="torch",
                                kalman={"components": ["level"]})
    model.initialize(y)
    y_test = _square_wave_data(32, 64, seed=1)

    def nll(series: torch.Tensor) -> float:  # after a warm-up of 16 steps
        dist, _ = model.one_step(series)
        return float(gaussian_nll(Gaussian(dist.mean[:, 16:], dist.var[:, 16:]), series[:, 16:]))

    with torch.no_grad():
        kalman_only = nll(y_test)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        gaussian_nll(model.one_step(y)[0], y).backward()
        opt.step()
    with torch.no_grad():
        learned = nll(y_test)
    truth = 0.5 * math.log(2 * math.pi * (0.04 + 0.05**2)) + 0.5  # knows level and wave
    assert learned < kalman_only - 0.4, (learned, kalman_only)
    assert learned < truth + 0.35, (learned, truth)


@pytest.mark.parametrize("nan_frac", [0.0, 0.2])
def test_window_filter_gives_the_sequential_numbers_and_gradients(nan_frac):
    """The Kalman part's batched window filter (the default) against the step-by-step one:
    the same one-step and horizon moments and the same gradient of the training loss in every
    parameter; windows with missing values take the sequential path in both."""
    kal = {"components": ["level", "seasonal"], "seasonal_period": 4}
    models = {m: _model(KalmanMambaResidual, kalman={**kal, "method": m}).train()
              for m in ("sequential", "window")}
    assert models["window"].kalman.method == "window"
    with torch.no_grad():  # a Kalman part away from its initial values
        for model in models.values():
            model.kalman.theta.copy_(torch.tensor([-1.0, -2.5, -3.0], dtype=torch.float64))
    y = _series(batch=4, length=14, nan_frac=nan_frac, seed=3)
    grads, outs = {}, {}
    for method, model in models.items():
        one, fc = model.predict_window(y[:, :8], 6)
        (gaussian_nll(one, y[:, :8]) + gaussian_nll(fc, y[:, 8:])).backward()
        outs[method] = one, fc
        grads[method] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for a, b in zip(outs["sequential"], outs["window"]):
        _close(a, b, atol=1e-5)
    assert grads["window"].keys() == grads["sequential"].keys()
    for name, g in grads["window"].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads["sequential"][name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_kalman_forecaster_window_method_equals_sequential():
    from tsssm.models.kalman import KalmanForecaster

    torch.manual_seed(0)
    y = _series(batch=3, length=30, seed=4).double()
    out = {}
    for method in ("sequential", "window"):
        k = KalmanForecaster(3, components=["level", "seasonal"], seasonal_period=4,
                             method=method)
        k.initialize(y)
        pred, state = k.one_step(y)
        loss = pred.mean.square().sum() + pred.var.log().sum() + state.mean.sum()
        loss.backward()
        fc = k.forecast(y, 5)
        out[method] = pred, state, k.theta.grad, fc
    s, w = out["sequential"], out["window"]
    _close(s[0], w[0], atol=1e-10)
    torch.testing.assert_close(w[1].mean, s[1].mean)
    torch.testing.assert_close(w[1].cov, s[1].cov)
    torch.testing.assert_close(w[2], s[2], rtol=1e-8, atol=1e-9)
    _close(s[3], w[3], atol=1e-10)
    # a carried state (a prior per stream, so covariances per stream) continues alike
    with torch.no_grad():
        _close(k.one_step(y[:, :5], w[1])[0], k.one_step(y[:, :5], s[1])[0], atol=1e-10)


# ------------------------------------------------ the Kalman part fitted as model=kalman_ett

#: the structure of conf/model/kalman_ett.yaml at the test's period (4 rows)
ETT_PART = {"components": ["level", "seasonal", "ar"], "seasonal_period": 4,
            "seasonal_kind": "trig", "seasonal_harmonics": 1, "ar_order": 1,
            "diffuse_level": True}
ETT_FIT = {"fit": "multistep", "em_iters": 3, "em_segment": 8, "em_prior": True,
           "multistep_iters": 8}


@pytest.mark.parametrize("cls", KINDS)
def test_untrained_hybrid_forecasts_as_the_fitted_kalman_model(cls, one_thread):
    """With ``kalman_fit`` the hybrid's Kalman part is fitted exactly as the Kalman model fits
    itself (EM on segments with a fitted prior, then the multi-step criterion over the
    model's horizon from input_len contexts): same parameters and prior, and the untrained
    hybrid's horizon means are that model's forecasts (on contexts with and without missing
    values). The fit really moves the parameters (else the test would prove nothing)."""
    from tsssm.models.kalman import KalmanForecaster, fit_forecaster

    y = _series(batch=3, length=64, seed=5)
    torch.manual_seed(0)
    model = cls(3, horizon=6, input_len=8, d_model=8, n_layers=1, d_state=4, patch_len=4,
                scan_backend="torch", kalman=ETT_PART, kalman_fit=ETT_FIT).eval()
    assert model.kalman.method == "window"  # the fit runs sequentially, training by windows
    model.initialize(y)
    assert model.kalman.method == "window"
    ref = KalmanForecaster(3, **ETT_PART)
    ref.initialize(y)
    moments = ref.theta.detach().clone()
    report = fit_forecaster(ref, [y], fit="multistep", em_iters=3, em_segment=8, em_prior=True,
                            multistep_iters=8, context=8, horizon=6)
    assert report.multistep_mse and not torch.allclose(ref.theta, moments)
    torch.testing.assert_close(model.kalman.theta, ref.theta, rtol=0, atol=0)
    torch.testing.assert_close(model.kalman.prior_mean, ref.prior_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.kalman.prior_cov, ref.prior_cov, rtol=0, atol=0)
    assert bool(model.kalman.prior_fitted)
    contexts = [_series(batch=4, length=8, seed=6), _series(batch=4, length=8, seed=7,
                                                            nan_frac=0.2)]
    with torch.no_grad():
        for ctx in contexts:
            torch.testing.assert_close(model.forecast(ctx, 6).mean, ref.forecast(ctx, 6).mean,
                                       atol=1e-5, rtol=1e-5)


def test_kalman_fit_is_checked():
    with pytest.raises(ConfigError, match="kalman_fit has unknown keys"):
        _model(KalmanMambaResidual, kalman_fit={"fit": "multistep", "iters": 3})
    with pytest.raises(ConfigError, match="kalman_fit.fit must be"):
        _model(KalmanMambaResidual, kalman_fit={"fit": "lbfgs"})
    with pytest.raises(ConfigError, match="kalman_fit.multistep_iters"):
        _model(KalmanMambaResidual, kalman_fit={"fit": "multistep", "multistep_iters": -1})


def test_configs_start_the_hybrids_as_kalman_ett():
    """conf/model/hybrid_*.yaml fit their Kalman part as conf/model/kalman_ett.yaml fits
    itself: the same structure and the same fitting keys (so the untrained hybrid is that
    model), and keep it frozen while the corrections train."""
    from tsssm.cli import compose

    common = ["experiment=ett", "data.horizon=192"]
    ref = compose([*common, "model=kalman_ett"]).model
    for name in ("hybrid_residual", "hybrid_dssm"):
        m = compose([*common, f"model={name}"]).model
        part = m.net.kalman
        for key in ("components", "seasonal_period", "seasonal_kind", "seasonal_harmonics",
                    "ar_order", "diffuse_level", "dtype"):
            assert part[key] == ref.net[key], (name, key)
        fit = m.net.kalman_fit
        assert fit.fit == ref.fit == "multistep"
        for key in ("em_iters", "em_segment", "em_prior", "multistep_iters"):
            assert fit[key] == ref[key], (name, key)
        assert m.net.horizon == 192 and m.optimizer.kalman_lr == 0.0
