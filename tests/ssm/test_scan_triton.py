"""Triton kernels of the selective scan against the sequential reference.

CPU tests run the kernels under Triton's interpreter. ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates a kernel, i.e. when ``tsssm.ssm.scan_triton`` is imported, so the
``interpreted`` fixture sets it and reloads that module (whatever imported it before, in this
process), then restores both afterwards. GPU tests (``-m gpu``) use the compiled kernels.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from tsssm.ssm import selective_scan, selective_scan_ref  # noqa: E402
from tsssm.ssm.scan import selective_scan_torch, selective_scan_triton  # noqa: E402

from .test_scan_ref import assert_close, make_inputs, run_with_grads  # noqa: E402


def _reload_scan_triton():
    import tsssm.ssm.scan_triton as st

    return importlib.reload(st)


@pytest.fixture(scope="module")
def interpreted():
    """tsssm.ssm.scan_triton with its kernels built for the CPU interpreter."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    st = _reload_scan_triton()
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(st._scan_fwd_kernel, InterpretedFunction)
    yield st
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    _reload_scan_triton()


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer of the launchers starts as NaN: an unwritten element cannot pass."""

    def factory(st):
        def nan_empty(*shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(st, "_empty", nan_empty)
        return st

    return factory


def ref_fn(**kw):
    return selective_scan_ref(**kw, return_final_state=True)


def triton_fn(**kw):
    return selective_scan_triton(**kw)


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def check_against_reference(inp, softplus, dtype, tol=None):
    tol = tol or TOL[dtype]
    ref_out, ref_h, ref_g = run_with_grads(ref_fn, inp, softplus)
    out, h, g = run_with_grads(triton_fn, inp, softplus)
    assert out.dtype == inp["u"].dtype and h.dtype == torch.float32
    assert_close("out", out, ref_out, tol)
    assert_close("final_state", h, ref_h, max(tol, 2e-5))
    assert set(g) == set(ref_g)
    for k in ref_g:
        assert g[k].dtype == inp[k].dtype, f"d{k} dtype"
        assert_close(f"d{k}", g[k], ref_g[k], 2 * tol)


# --------------------------------------------------------------------------------------------
# Interpreter (CPU, default tier): small shapes, several chunks and dim blocks
# --------------------------------------------------------------------------------------------

INTERP_CASES = [
    # (dtype, dim, L, groups, softplus, options); prefetch = (forward, backward) PREFETCH,
    # bc = how dB/dC cross dim blocks: "relaxed"/"acq_rel" atomics or "partials"
    (torch.float32, 6, 37, None, True, dict()),
    (torch.float32, 6, 37, None, True, dict(prefetch=(0, 1), bc="partials")),
    (torch.float32, 6, 21, None, True, dict(unroll=(4, 2), prefetch=(1, 1))),
    (torch.float32, 6, 1, None, False, dict(with_z=False, with_D=False, with_bias=False,
                                            with_h0=False)),
    (torch.float32, 6, 1, None, True, dict(prefetch=(1, 1), bc="acq_rel")),
    (torch.float32, 8, 45, 2, True, dict(with_D=False, with_bias=False, unroll=(2, 2),
                                         prefetch=(1, 1))),
    (torch.float32, 6, 33, None, False, dict(with_z=False, with_h0=False, prefetch=(0, 0),
                                             bc="partials")),
    (torch.bfloat16, 6, 37, None, True, dict()),
    (torch.bfloat16, 6, 37, None, True, dict(prefetch=(0, 1), bc="partials")),
    (torch.float16, 8, 20, 4, True, dict(with_z=False, prefetch=(1, 1))),
    (torch.float16, 8, 20, 4, True, dict(with_z=False, prefetch=(0, 0), bc="acq_rel")),
    # B/C loaded as 2-D tiles (fwd and bwd), the backward's per-state prefetch (one or two
    # states ahead, masked past N: N = 5 pads to 8), 2-channel backward blocks
    (torch.float32, 6, 37, None, True, dict(unroll=(4, 2), prefetch=(1, 0), N=5,
                                            extra=dict(BC_2D=1, STATE_PREFETCH=1))),
    pytest.param(torch.float32, 6, 33, None, False,
                 dict(with_z=False, with_h0=False, prefetch=(0, 1), bc="partials",
                      bwd_block_d=2, extra=dict(STATE_PREFETCH=1)), marks=pytest.mark.slow),
    (torch.float32, 8, 45, 2, True, dict(with_D=False, unroll=(2, 1), bwd_block_d=2,
                                         extra=dict(BC_2D=1, STATE_PREFETCH=1))),
    pytest.param(torch.bfloat16, 6, 16, None, True, dict(unroll=(1, 2), extra=dict(BC_2D=1)),
                 marks=pytest.mark.slow),
    (torch.float32, 3, 37, None, True, dict(unroll=(2, 2), bwd_block_d=1,
                                            extra=dict(BC_2D=1, STATE_PREFETCH=1))),
    # dB/dC atomics per channel row (no sum over the block's channels first), with groups,
    # masked channel rows (dim 6 in blocks of 4) and two states per iteration
    (torch.float32, 6, 37, None, True, dict(extra=dict(BC_2D=1, STATE_PREFETCH=1,
                                                       ROW_ATOMICS=1))),
    (torch.float32, 8, 45, 2, True, dict(unroll=(2, 2), extra=dict(ROW_ATOMICS=1))),
    (torch.bfloat16, 6, 37, None, True, dict(extra=dict(BC_2D=1, STATE_PREFETCH=1,
                                                        ROW_ATOMICS=1))),
    # the carried state taken into the chunk scan (forward and the backward's recompute), with
    # and without an initial state, several chunks, 1/2/4 states per iteration
    (torch.float32, 6, 37, None, True, dict(unroll=(4, 1), extra=dict(
        BC_2D=1, STATE_PREFETCH=1, ROW_ATOMICS=1, CARRY_IN_SCAN=1))),
    (torch.float32, 8, 45, 2, True, dict(with_h0=False, unroll=(2, 2), prefetch=(1, 1),
                                         extra=dict(CARRY_IN_SCAN=1))),
    (torch.bfloat16, 6, 37, None, True, dict(unroll=(1, 1), extra=dict(
        BC_2D=1, STATE_PREFETCH=1, CARRY_IN_SCAN=1, MAXNREG=128))),
    # 8 and 16 states per forward iteration (static_range), N = 16 and N = 11 (pads to 16)
    (torch.float32, 6, 37, None, True, dict(unroll=(8, 1), N=16, extra=dict(CARRY_IN_SCAN=1))),
    (torch.bfloat16, 6, 21, None, True, dict(unroll=(16, 1), N=11, prefetch=(1, 0),
                                             extra=dict(BC_2D=1, CARRY_IN_SCAN=1))),
]


@pytest.mark.parametrize("dtype,dim,L,groups,softplus,opts", INTERP_CASES)
def test_interpreted_kernels_match_reference(
    interpreted, poisoned, monkeypatch, dtype, dim, L, groups, softplus, opts
):
    st = poisoned(interpreted)
    # each case sets the launch shape itself: no per-dtype default overrides it
    for name in ("FWD_CONFIG_BY_DTYPE", "FWD_TRAIN_CONFIG_BY_DTYPE", "BWD_CONFIG_BY_DTYPE"):
        monkeypatch.setattr(st, name, {})
    # small blocks: several chunks (L not a multiple of 16) and several, partly masked, dim blocks
    monkeypatch.setitem(st.FWD_CONFIG, "BLOCK_L", 16)
    monkeypatch.setitem(st.FWD_CONFIG, "BLOCK_D", 4)
    opts = dict(opts)
    monkeypatch.setitem(st.BWD_CONFIG, "BLOCK_D", opts.pop("bwd_block_d", 4))
    for key, value in opts.pop("extra", {}).items():  # kernel switches, in both configs
        monkeypatch.setitem(st.FWD_CONFIG, key, value)
        monkeypatch.setitem(st.BWD_CONFIG, key, value)
    fwd_unroll, bwd_unroll = opts.pop("unroll", (1, 1))  # states per loop iteration
    monkeypatch.setitem(st.FWD_CONFIG, "UNROLL", fwd_unroll)
    monkeypatch.setitem(st.BWD_CONFIG, "UNROLL", bwd_unroll)
    fwd_prefetch, bwd_prefetch = opts.pop("prefetch", (st.FWD_CONFIG["PREFETCH"],
                                                       st.BWD_CONFIG["PREFETCH"]))
    monkeypatch.setitem(st.FWD_CONFIG, "PREFETCH", fwd_prefetch)
    monkeypatch.setitem(st.BWD_CONFIG, "PREFETCH", bwd_prefetch)
    bc = opts.pop("bc", "relaxed")
    monkeypatch.setattr(st, "BWD_ATOMIC_BC", bc != "partials")
    monkeypatch.setattr(st, "ATOMIC_SEM", "acq_rel" if bc == "acq_rel" else "relaxed")
    inp = make_inputs(dim=dim, L=L, groups=groups, dtype=dtype, positive_delta=not softplus,
                      **opts)
    check_against_reference(inp, softplus, dtype)


def test_launch_config_per_dtype_overrides(interpreted, monkeypatch):
    st = interpreted
    for name in ("FWD_CONFIG_BY_DTYPE", "FWD_TRAIN_CONFIG_BY_DTYPE", "BWD_CONFIG_BY_DTYPE"):
        monkeypatch.setattr(st, name, {})  # from the module's defaults alone
    monkeypatch.setitem(st.FWD_CONFIG_BY_DTYPE, "float32", {"BLOCK_L": 32, "num_warps": 2})
    cfg = st.launch_config("fwd", torch.float32)
    assert cfg["BLOCK_L"] == 32 and cfg["num_warps"] == 2
    assert cfg["UNROLL"] == st.FWD_CONFIG["UNROLL"]
    assert st.launch_config("fwd", torch.bfloat16) == st.FWD_CONFIG
    assert st.launch_config("bwd", torch.float32, {"UNROLL": 1})["UNROLL"] == 1
    monkeypatch.setitem(st.FWD_TRAIN_CONFIG_BY_DTYPE, "float32", {"BLOCK_L": 16})
    assert st.launch_config("fwd_train", torch.float32)["BLOCK_L"] == 16
    assert st.launch_config("fwd_train", torch.float32)["num_warps"] == 2
    assert st.launch_config("fwd", torch.float32)["BLOCK_L"] == 32
    with pytest.raises(ValueError, match="kind"):
        st.launch_config("bwd_train", torch.float32)


def test_interpreted_training_forward_config(interpreted, poisoned, monkeypatch):
    """A training forward with its own chunk length (the backward inherits it) stays exact."""
    st = poisoned(interpreted)
    monkeypatch.setitem(st.FWD_CONFIG, "BLOCK_L", 32)
    monkeypatch.setattr(st, "FWD_TRAIN_CONFIG", {"BLOCK_L": 16, "BLOCK_D": 2, "PREFETCH": 0})
    inp = make_inputs(dim=6, L=37)
    check_against_reference(inp, True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_default_config(interpreted, poisoned, dtype):
    """The module's launch shapes, per-dtype overrides included: training (forward + every
    gradient) and the inference forward (its own shape) against the reference."""
    st = poisoned(interpreted)
    inp = make_inputs(dim=6, L=40, groups=None, dtype=dtype)
    check_against_reference(inp, True, dtype)
    with torch.no_grad():
        out, _ = triton_fn(**inp, delta_softplus=True)
        ref, _ = ref_fn(**inp, delta_softplus=True)
    assert_close("inference out", out, ref, TOL[dtype])
    assert st.FWD_CONFIG["BLOCK_L"] >= 64


def test_interpreted_backward_variants_agree(interpreted, poisoned):
    """Every way of reducing dB/dC across dim blocks (relaxed or acq_rel atomics, partial sums),
    the explicit-flip reverse scan, the prefetching loop and the B/C load switches give the
    same gradients."""
    st = poisoned(interpreted)
    inp = {k: (v.detach() if v is not None else None)
           for k, v in make_inputs(dim=4, L=40, groups=2).items()}
    out, _, hsave, block_l = st.scan_forward(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
        inp["delta_bias"], inp["initial_state"], True, config={"BLOCK_L": 16, "BLOCK_D": 2},
    )
    dout = torch.randn_like(out)
    args = (dout, torch.randn(2, 4, 4), inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
            inp["D"], inp["z"], inp["delta_bias"], hsave, block_l, True)
    base = st.scan_backward(*args, config={"BLOCK_D": 2, "PREFETCH": 0}, atomic_bc=False)
    variants = [dict(atomic_bc=True, atomic_sem="relaxed"),
                dict(atomic_bc=True, atomic_sem="acq_rel"),
                dict(atomic_bc=False, reverse_via_flip=True),
                dict(atomic_bc=True, config={"BLOCK_D": 2, "PREFETCH": 1}),
                dict(atomic_bc="auto", config={"BLOCK_D": 2, "PREFETCH": 1}),
                dict(atomic_bc=True, config={"BLOCK_D": 2, "PREFETCH": 0, "ROW_ATOMICS": 1}),
                # the backward before 2026-12-01: B/C as vectors, no per-state prefetch
                dict(atomic_bc=False, config={"BLOCK_D": 2, "PREFETCH": 0, "UNROLL": 2,
                                              "BC_2D": 0, "STATE_PREFETCH": 0})]
    for kw in variants:
        kw = {"config": {"BLOCK_D": 2, "PREFETCH": 0}, **kw}
        other = st.scan_backward(*args, **kw)
        for a, b in zip(base, other):
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), kw
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), kw
    with pytest.raises(ValueError, match="atomic_sem"):
        st.scan_backward(*args, atomic_sem="release")


def test_interpreted_forward_prefetch_is_bitwise_neutral(interpreted, poisoned):
    """Prefetching changes when inputs are loaded, never what is computed."""
    st = poisoned(interpreted)
    inp = {k: (v.detach() if v is not None else None)
           for k, v in make_inputs(dim=4, L=37, groups=None).items()}
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
            inp["delta_bias"], inp["initial_state"], True)
    outs = [st.scan_forward(*args, config={"BLOCK_L": 16, "BLOCK_D": 2, "PREFETCH": p})
            for p in (0, 1)]
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert torch.equal(a, b)


def test_interpreted_chunked_calls_equal_one_pass(interpreted, poisoned, monkeypatch):
    st = poisoned(interpreted)
    monkeypatch.setitem(st.FWD_CONFIG, "BLOCK_L", 16)
    inp = {k: (v.detach() if v is not None else None)
           for k, v in make_inputs(dim=4, L=40, with_h0=False).items()}
    inp.pop("initial_state")
    full, h_full = selective_scan_triton(**inp, delta_softplus=True)
    h, pieces = None, []
    for s, e in ((0, 17), (17, 18), (18, 40)):
        piece = {k: (v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v)
                 for k, v in inp.items()}
        y, h = selective_scan_triton(**piece, delta_softplus=True, initial_state=h)
        pieces.append(y)
    assert torch.allclose(torch.cat(pieces, -1), full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# GPU (-m gpu): compiled kernels, larger shapes
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,groups,opts", [
    (300, None, dict()),
    (1, None, dict(with_z=False, with_D=False, with_bias=False, with_h0=False)),
    (257, 4, dict(with_bias=False)),
])
def test_gpu_kernels_match_reference(poisoned, dtype, L, groups, opts):
    import tsssm.ssm.scan_triton as st

    poisoned(st)
    inp = make_inputs(batch=2, dim=64, N=16, L=L, groups=groups, dtype=dtype, device="cuda",
                      **opts)
    check_against_reference(inp, True, dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("atomic,flip", [(False, False), (True, False), (False, True)])
def test_gpu_long_sequence_against_float64_torch_path(poisoned, atomic, flip, monkeypatch):
    import tsssm.ssm.scan_triton as st

    poisoned(st)
    monkeypatch.setattr(st, "BWD_ATOMIC_BC", atomic)
    monkeypatch.setattr(st, "BWD_REVERSE_VIA_FLIP", flip)
    inp = make_inputs(batch=2, dim=96, N=16, L=4099, groups=None, device="cuda")
    inp64 = {k: (v.detach().double().requires_grad_() if v is not None else None)
             for k, v in inp.items()}
    ref_out, ref_h, ref_g = run_with_grads(
        lambda **kw: selective_scan_torch(**kw, chunk=128), inp64)
    out, h, g = run_with_grads(triton_fn, inp)
    assert_close("out", out, ref_out, 1e-4)
    assert_close("final_state", h, ref_h, 1e-4)
    for k in ref_g:
        assert_close(f"d{k}", g[k], ref_g[k], 2e-4)


@pytest.mark.gpu
@cuda
def test_gpu_auto_backend_uses_triton(monkeypatch):
    import tsssm.ssm.scan_triton as st

    calls = []
    real = st.scan_forward
    monkeypatch.setattr(st, "scan_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = {k: (v.detach() if v is not None else None)
           for k, v in make_inputs(dim=32, L=50, device="cuda").items()}
    out = selective_scan(**inp, delta_softplus=True)
    assert calls and out.is_cuda
    torch_out = selective_scan(**inp, delta_softplus=True, backend="torch")
    assert_close("out", out, torch_out, 1e-5)


def test_interpreted_inference_under_no_grad_saves_no_states(interpreted, monkeypatch):
    st = interpreted
    seen = []
    real = st.scan_forward

    def spy(*args, **kwargs):
        seen.append(kwargs["save_states"])
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "scan_forward", spy)
    inp = make_inputs(dim=4, L=8)
    with torch.no_grad():
        selective_scan_triton(**inp, delta_softplus=True)
    selective_scan_triton(**inp, delta_softplus=True)
    assert seen == [False, True]
