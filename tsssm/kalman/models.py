"""Structural time series models as linear Gaussian state space models.

Components (each a block of the state, summed in the observation):

- ``level``: random-walk level mu_t = mu_{t-1} + eta_t.
- ``trend``: a slope feeding the level (with ``level``: the local linear trend),
  mu_t = mu_{t-1} + beta_{t-1} + eta_t, beta_t = beta_{t-1} + zeta_t.
- ``damped`` (with ``level``, instead of ``trend``): the damped trend,
  mu_t = mu_{t-1} + beta_{t-1} + eta_t, beta_t = phi beta_{t-1} + zeta_t with phi in (0, 1)
  (``logit_damping``): forecasts level off at mu + beta / (1 - phi) instead of running away.
- ``seasonal`` ``kind="dummy"``: s-1 states, the seasonal effects sum to noise over a period.
- ``seasonal`` ``kind="trig"``: harmonics j = 1..h of frequency 2 pi j / s, each a rotating pair
  with its own noise (one shared variance), as in Harvey (1989) / statsmodels.
- ``ar``: AR(p) in companion form, the state (a_t, a_{t-1}, ..., a_{t-p+1}) (so that EM can
  update the coefficients by a regression); ``arma``: ARMA(p, q) in Harvey's form, state
  dimension max(p, q + 1). AR coefficients from partial autocorrelations in (-1, 1) (tanh of the
  parameter, Durbin-Levinson: always stationary), MA coefficients likewise (always invertible).

Every model maps an unconstrained parameter vector ``theta (..., n_params)`` to the matrices in
one place, :meth:`StructuralModel.to_ssm`: variances are ``exp(theta)`` (log-variances), ARMA
coefficients go through the PACF transform. Batch axes of ``theta`` become batch axes of the model,
so one call builds the models of many series (or of every channel: the per-channel layout).

Observation: ``observation="univariate"`` (p = 1; use a batch axis for several channels, each
with its own parameters) or ``"full"``: one latent state for ``n_obs`` channels with a full,
freely estimated observation matrix ``H (p, n)`` and a diagonal observation noise (note: a full
loading matrix is only identified up to the scale of the states; the likelihood is what matters).

Initial state: :meth:`StructuralModel.initial_state` builds a data-based prior: the level starts
at the first observed value, the nonstationary states get a prior variance from the data's
variance (times ``prior_scale``), the ARMA block its stationary covariance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tsssm.errors import ConfigError, DataError
from tsssm.kalman.ssm import LinearGaussianSSM

COMPONENTS = ("level", "trend", "damped", "seasonal", "ar", "arma")


def pacf_to_coefficients(raw: Tensor) -> Tensor:
    """Unconstrained (..., p) -> coefficients of a stationary AR(p) polynomial (..., p).

    Partial autocorrelations r_k = tanh(raw_k) in (-1, 1), then the Durbin-Levinson recursion
    phi^(k)_j = phi^(k-1)_j - r_k phi^(k-1)_{k-j}, phi^(k)_k = r_k (Barndorff-Nielsen & Schou
    1973; Monahan 1984). Every output is the coefficient vector of a stationary process.
    """
    r = torch.tanh(raw)
    p = raw.shape[-1]
    phi = r[..., :1]
    for k in range(1, p):
        rk = r[..., k : k + 1]
        phi = torch.cat([phi - rk * torch.flip(phi, dims=(-1,)), rk], dim=-1)
    return phi


def coefficients_to_pacf(phi: Tensor) -> Tensor:
    """Inverse of :func:`pacf_to_coefficients` (for stationary ``phi``)."""
    p = phi.shape[-1]
    raws = []
    for k in range(p, 0, -1):
        rk = phi[..., k - 1 : k]
        raws.append(torch.atanh(rk.clamp(-1 + 1e-12, 1 - 1e-12)))
        if k > 1:
            prev = phi[..., : k - 1]
            phi = (prev + rk * torch.flip(prev, dims=(-1,))) / (1 - rk * rk)
    return torch.cat(raws[::-1], dim=-1)


def stationary_covariance(F: Tensor, Q: Tensor) -> Tensor:
    """Solution P of P = F P F' + Q (discrete Lyapunov) for stable F, via the Kronecker system."""
    n = F.shape[-1]
    eye = torch.eye(n * n, dtype=F.dtype, device=F.device)
    kron = (F.unsqueeze(-1).unsqueeze(-3) * F.unsqueeze(-2).unsqueeze(-4)).reshape(
        *F.shape[:-2], n * n, n * n
    )  # kron[(i,k),(j,l)] = F_ij F_kl ... arranged so that vec_row(F P F') = kron @ vec_row(P)
    vecP = torch.linalg.solve(eye - kron, Q.reshape(*Q.shape[:-2], n * n, 1))
    P = vecP.reshape(*vecP.shape[:-2], n, n)
    return 0.5 * (P + P.mT)


@dataclass(frozen=True)
class Block:
    """One component: its states, parameters and how its parameters make its matrices."""

    name: str
    n_states: int
    param_names: tuple[str, ...]
    stationary: bool = False
    period: int | None = None
    harmonics: int | None = None
    kind: str | None = None
    ar_order: int = 0
    ma_order: int = 0

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def observation_row(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """h (k,): how the block's states add to the observation."""
        h = torch.zeros(self.n_states, dtype=dtype, device=device)
        if self.name == "seasonal" and self.kind == "trig":
            h[0::2] = 1.0  # the first state of every harmonic pair (and a lone Nyquist state)
        else:
            h[0] = 1.0
        return h

    def matrices(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(F (..., k, k), Q (..., k, k)) from the block's parameters theta (..., n_params)."""
        k = self.n_states
        batch, dtype, device = theta.shape[:-1], theta.dtype, theta.device
        eye = torch.eye(k, dtype=dtype, device=device)
        if self.name == "level":
            return eye.expand(*batch, 1, 1), theta.exp().reshape(*batch, 1, 1)
        if self.name == "trend":  # local linear trend: [level, slope]
            F = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=dtype, device=device)
            Q = torch.diag_embed(theta.exp())
            return F.expand(*batch, 2, 2), Q
        if self.name == "slope":  # trend without a level term: a random-walk slope only
            return eye.expand(*batch, 1, 1), theta.exp().reshape(*batch, 1, 1)
        if self.name == "damped_trend":  # [level, slope], the slope decays by phi per step
            F = theta.new_zeros(*batch, 2, 2)
            F[..., 0, :] = 1.0
            F[..., 1, 1] = torch.sigmoid(theta[..., 2])
            return F, torch.diag_embed(theta[..., :2].exp())
        if self.name == "seasonal" and self.kind == "dummy":
            F = torch.zeros(k, k, dtype=dtype, device=device)
            F[0, :] = -1.0
            if k > 1:
                F[1:, :-1] = torch.eye(k - 1, dtype=dtype, device=device)
            sel = torch.zeros(k, k, dtype=dtype, device=device)
            sel[0, 0] = 1.0
            return F.expand(*batch, k, k), theta.exp().reshape(*batch, 1, 1) * sel
        if self.name == "seasonal":  # trigonometric
            F = torch.zeros(k, k, dtype=dtype, device=device)
            for j in range(1, self.harmonics + 1):
                lam = 2.0 * math.pi * j / self.period
                i = 2 * (j - 1)
                if i + 1 < k:
                    c, s = math.cos(lam), math.sin(lam)
                    F[i : i + 2, i : i + 2] = torch.tensor([[c, s], [-s, c]], dtype=dtype)
                else:  # Nyquist frequency of an even period: a single state, cos = -1
                    F[i, i] = math.cos(lam)
            return F.expand(*batch, k, k), theta.exp().reshape(*batch, 1, 1) * eye
        if self.name == "ar":  # companion form: a_t = sum_i phi_i a_{t-i} + e_t
            phi = pacf_to_coefficients(theta[..., :-1])
            F = theta.new_zeros(*batch, k, k)
            F[..., 0, :] = phi
            if k > 1:
                F[..., 1:, :-1] = torch.eye(k - 1, dtype=dtype, device=device)
            sel = torch.zeros(k, k, dtype=dtype, device=device)
            sel[0, 0] = 1.0
            return F, theta[..., -1].exp()[..., None, None] * sel
        # arma(p, q), Harvey's form: state dimension r = max(p, q + 1)
        p, q = self.ar_order, self.ma_order
        phi = pacf_to_coefficients(theta[..., :p]) if p else theta.new_zeros(*batch, 0)
        ma = -pacf_to_coefficients(theta[..., p : p + q]) if q else theta.new_zeros(*batch, 0)
        sigma2 = theta[..., -1].exp()
        F = theta.new_zeros(*batch, k, k)
        F[..., :p, 0] = phi
        if k > 1:
            F[..., :-1, 1:] = torch.eye(k - 1, dtype=dtype, device=device)
        r = torch.cat([theta.new_ones(*batch, 1), ma, theta.new_zeros(*batch, k - 1 - q)], -1)
        Q = sigma2[..., None, None] * r.unsqueeze(-1) * r.unsqueeze(-2)
        return F, Q


#: EM keeps a damping factor / AR(1)-like coefficient inside these bounds.
DAMPING_BOUNDS = (1e-3, 1.0 - 1e-3)


def _sigmoid_inverse(x: Tensor) -> Tensor:
    return torch.log(x) - torch.log1p(-x)


def _companion_radius(phi: Tensor) -> Tensor:
    """Spectral radius (...) of the companion matrix of AR coefficients phi (..., p)."""
    p = phi.shape[-1]
    if p == 1:
        return phi[..., 0].abs()
    C = phi.new_zeros(*phi.shape[:-1], p, p)
    C[..., 0, :] = phi
    C[..., 1:, :-1] = torch.eye(p - 1, dtype=phi.dtype, device=phi.device)
    return torch.linalg.eigvals(C).abs().amax(-1)


def block_em_update(block: Block, theta: Tensor, S11: Tensor, S10: Tensor, S00: Tensor,
                    count: Tensor | float, floor: Tensor) -> Tensor:
    """M-step for one block: the parameters (..., n_params) that maximise the expected
    complete-data log-likelihood of its transitions.

    S11, S10, S00 (..., k, k): sums over the transitions t of E[x_t x_t'], E[x_t x_{t-1}'] and
    E[x_{t-1} x_{t-1}'] for the block's states, given the data; ``count`` transitions; ``floor``
    (...) the smallest variance allowed. Free transition coefficients (damping, AR) are the
    regression of the noisy state on the previous state, then the variances are the mean
    squared residual (the joint maximum, as the noise of that row is its own parameter).
    Damping stays in DAMPING_BOUNDS; an AR regression that would leave the stationary region is
    shrunk toward the current coefficients until it is inside (still an increase of the
    expected log-likelihood: it is concave in the coefficients).
    """
    if block.name == "arma":
        raise ConfigError("EM has no closed-form update for an ARMA component with an MA part; "
                          "use maximum likelihood (model.fit=mle)")
    theta = theta.clone()
    if block.name == "damped_trend":
        phi = (S10[..., 1, 1] / S00[..., 1, 1].clamp_min(1e-300)).clamp(*DAMPING_BOUNDS)
        theta[..., 2] = _sigmoid_inverse(phi)
    elif block.name == "ar":
        p = block.ar_order
        old = pacf_to_coefficients(theta[..., :p])
        new = torch.linalg.solve(S00[..., :p, :p], S10[..., 0, :p].unsqueeze(-1)).squeeze(-1)
        step = torch.ones_like(new[..., :1])
        limit = 1.0 - 1e-6
        for _ in range(60):  # halve the step where the regression is not stationary
            bad = (_companion_radius(old + step * (new - old)) >= limit).unsqueeze(-1)
            if not bool(bad.any()):
                break
            step = torch.where(bad, 0.5 * step, step)
        else:  # still outside after 60 halvings: keep the current coefficients there
            step = torch.where(bad, 0.0, step)
        cand = old + step * (new - old)
        theta[..., :p] = coefficients_to_pacf(cand)
    F, _ = block.matrices(theta)
    # sum over transitions of E[w_t w_t'], w_t = x_t - F x_{t-1}
    FS10 = F @ S10.mT
    W = S11 - FS10 - FS10.mT + F @ S00 @ F.mT
    diag = torch.diagonal(W, dim1=-2, dim2=-1) / count
    fl = floor.unsqueeze(-1) if isinstance(floor, Tensor) else floor
    if block.name in ("level", "slope"):
        theta[..., 0] = torch.maximum(diag[..., 0], floor).log()
    elif block.name in ("trend", "damped_trend"):
        theta[..., 0:2] = torch.maximum(diag[..., 0:2], fl).log()
    elif block.name == "seasonal" and block.kind == "dummy":
        theta[..., 0] = torch.maximum(diag[..., 0], floor).log()
    elif block.name == "seasonal":  # trig: one variance shared by all harmonic states
        theta[..., 0] = torch.maximum(diag.mean(-1), floor).log()
    elif block.name == "ar":
        theta[..., -1] = torch.maximum(diag[..., 0], floor).log()
    else:  # pragma: no cover - every block kind is handled above
        raise ConfigError(f"no EM update for component {block.name}")
    return theta


def _make_blocks(
    components: Sequence[str],
    seasonal_period: int | None,
    seasonal_kind: str,
    seasonal_harmonics: int | None,
    ar_order: int,
    ma_order: int,
) -> tuple[Block, ...]:
    comps = [str(c).lower() for c in components]
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown or not comps:
        raise ConfigError(
            f"unknown structural components {unknown or comps}; choose from {', '.join(COMPONENTS)}"
        )
    if len(set(comps)) != len(comps):
        raise ConfigError(f"structural components repeat: {comps}; name each once")
    blocks: list[Block] = []
    if "damped" in comps and ("trend" in comps or "level" not in comps):
        raise ConfigError(
            f"the damped component is a damped trend on the level: use it with 'level' and "
            f"without 'trend' (components {comps})"
        )
    if "damped" in comps:
        blocks.append(Block("damped_trend", 2, ("log_var_level", "log_var_trend",
                                                "logit_damping")))
    elif "level" in comps and "trend" in comps:
        blocks.append(Block("trend", 2, ("log_var_level", "log_var_trend")))
    elif "level" in comps:
        blocks.append(Block("level", 1, ("log_var_level",)))
    elif "trend" in comps:
        blocks.append(Block("slope", 1, ("log_var_trend",)))
    if "seasonal" in comps:
        if seasonal_period is None or int(seasonal_period) < 2:
            raise ConfigError(
                f"the seasonal component needs seasonal_period >= 2, got {seasonal_period!r}"
            )
        s = int(seasonal_period)
        if seasonal_kind == "dummy":
            blocks.append(Block("seasonal", s - 1, ("log_var_seasonal",), period=s, kind="dummy"))
        elif seasonal_kind == "trig":
            h = s // 2 if seasonal_harmonics is None else int(seasonal_harmonics)
            if not 1 <= h <= s // 2:
                raise ConfigError(
                    f"seasonal_harmonics must be between 1 and period // 2 = {s // 2}, got {h}"
                )
            k = 2 * h - (1 if 2 * h == s else 0)
            blocks.append(Block("seasonal", k, ("log_var_seasonal",), period=s, harmonics=h,
                                kind="trig"))
        else:
            raise ConfigError(f"seasonal_kind must be 'dummy' or 'trig', got {seasonal_kind!r}")
    if "ar" in comps or "arma" in comps:
        p = int(ar_order)
        q = int(ma_order) if "arma" in comps else 0
        if p < 0 or q < 0 or p + q == 0:
            raise ConfigError(f"an ARMA component needs ar_order + ma_order >= 1, got ({p}, {q})")
        names = tuple(f"pacf_ar{i + 1}" for i in range(p)) + tuple(
            f"pacf_ma{i + 1}" for i in range(q)
        ) + ("log_var_arma",)
        if q == 0:
            blocks.append(Block("ar", p, names, stationary=True, ar_order=p))
        else:
            blocks.append(Block("arma", max(p, q + 1), names, stationary=True, ar_order=p,
                                ma_order=q))
    return tuple(blocks)


@dataclass(frozen=True)
class StructuralModel:
    """A sum of structural components; ``to_ssm(theta)`` builds its LinearGaussianSSM."""

    components: tuple[str, ...] = ("level", "trend")
    seasonal_period: int | None = None
    seasonal_kind: str = "trig"
    seasonal_harmonics: int | None = None
    ar_order: int = 1
    ma_order: int = 0
    observation: str = "univariate"  # or "full"
    n_obs: int = 1
    prior_scale: float = 10.0
    blocks: tuple[Block, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.observation not in ("univariate", "full"):
            raise ConfigError(
                f"observation must be 'univariate' or 'full', got {self.observation!r}"
            )
        if self.observation == "univariate" and self.n_obs != 1:
            raise ConfigError(
                "observation='univariate' has n_obs = 1; use a batch axis per channel"
            )
        blocks = _make_blocks(self.components, self.seasonal_period, self.seasonal_kind,
                              self.seasonal_harmonics, self.ar_order, self.ma_order)
        object.__setattr__(self, "blocks", blocks)

    @property
    def n_states(self) -> int:
        return sum(b.n_states for b in self.blocks)

    @property
    def param_names(self) -> tuple[str, ...]:
        names = [name for b in self.blocks for name in b.param_names]
        if self.observation == "univariate":
            names.append("log_var_obs")
        else:
            names += [f"log_var_obs{i}" for i in range(self.n_obs)]
            names += [f"H{i}_{j}" for i in range(self.n_obs) for j in range(self.n_states)]
        return tuple(names)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def natural_observation_row(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(n,) the structural observation row (1 on each component's output state)."""
        return torch.cat([b.observation_row(dtype, device) for b in self.blocks])

    def transition(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(F (..., n, n), Q (..., n, n)): block diagonal over the components."""
        Fs, Qs, i = [], [], 0
        for b in self.blocks:
            F, Q = b.matrices(theta[..., i : i + b.n_params])
            Fs.append(F)
            Qs.append(Q)
            i += b.n_params
        return _block_diag(Fs), _block_diag(Qs)

    def to_ssm(self, theta: Tensor, m0: Tensor | None = None, P0: Tensor | None = None
               ) -> LinearGaussianSSM:
        """The model's matrices for parameters ``theta (..., n_params)``.

        m0 (..., n), P0 (..., n, n): the prior of the first state (default: zero mean,
        ``prior_scale`` variance on nonstationary states, stationary covariance on ARMA states;
        for a data-based prior use :meth:`initial_state`).
        """
        if theta.shape[-1] != self.n_params:
            raise ConfigError(
                f"theta has {theta.shape[-1]} parameters, the model {self.components} has "
                f"{self.n_params}: {', '.join(self.param_names)}"
            )
        F, Q = self.transition(theta)
        n, p = self.n_states, self.n_obs
        i = sum(b.n_params for b in self.blocks)
        if self.observation == "univariate":
            H = self.natural_observation_row(theta.dtype, theta.device)
            H = H.expand(*theta.shape[:-1], 1, n)
            R = theta[..., i].exp().reshape(*theta.shape[:-1], 1, 1)
        else:
            R = torch.diag_embed(theta[..., i : i + p].exp())
            H = theta[..., i + p :].reshape(*theta.shape[:-1], p, n)
        if m0 is None or P0 is None:
            m0_d, P0_d = self.default_prior(theta, F, Q, variance=self.prior_scale)
            m0 = m0_d if m0 is None else m0
            P0 = P0_d if P0 is None else P0
        return LinearGaussianSSM(F, H, Q, R, m0, P0)

    def default_prior(self, theta: Tensor, F: Tensor | None = None, Q: Tensor | None = None,
                      variance: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """Zero mean; ``variance`` on nonstationary states, stationary covariance on ARMA."""
        if F is None or Q is None:
            F, Q = self.transition(theta)
        batch = theta.shape[:-1]
        blocks_P = []
        i = 0
        var = torch.as_tensor(variance, dtype=theta.dtype, device=theta.device)
        for b in self.blocks:
            k = b.n_states
            if b.stationary:
                blocks_P.append(stationary_covariance(F[..., i : i + k, i : i + k],
                                                      Q[..., i : i + k, i : i + k]))
            else:
                eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
                blocks_P.append(eye * var.reshape(*var.shape, 1, 1).expand(*batch, k, k))
            i += k
        m0 = theta.new_zeros(*batch, self.n_states)
        return m0, _block_diag(blocks_P)

    def initial_state(self, theta: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data-based prior (m0 (..., n), P0 (..., n, n)) for series y (..., T, p).

        The level (or first state of each channel's structural row) starts at the first
        observed value; nonstationary states get variance ``prior_scale * var(y)``.
        """
        stats = _series_stats(y)
        var = (self.prior_scale * stats.var.mean(-1)).to(theta.dtype)  # (...)
        m0, P0 = self.default_prior(theta, variance=var)
        if self.blocks[0].name in ("level", "trend", "damped_trend"):
            first = stats.first.mean(-1) if self.observation == "full" else stats.first[..., 0]
            m0 = m0.clone()
            m0[..., 0] = first.to(theta.dtype)
        return m0, P0

    def initial_params(self, y: Tensor) -> Tensor:
        """Data-based starting parameters (..., n_params) for series y (..., T, p).

        Moments of the first differences (var g0 and lag-one covariance g1) give the local-level
        split: noise variance -g1, level variance g0 + 2 g1 (both floored); the other variances
        start at a small fraction, ARMA partial autocorrelations at 0.
        """
        stats = _series_stats(y)
        g0 = stats.diff_var.mean(-1).clamp_min(1e-8)
        g1 = stats.diff_cov1.mean(-1)
        obs = (-g1).clamp(min=0.05 * g0, max=0.45 * g0)
        lvl = (g0 - 2 * obs).clamp_min(0.02 * g0)
        small = 0.01 * g0
        vals = []
        for b in self.blocks:
            for name in b.param_names:
                if name == "log_var_level":
                    vals.append(lvl.log())
                elif name == "log_var_arma":
                    vals.append((0.5 * stats.var.mean(-1).clamp_min(1e-8)).log())
                elif name.startswith("pacf"):
                    vals.append(torch.zeros_like(g0))
                elif name == "logit_damping":
                    vals.append(torch.full_like(g0, math.log(0.9 / 0.1)))  # phi = 0.9
                else:
                    vals.append(small.log())
        if self.observation == "univariate":
            vals.append(obs.log())
        else:
            obs_c = (-stats.diff_cov1).clamp(min=0.05 * stats.diff_var, max=0.45 * stats.diff_var)
            vals += list(obs_c.clamp_min(1e-8).log().unbind(-1))
            h = self.natural_observation_row(y.dtype, y.device)
            H = h.expand(*g0.shape, self.n_obs, self.n_states)
            vals += list(H.reshape(*g0.shape, -1).unbind(-1))
        return torch.stack(vals, dim=-1).to(y.dtype)


class _Stats:
    """NaN-aware moments of series y (..., T, p), per channel (...,  p)."""

    def __init__(self, first: Tensor, var: Tensor, diff_var: Tensor, diff_cov1: Tensor):
        self.first, self.var, self.diff_var, self.diff_cov1 = first, var, diff_var, diff_cov1


def _nanmean(x: Tensor, dim: int) -> Tensor:
    ok = ~torch.isnan(x)
    return torch.where(ok, x, 0).sum(dim) / ok.sum(dim).clamp_min(1)


def _series_stats(y: Tensor) -> _Stats:
    if y.ndim < 2:
        raise DataError(f"series must be shaped (..., T, p), got {tuple(y.shape)}")
    ok = ~torch.isnan(y)
    if not bool(ok.any(-2).all()):
        raise DataError("a series (or channel) has no observed value; drop it or fill it")
    idx = torch.where(ok, torch.arange(y.shape[-2], device=y.device).unsqueeze(-1), y.shape[-2])
    first_idx = idx.amin(-2, keepdim=True)
    first = torch.gather(torch.where(ok, y, 0), -2, first_idx.clamp_max(y.shape[-2] - 1))[..., 0, :]
    mean = _nanmean(y, -2)
    var = _nanmean((y - mean.unsqueeze(-2)) ** 2, -2)
    dy = y[..., 1:, :] - y[..., :-1, :]
    dmean = _nanmean(dy, -2)
    dc = dy - dmean.unsqueeze(-2)
    diff_var = _nanmean(dc**2, -2)
    diff_cov1 = _nanmean(dc[..., 1:, :] * dc[..., :-1, :], -2) if y.shape[-2] > 2 else (
        torch.zeros_like(diff_var)
    )
    diff_var = torch.where(torch.isnan(diff_var) | (diff_var <= 0), var.clamp_min(1e-8), diff_var)
    diff_cov1 = torch.nan_to_num(diff_cov1)
    return _Stats(first, var.clamp_min(1e-8), diff_var, diff_cov1)


def _block_diag(mats: Sequence[Tensor]) -> Tensor:
    """Block-diagonal matrix of (..., k_i, k_i) blocks with broadcast batch axes."""
    if len(mats) == 1:
        return mats[0]
    batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    rows = []
    n = sum(m.shape[-1] for m in mats)
    i = 0
    for m in mats:
        k = m.shape[-1]
        m = m.expand(*batch, k, k)
        left, right = m.new_zeros(*batch, k, i), m.new_zeros(*batch, k, n - i - k)
        rows.append(torch.cat([left, m, right], -1))
        i += k
    return torch.cat(rows, dim=-2)
