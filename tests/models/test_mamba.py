"""Mamba block and stack: shapes, init, causality, and stateful inference equal to one pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import softplus

from tsssm.errors import ConfigError, ModelError
from tsssm.models import mamba as mamba_module
from tsssm.models.mamba import MambaBlock, MambaConfig, MambaStack, detach_state

ATOL = 2e-5  # float32 scan, chunked vs one pass: rounding only


def _stack(seed: int = 0, **overrides) -> MambaStack:
    torch.manual_seed(seed)
    kwargs = {"d_model": 16, "n_layers": 2, "d_state": 8, "scan_backend": "torch"}
    kwargs.update(overrides)
    return MambaStack(MambaConfig(**kwargs)).eval()


def _run_chunks(model, x, bounds):
    state, outs = None, []
    for lo, hi in zip([0, *bounds], [*bounds, x.shape[1]]):
        y, state = model(x[:, lo:hi], state)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def test_shapes_and_state_layout():
    cfg = MambaConfig(d_model=16, n_layers=3, d_state=8, d_conv=4, expand=2, scan_backend="torch")
    model = MambaStack(cfg)
    y, state = model(torch.randn(3, 11, 16))
    assert y.shape == (3, 11, 16)
    assert len(state) == 3
    for s in state:
        assert s.conv.shape == (3, cfg.d_inner, cfg.d_conv - 1)
        assert s.ssm.shape == (3, cfg.d_inner, cfg.d_state)
        assert s.ssm.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_init_follows_s4d_real_and_dt_range():
    cfg = MambaConfig(d_model=32, d_state=6, dt_min=1e-3, dt_max=1e-1, scan_backend="torch")
    block = MambaBlock(cfg)
    expected = -torch.arange(1, 7, dtype=torch.float32).expand(cfg.d_inner, 6)
    torch.testing.assert_close(block.A, expected)
    torch.testing.assert_close(block.D.detach(), torch.ones(cfg.d_inner))
    dt = softplus(block.dt_proj.bias.detach())
    assert dt.min() >= cfg.dt_min * (1 - 1e-4) and dt.max() <= cfg.dt_max * (1 + 1e-4)
    # log-uniform: the log of dt spreads over most of [log dt_min, log dt_max]
    span = (dt.log().max() - dt.log().min()) / (math.log(cfg.dt_max) - math.log(cfg.dt_min))
    assert span > 0.5
    assert cfg.resolved_dt_rank == 2


@pytest.mark.parametrize("bounds", [[5], [1, 2, 3, 9, 17], [7, 8, 20]])
def test_chunked_forward_equals_one_pass(bounds):
    model = _stack()
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        full, full_state = model(x)
        chunked, chunked_state = _run_chunks(model, x, bounds)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=1e-4)
    for a, b in zip(chunked_state, full_state):
        torch.testing.assert_close(a.conv, b.conv, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(a.ssm, b.ssm, atol=ATOL, rtol=1e-4)


def test_single_steps_equal_the_scan(monkeypatch):
    """Feeding one sample at a time (the selective_state_update path) gives the scan's output."""
    calls = []
    real_update = mamba_module.selective_state_update

    def spy(*args, **kwargs):
        calls.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_state_update", spy)
    model = _stack(seed=1, d_conv=3)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        full, full_state = model(x)
        stepped, step_state = _run_chunks(model, x, list(range(1, 12)))
    torch.testing.assert_close(stepped, full, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(step_state[-1].ssm, full_state[-1].ssm, atol=ATOL, rtol=1e-4)
    assert len(calls) == 12 * 2  # all 12 steps are single steps, through 2 layers


def test_step_does_not_mutate_the_callers_state():
    model = _stack()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, state = model(x)
        before = [s.ssm.clone() for s in state]
        model(torch.randn(2, 1, 16), state)
    for s, b in zip(state, before):
        assert torch.equal(s.ssm, b)


def test_causal():
    model = _stack()
    x = torch.randn(2, 20, 16)
    t = 9
    x2 = x.clone()
    x2[:, t] += 3.0
    with torch.no_grad():
        y, _ = model(x)
        y2, _ = model(x2)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert (y[:, t:] - y2[:, t:]).abs().amax() > 1e-3


def test_gradients_reach_every_parameter_and_carried_state():
    model = _stack().train()
    x = torch.randn(2, 10, 16)
    _, state = model(x[:, :4])
    state = tuple(
        type(s)(s.conv.detach().requires_grad_(), s.ssm.detach().requires_grad_()) for s in state
    )
    y, _ = model(x[:, 4:], state)
    y.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for s in state:
        assert s.conv.grad.abs().sum() > 0 and s.ssm.grad.abs().sum() > 0
    assert all(not s.ssm.requires_grad for s in detach_state(state))


def test_empty_input_keeps_state():
    model = _stack()
    _, state = model(torch.randn(1, 5, 16))
    y, same = model(torch.randn(1, 0, 16), state)
    assert y.shape == (1, 0, 16) and same is state


def test_bad_config_and_state_are_clear_errors():
    with pytest.raises(ConfigError, match="model.d_state"):
        MambaConfig(d_state=0)
    with pytest.raises(ConfigError, match="model.scan_backend"):
        MambaConfig(scan_backend="cuda")
    with pytest.raises(ConfigError, match="dt_min"):
        MambaConfig(dt_min=0.5, dt_max=0.1)
    model = _stack()
    _, state = model(torch.randn(2, 5, 16))
    with pytest.raises(ModelError, match="batch 2"):
        model(torch.randn(3, 5, 16), state)
    with pytest.raises(ModelError, match="layers"):
        model(torch.randn(2, 5, 16), state[:1])
    with pytest.raises(ModelError, match="expects input"):
        model(torch.randn(2, 5, 15))
