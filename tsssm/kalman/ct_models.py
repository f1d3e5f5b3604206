"""Continuous-time structural components as :class:`~tsssm.kalman.ct.ContinuousLinearSSM`.

Components (each a block of the state; the observation adds each block's first state):

- ``level``: Brownian level, ``dμ = σ_l dW`` (state μ).
- ``trend``: integrated random walk, ``dμ = β ds``, ``dβ = σ_β dW`` (states μ, β); together with
  ``level`` the level also diffuses (``dμ = β ds + σ_l dW``): the continuous local linear trend.
- ``oscillator``: a stochastic mass-spring-damper, ``m ẍ = -k x - b ẋ + f(s)`` with a white
  random force; states (x, ẋ), drift ``[[0, 1], [-k/m, -b/m]]``, diffusion on ẋ. Parameters are
  ``k/m`` (the squared natural frequency, s^-2) and ``b/m`` (s^-1), each by its logarithm.
- ``ou``: Ornstein-Uhlenbeck, ``dx = -θ x ds + σ dW`` (mean 0: add ``level`` for a moving mean).

Inputs ``u`` (k channels) drive one state of the components named in ``inputs_drive`` with a
free gain each: the velocity of the oscillator (a force per unit mass), the state of an OU, the
level's rate. ``feedthrough=True`` adds a free direct gain ``D`` from each input to y.

Parameters ``theta (..., n_params)``: log-variances (diffusions per unit time, the observation
noise per sample), logs of rates, gains as they are. Batch axes of theta are batch axes of the
model (one model per channel, per series, or per candidate start). :meth:`derived` gives the
quantities a user reads (``oscillator.k/m``, ``oscillator.b/m``, ``ou.rate``, noise standard
deviations, gains), whose standard errors follow by the delta method
(:func:`tsssm.kalman.ct_fit.derived_standard_errors`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tsssm.errors import ConfigError, DataError
from tsssm.kalman.ct import ContinuousLinearSSM, continuous_lyapunov

CT_COMPONENTS = ("level", "trend", "oscillator", "ou")
#: components an input can drive, and the index of the state it enters inside the block
_DRIVEN_STATE = {"level": 0, "trend": 0, "irw": 0, "oscillator": 1, "ou": 0}


@dataclass(frozen=True)
class CTBlock:
    """One component: its states and parameters."""

    #: level | trend (level and slope, both diffusing) | irw (smooth trend) | oscillator | ou
    name: str
    n_states: int
    param_names: tuple[str, ...]
    stationary: bool = False

    def matrices(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(A (..., k, k), Qc (..., k, k)) from the block's parameters (..., n_params)."""
        batch, dtype, device = theta.shape[:-1], theta.dtype, theta.device
        if self.name == "level":
            return theta.new_zeros(*batch, 1, 1), theta.exp().reshape(*batch, 1, 1)
        if self.name in ("trend", "irw"):
            A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=dtype, device=device)
            var = theta.exp()
            if self.name == "irw":  # no level noise: the integrated random walk
                var = torch.cat([torch.zeros_like(var), var], -1)
            return A.expand(*batch, 2, 2), torch.diag_embed(var)
        if self.name == "oscillator":
            k_m, b_m, q = theta[..., 0].exp(), theta[..., 1].exp(), theta[..., 2].exp()
            zero, one = torch.zeros_like(k_m), torch.ones_like(k_m)
            A = torch.stack([torch.stack([zero, one], -1), torch.stack([-k_m, -b_m], -1)], -2)
            Qc = torch.stack([torch.stack([zero, zero], -1), torch.stack([zero, q], -1)], -2)
            return A, Qc
        if self.name == "ou":
            return -theta[..., :1].exp().unsqueeze(-1), theta[..., 1:2].exp().unsqueeze(-1)
        raise ConfigError(f"unknown continuous-time component {self.name!r}")


def _make_blocks(components: Sequence[str]) -> tuple[CTBlock, ...]:
    comps = [str(c).lower() for c in components]
    unknown = [c for c in comps if c not in CT_COMPONENTS]
    if unknown or not comps:
        raise ConfigError(
            f"unknown continuous-time components {unknown or comps}; choose from "
            f"{', '.join(CT_COMPONENTS)}"
        )
    if len(set(comps)) != len(comps):
        raise ConfigError(f"continuous-time components repeat: {comps}; name each once")
    blocks = []
    if "level" in comps and "trend" in comps:
        blocks.append(CTBlock("trend", 2, ("log_var_level", "log_var_slope")))
    elif "level" in comps:
        blocks.append(CTBlock("level", 1, ("log_var_level",)))
    elif "trend" in comps:
        blocks.append(CTBlock("irw", 2, ("log_var_slope",)))
    if "oscillator" in comps:
        blocks.append(CTBlock("oscillator", 2, ("log_k_over_m", "log_b_over_m",
                                                "log_var_force"), stationary=True))
    if "ou" in comps:
        blocks.append(CTBlock("ou", 1, ("log_rate_ou", "log_var_ou"), stationary=True))
    return tuple(blocks)


def block_diag(mats: Sequence[Tensor]) -> Tensor:
    """Block-diagonal matrix of square blocks (..., k_i, k_i) with broadcast batch axes."""
    if len(mats) == 1:
        return mats[0]
    batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    n = sum(m.shape[-1] for m in mats)
    out = mats[0].new_zeros(*batch, n, n)
    i = 0
    for m in mats:
        k = m.shape[-1]
        out[..., i : i + k, i : i + k] = m
        i += k
    return out


def _component_of(block: CTBlock) -> str:
    return {"irw": "trend"}.get(block.name, block.name)


@dataclass(frozen=True)
class CTStructuralModel:
    """A sum of continuous-time components; ``to_ct(theta)`` builds its ContinuousLinearSSM."""

    components: tuple[str, ...] = ("level",)
    n_inputs: int = 0
    #: components whose driven state the inputs enter (default: oscillator and ou if present,
    #: else the level/trend)
    inputs_drive: tuple[str, ...] | None = None
    feedthrough: bool = False
    prior_scale: float = 10.0
    blocks: tuple[CTBlock, ...] = field(init=False, repr=False)
    driven: tuple[int, ...] = field(init=False, repr=False)  # indices into blocks

    def __post_init__(self) -> None:
        blocks = _make_blocks(self.components)
        object.__setattr__(self, "blocks", blocks)
        if not isinstance(self.n_inputs, int) or self.n_inputs < 0:
            raise ConfigError(f"n_inputs must be a non-negative integer, got {self.n_inputs!r}")
        names = [_component_of(b) for b in blocks]
        if self.inputs_drive is None:
            drive = [c for c in ("oscillator", "ou") if c in names] or names[:1]
        else:
            drive = [str(c).lower() for c in self.inputs_drive]
            bad = [c for c in drive if c not in names and not (c == "level" and "trend" in names)]
            if bad:
                raise ConfigError(f"inputs_drive names {bad}, which are not components of this "
                                  f"model ({', '.join(names)})")
        idx = tuple(i for i, b in enumerate(blocks)
                    if _component_of(b) in drive or (b.name == "trend" and "level" in drive))
        object.__setattr__(self, "driven", idx if self.n_inputs else ())

    # ------------------------------------------------------------------------------ layout
    @property
    def n_states(self) -> int:
        return sum(b.n_states for b in self.blocks)

    @property
    def param_names(self) -> tuple[str, ...]:
        names = [nm for b in self.blocks for nm in b.param_names]
        for i in self.driven:
            names += [f"gain_{_component_of(self.blocks[i])}_{j}" for j in range(self.n_inputs)]
        if self.feedthrough and self.n_inputs:
            names += [f"feedthrough_{j}" for j in range(self.n_inputs)]
        names.append("log_var_obs")
        return tuple(names)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def observation_row(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(n,): 1 on the first state of every block."""
        h = torch.zeros(self.n_states, dtype=dtype, device=device)
        i = 0
        for b in self.blocks:
            h[i] = 1.0
            i += b.n_states
        return h

    def _offsets(self) -> list[int]:
        out, i = [], 0
        for b in self.blocks:
            out.append(i)
            i += b.n_states
        return out

    # ------------------------------------------------------------------------------ matrices
    def drift(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(A (..., n, n), Qc (..., n, n)), block diagonal over the components."""
        As, Qs, i = [], [], 0
        for b in self.blocks:
            A, Q = b.matrices(theta[..., i : i + len(b.param_names)])
            As.append(A)
            Qs.append(Q)
            i += len(b.param_names)
        return block_diag(As), block_diag(Qs)

    def to_ct(self, theta: Tensor, m0: Tensor | None = None, P0: Tensor | None = None, *,
              level0: Tensor | float = 0.0, var0: Tensor | float = 1.0) -> ContinuousLinearSSM:
        """The model for parameters ``theta (..., n_params)``.

        m0, P0: the prior of the first state; default: zero mean except the level at
        ``level0``, the stationary covariance on oscillator/OU blocks and ``prior_scale *
        var0`` on the nonstationary ones (level0, var0 broadcast against theta's batch).
        """
        if theta.shape[-1] != self.n_params:
            raise ConfigError(
                f"theta has {theta.shape[-1]} parameters, the model {self.components} has "
                f"{self.n_params}: {', '.join(self.param_names)}"
            )
        A, Qc = self.drift(theta)
        batch, dtype, device = theta.shape[:-1], theta.dtype, theta.device
        n, k = self.n_states, self.n_inputs
        i = sum(len(b.param_names) for b in self.blocks)
        B = D = None
        if self.driven:
            rows = [theta.new_zeros(*batch, k)] * n  # row s of B: how the inputs move state s
            offsets = self._offsets()
            for bi in self.driven:
                rows[offsets[bi] + _DRIVEN_STATE[self.blocks[bi].name]] = theta[..., i : i + k]
                i += k
            B = torch.stack(rows, dim=-2)
        if self.feedthrough and k:
            D = theta[..., i : i + k].unsqueeze(-2)
            i += k
        R = theta[..., i].exp().reshape(*batch, 1, 1)
        C = self.observation_row(dtype, device).expand(*batch, 1, n)
        if m0 is None or P0 is None:
            m0_d, P0_d = self.default_prior(theta, A, Qc, level0=level0, var0=var0)
            m0 = m0_d if m0 is None else m0
            P0 = P0_d if P0 is None else P0
        if k and B is None and D is None:
            raise ConfigError("the model takes inputs but none of its components is driven and "
                              "feedthrough is off; set inputs_drive or feedthrough")
        return ContinuousLinearSSM(A, C, Qc, R, m0, P0, B=B, D=D)

    def default_prior(self, theta: Tensor, A: Tensor | None = None, Qc: Tensor | None = None, *,
                      level0: Tensor | float = 0.0, var0: Tensor | float = 1.0
                      ) -> tuple[Tensor, Tensor]:
        """(m0 (..., n), P0 (..., n, n)): stationary covariance on oscillator/OU blocks,
        ``prior_scale * var0`` on the others; the level's mean at ``level0``."""
        if A is None or Qc is None:
            A, Qc = self.drift(theta)
        batch, dtype, device = theta.shape[:-1], theta.dtype, theta.device
        var = torch.as_tensor(var0, dtype=dtype, device=device) * self.prior_scale
        blocks, i = [], 0
        for b in self.blocks:
            k = b.n_states
            if b.stationary:
                blocks.append(continuous_lyapunov(A[..., i : i + k, i : i + k],
                                                  Qc[..., i : i + k, i : i + k]))
            else:
                eye = torch.eye(k, dtype=dtype, device=device)
                blocks.append(eye * var.reshape(*var.shape, 1, 1).expand(*batch, k, k))
            i += k
        m0 = theta.new_zeros(*batch, self.n_states)
        if self.blocks[0].name in ("level", "trend", "irw"):
            lvl = torch.as_tensor(level0, dtype=dtype, device=device).expand(batch)
            m0 = torch.cat([lvl.unsqueeze(-1), m0[..., 1:]], -1)
        return m0, block_diag(blocks)

    # ------------------------------------------------------------------------------ reading
    def derived(self, theta: Tensor) -> dict[str, Tensor]:
        """The quantities a user reads, each (...): rates, frequencies, noise levels, gains."""
        out: dict[str, Tensor] = {}
        i = 0
        for b in self.blocks:
            t = theta[..., i : i + len(b.param_names)]
            if b.name == "level":
                out["level.sd"] = (0.5 * t[..., 0]).exp()
            elif b.name == "trend":
                out["level.sd"] = (0.5 * t[..., 0]).exp()
                out["trend.slope_sd"] = (0.5 * t[..., 1]).exp()
            elif b.name == "irw":
                out["trend.slope_sd"] = (0.5 * t[..., 0]).exp()
            elif b.name == "oscillator":
                out["oscillator.k_over_m"] = t[..., 0].exp()
                out["oscillator.b_over_m"] = t[..., 1].exp()
                out["oscillator.force_sd"] = (0.5 * t[..., 2]).exp()
            elif b.name == "ou":
                out["ou.rate"] = t[..., 0].exp()
                out["ou.sd"] = (0.5 * (t[..., 1] - t[..., 0] - math.log(2.0))).exp()
            i += len(b.param_names)
        for name, j in zip(self.param_names[i:], range(i, self.n_params)):
            if name == "log_var_obs":
                out["obs.sd"] = (0.5 * theta[..., j]).exp()
            else:
                # gain_<component>_<j> -> gain.<component>[j], feedthrough_<j> -> feedthrough[j]
                head, _, idx = name.rpartition("_")
                head = head.replace("gain_", "gain.") if head != "feedthrough" else head
                out[f"{head}[{idx}]"] = theta[..., j]
        return out

    # ------------------------------------------------------------------------------ starts
    def initial_params(self, y: Tensor, dt: Tensor) -> Tensor:
        """Data-based starting parameters (..., n_params) for series y (..., T, 1) on dt (..., T).

        Moments of the first differences split the variance between level and noise (as the
        discrete structural models do), per unit of the median step; the oscillator starts at
        the frequency of the zero crossings with a damping ratio of 0.1 and the force noise that
        gives the series' variance; the OU rate from the lag-one autocorrelation.
        """
        if y.ndim < 2 or y.shape[-1] != 1:
            raise DataError(f"initial_params expects univariate series (..., T, 1), got "
                            f"{tuple(y.shape)}")
        x = y[..., 0]
        ok = ~torch.isnan(x)
        if not bool(ok.any(-1).all()):
            raise DataError("a series has no observed value; drop it or fill it")
        step = float(dt[..., 1:].median()) if dt.shape[-1] > 1 else 1.0
        step = step if step > 0 else 1.0
        cnt = ok.sum(-1).clamp_min(1)
        mean = torch.where(ok, x, 0).sum(-1) / cnt
        xc = torch.where(ok, x - mean.unsqueeze(-1), 0)
        var = ((xc * xc).sum(-1) / cnt).clamp_min(1e-8)
        both = ok[..., 1:] & ok[..., :-1]
        nb = both.sum(-1).clamp_min(1)
        dx = torch.where(both, x[..., 1:] - x[..., :-1], 0)
        g0 = ((dx * dx).sum(-1) / nb).clamp_min(1e-8)
        lag1 = (torch.where(both, xc[..., 1:] * xc[..., :-1], 0).sum(-1) / nb) / var
        obs = (0.1 * g0).clamp_max(0.45 * var)
        # zero crossings per unit time -> frequency of the dominant oscillation
        sign_change = both & ((xc[..., 1:] > 0) != (xc[..., :-1] > 0))
        elapsed = torch.where(both, dt[..., 1:].to(x.dtype).expand_as(both), 0).sum(-1)
        rate = sign_change.sum(-1) / elapsed.clamp_min(step)
        omega = (math.pi * rate).clamp(min=1e-3 / step, max=math.pi / step)
        vals: list[Tensor] = []
        for b in self.blocks:
            if b.name == "level":
                vals.append((g0 / step).log())
            elif b.name == "trend":
                vals += [(g0 / step).log(), (0.01 * g0 / step**3).log()]
            elif b.name == "irw":
                vals.append((0.01 * g0 / step**3).log())
            elif b.name == "oscillator":
                gamma = 0.2 * omega  # 2 * zeta * omega with zeta = 0.1
                vals += [(omega * omega).log(), gamma.log(),
                         (2 * gamma * omega * omega * var).log()]
            elif b.name == "ou":
                rho = lag1.clamp(0.05, 0.99)
                theta_ou = -rho.log() / step
                vals += [theta_ou.log(), (2 * theta_ou * var).log()]
        for name in self.param_names[len(vals):]:
            vals.append(obs.log() if name == "log_var_obs" else torch.zeros_like(var))
        return torch.stack(vals, -1).to(y.dtype)

    def start_candidates(self, theta0: Tensor, n_frequencies: int = 9) -> Tensor:
        """Starting points (S, ..., n_params) around theta0: the oscillator's frequency over a
        grid of 4 octaves each side (its likelihood has a local optimum near every harmonic),
        other parameters as in theta0. Without an oscillator: theta0 alone (S = 1)."""
        names = self.param_names
        if "log_k_over_m" not in names or n_frequencies < 2:
            return theta0.unsqueeze(0)
        j = names.index("log_k_over_m")
        jb = names.index("log_b_over_m")
        jq = names.index("log_var_force")
        factors = torch.logspace(-2, 2, n_frequencies, base=2.0, dtype=theta0.dtype,
                                 device=theta0.device)  # on omega
        out = theta0.unsqueeze(0).repeat(n_frequencies, *([1] * theta0.ndim))
        shift = (2 * factors.log()).reshape(-1, *([1] * (theta0.ndim - 1)))
        out[..., j] = theta0[..., j] + shift  # k/m scales with omega^2
        out[..., jb] = theta0[..., jb] + 0.5 * shift  # same damping ratio
        out[..., jq] = theta0[..., jq] + 1.5 * shift  # same stationary variance
        return out
