"""A long sequence's scan in segments side by side (tsssm.ssm.segmented) equals one pass over it,
outputs and final state, from a carried initial state; and a Mamba stack scanning in segments
equals the stack scanning whole, its chunked calls included."""

from __future__ import annotations

import pytest
import torch

import tsssm.models.mamba as mamba
from tsssm.models.mamba import MambaConfig, MambaStack
from tsssm.ssm import selective_scan
from tsssm.ssm.segmented import segmented_scan


def inputs(b=2, d=6, n=4, L=1000, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.exp(r(d, n) * 0.5)
    return (r(b, d, L), r(b, d, L) * 0.5 - 1.0, A, r(b, n, L), r(b, n, L), r(d), r(b, d, L),
            r(d) * 0.1, r(b, d, n))


@pytest.mark.parametrize("L,segment", [(1000, 100), (1000, 333), (1000, 1), (999, 1000),
                                       (64, 7)])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segmented_equals_one_pass(L, segment, softplus, dtype):
    u, delta, A, B, C, D, z, bias, h0 = inputs(L=L, dtype=dtype)
    if not softplus:
        delta = torch.nn.functional.softplus(delta)
    want, want_h = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                                  delta_softplus=softplus, initial_state=h0,
                                  return_final_state=True, backend="torch")
    got, got_h = segmented_scan(u, delta, A, B, C, D, z, bias, softplus, h0, segment, "torch")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert got.shape == want.shape and got_h.shape == want_h.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_h.to(want_h.dtype), want_h, rtol=tol, atol=tol)


def test_segmented_from_zero_state_without_gate():
    u, delta, A, B, C, D, _, bias, _ = inputs(L=500)
    want, want_h = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True,
                                  return_final_state=True, backend="torch")
    got, got_h = segmented_scan(u, delta, A, B, C, D, None, bias, True, None, 64, "torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_mamba_stack_scans_long_sequences_in_segments_exactly(monkeypatch):
    torch.manual_seed(0)
    stack = MambaStack(MambaConfig(d_model=16, n_layers=2, d_state=4, scan_backend="torch"))
    stack.eval()
    x = torch.randn(1, 1200, 16)
    want, want_state = stack(x[:, :500])
    want2, want_state = stack(x[:, 500:], want_state)
    monkeypatch.setattr(mamba, "SEGMENT_DEVICES", ("cpu",))
    monkeypatch.setattr(mamba, "SEGMENT_ROWS", 64)
    calls = []
    real = mamba.segmented_scan
    monkeypatch.setattr(mamba, "segmented_scan", lambda *a: calls.append(1) or real(*a))
    got, state = stack(x[:, :500])
    got2, state = stack(x[:, 500:], state)
    assert len(calls) == 4  # both layers, both calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)
    for a, b in zip(state, want_state):
        torch.testing.assert_close(a.conv, b.conv)
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-4, atol=1e-4)
    short = stack(x[:, :100])  # shorter than 2 segments: one pass
    assert len(calls) == 4 and short[0].shape == (1, 100, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("L,segment", [(1 << 16, 8192), (50_000, 8192), (20_000, 1000)])
def test_segmented_triton_equals_one_pass_on_the_gpu(L, segment):
    u, delta, A, B, C, D, z, bias, h0 = (t.cuda() for t in inputs(b=1, d=128, n=16, L=L))
    want, want_h = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                                  delta_softplus=True, initial_state=h0,
                                  return_final_state=True, backend="triton")
    got = torch.full_like(want, float("nan"))  # poisoned: every entry must be written
    got[:], got_h = segmented_scan(u, delta, A, B, C, D, z, bias, True, h0, segment, "triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mamba_forecaster_long_chunks_on_the_gpu_equal_short_ones():
    from tsssm.models.mamba_forecaster import MambaForecaster

    torch.manual_seed(0)
    model = MambaForecaster(8, d_model=64, n_layers=2, d_state=16, horizon=24).cuda().eval()
    y = torch.randn(1, 40_000, 8, device="cuda")
    y[0, 1000:1010] = float("nan")
    with torch.no_grad():
        whole, _ = model.one_step(y)  # 40k rows: segmented scans
        parts, state = [], None
        for a in range(0, 40_000, 10_000):  # 10k rows: one pass each
            pred, state = model.one_step(y[:, a : a + 10_000], state)
            parts.append(pred.mean)
    torch.testing.assert_close(whole.mean, torch.cat(parts, 1), rtol=1e-4, atol=1e-4)
