"""Mamba forecaster and hybrids with exogenous inputs and real time steps (issue 14, items 3-4).

- without inputs on an evenly spaced grid, the outputs are those of the code before this change
  (tests/models/data/mamba_golden.npz, written by ``write_golden`` on main b722b96, the code
  before this branch, torch 2.13 CPU; ``python tests/models/test_mamba_exog.py`` rewrites it),
  and a constant nominal time step changes nothing, bit for bit;
- Δ over the real step: one step of k nominal steps with no input is the k-step hold of the
  SSM state (zero-order hold), and the dt-scaled path equals the fused-softplus path at ratio 1;
- a gap changes the state evolution from the gap on (and nothing before it), a constant grid
  at the nominal step is the same as no time steps, and only the ratio dt / nominal matters;
- chunked == whole sequence == step by step with inputs and irregular time steps;
- inputs: causal (one step and over the horizon), unknown future inputs = the last one held
  (with a warning), clear errors, gradients reach the new parameters, bundles from before load;
- a forced system where the inputs help: one-step test MSE with the input clearly below
  without it (the spring of `tsssm.data.synthetic`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tsssm.errors import DataError
from tsssm.models.base import Exog, call_forecast, call_one_step
from tsssm.models.heads import gaussian_nll
from tsssm.models.hybrid import KalmanMambaResidual, MambaKalmanFilter
from tsssm.models.mamba import MambaBlock, MambaConfig, time_scaled_delta
from tsssm.models.mamba_forecaster import MambaForecaster
from tsssm.ssm import selective_scan

GOLDEN = Path(__file__).parent / "data" / "mamba_golden.npz"
C, T, H = 2, 40, 6
ATOL = 2e-5

GOLDEN_CASES = {
    "mamba_last_mixing": (MambaForecaster, dict(d_model=16, n_layers=2, d_state=4, horizon=H,
                                                head="last", revin=False)),
    "mamba_last_indep_p3": (MambaForecaster, dict(d_model=16, n_layers=1, d_state=4, horizon=H,
                                                  head="last", channel_mode="independent",
                                                  patch_len=3, revin=True)),
    "mamba_flatten": (MambaForecaster, dict(d_model=16, n_layers=2, d_state=4, horizon=H,
                                            head="flatten", input_len=24, forecast_patch_len=8,
                                            linear_skip=True)),
    "hybrid_residual": (KalmanMambaResidual, dict(horizon=H, input_len=24, d_model=16,
                                                  n_layers=1, d_state=4, patch_len=8)),
    "hybrid_dssm": (MambaKalmanFilter, dict(horizon=H, input_len=24, d_model=16, n_layers=1,
                                            d_state=4, patch_len=8)),
}


def _series(batch: int = 3, length: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, length, C, generator=g).cumsum(1) * 0.3
    y[0, 5, 1] = float("nan")
    y[2, 17:20, 0] = float("nan")
    return y


def _golden_model(name: str) -> torch.nn.Module:
    cls, kw = GOLDEN_CASES[name]
    torch.manual_seed(0)
    model = cls(C, **kw)
    with torch.no_grad():  # move the zero-initialised heads off zero so that they matter
        g = torch.Generator().manual_seed(2)
        for pname, p in model.named_parameters():
            if "head" in pname or "skip" in pname:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _outputs(model: torch.nn.Module, exog: Exog | None = None) -> dict[str, np.ndarray]:
    y = _series()
    with torch.no_grad():
        one, _ = call_one_step(model, y, None, exog)
        fc = call_forecast(model, y[:, :30], H, None,
                           None if exog is None else exog.slice(0, 30 + H))
    return {"one_mean": one.mean.numpy(), "one_var": one.var.numpy(),
            "fc_mean": fc.mean.numpy(), "fc_var": fc.var.numpy()}


def write_golden() -> None:
    arrays = {f"{name}/{k}": v for name in GOLDEN_CASES
              for k, v in _outputs(_golden_model(name)).items()}
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez(GOLDEN, torch_version=np.array(torch.__version__), **arrays)


def _constant_exog(model: torch.nn.Module, step: float = 0.5) -> Exog:
    """An evenly spaced grid at the model's nominal step (set here: initialize learns one only
    from real, varying training steps, see test_the_time_grid_is_learnt_from_real_steps)."""
    model.nominal_step.fill_(step)
    return Exog(dt=torch.full((3, T + H), step, dtype=torch.float64))


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_without_exog_the_outputs_are_those_from_before(name):
    """The outputs of the code before inputs and time steps, and a constant nominal step (what
    data.gaps=keep and evenly sampled data give) changes no bit."""
    golden = np.load(GOLDEN)
    model = _golden_model(name)
    plain = _outputs(model)
    for key, value in plain.items():
        # bit for bit on the machine that wrote the file; a BLAS of another CPU may round
        # the last digit differently
        np.testing.assert_allclose(value, golden[f"{name}/{key}"], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    timed = _outputs(model, _constant_exog(model))
    for key in plain:
        assert np.array_equal(plain[key], timed[key], equal_nan=True), key


# ------------------------------------------------------------------ Δ over the real step


def test_a_long_step_without_input_is_the_hold_of_k_nominal_steps():
    """Zero-order hold: with no input (u = 0) the state after one step of k x the nominal step
    equals the state after k nominal steps with the same Δ, exp(k Δ A) h."""
    g = torch.Generator().manual_seed(0)
    b, d, n, k = 2, 5, 4, 7
    A = -torch.rand(d, n, generator=g) - 0.1
    h0 = torch.randn(b, d, n, generator=g)
    raw, bias = torch.randn(b, d, 1, generator=g), torch.randn(d, generator=g) * 0.1

    def final(steps: int, scale: float) -> torch.Tensor:
        delta = time_scaled_delta(raw.expand(b, d, steps), bias,
                                  torch.full((b, steps), scale))
        zeros = torch.zeros(b, d, steps)
        bc = torch.randn(b, n, steps, generator=g)
        _, h = selective_scan(zeros, delta, A, bc, bc, initial_state=h0,
                              return_final_state=True, backend="torch")
        return h

    torch.testing.assert_close(final(1, float(k)), final(k, 1.0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(final(1, float(k)), final(1, 1.0), atol=1e-3)


def test_the_dt_scaled_path_at_ratio_one_equals_the_fused_softplus_path():
    torch.manual_seed(0)
    block = MambaBlock(MambaConfig(d_model=8, d_state=4, scan_backend="torch"))
    x = torch.randn(2, 11, 8)
    y0, s0 = block(x)
    y1, s1 = block(x, time_scale=torch.ones(2, 11))
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s1.ssm, s0.ssm, atol=1e-6, rtol=1e-6)
    y2, _ = block(x, time_scale=torch.full((2, 11), 3.0))
    assert (y2 - y0).abs().amax() > 1e-4


def _timed_model(seed: int = 0, n_inputs: int = 0, **kw) -> MambaForecaster:
    torch.manual_seed(seed)
    args = dict(d_model=16, n_layers=2, d_state=4, horizon=H, head="last", revin=False,
                scan_backend="torch", n_inputs=n_inputs)
    args.update(kw)
    model = MambaForecaster(C, **args)
    with torch.no_grad():  # the zero-initialised time and input terms made to matter
        g = torch.Generator().manual_seed(3)
        model.lead_time.copy_(torch.randn(model.lead_time.shape, generator=g))
        if n_inputs:
            model.input_gain.copy_(torch.randn(model.input_gain.shape, generator=g))
            model.input_response.weight.copy_(
                0.3 * torch.randn(model.input_response.weight.shape, generator=g))
    model.nominal_step.fill_(1.0)
    return model.eval()


def _irregular_dt(batch: int = 3, length: int = T, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    return steps[torch.randint(0, 3, (batch, length), generator=g)]


def test_a_gap_changes_the_state_from_the_gap_on():
    model = _timed_model()
    y = _series()
    dt = torch.ones(3, T, dtype=torch.float64)
    gap = 23
    dt[:, gap] = 30.0  # 30 nominal steps between rows 22 and 23
    with torch.no_grad():
        plain, plain_state = model.one_step(y)
        timed, timed_state = model.one_step(y, exog=Exog(dt=dt))
        before, before_state = model.one_step(y[:, :gap], exog=Exog(dt=dt[:, :gap]))
        _, plain_before = model.one_step(y[:, :gap])
    torch.testing.assert_close(timed.mean[:, :gap], plain.mean[:, :gap], atol=1e-6, rtol=1e-6)
    for a, b in zip(before_state.encoder, plain_before.encoder):
        torch.testing.assert_close(a.ssm, b.ssm, atol=1e-6, rtol=1e-6)
    # the row after the gap is predicted knowing how far ahead it lies (lead time), and the
    # SSM state decays over the gap: the state and every later prediction move
    assert ((timed.mean[:, gap] - plain.mean[:, gap]).abs().amax(-1) > 1e-2).all()
    assert ((timed.mean[:, gap:] - plain.mean[:, gap:]).abs().amax(-1) > 1e-6).all()
    for a, b in zip(timed_state.encoder, plain_state.encoder):
        assert (a.ssm - b.ssm).norm() > 0.01 * b.ssm.norm()


def test_a_constant_grid_is_no_time_and_only_the_ratio_matters():
    model = _timed_model()
    y = _series()
    with torch.no_grad():
        plain, _ = model.one_step(y)
        nominal, _ = model.one_step(y, exog=Exog(dt=torch.ones(3, T, dtype=torch.float64)))
        doubled, _ = model.one_step(y, exog=Exog(dt=torch.full((3, T), 2.0,
                                                               dtype=torch.float64)))
        dt = _irregular_dt()
        irregular, _ = model.one_step(y, exog=Exog(dt=dt))
        model.nominal_step.fill_(60.0)  # the same grid in minutes -> seconds
        rescaled, _ = model.one_step(y, exog=Exog(dt=dt * 60.0))
    assert torch.equal(nominal.mean, plain.mean) and torch.equal(nominal.var, plain.var)
    assert (doubled.mean - plain.mean).abs().amax() > 1e-3
    torch.testing.assert_close(rescaled.mean, irregular.mean, atol=1e-6, rtol=1e-6)


def test_the_time_grid_is_learnt_from_real_steps():
    """initialize: the median step where the training steps vary along a stream (gaps=time);
    evenly spaced streams (what keep/mask/fill give, even at different steps per stream) leave
    the model on the grid of rows, so it may also be called without exog."""
    model = _timed_model()
    y = _series()
    model.initialize(y, exog=Exog(dt=_irregular_dt()))
    assert float(model.nominal_step) == 1.0 and not model.runs_without_exog
    even = torch.tensor([[1.0] * T, [2.0] * T, [1.0] * T], dtype=torch.float64)
    model.initialize(y, exog=Exog(dt=even))
    assert torch.isnan(model.nominal_step) and model.runs_without_exog
    model.initialize(y)
    assert torch.isnan(model.nominal_step)
    assert not _timed_model(n_inputs=1).runs_without_exog  # inputs are always needed


def test_without_a_nominal_step_time_steps_are_ignored():
    """A model that never saw a time grid (built outside the pipeline, or an old bundle)."""
    model = _timed_model()
    model.nominal_step.fill_(float("nan"))
    y = _series()
    with torch.no_grad():
        plain, _ = model.one_step(y)
        timed, _ = model.one_step(y, exog=Exog(dt=_irregular_dt()))
    assert torch.equal(plain.mean, timed.mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_path_with_time_steps_matches_the_torch_path():
    """Δ is scaled before the scan, so the fused kernels see a plain Δ (softplus off): the
    Triton path equals the torch path forward and backward, and streaming (the fused
    single-step update) carries the time too."""
    pytest.importorskip("triton")
    y, ex = _series(), _exog()
    results = []
    for backend in ("torch", "triton"):
        model = _timed_model(n_inputs=2, scan_backend=backend).cuda().train()
        exog = Exog(ex.u.cuda(), ex.dt.cuda())
        pred, _ = model.one_step(y.cuda(), exog=exog)
        gaussian_nll(pred, y.cuda()).backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                 if p.grad is not None}
        with torch.no_grad():
            state, steps = None, []
            for t in range(8):
                step, state = model.eval().one_step(y[:, t : t + 1].cuda(), state,
                                                    exog=exog.slice(t, t + 1))
                steps.append(step.mean)
        results.append((pred.mean.detach().cpu(), grads, torch.cat(steps, 1).cpu()))
    (m0, g0, s0), (m1, g1, s1) = results
    torch.testing.assert_close(m1, m0, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(s1, m0[:, :8], atol=1e-4, rtol=1e-3)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-3, rtol=1e-2, msg=name)


# ------------------------------------------------------------------ chunks and steps

VARIANTS = [
    pytest.param("mixing", 1, id="mixing-p1"),
    pytest.param("mixing", 3, id="mixing-p3"),
    pytest.param("independent", 1, id="independent-p1"),
    pytest.param("independent", 4, id="independent-p4"),
]


def _exog(batch: int = 3, length: int = T, k: int = 2, seed: int = 5) -> Exog:
    g = torch.Generator().manual_seed(seed)
    return Exog(torch.randn(batch, length, k, generator=g), _irregular_dt(batch, length, seed))


@pytest.mark.parametrize("mode,patch", VARIANTS)
def test_chunked_and_step_by_step_equal_one_call_with_inputs_and_time(mode, patch):
    model = _timed_model(n_inputs=2, channel_mode=mode, patch_len=patch)
    y, ex = _series(), _exog()
    with torch.no_grad():
        whole, whole_state = model.one_step(y, exog=ex)
        # chunks, then the first rows one at a time (the streaming loop)
        for bounds in ((0, 7, 8, 19, 40), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 40)):
            state, means, variances = None, [], []
            for a, b in zip(bounds[:-1], bounds[1:]):
                pred, state = model.one_step(y[:, a:b], state, exog=ex.slice(a, b))
                means.append(pred.mean)
                variances.append(pred.var)
            torch.testing.assert_close(torch.cat(means, 1), whole.mean, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(torch.cat(variances, 1), whole.var, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(state.last_hidden, whole_state.last_hidden, atol=ATOL,
                                       rtol=1e-4)
        # the horizon from the carried state equals the horizon from the whole context
        future = _exog(length=T + H)
        future = Exog(torch.cat([ex.u, future.u[:, T:]], 1), torch.cat([ex.dt, future.dt[:, T:]],
                                                                       1))
        full = model.forecast(y, H, exog=future)
        carried = model.forecast(y[:, :0], H, whole_state,
                                 exog=Exog(future.u[:, T:], future.dt[:, T:]))
    torch.testing.assert_close(carried.mean, full.mean, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(carried.var, full.var, atol=ATOL, rtol=1e-4)


def test_step_mode_under_autograd_equals_the_single_step_update():
    """Rows one at a time with gradients on take the scan of length 1; without, the fused
    single-step update: both carry the time."""
    model = _timed_model(n_inputs=2)
    y, ex = _series(length=9), _exog(length=9)
    outs = []
    for grad in (True, False):
        state, means = None, []
        with torch.set_grad_enabled(grad):
            for t in range(9):
                pred, state = model.one_step(y[:, t : t + 1], state, exog=ex.slice(t, t + 1))
                means.append(pred.mean.detach())
        outs.append(torch.cat(means, 1))
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------ inputs


def test_inputs_are_causal_in_one_step_and_over_the_horizon():
    model = _timed_model(n_inputs=2)
    y, ex = _series(), _exog(length=T + H)
    with torch.no_grad():
        base, _ = model.one_step(y, exog=ex.slice(0, T))
        t = 17
        u2 = ex.u.clone()
        u2[:, t, 0] += 3.0
        pert, _ = model.one_step(y, exog=Exog(u2[:, :T], ex.dt[:, :T]))
        assert torch.equal(pert.mean[:, :t], base.mean[:, :t])
        assert (pert.mean[:, t] - base.mean[:, t]).abs().amax() > 1e-4  # the feedthrough
        fc = model.forecast(y[:, :30], H, exog=ex.slice(0, 30 + H))
        lead = 3  # the input of forecast row 3 moves leads >= 3 only
        u3 = ex.u.clone()
        u3[:, 30 + lead - 1, 1] += 3.0
        fc3 = model.forecast(y[:, :30], H, exog=Exog(u3[:, : 30 + H], ex.dt[:, : 30 + H]))
    torch.testing.assert_close(fc3.mean[:, : lead - 1], fc.mean[:, : lead - 1])
    assert (fc3.mean[:, lead - 1 :] - fc.mean[:, lead - 1 :]).abs().amax(-1).amin() > 1e-4


@pytest.mark.parametrize("head", ["last", "flatten"])
def test_unknown_future_inputs_hold_the_last_one_and_say_so(head, caplog):
    kw = dict(head=head) if head == "last" else dict(head="flatten", input_len=24,
                                                     forecast_patch_len=8, linear_skip=True)
    model = _timed_model(n_inputs=2, **kw)
    y, ex = _series(), _exog(length=T + H)
    ctx = y[:, :30]
    held = Exog(torch.cat([ex.u[:, :30], ex.u[:, 29:30].expand(-1, H, -1)], 1), ex.dt[:, :30])
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="tsssm"):
        known = model.forecast(ctx, H, exog=ex.slice(0, 30 + H))
        unknown = model.forecast(ctx, H, exog=ex.slice(0, 30))
        unknown_again = model.forecast(ctx, H, exog=ex.slice(0, 30))
        explicit = model.forecast(ctx, H, exog=held)
    assert torch.equal(unknown.mean, explicit.mean) and torch.equal(unknown.mean,
                                                                    unknown_again.mean)
    assert (known.mean - unknown.mean).abs().amax() > 1e-3
    warnings = [r for r in caplog.records if "holding the last input" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("cls", [MambaForecaster, KalmanMambaResidual, MambaKalmanFilter])
def test_bad_exog_is_a_clear_error(cls):
    torch.manual_seed(0)
    kw = dict(horizon=H, d_model=8, n_layers=1, d_state=4, n_inputs=2)
    if cls is not MambaForecaster:
        kw.update(input_len=24, patch_len=8)
    model = cls(C, **kw)
    model.nominal_step.fill_(1.0)
    y = _series(length=12)
    with pytest.raises(DataError, match="takes 2 inputs"):
        model.one_step(y)
    with pytest.raises(DataError, match="inputs u have shape"):
        model.one_step(y, exog=Exog(u=torch.zeros(3, 12, 1)))
    with pytest.raises(DataError, match="finite and positive"):
        model.one_step(y, exog=Exog(torch.zeros(3, 12, 2), torch.zeros(3, 12)))
    with pytest.raises(DataError, match="covers 13 rows"):
        model.forecast(y, 4, exog=Exog(torch.zeros(3, 13, 2)))


def test_gradients_reach_the_input_and_time_parameters():
    torch.manual_seed(0)
    model = MambaForecaster(C, d_model=16, n_layers=1, d_state=4, horizon=H, head="flatten",
                            input_len=24, forecast_patch_len=8, linear_skip=True, n_inputs=2,
                            scan_backend="torch").train()
    model.nominal_step.fill_(1.0)
    y, ex = _series(length=30), _exog(length=30)
    dist, _ = model.one_step(y, exog=ex)
    fc = model.forecast(y[:, :-H], H, exog=ex)
    (gaussian_nll(dist, y) + gaussian_nll(fc, y[:, -H:])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_weights_saved_before_time_steps_load_and_ignore_them():
    model = _timed_model()
    old = {k: v for k, v in model.state_dict().items() if k not in ("lead_time", "nominal_step")}
    fresh = _timed_model(seed=1)
    fresh.load_state_dict(old)
    assert torch.isnan(fresh.nominal_step) and (fresh.lead_time == 0).all()
    y = _series()
    with torch.no_grad():
        a, _ = fresh.one_step(y)
        b, _ = fresh.one_step(y, exog=Exog(dt=_irregular_dt()))
    assert torch.equal(a.mean, b.mean)


# ------------------------------------------------------------------ hybrids


@pytest.mark.parametrize("cls", [KalmanMambaResidual, MambaKalmanFilter])
def test_hybrids_chunked_equals_one_call_with_inputs_and_time(cls):
    torch.manual_seed(0)
    model = cls(C, horizon=H, input_len=24, d_model=16, n_layers=1, d_state=4, patch_len=8,
                n_inputs=2, scan_backend="torch")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if any(k in name for k in ("head", "lead_time", "input_gain", "input_response")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.nominal_step.fill_(1.0)
    model.eval()
    y, ex = _series(), _exog()
    with torch.no_grad():
        whole, _ = model.one_step(y, exog=ex)
        plain, _ = model.one_step(y, exog=Exog(ex.u, torch.ones_like(ex.dt)))
        state, means = None, []
        for a, b in ((0, 9), (9, 10), (10, 40)):
            pred, state = model.one_step(y[:, a:b], state, exog=ex.slice(a, b))
            means.append(pred.mean)
        torch.testing.assert_close(torch.cat(means, 1), whole.mean, atol=ATOL, rtol=1e-4)
        assert (whole.mean - plain.mean).abs().amax() > 1e-4  # the time steps matter
        fut = _exog(length=T + H)
        fc = model.forecast(y, H, exog=Exog(torch.cat([ex.u, fut.u[:, T:]], 1), ex.dt))
        held = model.forecast(y, H, exog=ex)
        one, fc2 = model.predict_window(y, H, exog=Exog(torch.cat([ex.u, fut.u[:, T:]], 1),
                                                          ex.dt))
    assert fc.mean.shape == (3, H, C) and torch.isfinite(fc.mean).all()
    assert (fc.mean - held.mean).abs().amax() > 1e-4  # the future inputs are used
    torch.testing.assert_close(fc2.mean, fc.mean)
    torch.testing.assert_close(one.mean, whole.mean, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("cls", [KalmanMambaResidual, MambaKalmanFilter])
def test_hybrids_train_with_inputs_and_time(cls):
    """The training pass (predict_window) is differentiable with exog, and reaches the input
    and time parameters."""
    torch.manual_seed(0)
    model = cls(C, horizon=H, input_len=24, d_model=8, n_layers=1, d_state=4, patch_len=8,
                n_inputs=2, scan_backend="torch").train()
    model.nominal_step.fill_(1.0)
    y, ex = _series(length=30), _exog(length=30)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # the second step: the zero-initialised step head has moved
        opt.zero_grad()
        one, fc = model.predict_window(y[:, :-H], H, exog=ex)
        (gaussian_nll(one, y[:, :-H]) + gaussian_nll(fc, y[:, -H:])).backward()
        opt.step()
    for name in ("input_gain", "input_response.weight", "lead_time"):
        p = model.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_the_deep_ssm_feedthrough_keeps_the_exact_likelihood():
    """y = H x + G u + v: the filter on y - G u, with G u added back, is the same filter
    shifted: predictions move by exactly G u and the variances do not change."""
    torch.manual_seed(0)
    model = MambaKalmanFilter(C, horizon=H, input_len=24, d_model=8, n_layers=1, d_state=4,
                              patch_len=8, n_inputs=2, scan_backend="torch").eval()
    y, ex = _series(), _exog()
    with torch.no_grad():
        gu = ex.u @ torch.tensor([[0.5, -1.0], [2.0, 0.3]]).t()
        base, _ = model.one_step(y - gu, exog=ex)
        model.input_gain.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.3]]))
        shifted, _ = model.one_step(y, exog=ex)
    # the step head starts at zero, so the noise terms do not depend on what the encoder reads
    torch.testing.assert_close(shifted.var, base.var, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shifted.mean - gu, base.mean, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ inputs help


def _fit(model: MambaForecaster, y: torch.Tensor, ex: Exog, steps: int, length: int = 32
         ) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, y.shape[1] - length, (16,), generator=g).tolist()
        yb = torch.stack([y[0, s : s + length] for s in starts])
        eb = Exog(None if ex.u is None else torch.stack([ex.u[0, s : s + length]
                                                         for s in starts]),
                  torch.stack([ex.dt[0, s : s + length] for s in starts]))
        pred, _ = call_one_step(model, yb, None, eb)
        loss = gaussian_nll(pred, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_inputs_help_on_a_forced_system(one_thread):
    """A first-order system driven by a known input at irregular times: x relaxes towards
    the input with time constant 2 s, observed with noise. With data.inputs the input's
    effect on the next sample is predictable; without it, it is noise."""
    g = np.random.default_rng(0)
    n, train = 1200, 900
    dt = g.choice([0.5, 1.0, 2.0], size=n)
    u = g.normal(size=n)
    x = np.zeros(n)
    for t in range(1, n):  # exact for an input held over the step: x' = (u - x) / 2
        a = np.exp(-dt[t] / 2.0)
        x[t] = a * x[t - 1] + (1 - a) * 2.0 * u[t - 1]
    y = x + 0.05 * g.normal(size=n)
    y = torch.tensor((y - y[:train].mean()) / y[:train].std(), dtype=torch.float32)
    ex = Exog(torch.tensor(u, dtype=torch.float32).view(1, -1, 1),
              torch.tensor(dt, dtype=torch.float64).view(1, -1))
    mse = {}
    for k in (0, 1):
        torch.manual_seed(0)
        model = MambaForecaster(1, d_model=8, n_layers=1, d_state=4, horizon=4, head="last",
                                revin=False, n_inputs=k, scan_backend="torch")
        exog = ex if k else Exog(dt=ex.dt)
        model.initialize(y.view(1, -1, 1)[:, :train], exog=exog.slice(0, train))
        _fit(model.train(), y.view(1, -1, 1)[:, :train], exog.slice(0, train), steps=60)
        with torch.no_grad():
            pred, _ = model.eval().one_step(y.view(1, -1, 1), exog=exog)
        mse[k] = float((pred.mean[0, train:, 0] - y[train:]).square().mean())
    assert mse[1] < 0.5 * mse[0], mse


if __name__ == "__main__":
    write_golden()
