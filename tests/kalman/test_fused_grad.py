"""Gradients of the fused Kalman filter (the generated adjoint kernel) against torch autograd
through the sequential filter (the specification) and against finite differences.

CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1 per test, as in
test_fused_triton.py); GPU tests (-m gpu) the compiled kernels. Gradients of the symmetric
inputs (Q, R, P0) are compared symmetrised: the fused path returns the symmetric-convention
gradient, the one that any symmetric parametrisation needs (see fused_adjoint's docstring).
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_cases import random_y, spd

from tsssm.kalman import LinearGaussianSSM, kalman_filter
from tsssm.kalman import fused_adjoint as fa
from tsssm.kalman.fused_triton import fused_kalman_filter

FIELDS = ("F", "H", "Q", "R", "m0", "P0", "c", "d")
SYM = ("Q", "R", "P0")


def random_model(gen, n, p, batch=(), with_cd=True, structural=False):
    if structural:  # a local linear trend per state pair: entries 0 and 1 compiled in
        F = torch.zeros(n, n, dtype=torch.float64)
        for i in range(0, n, 2):
            F[i, i] = 1.0
            if i + 1 < n:
                F[i, i + 1] = F[i + 1, i + 1] = 1.0
        F = F.expand(*batch, n, n).clone()
        H = torch.zeros(*batch, p, n, dtype=torch.float64)
        H[..., :, 0] = 1.0
        H[..., 0, n - 1] = -1.0
        Q = torch.diag_embed(torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.1)
    else:
        F = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
        F = 0.9 * F / torch.linalg.matrix_norm(F, ord=2)[..., None, None]
        H = torch.randn(*batch, p, n, generator=gen, dtype=torch.float64)
        Q = spd(gen, *batch, n, n, scale=0.3, jitter=0.3)
    R = spd(gen, *batch, p, p, scale=0.5, jitter=0.3)
    m0 = torch.randn(*batch, n, generator=gen, dtype=torch.float64)
    P0 = spd(gen, *batch, n, n, jitter=0.3)
    c = 0.1 * torch.randn(*batch, n, generator=gen, dtype=torch.float64) if with_cd else None
    d = 0.1 * torch.randn(*batch, p, generator=gen, dtype=torch.float64) if with_cd else None
    return LinearGaussianSSM(F, H, Q, R, m0, P0, d=d, c=c)


def leaves(ssm, dtype, grad_fields):
    """A copy of the model in ``dtype`` whose ``grad_fields`` are fresh leaves."""
    out = {}
    for f in FIELDS:
        v = getattr(ssm, f)
        if v is None:
            continue
        v = v.detach().to(dtype).clone()
        out[f] = v.requires_grad_(f in grad_fields)
    return ssm._replace(**out)


def loss_of(res, weights):
    """A functional touching every differentiable output of the filter."""
    total = res.loglik.sum() * weights["loglik"]
    for name in ("log_liks", "filtered_mean", "filtered_cov", "predicted_mean", "predicted_cov",
                 "innovation", "nis", "predicted_obs_mean", "predicted_obs_cov"):
        if name in weights:
            total = total + (getattr(res, name) * weights[name]).sum()
    return total


def make_weights(gen, res, names):
    w = {"loglik": 0.7}
    for name in names:
        shape = getattr(res, name).shape
        w[name] = 0.1 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    return w


def grads(ssm, y, weights, fused, grad_fields, want_dy):
    res = fused_kalman_filter(ssm, y, outputs="all") if fused else kalman_filter(ssm, y)
    targets = [getattr(ssm, f) for f in grad_fields] + ([y] if want_dy else [])
    dev, dt = res.loglik.device, res.loglik.dtype
    w = {k: (v.to(dev, dt) if torch.is_tensor(v) else v) for k, v in weights.items()}
    gs = torch.autograd.grad(loss_of(res, w), targets)
    out = dict(zip([*grad_fields, *(["y"] if want_dy else [])], gs))
    for f in SYM:
        if f in out:
            out[f] = 0.5 * (out[f] + out[f].mT)
    return res, out


def check(ssm64, y64, grad_fields, out_names, dtype, rtol, atol, want_dy=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref_res = kalman_filter(ssm64, y64)
    weights = make_weights(gen, ref_res, out_names)
    ref_model = leaves(ssm64, torch.float64, grad_fields)
    y_ref = y64.clone().requires_grad_(want_dy)
    _, ref = grads(ref_model, y_ref, weights, False, grad_fields, want_dy)
    model = leaves(ssm64, dtype, grad_fields)
    y = y64.to(dtype).clone().requires_grad_(want_dy)
    res, got = grads(model, y, weights, True, grad_fields, want_dy)
    assert set(got) == set(ref)
    for k in ref:
        a, b = got[k].double(), ref[k]
        if k == "y":  # the reference leaves NaN-propagated garbage out: missing entries get 0
            b = torch.where(torch.isnan(y64), torch.zeros_like(b), b)
        assert a.shape == b.shape, k
        assert torch.isfinite(a).all(), f"d{k}: not finite"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"d{k}")


ALL_OUTPUTS = ("log_liks", "filtered_mean", "filtered_cov", "predicted_mean", "predicted_cov",
               "innovation", "nis", "predicted_obs_mean", "predicted_obs_cov")


# ------------------------------------------------------------------------------------------------
# interpreter (CPU, default tier)


@pytest.mark.parametrize(
    ("n", "p", "batch", "T", "with_cd", "structural"),
    [
        (2, 1, (3,), 11, False, True),  # local linear trend, per-series matrices
        (3, 2, (), 9, True, False),  # shared matrices, multivariate, partial missing
        (4, 3, (2,), 7, True, False),
        (4, 1, (), 10, False, True),  # structural zeros and ones in F and H
    ],
)
def test_gradients_match_sequential_float64(interpret, n, p, batch, T, with_cd, structural):
    gen = torch.Generator().manual_seed(100 * n + 10 * p + T)
    ssm = random_model(gen, n, p, batch=batch, with_cd=with_cd, structural=structural)
    y = random_y(gen, (*batch, T, p) if batch else (3, T, p))
    fields = [f for f in FIELDS if getattr(ssm, f) is not None]
    check(ssm, y, fields, ALL_OUTPUTS, torch.float64, rtol=1e-9, atol=1e-9)


def test_gradients_float32(interpret):
    gen = torch.Generator().manual_seed(3)
    ssm = random_model(gen, 3, 2, batch=(4,))
    y = random_y(gen, (4, 12, 2))
    fields = [f for f in FIELDS if getattr(ssm, f) is not None]
    check(ssm, y, fields, ("log_liks", "predicted_obs_mean", "predicted_obs_cov"),
          torch.float32, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("grad_fields", [("Q", "R"), ("m0",), ("F", "P0", "d")])
def test_only_some_inputs_need_grad(interpret, grad_fields):
    """Structural entries are compiled in where no gradient is wanted; the others still exact."""
    gen = torch.Generator().manual_seed(len(grad_fields))
    ssm = random_model(gen, 2, 1, with_cd=True, structural=True)
    y = random_y(gen, (5, 10, 1))
    check(ssm, y, list(grad_fields), ("log_liks", "filtered_mean"), torch.float64,
          rtol=1e-9, atol=1e-9, want_dy=False)


def test_loglik_only_and_steady_state(interpret):
    """Complete data, long enough for the forward's steady-state path: the backward still
    differentiates the whole recursion."""
    gen = torch.Generator().manual_seed(11)
    ssm = random_model(gen, 2, 1, with_cd=False, structural=True)
    y = random_y(gen, (3, 120, 1), missing=0.0)
    y[..., 3, :] = 0.25
    fields = ["F", "H", "Q", "R", "m0", "P0"]
    check(ssm, y, fields, (), torch.float64, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_depths_agree(interpret, monkeypatch, depth):
    """How many steps of loads are in flight changes nothing computed (T < depth included)."""
    monkeypatch.setattr(fa, "ADJOINT_PREFETCH", depth)
    gen = torch.Generator().manual_seed(depth)
    ssm = random_model(gen, 2, 1, batch=(3,), with_cd=True, structural=True)
    fields = [f for f in FIELDS if getattr(ssm, f) is not None]
    for T in (2, 9):
        y = random_y(gen, (3, T, 1))
        check(ssm, y, fields, ("log_liks", "predicted_obs_cov"), torch.float64, rtol=1e-9,
              atol=1e-9)


def test_gradcheck_against_finite_differences(interpret):
    gen = torch.Generator().manual_seed(5)
    ssm = random_model(gen, 2, 2, with_cd=True)
    y = random_y(gen, (2, 6, 2))

    def f(F, Q, c, y_):
        Qs = 0.5 * (Q + Q.mT)  # symmetric parametrisation, as a model would use
        res = fused_kalman_filter(ssm._replace(F=F, Q=Qs, c=c), y_, outputs="all")
        return res.loglik, res.filtered_mean

    args = [ssm.F.clone().requires_grad_(), ssm.Q.clone().requires_grad_(),
            ssm.c.clone().requires_grad_(), y.clone().requires_grad_()]
    # finite differences through NaN entries are NaN: perturb observed y only
    assert torch.autograd.gradcheck(lambda F, Q, c: f(F, Q, c, args[3].detach()), args[:3],
                                    eps=1e-6, atol=1e-6)


def test_backward_writes_every_output(interpret, monkeypatch):
    """Poisoned (NaN-filled) gradient buffers: an element the adjoint kernel skips fails."""
    calls = []

    def nan_empty(shape, device, dtype):
        calls.append(shape)
        return torch.full(shape, math.nan, device=device, dtype=dtype)

    monkeypatch.setattr(fa, "_empty", nan_empty)
    gen = torch.Generator().manual_seed(8)
    ssm = random_model(gen, 3, 1, batch=(2,), with_cd=False)
    y = random_y(gen, (2, 9, 1))
    check(ssm, y, ["H", "R"], ("filtered_mean",), torch.float64, rtol=1e-9, atol=1e-9)
    assert len(calls) == 2  # dy and the parameter gradients


def test_generated_source_folds_structure():
    """No load and no term for structural zeros/ones of matrices without gradient."""
    spec = fa.AdjointSpec(n=2, p=1, dtype="fp32", batched=(), diff=("Q",), has_c=False,
                          has_d=False, F_code=((1, 1), (0, 1)), H_code=((1, 0),),
                          Q_nz=((True, False), (False, True)), cotangents=(),
                          loglik_cotangent=True, want_dy=False)
    src = fa.kernel_source(spec, "k")
    assert "F_ptr +" not in src and "H_ptr +" not in src
    assert "Q_ptr + 1" in src  # Q's off-diagonal: its gradient is wanted even though 0
    spec_all = spec.__class__(**{**spec.__dict__, "diff": ("F", "H", "Q")})
    assert "F_ptr + 1" in fa.kernel_source(spec_all, "k")


def test_no_grad_path_unchanged(interpret):
    """Without grad mode the fused filter is the forward kernel alone (no predicted states)."""
    gen = torch.Generator().manual_seed(2)
    ssm = leaves(random_model(gen, 2, 1, with_cd=False), torch.float64, ("Q",))
    y = random_y(gen, (2, 8, 1))
    with torch.no_grad():
        res = fused_kalman_filter(ssm, y)
    assert res.predicted_cov is None and not res.loglik.requires_grad
    res = fused_kalman_filter(ssm, y)
    assert res.predicted_cov is None and res.loglik.requires_grad


# ------------------------------------------------------------------------------------------------
# GPU (-m gpu): compiled kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "p", "batched"), [(2, 1, True), (3, 2, False)])
def test_gpu_gradients_match_sequential(dtype, n, p, batched):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(n + p)
    S, T = 300, 257
    ssm = random_model(gen, n, p, batch=(S,) if batched else (), structural=n == 2)
    y = random_y(gen, (S, T, p), missing=0.05)
    dev = torch.device("cuda")
    ssm = ssm._replace(**{f: getattr(ssm, f).to(dev) for f in FIELDS
                          if getattr(ssm, f) is not None})
    fields = [f for f in FIELDS if getattr(ssm, f) is not None]
    tol = 1e-8 if dtype == torch.float64 else 5e-3
    check(ssm, y.to(dev), fields, ("log_liks", "predicted_obs_mean", "predicted_obs_cov"),
          dtype, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_kalman_forecaster_trains_through_the_fused_path():
    """The Kalman forecaster's training loss (one-step NLL) has the same gradient with
    method="fused" (the generated adjoint) as with the sequential filter."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tsssm.anomaly.scores import gaussian_nll
    from tsssm.models.kalman import KalmanForecaster

    gen = torch.Generator().manual_seed(4)
    y = torch.randn(16, 500, 3, generator=gen, dtype=torch.float64).cumsum(1) * 0.1
    y[torch.rand(y.shape, generator=gen) < 0.05] = math.nan
    y = y.cuda()
    grads = {}
    for method in ("sequential", "fused"):
        torch.manual_seed(0)
        model = KalmanForecaster(3, components=("level", "trend"), method=method).cuda()
        model.initialize(y)
        pred, _ = model.one_step(y)
        loss = gaussian_nll(y, pred)
        loss.backward()
        grads[method] = (float(loss), model.theta.grad.clone())
    assert abs(grads["fused"][0] - grads["sequential"][0]) <= 1e-9 * abs(grads["sequential"][0])
    torch.testing.assert_close(grads["fused"][1], grads["sequential"][1], rtol=1e-7, atol=1e-9)


def test_structural_model_parameters_get_exact_gradients(interpret):
    """The Kalman forecaster's loss, the NLL of the one-step predictions, differentiated into
    its parameters theta through the fused path equals the sequential filter's gradient."""
    from tsssm.anomaly.scores import gaussian_nll
    from tsssm.models.base import Gaussian
    from tsssm.models.kalman import KalmanForecaster

    gen = torch.Generator().manual_seed(4)
    y = torch.randn(3, 40, 2, generator=gen, dtype=torch.float64).cumsum(1) * 0.1
    y[torch.rand(y.shape, generator=gen) < 0.1] = math.nan
    model = KalmanForecaster(2, components=("level", "trend", "seasonal"), seasonal_period=4,
                             seasonal_kind="dummy")
    model.initialize(y)
    yk = model._channels_as_batch(y)  # (B, C, T, 1)
    out = {}
    for fused in (False, True):
        model.zero_grad()
        ssm = model.ssm()
        res = (fused_kalman_filter(ssm, yk, outputs="all") if fused else kalman_filter(ssm, yk))
        pred = Gaussian(res.predicted_obs_mean[..., 0].transpose(1, 2),
                        res.predicted_obs_cov[..., 0, 0].transpose(1, 2))
        loss = gaussian_nll(y, pred)
        loss.backward()
        out[fused] = (float(loss), model.theta.grad.clone())
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-10)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-8, atol=1e-10)
