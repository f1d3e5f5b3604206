"""MambaForecaster: the Forecaster protocol, causality, chunked = one pass, NaN, learning."""

from __future__ import annotations

import math

import pytest
import torch

from tsssm.errors import ConfigError, DataError, ModelError
from tsssm.models.base import Forecaster, Gaussian
from tsssm.models.heads import gaussian_nll
from tsssm.models.mamba_forecaster import MIN_VAR, MambaForecaster

ATOL = 2e-5
VARIANTS = [
    pytest.param("mixing", 1, id="mixing-p1"),
    pytest.param("mixing", 3, id="mixing-p3"),
    pytest.param("independent", 1, id="independent-p1"),
    pytest.param("independent", 4, id="independent-p4"),
]


def _model(channel_mode="mixing", patch_len=1, seed=0, **kw) -> MambaForecaster:
    torch.manual_seed(seed)
    args = {"d_model": 16, "n_layers": 2, "d_state": 8, "horizon": 6, "scan_backend": "torch"}
    args.update(kw)
    return MambaForecaster(3, channel_mode=channel_mode, patch_len=patch_len, **args).eval()


def _series(batch=2, length=17, channels=3, seed=1, nan_frac=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, length, channels, generator=g)
    if nan_frac:
        y[torch.rand(y.shape, generator=g) < nan_frac] = float("nan")
    return y


def _assert_gauss_close(a: Gaussian, b: Gaussian) -> None:
    torch.testing.assert_close(a.mean, b.mean, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(a.var, b.var, atol=ATOL, rtol=1e-4)


def test_implements_the_forecaster_protocol():
    model = _model()
    assert isinstance(model, Forecaster)
    assert model.training_input == "windows" and model.n_channels == 3


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_shapes_and_positive_variance(mode, patch):
    model = _model(mode, patch)
    y = _series(length=13)
    with torch.no_grad():
        dist, state = model.one_step(y)
        fc = model.forecast(y, 5)
    assert dist.mean.shape == dist.var.shape == (2, 13, 3)
    assert fc.mean.shape == fc.var.shape == (2, 5, 3)
    for t in (*dist, *fc):
        assert t is None or torch.isfinite(t).all()  # Gaussian.cov is None: independent channels
    assert (dist.var >= MIN_VAR).all() and (fc.var >= MIN_VAR).all()
    assert state.pending.shape == (2, 13 % patch, 3)


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_one_step_is_causal(mode, patch):
    """Perturbing y[:, t] changes no prediction at positions <= t (and does change later ones)."""
    model = _model(mode, patch)
    y = _series(length=16)
    with torch.no_grad():
        base, _ = model.one_step(y)
        for t in (0, 5, 11):
            y2 = y.clone()
            y2[:, t, 1] += 5.0
            pert, _ = model.one_step(y2)
            assert torch.equal(pert.mean[:, : t + 1], base.mean[:, : t + 1]), t
            assert torch.equal(pert.var[:, : t + 1], base.var[:, : t + 1]), t
            # the first prediction that may see y[t] is at the next patch boundary
            first_seen = (t // patch + 1) * patch
            assert (pert.mean[:, first_seen:] - base.mean[:, first_seen:]).abs().amax() > 1e-4


@pytest.mark.parametrize("mode,patch", VARIANTS)
@pytest.mark.parametrize("bounds", [[1], [4, 5, 6, 13], [2, 9, 10, 11, 12, 18]])
def test_chunked_one_step_equals_one_call(mode, patch, bounds):
    model = _model(mode, patch)
    y = _series(length=19, nan_frac=0.2)
    with torch.no_grad():
        full, full_state = model.one_step(y)
        state, means, vars_ = None, [], []
        for lo, hi in zip([0, *bounds], [*bounds, y.shape[1]]):
            dist, state = model.one_step(y[:, lo:hi], state)
            means.append(dist.mean)
            vars_.append(dist.var)
    _assert_gauss_close(Gaussian(torch.cat(means, 1), torch.cat(vars_, 1)), full)
    torch.testing.assert_close(state.last_hidden, full_state.last_hidden, atol=ATOL, rtol=1e-4)
    assert torch.equal(state.pending.isnan(), full_state.pending.isnan())


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_forecast_from_carried_state_equals_full_context(mode, patch):
    """forecast(y[:, k:], state after y[:, :k]) == forecast(y) for any split (revin off)."""
    model = _model(mode, patch, revin=False)
    y = _series(length=14, nan_frac=0.1)
    with torch.no_grad():
        full = model.forecast(y, 6)
        for k in (3, 7, 14):
            _, state = model.one_step(y[:, :k])
            _assert_gauss_close(model.forecast(y[:, k:], 6, state), full)


def test_forecast_is_aligned_to_absolute_time_with_a_partial_patch():
    """Contexts ending inside the same patch share the encoder output; their forecasts must name
    the same absolute steps: forecast(y[:, :9])[:, 1:] == forecast(y[:, :10])[:, :-1]."""
    model = _model("mixing", 4, revin=False)
    y = _series(length=10)  # patch boundary at 8; contexts of 9 and 10 steps end inside patch 2
    with torch.no_grad():
        f9 = model.forecast(y[:, :9], 6)
        f10 = model.forecast(y, 6)
    _assert_gauss_close(
        Gaussian(f9.mean[:, 1:], f9.var[:, 1:]), Gaussian(f10.mean[:, :-1], f10.var[:, :-1])
    )
    assert (f9.mean[:, :-1] - f10.mean[:, :-1]).abs().amax() > 1e-4  # not a constant head


def test_revin_makes_forecast_equivariant_to_affine_maps():
    model = _model("mixing", 2, revin=True)
    y = _series(length=12, nan_frac=0.15)
    a = torch.tensor([2.0, 0.5, 3.0])
    b = torch.tensor([10.0, -4.0, 0.3])
    with torch.no_grad():
        f = model.forecast(y, 6)
        g = model.forecast(y * a + b, 6)
    torch.testing.assert_close(g.mean, f.mean * a + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.var - MIN_VAR, (f.var - MIN_VAR) * a**2, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_nan_input_gives_finite_output_and_gradients(mode, patch):
    model = _model(mode, patch).train()
    y = _series(length=12, nan_frac=0.3)
    y[0, :, 2] = float("nan")  # a channel never observed
    y[1] = float("nan")  # a stream never observed
    dist, _ = model.one_step(y)
    fc = model.forecast(y[:, :6], 6)
    target = _series(length=12, seed=3)
    loss = gaussian_nll(dist, target) + gaussian_nll(fc, target[:, 6:])
    loss.backward()
    for t in (*dist, *fc):
        assert t is None or torch.isfinite(t).all()  # Gaussian.cov is None: independent channels
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_missing_is_not_the_same_as_zero():
    model = _model()
    y = _series(length=8)
    y_zero, y_nan = y.clone(), y.clone()
    y_zero[:, 3] = 0.0
    y_nan[:, 3] = float("nan")
    with torch.no_grad():
        a, _ = model.one_step(y_zero)
        b, _ = model.one_step(y_nan)
    assert (a.mean[:, 4:] - b.mean[:, 4:]).abs().amax() > 1e-5


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_gradients_reach_every_parameter(mode, patch):
    model = _model(mode, patch).train()
    y = _series(length=18)
    dist, _ = model.one_step(y)
    fc = model.forecast(y[:, :-6], 6)
    (gaussian_nll(dist, y) + gaussian_nll(fc, y[:, -6:])).backward()
    for name, p in model.named_parameters():
        if name == "lead_time":  # used with real time steps only (test_mamba_exog.py)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_weight_decay_names_the_dynamics_and_biases():
    names = _model().no_weight_decay()
    assert "encoder.layers.0.block.A_log" in names and "start" in names
    assert "encoder.layers.0.block.in_proj.weight" not in names


def test_float64_input_is_accepted():
    model = _model()
    y = _series(length=9)
    with torch.no_grad():
        a, _ = model.one_step(y)
        b, _ = model.one_step(y.double())
    assert b.mean.dtype == torch.float32
    torch.testing.assert_close(a.mean, b.mean)


def test_bad_input_is_a_clear_error():
    model = _model()
    with pytest.raises(DataError, match="3 channels"):
        model.one_step(torch.randn(2, 5, 4))
    with pytest.raises(DataError, match="inf"):
        model.one_step(torch.tensor([[[1.0, float("inf"), 0.0]]]))
    with pytest.raises(ModelError, match="horizon"):
        model.forecast(torch.randn(2, 5, 3), 7)
    _, state = model.one_step(torch.randn(2, 5, 3))
    with pytest.raises(ModelError, match="revin"):
        model.forecast(torch.randn(2, 5, 3), 3, state)
    with pytest.raises(ModelError, match="batch 2"):
        model.one_step(torch.randn(1, 5, 3), state)
    with pytest.raises(ConfigError, match="channel_mode"):
        MambaForecaster(3, channel_mode="shared")
    with pytest.raises(ConfigError, match="patch_len"):
        MambaForecaster(3, patch_len=0)


@pytest.mark.parametrize("mode,patch", [("mixing", 1), ("independent", 2)])
def test_tiny_model_learns_a_sine(mode, patch, one_thread):
    """A tiny model fitted for a few seconds on noisy sines beats its start by a wide margin."""
    torch.manual_seed(0)
    model = MambaForecaster(
        2,
        d_model=16,
        n_layers=1,
        d_state=4,
        horizon=8,
        channel_mode=mode,
        patch_len=patch,
        scan_backend="torch",
    )
    t = torch.arange(64, dtype=torch.float32)
    phase = torch.rand(16, 1, 2) * 2 * math.pi
    y = torch.sin(2 * math.pi * t[None, :, None] / 16 + phase)  # (16, 64, 2)
    y = y + 0.05 * torch.randn_like(y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_fn():
        dist, _ = model.one_step(y)
        fc = model.forecast(y[:, :-8], 8)
        return gaussian_nll(dist, y) + gaussian_nll(fc, y[:, -8:])

    with torch.no_grad():
        start = loss_fn().item()
    for _ in range(120):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn().item()
    # Start: ~1.4 per term (unit-variance guess); a fitted sine with noise 0.05 reaches < 0.
    print(f"sine NLL {start:.3f} -> {end:.3f}")
    assert end < start - 2.0 and end < -1.0, (start, end)


# ------------------------------------------------------------------ the flatten head


def _flat(seed=0, **kw) -> MambaForecaster:
    torch.manual_seed(seed)
    args = {"d_model": 16, "n_layers": 1, "d_state": 8, "horizon": 6, "scan_backend": "torch",
            "head": "flatten", "input_len": 12, "forecast_patch_len": 4, "linear_skip": True}
    args.update(kw)
    return MambaForecaster(3, **args).eval()


@pytest.mark.parametrize("input_len", [12, 10])  # 10: a partial first patch
def test_flatten_head_shapes_and_padding(input_len):
    model = _flat(input_len=input_len)
    with torch.no_grad():
        for length in (5, input_len, 30):  # shorter contexts are padded with missing steps
            fc = model.forecast(_series(length=length, nan_frac=0.1), 4)
            assert fc.mean.shape == fc.var.shape == (2, 4, 3)
            assert torch.isfinite(fc.mean).all() and (fc.var >= MIN_VAR).all()


def test_flatten_head_reads_only_the_last_input_len_steps():
    model = _flat()
    y = _series(length=30)
    y2 = y.clone()
    y2[:, :18] += 100.0  # before the last 12 steps
    with torch.no_grad():
        _assert_gauss_close(model.forecast(y, 6), model.forecast(y2, 6))


def test_flatten_head_mean_is_equivariant_to_affine_maps():
    model = _flat()
    y = _series(length=12, nan_frac=0.15)
    a = torch.tensor([2.0, 0.5, 3.0])
    b = torch.tensor([10.0, -4.0, 0.3])
    with torch.no_grad():
        f, g = model.forecast(y, 6), model.forecast(y * a + b, 6)
    torch.testing.assert_close(g.mean, f.mean * a + b, atol=1e-4, rtol=1e-4)


def test_flatten_head_gradients_and_errors():
    model = _flat().train()
    y = _series(length=18, nan_frac=0.2)
    dist, state = model.one_step(y)
    fc = model.forecast(y[:, :-6], 6)
    target = _series(length=18, seed=4)
    (gaussian_nll(dist, target) + gaussian_nll(fc, target[:, -6:])).backward()
    for name, p in model.named_parameters():
        if name == "lead_time":  # used with real time steps only (test_mamba_exog.py)
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with pytest.raises(ModelError, match="state=None"):
        model.forecast(y, 6, state)
    with pytest.raises(ConfigError, match="linear_skip"):
        MambaForecaster(3, linear_skip=True)
    with pytest.raises(ConfigError, match="head"):
        MambaForecaster(3, head="mean")
