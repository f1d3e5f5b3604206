"""A validation-weighted combination of trained forecasters (``model=ensemble``).

The members are ordinary tsssm forecasters (each trained by its own ``tsssm train``); the
ensemble holds them and a fitted combination, and is itself a Forecaster
(tsssm.models.base): its predictive distribution is the members' **linear pool**, the mixture
``p(y) = sum_k w_k N(y; mu_k, var_k)`` with convex weights (w >= 0, sum 1), summarised by its
first two moments:

    mean = sum_k w_k mu_k
    var  = sum_k w_k (var_k + mu_k^2) - mean^2  =  sum_k w_k var_k + sum_k w_k (mu_k - mean)^2

(the members' average variance plus their disagreement), so coverage, CRPS and NLL stay
meaningful. A variance factor per lead time (:class:`HorizonVarianceScale`), fitted on the
validation windows like every neural model's, calibrates the pooled variance.

The weights are buffers fitted after training by :mod:`tsssm.tasks.combine` on the VALIDATION
split only (a fitted component, saved with the model like a threshold): one set per lead time
of the horizon (``horizon_weights`` (H, K), equal rows when one vector was chosen) and one
vector for the one-step forecast (``step_weights`` (K,), fitted on the one-step errors).

Streaming: the state of ``one_step`` is the tuple of the members' states, so chunked and
live scoring work exactly when every member supports them. Members must be tsssm model classes
(``tsssm.models.*``) and not ensembles themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tsssm.errors import ModelError
from tsssm.models.base import Exog, Gaussian, call_forecast, call_one_step, needs_exog
from tsssm.models.heads import HorizonVarianceScale

ENSEMBLE_TARGET = "tsssm.models.ensemble.Ensemble"
#: the only modules a net config (a bundle's or an ensemble member's) may name
MODEL_PREFIX = "tsssm.models."
#: the floor of the pooled variance (members' variances are positive; the pool is too, but
#: float cancellation in sum w (var + mu^2) - mean^2 must never give zero)
MIN_VAR = 1e-8


class EnsembleState(NamedTuple):
    """The members' own ``one_step`` states, in member order (None before the first step)."""

    members: tuple[Any, ...]


class NetConfigProblem(NamedTuple):
    """Why a net config may not be built (:func:`net_config_problem`); each caller words it.

    ``kind`` is ``"mapping"`` (the config is not a mapping), ``"target"`` (its ``_target_``,
    given in ``detail``, is not a tsssm model class) or ``"nested"`` (the key ``detail`` holds a
    config that names a class to build)."""

    kind: str
    detail: Any = None


def net_config_problem(net: Any) -> NetConfigProblem | None:
    """The first reason ``net`` would build anything but a tsssm model class, or None.

    Checked in order: a mapping; a ``_target_`` in ``tsssm.models.*``; no value that is itself
    a config with a ``_target_`` (Hydra would build it too). The one check for bundles
    (tsssm.bundle) and ensemble members (:func:`check_member_config`)."""
    if not isinstance(net, dict):
        return NetConfigProblem("mapping")
    target = net.get("_target_")
    if not isinstance(target, str) or not target.startswith(MODEL_PREFIX):
        return NetConfigProblem("target", target)
    nested = [k for k, v in net.items() if isinstance(v, dict) and "_target_" in v]
    if nested:
        return NetConfigProblem("nested", nested[0])
    return None


def check_member_config(name: str, net: Any) -> None:
    """Refuse a member net config that would build anything but a tsssm model class (or
    another ensemble)."""
    if isinstance(net, dict) and net.get("_target_") == ENSEMBLE_TARGET:
        raise ModelError(f"ensemble member {name!r} is an ensemble itself; list its members "
                         "instead (model.members)")
    problem = net_config_problem(net)
    if problem is not None:
        match problem.kind:
            case "mapping":
                why = "its net config must be a mapping"
            case "target":
                why = (f"the net to build is {problem.detail!r}, not a tsssm model class; "
                       "refusing to build it")
            case _:
                why = (f"net.{problem.detail} names a class to build; a member never does, "
                       "refusing to build it")
        raise ModelError(f"ensemble member {name!r}: {why}")


def build_member(name: str, net: dict, n_channels: int) -> nn.Module:
    """The member's module from its net config (``_target_`` + keyword arguments)."""
    check_member_config(name, net)
    module_name, _, class_name = net["_target_"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"ensemble member {name!r}: no model class {net['_target_']!r} in "
                         "this tsssm") from err
    kwargs = {k: v for k, v in net.items() if not (k.startswith("_") and k.endswith("_"))}
    return cls(n_channels=n_channels, **kwargs)


def linear_pool(preds: Sequence[Gaussian], weights: Tensor) -> Gaussian:
    """The moments of the mixture sum_k w_k N(mu_k, var_k) of K Gaussians (B, T, C).

    weights: (K,) one weight per member, or (T, K) one set per step (lead time); each row on
    the simplex. Computed in float64. A full covariance is returned when every member gives one
    (sum_k w_k (cov_k + mu_k mu_k') - m m'); otherwise None (diagonal)."""
    mu = torch.stack([p.mean.double() for p in preds])  # (K, B, T, C)
    var = torch.stack([p.var.double() for p in preds])  # (K, B, T, C)
    w = weights.double().to(mu.device)
    # (K, 1, 1, 1) one weight per member, or (K, 1, T, 1) one per member and step
    w = (w.view(-1, 1, 1, 1) if w.ndim == 1
         else w[: mu.shape[2]].t().reshape(len(preds), 1, -1, 1))
    mean = (w * mu).sum(0)  # (B, T, C)
    # var = sum w var_k + sum w (mu_k - mean)^2: no cancellation of large second moments
    pooled = (w * var).sum(0) + (w * (mu - mean) ** 2).sum(0)
    cov = None
    if all(p.cov is not None for p in preds):
        d = mu - mean  # (K, B, T, C)
        covs = torch.stack([p.cov.double() for p in preds])  # (K, B, T, C, C)
        ww = w.unsqueeze(-1)  # (K, 1, T?, 1, 1)
        cov = (ww * (covs + d.unsqueeze(-1) * d.unsqueeze(-2))).sum(0)  # (B, T, C, C)
    return Gaussian(mean, pooled.clamp_min(MIN_VAR), cov)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """Where a member's weights are (members may sit on different devices: a Kalman filter's
    sequential recursion is fastest on the CPU, a Mamba on the GPU)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default


def _exog_to(exog: Exog | None, device: torch.device) -> Exog | None:
    if exog is None:
        return None
    return Exog(None if exog.u is None else exog.u.to(device),
                None if exog.dt is None else exog.dt.to(device))


def _gaussian_to(g: Gaussian, device: torch.device) -> Gaussian:
    return Gaussian(g.mean.to(device), g.var.to(device),
                    None if g.cov is None else g.cov.to(device))


def place_members(model: Ensemble, device: torch.device) -> Ensemble:
    """Put the members on ``device``, except those trained on whole streams (the Kalman
    filters: their step-by-step recursion runs on the CPU's compiled kernel), and the
    ensemble's own buffers on the CPU, where the pooling happens for CPU inputs."""
    for m in model.members:
        m.to("cpu" if getattr(m, "training_input", "") == "streams" else device)
    return model


class Ensemble(nn.Module):
    """K trained forecasters and their fitted convex combination (see the module docstring).

    members: [{"name": <model config name>, "net": <its net config>}] in order; horizon: the
    longest forecast the weights cover (data.horizon of the training). ``scheme`` says how the
    horizon weights were chosen (``one`` vector, ``per_lead`` or ``blocks`` of lead times;
    ``unfitted`` before :mod:`tsssm.tasks.combine` fits them); it is informational, the
    weights themselves are the buffers.
    """

    training_input = "windows"

    def __init__(self, n_channels: int, members: Sequence[dict], horizon: int = 24,
                 scheme: str = "unfitted") -> None:
        super().__init__()
        if not members:
            raise ModelError("model.members is empty; list at least one model config")
        names = [str(m.get("name")) if isinstance(m, dict) else "?" for m in members]
        if len(set(names)) != len(names):
            raise ModelError(f"model.members names a model twice: {names}")
        self.n_channels = n_channels
        self.horizon = int(horizon)
        self.scheme = str(scheme)
        self.names = names
        self.members = nn.ModuleList(
            build_member(name, dict(m["net"]), n_channels) for name, m in zip(names, members))
        k = len(names)
        self.register_buffer("horizon_weights", torch.full((self.horizon, k), 1.0 / k,
                                                           dtype=torch.float64))
        self.register_buffer("step_weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.var_calibration = HorizonVarianceScale(self.horizon)
        exog = {f for m in self.members for f in getattr(m, "uses_exog", ())}
        self.uses_exog = tuple(sorted(exog))

    # -- the fitted component ------------------------------------------------------------------
    @torch.no_grad()
    def set_weights(self, horizon_weights: Tensor, step_weights: Tensor, scheme: str) -> None:
        """Install fitted weights: (H, K) and (K,), every row on the simplex."""
        hw = torch.as_tensor(horizon_weights, dtype=torch.float64)
        sw = torch.as_tensor(step_weights, dtype=torch.float64)
        k = len(self.members)
        for name, w, shape in (("horizon_weights", hw, (self.horizon, k)),
                               ("step_weights", sw, (k,))):
            if tuple(w.shape) != shape or not bool(torch.isfinite(w).all()) or bool(
                    (w < 0).any()) or not torch.allclose(w.sum(-1), torch.ones(()).double(),
                                                         atol=1e-6):
                raise ValueError(f"{name} must be {shape} non-negative rows summing to 1, got "
                                 f"shape {tuple(w.shape)}")
        self.horizon_weights.copy_(hw)
        self.step_weights.copy_(sw)
        self.scheme = scheme

    def variance_scales(self) -> list[HorizonVarianceScale]:
        """The variance factors that calibration fits for this model: the pool's own (each
        member's were fitted when it was trained and stay as they are)."""
        return [self.var_calibration]

    @property
    def runs_without_exog(self) -> bool:
        return not any(needs_exog(m) for m in self.members)

    # -- Forecaster ----------------------------------------------------------------------------
    def _check_exog(self, exog: Exog | None, what: str) -> None:
        if exog is None:
            for name, m in zip(self.names, self.members):
                if needs_exog(m):
                    raise ModelError(f"{what} of this ensemble needs the inputs/time steps: its "
                                     f"member {name!r} cannot run without them")

    def one_step(self, y: Tensor, state: EnsembleState | None = None, *,
                 exog: Exog | None = None) -> tuple[Gaussian, EnsembleState]:
        """Every member's one-step forecast of ``y`` (B, T, C) from its own carried state,
        pooled with ``step_weights``. Returns (Gaussian (B, T, C), EnsembleState)."""
        self._check_exog(exog, "one_step")
        if state is None:
            states: tuple[Any, ...] = (None,) * len(self.members)
        elif isinstance(state, EnsembleState) and len(state.members) == len(self.members):
            states = state.members
        else:
            raise ModelError("ensemble one_step: the state is not this ensemble's (a tuple of "
                             f"{len(self.members)} member states from its one_step)")
        preds, new = [], []
        for m, s in zip(self.members, states):
            device = _device_of(m, y.device)
            pred, s2 = call_one_step(m, y.to(device), s, _exog_to(exog, device))
            preds.append(_gaussian_to(pred, y.device))
            new.append(s2)
        pooled = linear_pool(preds, self.step_weights)
        return self._as_dtype(pooled, y), EnsembleState(tuple(new))

    def member_forecasts(self, context: Tensor, horizon: int, exog: Exog | None = None
                         ) -> list[Gaussian]:
        """Each member's forecast of the ``horizon`` steps after ``context`` (B, L, C)."""
        self._check_horizon(horizon)
        self._check_exog(exog, "forecast")
        out = []
        for m in self.members:
            device = _device_of(m, context.device)
            pred = call_forecast(m, context.to(device), horizon, None, _exog_to(exog, device))
            out.append(_gaussian_to(pred, context.device))
        return out

    def forecast(self, context: Tensor, horizon: int, state: Any = None, *,
                 exog: Exog | None = None) -> Gaussian:
        """The pooled forecast (B, horizon, C) with the weights of each lead time."""
        if state is not None:
            raise ModelError("an ensemble forecasts from the full context (state=None): its "
                             "members read the context themselves")
        preds = self.member_forecasts(context, horizon, exog)
        return self.pool(preds, context)

    def pool(self, preds: Sequence[Gaussian], like: Tensor | None = None) -> Gaussian:
        """The calibrated linear pool of members' horizon forecasts (B, h, C) each."""
        h = preds[0].mean.shape[1]
        pooled = linear_pool(preds, self.horizon_weights[:h])
        # the fitted factor per lead time (HorizonVarianceScale's), where the pool is
        s = self.var_calibration.scale[:h].to(device=pooled.var.device, dtype=pooled.var.dtype)
        var = pooled.var * s.view(1, h, 1)
        cov = pooled.cov
        if cov is not None:
            cov = cov * s.view(1, h, 1, 1)
        return self._as_dtype(Gaussian(pooled.mean, var, cov), like)

    def _check_horizon(self, horizon: int) -> None:
        if not isinstance(horizon, int) or not 1 <= horizon <= self.horizon:
            raise ModelError(f"forecast horizon must be an integer in [1, {self.horizon}] (the "
                             f"ensemble's fitted horizon), got {horizon!r}")

    def _as_dtype(self, g: Gaussian, like: Tensor | None) -> Gaussian:
        """The pool in the widest dtype of the input and float32 (members compute in their own
        precision; the combination itself runs in float64)."""
        dtype = torch.promote_types(torch.float32, like.dtype) if like is not None \
            else torch.float32
        return Gaussian(g.mean.to(dtype), g.var.to(dtype),
                        None if g.cov is None else g.cov.to(dtype))
