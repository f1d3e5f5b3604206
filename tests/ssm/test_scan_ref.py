"""The specification (sequential loop) and the chunked torch path of the selective scan."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tsssm.errors import ConfigError, ModelError
from tsssm.ssm import scan as scan_mod
from tsssm.ssm import scan_ref, selective_scan, selective_scan_ref
from tsssm.ssm.scan import selective_scan_torch


def make_inputs(
    batch=2, dim=6, N=4, L=23, groups=None, dtype=torch.float32, with_D=True, with_z=True,
    with_bias=True, with_h0=True, seed=None, device="cpu", positive_delta=False,
):
    """Fresh random inputs (a new seed per call unless given), all requiring grad.

    ``positive_delta``: Δ itself positive (for delta_softplus=False), else raw values for softplus.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(device)

    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)
    inputs = {
        "u": rnd(batch, dim, L),
        "delta": (torch.rand(batch, dim, L, generator=g) * 0.9 + 0.05).to(dtype).to(device)
        if positive_delta else rnd(batch, dim, L, scale=0.5, shift=-0.5),
        # A = -exp(A_log) as in Mamba; float32 like a parameter (float64 for gradcheck)
        "A": -torch.exp(torch.randn(dim, N, generator=g) * 0.5)
        .to(torch.float64 if dtype == torch.float64 else torch.float32).to(device),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim) if with_D else None,
        "z": rnd(batch, dim, L) if with_z else None,
        "delta_bias": (
            (torch.rand(dim, generator=g) * 0.2).to(dtype).to(device) if positive_delta
            else rnd(dim, scale=0.3)
        ) if with_bias else None,
        "initial_state": rnd(batch, dim, N) if with_h0 else None,
    }
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    return inputs


def detached(inputs):
    return {k: (v.detach() if v is not None else None) for k, v in inputs.items()}


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_with_grads(fn, inputs, softplus=True, seed=0):
    """out, final state and the gradient of a random linear functional of both, per input."""
    out, h = fn(**inputs, delta_softplus=softplus)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out.device, torch.float32)
    w_h = torch.randn(h.shape, generator=g).to(h.device, torch.float32)
    loss = (out.float() * w_out).sum() + (h.float() * w_h).sum()
    names = [k for k in GRAD_NAMES if inputs.get(k) is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return out, h, dict(zip(names, grads))


def ref_fn(**kw):
    return selective_scan_ref(**kw, return_final_state=True)


def assert_close(name, got, ref, rel, atol=1e-5):
    """‖got − ref‖ ≤ rel·‖ref‖ + atol·√n and max error ≤ 10·rel·max|ref| + atol; NaN never passes.

    ``atol`` covers gradients that are exactly zero in exact arithmetic (e.g. dA at L=1 from a
    zero state), which fused multiply-adds leave at rounding level. Inputs are O(1).
    """
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).norm().item()
    bound = rel * ref.norm().item() + atol * math.sqrt(ref.numel())
    assert err <= bound, f"{name}: error norm {err:.2e} > {bound:.2e} (rel {rel:.0e})"
    max_err = (got - ref).abs().max().item()
    max_bound = 10 * rel * ref.abs().max().item() + atol
    assert max_err <= max_bound, f"{name}: max error {max_err:.2e} > {max_bound:.2e}"


# --------------------------------------------------------------------------------------------
# The specification itself
# --------------------------------------------------------------------------------------------


def test_reference_matches_hand_computed_two_steps():
    # one channel, one state: h1 = e^{Δ1 a} h0 + Δ1 b1 u1; y1 = c1 h1 + D u1; out = y silu(z)
    u = torch.tensor([[[0.7, -1.2]]])
    delta = torch.tensor([[[0.3, 0.9]]])
    A = torch.tensor([[-1.5]])
    B = torch.tensor([[[2.0, -0.5]]])
    C = torch.tensor([[[0.4, 1.1]]])
    D = torch.tensor([0.25])
    z = torch.tensor([[[0.6, -2.0]]])
    h0 = torch.tensor([[[0.8]]])
    out, h = selective_scan_ref(u, delta, A, B, C, D, z, initial_state=h0, return_final_state=True)
    h1 = math.exp(0.3 * -1.5) * 0.8 + 0.3 * 2.0 * 0.7
    h2 = math.exp(0.9 * -1.5) * h1 + 0.9 * -0.5 * -1.2
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    want = [(0.4 * h1 + 0.25 * 0.7) * silu(0.6), (1.1 * h2 + 0.25 * -1.2) * silu(-2.0)]
    assert torch.allclose(out[0, 0], torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert torch.allclose(h[0, 0, 0], torch.tensor(h2), rtol=1e-6)


def test_reference_softplus_and_bias():
    inp = make_inputs(L=5, with_z=False, with_D=False, with_h0=False)
    base = detached(inp)
    raw = selective_scan_ref(**{**base, "delta_bias": None, "delta": torch.nn.functional.softplus(
        base["delta"] + base["delta_bias"][:, None])})
    fused = selective_scan_ref(**base, delta_softplus=True)
    assert torch.allclose(raw, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [None, 2])
def test_reference_gradcheck_float64(groups):
    inp = make_inputs(batch=1, dim=4, N=2, L=5, groups=groups, dtype=torch.float64)
    names = [k for k in GRAD_NAMES if inp[k] is not None]

    def f(*args):
        kw = dict(zip(names, args))
        out, h = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
        return out, h

    assert torch.autograd.gradcheck(f, [inp[k] for k in names], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("inner,save_all", [("doubling", True), ("loop", True), ("step", True),
                                            ("step", False)])
def test_torch_path_gradcheck_float64(inner, save_all, monkeypatch):
    if not save_all:  # the CPU path's chunk-recompute mode (long sequences)
        monkeypatch.setattr(scan_ref, "STEP_SAVE_ALL_BYTES", 0)
    # the hand-written backward of the chunked path, checked by finite differences
    inp = make_inputs(batch=1, dim=4, N=3, L=11, groups=2, dtype=torch.float64)
    names = [k for k in GRAD_NAMES if inp[k] is not None]

    def f(*args):
        kw = dict(zip(names, args))
        return selective_scan_torch(**kw, delta_softplus=True, chunk=4, inner=inner)

    assert torch.autograd.gradcheck(f, [inp[k] for k in names], eps=1e-6, atol=1e-5)


def test_reference_stays_finite_with_fast_decay():
    inp = make_inputs(L=9, with_h0=False)
    with torch.no_grad():
        inp["delta"].fill_(60.0)
        inp["A"].fill_(-16.0)  # exp(-960) underflows to 0: must not produce NaN
    out = selective_scan_ref(**detached(inp))
    assert torch.isfinite(out).all()
    out2, _ = selective_scan_torch(**detached(inp))
    assert torch.isfinite(out2).all()
    assert torch.allclose(out, out2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The chunked torch path against the specification
# --------------------------------------------------------------------------------------------

CASES = [
    # (L, groups, chunk, inner, options)
    (37, None, 8, "doubling", dict()),
    (37, 3, 5, "loop", dict()),
    (1, None, 64, "doubling", dict()),
    (64, None, 64, "doubling", dict(with_z=False, with_D=False, with_bias=False, with_h0=False)),
    (50, 2, 16, "doubling", dict(with_bias=False)),
    (19, None, 1, "loop", dict(with_h0=False)),
    (37, None, 8, "step", dict()),
    (45, 3, 16, "step", dict(with_bias=False)),
    (1, None, 64, "step", dict(with_z=False, with_D=False, with_bias=False, with_h0=False)),
    (33, 2, 64, "auto", dict(with_h0=False)),
]


@pytest.mark.parametrize("L,groups,chunk,inner,opts", CASES)
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_path_matches_reference(L, groups, chunk, inner, opts, softplus):
    _check_torch_path(L, groups, chunk, inner, opts, softplus)


@pytest.mark.parametrize("L,groups,chunk", [(37, None, 8), (45, 3, 16), (5, None, 64)])
def test_cpu_step_path_recompute_mode_matches_reference(L, groups, chunk, monkeypatch):
    """Beyond STEP_SAVE_ALL_BYTES the CPU path keeps chunk starts and recomputes."""
    monkeypatch.setattr(scan_ref, "STEP_SAVE_ALL_BYTES", 0)
    _check_torch_path(L, groups, chunk, "step", {}, True)


def test_cpu_step_path_saves_per_step_states_only_for_training():
    inp = detached(make_inputs(L=12))
    dt = scan_ref.discretise_delta(inp["delta"], inp["delta_bias"], True, torch.float32)
    Bg, Cg = inp["B"][:, None], inp["C"][:, None]
    args = (inp["u"], dt, inp["A"], Bg, Cg, inp["initial_state"])
    y, h, saved = scan_ref.stepwise_scan_forward(*args, chunk=4)
    assert saved[0] == "all" and saved[1].shape == (12, 2, 1, 4, 6)
    y2, h2, none = scan_ref.stepwise_scan_forward(*args, chunk=4, save_states=False)
    assert none is None and torch.equal(y, y2) and torch.equal(h, h2)


def _check_torch_path(L, groups, chunk, inner, opts, softplus):
    inp = make_inputs(L=L, groups=groups, dim=6, positive_delta=not softplus, **opts)
    ref_out, ref_h, ref_g = run_with_grads(ref_fn, inp, softplus)

    def fast(**kw):
        return selective_scan_torch(**kw, chunk=chunk, inner=inner)

    out, h, g = run_with_grads(fast, inp, softplus)
    assert_close("out", out, ref_out, 1e-5)
    assert_close("final_state", h, ref_h, 1e-5)
    assert set(g) == set(ref_g)
    for k in ref_g:
        assert_close(f"d{k}", g[k], ref_g[k], 2e-5)


def test_torch_path_bfloat16_inputs():
    inp = make_inputs(L=40, dtype=torch.bfloat16)
    ref_out, ref_h, ref_g = run_with_grads(ref_fn, inp)
    out, h, g = run_with_grads(lambda **kw: selective_scan_torch(**kw, chunk=16), inp)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close("out", out, ref_out, 1e-2)
    for k in ref_g:
        assert g[k].dtype == inp[k].dtype
        assert_close(f"d{k}", g[k], ref_g[k], 1e-2)


def test_dispatcher_torch_backend_returns_final_state_on_request():
    inp = detached(make_inputs(L=12))
    out = selective_scan(**inp, backend="torch")
    out2, h = selective_scan(**inp, backend="torch", return_final_state=True)
    assert torch.equal(out, out2) and h.shape == (2, 6, 4) and h.dtype == torch.float32


def test_chunked_calls_equal_one_pass():
    inp = detached(make_inputs(L=45, with_h0=False))
    full, h_full = selective_scan(**inp, delta_softplus=True, return_final_state=True)
    h, pieces = None, []
    for s, e in ((0, 7), (7, 8), (8, 30), (30, 45)):
        piece = {k: (v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v)
                 for k, v in inp.items() if k != "initial_state"}
        y, h = selective_scan(**piece, delta_softplus=True, initial_state=h,
                              return_final_state=True)
        pieces.append(y)
    assert torch.allclose(torch.cat(pieces, -1), full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Input validation and backend choice
# --------------------------------------------------------------------------------------------


def test_bad_shapes_raise_clear_errors():
    inp = detached(make_inputs(L=8))
    with pytest.raises(ModelError, match="delta must have u's shape"):
        selective_scan(**{**inp, "delta": inp["delta"][..., :-1]})
    with pytest.raises(ModelError, match="A must be"):
        selective_scan(**{**inp, "A": inp["A"][:-1]})
    with pytest.raises(ModelError, match="B must be"):
        selective_scan(**{**inp, "B": inp["B"][..., :-1]})
    with pytest.raises(ModelError, match="not divisible by groups"):
        selective_scan(**{**inp, "B": torch.randn(2, 4, 4, 8), "C": torch.randn(2, 4, 4, 8)})
    with pytest.raises(ModelError, match="initial_state must be"):
        selective_scan(**{**inp, "initial_state": torch.zeros(2, 6, 5)})
    with pytest.raises(ModelError, match="dtype"):
        selective_scan(**{**inp, "u": inp["u"].to(torch.int32)})
    with pytest.raises(ModelError, match="u must be"):
        selective_scan(**{**inp, "u": inp["u"][0]})


def test_backend_choice():
    inp = detached(make_inputs(L=4))
    with pytest.raises(ConfigError, match="backend must be one of"):
        selective_scan(**inp, backend="cuda")
    with pytest.raises(ModelError, match="needs CUDA tensors"):
        selective_scan(**inp, backend="triton")


def test_auto_fallback_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(scan_mod, "_fallback_logged", False)
    inp = detached(make_inputs(L=4))
    with caplog.at_level(logging.INFO, logger="tsssm.ssm.scan"):
        a = selective_scan(**inp)
        b = selective_scan(**inp)
    msgs = [r.getMessage() for r in caplog.records if "torch path" in r.getMessage()]
    assert len(msgs) == 1 and "cpu" in msgs[0]
    assert torch.equal(a, b)


def test_inference_under_no_grad_saves_no_states(monkeypatch):
    """Parameters that require grad, evaluated under torch.no_grad (scoring): nothing is kept
    for a backward that cannot happen."""
    seen = []
    real = scan_ref.stepwise_scan_forward

    def spy(*args, **kwargs):
        seen.append(kwargs["save_states"])
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_ref, "stepwise_scan_forward", spy)
    inp = make_inputs(L=9)  # requires grad
    with torch.no_grad():
        selective_scan_torch(**inp, delta_softplus=True)
    selective_scan_torch(**inp, delta_softplus=True)
    assert seen == [False, True]
