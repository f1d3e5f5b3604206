"""The linear Gaussian state space model: one typed container and the conventions every function
in :mod:`tsssm.kalman` follows.

Model, for observation steps ``t = 0 .. T-1``::

    x_0 ~ N(m0, P0)                                       the state AT the first observation
    x_t = F_t x_{t-1} + B_t u_t + c_t + w_t,  w_t ~ N(0, Q_t)      (t >= 1)
    y_t = H_t x_t + d_t + v_t,                v_t ~ N(0, R_t)      (t >= 0)

``m0, P0`` describe the state at the first observation (statsmodels' ``initialize_known``
convention), so results compare one to one with ``statsmodels.tsa.statespace``. The transition
quantities ``F_t, Q_t, B_t, c_t, u_t`` carry the index of the step they lead INTO; at ``t = 0``
they are unused (the prior takes their place). statsmodels indexes its transition by the step it
leads OUT of: its ``transition[..., t]`` is our ``F[t + 1]``.

Shapes (``n`` states, ``p`` observed channels, ``k`` controls, ``...`` any batch shape)::

    F (..., n, n)   H (..., p, n)   Q (..., n, n)   R (..., p, p)   B (..., n, k)
    c (..., n)      d (..., p)      m0 (..., n)     P0 (..., n, n)

Time-varying matrices. A matrix named in ``time_varying`` carries a time axis just before its own
(matrix or vector) axes: ``F (..., T, n, n)``, ``d (..., T, p)``. Whether a matrix is time-varying
is never guessed from its shape (a leading axis of length T could equally be a batch axis): it is
declared, e.g. ``LinearGaussianSSM(F, H, Q, R, m0, P0, time_varying=("H", "R"))``. ``m0`` and
``P0`` are never time-varying. The time axis has length T when filtering ``y (..., T, p)`` (the
entry at ``t = 0`` of F, Q, B, c is unused), and length ``horizon`` when the model describes the
steps of a forecast (entry ``k`` leads into forecast step ``k + 1``).

Batch shapes of all matrices (without the time axis), of ``y`` (without ``T, p``) and of ``u``
broadcast against each other; results carry the broadcast batch shape. One parameter set can
serve many series (matrices without batch axes, ``y (S, T, p)``), or every series can have its own.

Requirements: ``R`` (or at least ``H P H' + R`` at every step) positive definite; ``Q`` and ``P0``
positive semi-definite.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from tsssm.errors import DataError, ModelError

#: Names of the fields that hold tensors, in order, and the number of their own (core) axes.
CORE_NDIM = {"F": 2, "H": 2, "Q": 2, "R": 2, "m0": 1, "P0": 2, "B": 2, "d": 1, "c": 1}
#: Fields that may be declared time-varying.
TIME_VARYING_ALLOWED = ("F", "H", "Q", "R", "B", "d", "c")


class LinearGaussianSSM(NamedTuple):
    """Matrices of a linear Gaussian state space model (see the module docstring)."""

    F: Tensor  # (..., [T,] n, n) transition
    H: Tensor  # (..., [T,] p, n) observation
    Q: Tensor  # (..., [T,] n, n) state noise covariance
    R: Tensor  # (..., [T,] p, p) observation noise covariance
    m0: Tensor  # (..., n) mean of the state at the first observation
    P0: Tensor  # (..., n, n) its covariance
    B: Tensor | None = None  # (..., [T,] n, k) control matrix (needs ``u``)
    d: Tensor | None = None  # (..., [T,] p) observation intercept
    c: Tensor | None = None  # (..., [T,] n) state intercept
    time_varying: tuple[str, ...] = ()  # names of the fields that carry a time axis


def state_dim(ssm: LinearGaussianSSM) -> int:
    """Number of states ``n``."""
    return ssm.F.shape[-1]


def obs_dim(ssm: LinearGaussianSSM) -> int:
    """Number of observed channels ``p``."""
    return ssm.H.shape[-2]


def is_time_varying(ssm: LinearGaussianSSM, name: str) -> bool:
    """Whether field ``name`` carries a time axis."""
    return name in ssm.time_varying


def is_time_invariant(ssm: LinearGaussianSSM) -> bool:
    """True when no field that is present carries a time axis."""
    return not any(getattr(ssm, name) is not None for name in ssm.time_varying)


def batch_shape_of(ssm: LinearGaussianSSM, name: str) -> torch.Size:
    """Batch shape of one field: its shape without the time axis and core axes."""
    x = getattr(ssm, name)
    drop = CORE_NDIM[name] + (1 if is_time_varying(ssm, name) else 0)
    return x.shape[: x.ndim - drop]


def batch_shape(ssm: LinearGaussianSSM) -> torch.Size:
    """Broadcast batch shape of all fields that are present."""
    shapes = [batch_shape_of(ssm, name) for name in CORE_NDIM if getattr(ssm, name) is not None]
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as err:
        raise ModelError(
            f"the batch shapes of the model's matrices do not broadcast: "
            f"{ {n: tuple(s) for n, s in zip(CORE_NDIM, shapes)} }; give every matrix the same "
            f"batch shape or one that broadcasts"
        ) from err


def n_steps(ssm: LinearGaussianSSM) -> int | None:
    """Length of the time axis of the time-varying fields (None when time-invariant)."""
    lengths = {
        name: getattr(ssm, name).shape[-CORE_NDIM[name] - 1]
        for name in ssm.time_varying
        if getattr(ssm, name) is not None
    }
    if not lengths:
        return None
    if len(set(lengths.values())) > 1:
        raise ModelError(f"time-varying matrices disagree on the number of steps: {lengths}")
    return next(iter(lengths.values()))


def at_step(ssm: LinearGaussianSSM, name: str, t: int) -> Tensor | None:
    """Field ``name`` at step ``t`` (the field itself when it is time-invariant)."""
    x = getattr(ssm, name)
    if x is None or not is_time_varying(ssm, name):
        return x
    return x.select(x.ndim - CORE_NDIM[name] - 1, t)


def per_step(ssm: LinearGaussianSSM, name: str, T: int) -> list[Tensor | None]:
    """Field ``name`` at each of the T steps, as a list (for step-by-step loops).

    Time-varying fields are unbound once (indexing a tensor inside a loop would make its
    backward pass cost O(T) per step); constant fields repeat the same tensor.
    """
    x = getattr(ssm, name)
    if x is None or not is_time_varying(ssm, name):
        return [x] * T
    return list(x.unbind(x.ndim - CORE_NDIM[name] - 1))


def stacked(ssm: LinearGaussianSSM, name: str, T: int) -> Tensor | None:
    """Field ``name`` with an explicit time axis of length ``T``: (..., T, *core).

    A time-invariant field is expanded (a view, no copy).
    """
    x = getattr(ssm, name)
    if x is None:
        return None
    core = CORE_NDIM[name]
    if is_time_varying(ssm, name):
        return x
    x = x.unsqueeze(x.ndim - core)
    shape = list(x.shape)
    shape[x.ndim - core - 1] = T
    return x.expand(shape)


def time_slice(ssm: LinearGaussianSSM, start: int, stop: int) -> LinearGaussianSSM:
    """The model restricted to steps ``start:stop`` of its time-varying fields."""
    fields = {}
    for name in TIME_VARYING_ALLOWED:
        x = getattr(ssm, name)
        if x is not None and is_time_varying(ssm, name):
            x = x.narrow(x.ndim - CORE_NDIM[name] - 1, start, stop - start)
        fields[name] = x
    return ssm._replace(**fields)


def to_dtype(ssm: LinearGaussianSSM, dtype: torch.dtype) -> LinearGaussianSSM:
    """The model with every tensor cast to ``dtype``."""
    return ssm._replace(
        **{n: getattr(ssm, n).to(dtype) for n in CORE_NDIM if getattr(ssm, n) is not None}
    )


INF_MESSAGE = "observations y contain +-inf; mark missing values with NaN instead"


@contextmanager
def step_loop_threads() -> Iterator[None]:
    """Run a Python loop of small per-step ops single-threaded, then restore the setting.

    Intra-op threads cannot speed up ops of microseconds, and when the cores are shared with
    other processes, waiting for a descheduled worker costs milliseconds per op (measured: a
    (32, 25, 25) bmm takes 68 us on one thread, 3.7 ms on two on a busy 2-core machine).
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def compact(x: Tensor, core: int) -> Tensor:
    """x without its broadcast batch axes (stride 0, e.g. a covariance shared by many series):
    those axes keep length 1, so the result broadcasts back to x's shape and work on it is not
    repeated per series. ``core``: the number of trailing axes that are never batch axes."""
    for d in range(x.ndim - core):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def symmetrize(P: Tensor) -> Tensor:
    """(P + P') / 2 over the last two axes: keeps covariances exactly symmetric."""
    return 0.5 * (P + P.mT)


def validate(
    ssm: LinearGaussianSSM, y: Tensor | None = None, u: Tensor | None = None, *,
    scan_values: bool = True,
) -> torch.Size:
    """Check shapes, dtypes and devices; return the broadcast batch shape (with y's and u's).

    Raises ModelError for an inconsistent model and DataError for data that does not fit it.
    ``scan_values=False`` skips the pass over y for infinite values (for a caller that checks
    them itself on its way through the data).
    """
    if not isinstance(ssm, LinearGaussianSSM):
        raise ModelError(f"expected a LinearGaussianSSM, got {type(ssm).__name__}")
    for name in ssm.time_varying:
        if name not in TIME_VARYING_ALLOWED:
            raise ModelError(
                f"time_varying names {name!r}, which cannot vary in time; allowed: "
                f"{', '.join(TIME_VARYING_ALLOWED)}"
            )
    tensors = {n: getattr(ssm, n) for n in CORE_NDIM if getattr(ssm, n) is not None}
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise ModelError(f"model field {name} must be a torch.Tensor, got {type(x).__name__}")
        need = CORE_NDIM[name] + (1 if is_time_varying(ssm, name) else 0)
        if x.ndim < need:
            raise ModelError(
                f"model field {name} has shape {tuple(x.shape)}; it needs at least {need} axes"
                + (" (it is declared time-varying: (..., T, core axes))" if need > CORE_NDIM[name]
                   else "")
            )
        if not x.is_floating_point():
            raise ModelError(f"model field {name} must be a floating point tensor, got {x.dtype}")
    dtypes = {x.dtype for x in tensors.values()}
    devices = {x.device for x in tensors.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ModelError(
            "all model matrices must share one dtype and device, got "
            + ", ".join(f"{n}: {x.dtype}/{x.device}" for n, x in tensors.items())
        )
    n, p = state_dim(ssm), obs_dim(ssm)
    k = ssm.B.shape[-1] if ssm.B is not None else None
    expected = {
        "F": (n, n), "H": (p, n), "Q": (n, n), "R": (p, p), "m0": (n,), "P0": (n, n),
        "B": (n, k), "d": (p,), "c": (n,),
    }
    for name, x in tensors.items():
        core = tuple(x.shape[x.ndim - CORE_NDIM[name]:])
        if core != expected[name]:
            raise ModelError(
                f"model field {name} has core shape {core}, expected {expected[name]} for "
                f"n={n} states and p={p} channels (n is F's last axis, p is H's second last)"
            )
    shape = batch_shape(ssm)
    T_model = n_steps(ssm)
    dtype, device = next(iter(dtypes)), next(iter(devices))
    if y is not None:
        if not isinstance(y, Tensor) or y.ndim < 2:
            raise DataError(
                f"observations y must be a tensor (..., T, p), got "
                f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
            )
        if y.shape[-1] != p:
            raise DataError(f"observations y have {y.shape[-1]} channels, the model has p={p}")
        if y.dtype != dtype or y.device != device:
            raise DataError(
                f"observations y are {y.dtype} on {y.device}, the model is {dtype} on {device}; "
                f"convert one of them"
            )
        T = y.shape[-2]
        if T_model is not None and T_model != T:
            raise DataError(
                f"the model's time-varying matrices have {T_model} steps, y has T={T}"
            )
        if scan_values and torch.isinf(y).any():
            raise DataError(INF_MESSAGE)
        try:
            shape = torch.broadcast_shapes(shape, y.shape[:-2])
        except RuntimeError as err:
            raise DataError(
                f"the batch shape of y {tuple(y.shape[:-2])} does not broadcast with the model's "
                f"{tuple(shape)}"
            ) from err
    if ssm.B is not None:
        if u is None:
            raise DataError("the model has a control matrix B; pass the controls u (..., T, k)")
        if u.shape[-1] != k or (y is not None and u.shape[-2] != y.shape[-2]):
            raise DataError(
                f"controls u have shape {tuple(u.shape)}; expected (..., T, {k}) with T matching y"
            )
        if u.dtype != dtype or u.device != device:
            raise DataError(f"controls u are {u.dtype} on {u.device}, the model is {dtype}")
        if not torch.isfinite(u).all():
            raise DataError("controls u contain NaN or inf; controls cannot be missing")
        shape = torch.broadcast_shapes(shape, u.shape[:-2])
    elif u is not None:
        raise DataError("controls u were given but the model has no control matrix B")
    return shape


def transition_offset(ssm: LinearGaussianSSM, u: Tensor | None, T: int) -> Tensor | None:
    """``c_t + B_t u_t`` for every step: (..., T, n), or None when the model has neither."""
    parts = []
    if ssm.c is not None:
        parts.append(stacked(ssm, "c", T))
    if ssm.B is not None:
        parts.append((stacked(ssm, "B", T) @ u.unsqueeze(-1)).squeeze(-1))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]
