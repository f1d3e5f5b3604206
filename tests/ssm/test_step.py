"""Step mode (one timestep at a time) and chunked mode equal one pass of the scan."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tsssm.errors import ModelError
from tsssm.ssm import selective_scan, selective_scan_ref, selective_state_update

from .test_scan_ref import detached, make_inputs


def stream_one_at_a_time(inp, softplus, backend, state=None):
    """Feed the sequence sample by sample; returns (outputs (b, d, L), final state)."""
    u = inp["u"]
    batch, dim, L = u.shape
    N = inp["A"].shape[1]
    if state is None:
        state = torch.zeros(batch, dim, N, dtype=torch.float32, device=u.device)
    outs = []
    for t in range(L):
        z_t = inp["z"][..., t] if inp["z"] is not None else None
        outs.append(selective_state_update(
            state, u[..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t],
            inp["C"][..., t], D=inp["D"], z_t=z_t, delta_bias=inp["delta_bias"],
            delta_softplus=softplus, backend=backend,
        ))
    return torch.stack(outs, -1), state


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_steps_equal_scan(groups, softplus):
    inp = detached(make_inputs(L=29, groups=groups, positive_delta=not softplus))
    h0 = inp.pop("initial_state")
    ref, h_ref = selective_scan_ref(**inp, delta_softplus=softplus, initial_state=h0,
                                    return_final_state=True)
    state = h0.clone()
    out, state = stream_one_at_a_time(inp, softplus, "torch", state)
    # float32 over 29 steps in a different order of operations: rounding reaches ~1e-6 relative
    # on some draws (one failure seen at 1e-6); a wrong recurrence is off by orders more.
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(state, h_ref, rtol=1e-5, atol=1e-5)


def test_step_updates_state_in_place_and_returns_output():
    inp = detached(make_inputs(L=1, with_z=False))
    state = inp["initial_state"].clone()
    ptr = state.data_ptr()
    out = selective_state_update(state, inp["u"][..., 0], inp["delta"][..., 0], inp["A"],
                                 inp["B"][..., 0], inp["C"][..., 0], D=inp["D"])
    assert state.data_ptr() == ptr and not torch.equal(state, inp["initial_state"])
    assert out.shape == (2, 6)


def test_step_errors():
    inp = detached(make_inputs(L=1))
    state = inp["initial_state"].clone().requires_grad_()
    args = (inp["u"][..., 0], inp["delta"][..., 0], inp["A"], inp["B"][..., 0], inp["C"][..., 0])
    with pytest.raises(ModelError, match="requires grad"):
        selective_state_update(state, *args)
    with pytest.raises(ModelError, match="u_t must be"):
        selective_state_update(state.detach(), inp["u"], *args[1:])
    with pytest.raises(ModelError, match="float32"):
        selective_state_update(state.detach().bfloat16(), *args)
    with pytest.raises(ModelError, match="needs CUDA"):
        selective_state_update(state.detach(), *args, backend="triton")


@pytest.mark.parametrize("backend", ["torch"])
def test_chunked_mode_equals_one_pass(backend):
    inp = detached(make_inputs(L=50, groups=2, dim=8, with_h0=False))
    inp.pop("initial_state")
    full, h_full = selective_scan(**inp, delta_softplus=True, return_final_state=True,
                                  backend=backend)
    h, pieces = None, []
    for s, e in ((0, 1), (1, 20), (20, 21), (21, 50)):
        piece = {k: (v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v)
                 for k, v in inp.items()}
        y, h = selective_scan(**piece, delta_softplus=True, initial_state=h,
                              return_final_state=True, backend=backend)
        pieces.append(y)
    assert torch.allclose(torch.cat(pieces, -1), full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h, h_full, rtol=1e-5, atol=1e-5)


def test_steps_then_scan_continue_the_same_stream():
    # a live stream: warm up with the scan, continue step by step, compare with one pass
    inp = detached(make_inputs(L=30, with_h0=False))
    inp.pop("initial_state")
    full = selective_scan(**inp, delta_softplus=True)
    head = {k: (v[..., :20] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
    tail = {k: (v[..., 20:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
    y_head, state = selective_scan(**head, delta_softplus=True, return_final_state=True)
    y_tail, _ = stream_one_at_a_time(tail, True, "torch", state)
    assert torch.allclose(torch.cat([y_head, y_tail], -1), full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The Triton step kernel: interpreter on the CPU, compiled on the GPU
# --------------------------------------------------------------------------------------------


@pytest.fixture
def interpreted_step(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import tsssm.ssm.scan_triton as st

    st = importlib.reload(st)  # kernels are built as interpreted when decorated
    yield st
    monkeypatch.undo()
    importlib.reload(st)


def test_interpreted_step_kernel_equals_torch_step(interpreted_step, monkeypatch):
    st = interpreted_step
    monkeypatch.setattr(st, "_empty", lambda *s, dtype, device: torch.full(
        s, float("nan"), dtype=dtype, device=device))
    for groups in (None, 2):
        inp = detached(make_inputs(L=3, dim=6, groups=groups))
        s_torch = inp["initial_state"].clone()
        s_tri = inp["initial_state"].clone()
        for t in range(3):
            args = (inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t],
                    inp["C"][..., t], inp["D"], inp["z"][..., t], inp["delta_bias"], True)
            y1 = selective_state_update(s_torch, *args[:5], D=args[5], z_t=args[6],
                                        delta_bias=args[7], delta_softplus=True, backend="torch")
            y2 = st.state_update(s_tri, *args, block_d=4)
            assert torch.isfinite(y2).all()
            assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
            assert torch.allclose(s_torch, s_tri, rtol=1e-5, atol=1e-6)
    assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_steps_equal_gpu_scan(dtype):
    inp = detached(make_inputs(batch=2, dim=64, N=16, L=40, groups=2, dtype=dtype,
                               device="cuda", with_h0=False))
    inp.pop("initial_state")
    full, h_full = selective_scan(**inp, delta_softplus=True, return_final_state=True)
    out, state = stream_one_at_a_time(inp, True, "auto")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), full.float(), rtol=tol, atol=tol)
    assert torch.allclose(state, h_full, rtol=1e-5, atol=1e-5)
