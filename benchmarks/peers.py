"""The peers the benchmarks run side by side with tsssm, imported when present, never copied.

- mamba-ssm's CUDA selective scan (``selective_scan_cuda``, built from
  ``../shared/anchors/mamba_ssm_scan``, see its README): :class:`MambaScanFn` calls its
  ``fwd``/``bwd`` exactly as mamba-ssm's own ``selective_scan_fn`` does, and
  :func:`patch_mamba_block` makes tsssm's Mamba block use it (for end-to-end training throughput);
- dynamax (JAX): :func:`dynamax_filter` builds ``jit(vmap(lgssm_filter))`` for a time-invariant
  model, :func:`dynamax_parallel_filter` its parallel-in-time filter for one series.
"""

from __future__ import annotations

import contextlib
import os

import torch


def mamba_ssm():
    """The ``selective_scan_cuda`` extension module, or None when it is not importable."""
    try:
        import selective_scan_cuda
    except ImportError:
        return None
    return selective_scan_cuda


class MambaScanFn(torch.autograd.Function):
    """mamba-ssm's selective scan (its CUDA kernels) as an autograd Function, as its
    ``selective_scan_fn`` wraps them: B, C (b, N, L) enter as (b, 1, N, L); returns
    (out (b, d, L), final state (b, d, N) float32). The final state is not differentiable
    (mamba-ssm's backward has no input for it)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # type: ignore[override]
        ext = mamba_ssm()
        squeeze = B.dim() == 3
        u, delta = u.contiguous(), delta.contiguous()
        B4 = (B.unsqueeze(1) if squeeze else B).contiguous()
        C4 = (C.unsqueeze(1) if squeeze else C).contiguous()
        z = z.contiguous() if z is not None else None
        D = D.contiguous() if D is not None else None
        out, x, *rest = ext.fwd(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, x, out)
        ctx.delta_softplus, ctx.squeeze = delta_softplus, squeeze
        ctx.set_materialize_grads(False)
        last = x[:, :, -1, 1::2]  # (b, d, N): mamba-ssm's return_last_state
        return (rest[0] if z is not None else out), last

    @staticmethod
    def backward(ctx, dout, dlast):  # type: ignore[override]
        if dlast is not None:
            raise RuntimeError("mamba-ssm's scan has no gradient for the final state")
        ext = mamba_ssm()
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        dout = dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, x, out, None, ctx.delta_softplus, False
        )
        dz = rest[0] if z is not None else None
        if ctx.squeeze:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None


def mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """out (b, d, L) of mamba-ssm's scan (differentiable in every input)."""
    return MambaScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]


@contextlib.contextmanager
def patch_mamba_block():
    """Inside: tsssm's MambaBlock runs its scan on mamba-ssm's kernels. Only for training from a
    zero state (``one_step``/``forecast`` with state=None), which is what a training step does;
    mamba-ssm's kernel takes no initial state."""
    import tsssm.models.mamba as mamba_mod

    real = mamba_mod.selective_scan
    checked = []

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             initial_state=None, return_final_state=False, backend="auto"):
        if initial_state is not None and not checked:  # once: a device sync
            if bool(initial_state.abs().max() > 0):
                raise RuntimeError("mamba-ssm's scan takes no initial state")
            checked.append(True)
        out, last = MambaScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last) if return_final_state else out

    mamba_mod.selective_scan = scan
    try:
        yield
    finally:
        mamba_mod.selective_scan = real


# ------------------------------------------------------------------------------------------------
# dynamax
# ------------------------------------------------------------------------------------------------


def dynamax_available() -> bool:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    try:
        import dynamax.linear_gaussian_ssm  # noqa: F401
        import jax  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False
    return True


def _dynamax_params(M: dict, dtype):
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm import (
        ParamsLGSSM,
        ParamsLGSSMDynamics,
        ParamsLGSSMEmissions,
        ParamsLGSSMInitial,
    )

    n, p = M["F"].shape[0], M["H"].shape[0]
    a = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731
    return ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=a(M["m0"]), cov=a(M["P0"])),
        dynamics=ParamsLGSSMDynamics(weights=a(M["F"]), bias=a([0.0] * n),
                                     input_weights=jnp.zeros((n, 0), dtype), cov=a(M["Q"])),
        emissions=ParamsLGSSMEmissions(weights=a(M["H"]), bias=a([0.0] * p),
                                       input_weights=jnp.zeros((p, 0), dtype), cov=a(M["R"])),
    )


def dynamax_filter(M: dict, dtype: str = "float32"):
    """``f(y (S, T, p) jax array) -> log-likelihoods (S,)``: dynamax's ``lgssm_filter`` under
    ``jit(vmap(...))`` for model matrices M (numpy F, H, Q, R, m0, P0). dynamax's convention
    (x_1 ~ N(m0, P0), y_1 from x_1) is tsssm's (m0, P0 = the state at the first observation)."""
    import jax
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm import lgssm_filter

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = _dynamax_params(M, getattr(jnp, dtype))
    return jax.jit(jax.vmap(lambda y: lgssm_filter(params, y).marginal_loglik))


def dynamax_parallel_filter(M: dict, dtype: str = "float64"):
    """``f(y (T, p)) -> log-likelihood``: dynamax's parallel-in-time filter, jitted."""
    import jax
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm import parallel_inference

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = _dynamax_params(M, getattr(jnp, dtype))
    return jax.jit(lambda y: parallel_inference.lgssm_filter(params, y).marginal_loglik)


def jax_time(fn, *args, reps: int = 3) -> tuple[float, object]:
    """(median seconds of ``reps`` runs after one compiling run, last result), synchronised."""
    import statistics
    import time

    out = fn(*args)
    out.block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
