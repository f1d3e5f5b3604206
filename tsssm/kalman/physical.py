"""Physical models: a user's continuous-time state space model written as matrices of
expressions of named parameters, fitted by maximum likelihood (system identification).

A mass-spring-damper driven by a measured force ``u`` and observed through its position::

    model = PhysicalModel(
        A=[[0, 1], ["-k/m", "-b/m"]], B=[[0], ["1/m"]], C=[[1, 0]],
        Qc=[[0, 0], [0, "q"]], R=[["r"]],
        params={"k": {"init": 1.0, "positive": True}, "m": {"value": 2.0},
                "b": {"init": 0.3, "positive": True}, "q": {"init": 0.1, "positive": True},
                "r": {"init": 0.01, "positive": True}})

Parameters: ``{"init": x}`` is free (fitted, starting at x), ``{"value": x}`` (or a plain number)
is fixed; ``positive: true`` fits the logarithm (the parameter stays positive). ``theta`` holds
the unconstrained free parameters in the order of :attr:`PhysicalModel.free_names`.

Units. The matrices are in the user's units (those of the file's columns and of time, seconds
for timestamps). The pipeline feeds standardised data ``y_n = (y - μ_y) / σ_y``,
``u_n = (u - μ_u) / σ_u``; :func:`to_standardised` rewrites the model for them exactly (states
stay in physical units: ``B → B diag σ_u``, ``a → a + B μ_u``, ``C → diag(1/σ_y) C``,
``D → diag(1/σ_y) D diag σ_u``, ``d → (d + D μ_u - μ_y) / σ_y``, ``R → R / σ_y σ_y'``), so the
fitted parameters keep their physical meaning.

Prior of the first state (unless ``m0``/``P0`` are given): for a stable ``A`` at the starting
parameters, the stationary law under the mean input (mean ``-A⁻¹(B μ_u + a)``, the continuous
Lyapunov covariance); otherwise zero mean with ``prior_scale`` times the largest output variance
on every state (diffuse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tsssm.errors import ConfigError
from tsssm.kalman.ct import ContinuousLinearSSM, continuous_lyapunov
from tsssm.kalman.expressions import (
    Expression,
    evaluate_matrix,
    evaluate_vector,
    parse,
    parse_matrix,
    parse_vector,
)

MATRICES = ("A", "B", "C", "D", "Qc", "R", "a", "d", "m0", "P0")


class Units(NamedTuple):
    """How the pipeline standardised the data: per output and per input channel."""

    y_mean: Tensor  # (p,)
    y_std: Tensor  # (p,)
    u_mean: Tensor | None = None  # (k,)
    u_std: Tensor | None = None  # (k,)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    value: float  # the start of a free parameter, the value of a fixed one
    fixed: bool = False
    positive: bool = False


def _param_spec(name: str, spec: Any, key: str) -> ParamSpec:
    if not name.isidentifier() or name in ("pi", "e"):
        raise ConfigError(f"{key}.{name}: a parameter name must be an identifier other than "
                          f"pi and e")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ParamSpec(name, float(spec), fixed=True)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}.{name}: give {{init: <start>}} (free) or {{value: <x>}} "
                          f"(fixed), got {spec!r}")
    unknown = set(spec) - {"init", "value", "positive"}
    if unknown:
        raise ConfigError(f"{key}.{name}: unknown keys {sorted(unknown)}; use init, value, "
                          f"positive")
    has_init = spec.get("init") is not None
    has_value = spec.get("value") is not None
    if has_init == has_value:
        raise ConfigError(f"{key}.{name}: set exactly one of init (a free parameter's start) "
                          f"and value (a fixed parameter)")
    x = spec["init"] if has_init else spec["value"]
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ConfigError(f"{key}.{name}: {x!r} is not a finite number")
    positive = bool(spec.get("positive") or False)
    if positive and float(x) <= 0:
        raise ConfigError(f"{key}.{name}: positive, but its {'init' if has_init else 'value'} "
                          f"is {x}")
    return ParamSpec(name, float(x), fixed=has_value, positive=positive)


class PhysicalModel:
    """A continuous-time model from matrices of expressions (see the module docstring).

    n_obs, n_inputs: the data's output and input counts, checked against C and B/D.
    """

    def __init__(self, *, A, C, Qc, R, params: Mapping[str, Any], B=None, D=None, a=None,
                 d=None, m0=None, P0=None, derived: Mapping[str, str] | None = None,
                 n_obs: int | None = None, n_inputs: int | None = None,
                 prior_scale: float = 10.0, key: str = "model.net.physical") -> None:
        if not params:
            raise ConfigError(f"{key}.params: declare the parameters the matrices use")
        self.params = {name: _param_spec(str(name), spec, f"{key}.params")
                       for name, spec in params.items()}
        names = frozenset(self.params)
        if not isinstance(A, (list, tuple)) or not A:
            raise ConfigError(f"{key}.A: the drift matrix A is required")
        n = len(A)
        p = len(C) if isinstance(C, (list, tuple)) else 0
        if n_obs is not None and p != n_obs:
            raise ConfigError(f"{key}.C has {p} rows; the data have {n_obs} output channels "
                              f"(data.channels)")
        k = None
        for name, M in (("B", B), ("D", D)):
            if M is not None:
                width = len(M[0]) if isinstance(M, (list, tuple)) and M and \
                    isinstance(M[0], (list, tuple)) else None
                if k is not None and width != k:
                    raise ConfigError(f"{key}.{name} has {width} columns, B has {k}")
                k = width
        k = k or 0
        if n_inputs is not None and k != n_inputs:
            raise ConfigError(
                f"{key}: B/D have {k} input columns; the data have {n_inputs} inputs "
                f"(data.inputs)" if k else
                f"{key}: the data have {n_inputs} inputs (data.inputs) but the model has no B "
                f"or D; give B (how the inputs drive the states) or leave data.inputs empty")
        self.n_states, self.n_obs, self.n_inputs = n, p, k
        self.key = key
        mats: dict[str, Any] = {
            "A": parse_matrix(A, names, f"{key}.A", (n, n)),
            "C": parse_matrix(C, names, f"{key}.C", (p, n)),
            "Qc": parse_matrix(Qc, names, f"{key}.Qc", (n, n)),
            "R": parse_matrix(R, names, f"{key}.R", (p, p)),
        }
        if B is not None:
            mats["B"] = parse_matrix(B, names, f"{key}.B", (n, k))
        if D is not None:
            mats["D"] = parse_matrix(D, names, f"{key}.D", (p, k))
        for name, vec, size in (("a", a, n), ("d", d, p), ("m0", m0, n)):
            if vec is not None:
                mats[name] = parse_vector(vec, names, f"{key}.{name}", size)
        if P0 is not None:
            mats["P0"] = parse_matrix(P0, names, f"{key}.P0", (n, n))
        self.matrices = mats
        self.derived_exprs: dict[str, Expression] = {
            str(nm): parse(text, names, f"{key}.derived.{nm}")
            for nm, text in (derived or {}).items()
        }
        used = set().union(*(e.names for M in mats.values() for row in _rows(M) for e in row))
        unused = [nm for nm, s in self.params.items() if nm not in used and not s.fixed]
        if unused:
            raise ConfigError(f"{key}.params: the free parameters {unused} appear in no matrix; "
                              f"the data cannot identify them (remove or fix them)")
        self.free_names = tuple(nm for nm, s in self.params.items() if not s.fixed)
        self.prior_scale = float(prior_scale)
        with torch.no_grad():
            A0 = evaluate_matrix(mats["A"], self.values(self.theta0()), torch.Size(),
                                 torch.float64, torch.device("cpu"))
            self.stationary_prior = bool((torch.linalg.eigvals(A0).real < 0).all())

    # ------------------------------------------------------------------------------ parameters
    @property
    def n_params(self) -> int:
        return len(self.free_names)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of theta's entries (``log_<name>`` for positive parameters)."""
        return tuple(f"log_{nm}" if self.params[nm].positive else nm for nm in self.free_names)

    def theta0(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Unconstrained starting parameters (n_params,)."""
        vals = [math.log(self.params[nm].value) if self.params[nm].positive
                else self.params[nm].value for nm in self.free_names]
        return torch.tensor(vals, dtype=dtype)

    def values(self, theta: Tensor) -> dict[str, Tensor | float]:
        """Natural values of every parameter: free ones (...) from theta, fixed ones floats."""
        out: dict[str, Tensor | float] = {}
        for nm, spec in self.params.items():
            if spec.fixed:
                out[nm] = spec.value
            else:
                x = theta[..., self.free_names.index(nm)]
                out[nm] = x.exp() if spec.positive else x
        return out

    def derived(self, theta: Tensor) -> dict[str, Tensor]:
        """The free parameters' natural values and the ``derived`` expressions, each (...)."""
        vals = self.values(theta)
        batch = theta.shape[:-1]
        out = {nm: vals[nm] for nm in self.free_names}
        for nm, expr in self.derived_exprs.items():
            x = expr(vals)
            out[nm] = x if isinstance(x, Tensor) else theta.new_tensor(x).expand(batch)
        return out

    # ------------------------------------------------------------------------------ matrices
    def to_ct(self, theta: Tensor, units: Units | None = None) -> ContinuousLinearSSM:
        """The model at parameters theta (..., n_params), in the data's standardised units
        when ``units`` is given (else in the physical units)."""
        if theta.shape[-1] != self.n_params:
            raise ConfigError(f"theta has {theta.shape[-1]} entries; the model's free "
                              f"parameters are {', '.join(self.free_names)}")
        vals = self.values(theta)
        batch, dtype, device = theta.shape[:-1], theta.dtype, theta.device
        M = {name: (evaluate_vector if name in ("a", "d", "m0") else evaluate_matrix)(
            expr, vals, batch, dtype, device) for name, expr in self.matrices.items()}
        phys = ContinuousLinearSSM(M["A"], M["C"], M["Qc"], M["R"],
                                   theta.new_zeros(*batch, self.n_states),
                                   theta.new_zeros(*batch, self.n_states, self.n_states),
                                   B=M.get("B"), D=M.get("D"), a=M.get("a"), d=M.get("d"))
        ct = phys if units is None else to_standardised(phys, units)
        m0, P0 = M.get("m0"), M.get("P0")
        if m0 is None or P0 is None:
            dm0, dP0 = self._default_prior(ct, units)
            m0 = dm0 if m0 is None else m0
            P0 = dP0 if P0 is None else P0
        return ct._replace(m0=m0, P0=P0)

    def _default_prior(self, ct: ContinuousLinearSSM, units: Units | None
                       ) -> tuple[Tensor, Tensor]:
        batch = torch.broadcast_shapes(ct.A.shape[:-2], ct.Qc.shape[:-2])
        n = self.n_states
        if self.stationary_prior:
            P0 = continuous_lyapunov(ct.A, ct.Qc, check=False)
            if ct.a is not None:  # the standardised drift holds B mu_u: equilibrium at mean input
                m0 = -torch.linalg.solve(ct.A.expand(*batch, n, n),
                                         ct.a.expand(*batch, n).unsqueeze(-1))[..., 0]
            else:
                m0 = ct.A.new_zeros(*batch, n)
            return m0, P0
        scale = 1.0 if units is None else float(units.y_std.max()) ** 2
        eye = torch.eye(n, dtype=ct.A.dtype, device=ct.A.device)
        return ct.A.new_zeros(*batch, n), (self.prior_scale * scale * eye).expand(*batch, n, n)


def _rows(M) -> list:
    return M if M and isinstance(M[0], list) else [M]


def to_standardised(ct: ContinuousLinearSSM, units: Units) -> ContinuousLinearSSM:
    """The same model for standardised outputs and inputs (states unchanged; see the module
    docstring). units: per-channel means and standard deviations of the data."""
    dtype, device = ct.A.dtype, ct.A.device
    ys = units.y_std.to(dtype=dtype, device=device)
    ym = units.y_mean.to(dtype=dtype, device=device)
    inv = 1.0 / ys
    C = ct.C * inv[:, None]
    R = ct.R * inv[:, None] * inv[None, :]
    d = -ym * inv if ct.d is None else (ct.d - ym) * inv
    B, D, a = ct.B, ct.D, ct.a
    if B is not None or D is not None:
        if units.u_mean is None or units.u_std is None:
            raise ConfigError("the model takes inputs: its units need the inputs' scaling")
        us = units.u_std.to(dtype=dtype, device=device)
        um = units.u_mean.to(dtype=dtype, device=device)
        if B is not None:
            Bu = (B @ um.unsqueeze(-1))[..., 0]
            a = Bu if a is None else a + Bu
            B = B * us
        if D is not None:
            d = d + (D @ um.unsqueeze(-1))[..., 0] * inv
            D = D * us * inv[:, None]
    return ct._replace(B=B, D=D, a=a, C=C, R=R, d=d)
