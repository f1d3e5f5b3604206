"""Per-timestep anomaly scores, their per-channel attribution, and the Gaussian loss.

Every forecaster returns, for each time step, a Gaussian over the ``C`` channels of the next
observation (tsssm.models.base.Gaussian): independent channels ``N(mean, var)``, or, when the model
gives ``cov``, the joint distribution ``N(mean, cov)``. Training minimises its negative log density
(``gaussian_nll``); anomaly scoring measures how surprising each observation is under it. Both use
the same per-entry terms (``_diag_terms`` / ``_full_terms``), so the loss a model is trained on and
the score it is judged by cannot drift apart.

Score kinds (``anomaly_scores(kind=...)``), all averaged over the observed channels so that a
calibrated model scores 1 on average:

- ``"nis"``: normalised innovation squared per channel, ``mean_c (y-mean)^2/var`` (ignores
  ``cov``);
- ``"mahalanobis"``: the squared Mahalanobis distance of the innovation under the joint predictive
  covariance, ``e' cov^-1 e / n_observed`` (equals ``"nis"`` for a model without ``cov``). It sees
  a fault as a break of the channels' correlation, not only as a large value;
- ``"nll"``: negative log predictive density per observed channel (joint density with ``cov``).

Attribution. ``step_terms`` splits the score of every step into additive per-channel
contributions (they sum to the score): for ``"nis"`` the channel's own ``z^2``; for
``"mahalanobis"`` the complete decomposition ``u_c^2`` of the whitened innovation
``u = cov^-1/2 e`` (symmetric square root: independent of the channel order, never negative; Alcala
& Qin 2009, "Reconstruction-based contribution for process monitoring"); for ``"nll"`` the
chain-rule terms ``-log p(y_c | y_<c)``.

Windows (``window_scores``). A fault that shifts a level by less than the noise is invisible to
any single step, but not to a window of them:

- ``"mean"``: the mean of the step scores (and contributions) over the window;
- ``"shift"``: the squared norm of the window's summed whitened innovations, ``sum_c (sum_t
  u_tc)^2 / n_tc``, per observed channel: a persistent mean shift of the innovations adds up
  linearly while the noise adds up as its square root. For a calibrated model with white
  innovations it is chi-square with C degrees of freedom over C (mean 1), like the step score, and
  a window of one step is the step score itself.

A window is ``"trailing"`` (rows t-w+1..t: causal, what a live stream can compute) or
``"centered"`` (rows around t: for batch scoring; the score of row t then uses w/2 rows after t).

Missing observations are ``NaN`` in ``y`` and are skipped: they contribute nothing to the loss,
the score or the attribution, and neither their value nor their gradient is ever NaN (the NaN is
replaced *before* any arithmetic, because ``torch.where`` after the fact would still send NaN
gradients back). With ``cov`` the observed channels' marginal distribution is used exactly (the
rows and columns of missing channels are replaced by the identity, which decouples them).

Convention for time steps where *no* channel is observed: the score is ``fill`` (0.0 by default).
With ``kind="nis"`` 0 is the smallest possible score, so such a step is never flagged. Use
``observed_steps(y)`` to exclude those steps explicitly, e.g. when fitting a threshold or
computing metrics (with ``kind="nll"`` the score can be negative, so 0 is not neutral there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from tsssm.anomaly.reanchor import ReanchorSpec
from tsssm.errors import ConfigError, ModelError, NumericalError
from tsssm.models.base import Gaussian

SCORE_KINDS = ("nis", "nll", "mahalanobis")
WINDOW_KINDS = ("mean", "shift")
WINDOW_ALIGNS = ("trailing", "centered")
REDUCTIONS = ("mean", "sum", "none")

#: Variances are floored here before dividing: a model may report var == 0 through underflow.
MIN_VAR = 1e-12

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class ScoreSpec(NamedTuple):
    """How a stream's anomaly score is computed from a model's one-step predictions."""

    kind: str = "nis"  # one of SCORE_KINDS
    window: int = 1  # rows per window (1: the step score)
    window_kind: str = "mean"  # one of WINDOW_KINDS
    align: str = "trailing"  # one of WINDOW_ALIGNS
    #: the shift score's guarded moving reference (tsssm.anomaly.reanchor.ReanchorSpec), None:
    #: the reference frozen at 0 (the plain score); needs a trailing "shift" window
    reanchor: ReanchorSpec | None = None

    def check(self) -> ScoreSpec:
        if self.kind not in SCORE_KINDS:
            raise ConfigError(f"anomaly score kind must be one of {SCORE_KINDS}; got {self.kind!r}")
        if int(self.window) != self.window or self.window < 1:
            raise ConfigError(f"score window must be a positive integer; got {self.window!r}")
        if self.window_kind not in WINDOW_KINDS:
            raise ConfigError(
                f"score window kind must be one of {WINDOW_KINDS}; got {self.window_kind!r}")
        if self.align not in WINDOW_ALIGNS:
            raise ConfigError(f"score window align must be one of {WINDOW_ALIGNS}; got "
                              f"{self.align!r}")
        if self.reanchor is not None:
            self.reanchor.check()
            if self.window_kind != "shift" or self.align != "trailing":
                raise ConfigError(
                    "task.window.reanchor moves the reference of the trailing shift score: it "
                    "needs task.window.kind=shift and task.window.align=trailing; got "
                    f"kind={self.window_kind!r}, align={self.align!r}")
        return self

    def to_dict(self) -> dict:
        d = dict(self._asdict())
        if self.reanchor is None:  # the plain score: the same dict as before the key existed
            del d["reanchor"]
        else:
            d["reanchor"] = dict(self.reanchor._asdict())
        return d

    @classmethod
    def from_dict(cls, d: dict | None, kind: str = "nis") -> ScoreSpec:
        """From ``to_dict`` output (None: the one-step score of ``kind``, as older bundles;
        a bundle without ``reanchor`` has the plain score)."""
        if not d:
            return cls(kind=kind).check()
        values = {k: d[k] for k in cls._fields if k in d}
        if values.get("reanchor") is not None:
            values["reanchor"] = ReanchorSpec(**dict(values["reanchor"]))
        return cls(**values).check()


def observed_mask(y: Tensor) -> Tensor:
    """Boolean mask of observed entries: ``~isnan(y)``, same shape as ``y``."""
    return ~torch.isnan(y)


def observed_steps(y: Tensor) -> Tensor:
    """(B, T) boolean: True where at least one channel of ``y`` (B, T, C) is observed."""
    return observed_mask(y).any(dim=-1)


def _check_shapes(y: Tensor, pred: Gaussian) -> None:
    if y.dim() != 3:
        raise ModelError(
            f"observations must be (batch, time, channels); got shape {tuple(y.shape)}"
        )
    if tuple(pred.mean.shape) != tuple(y.shape) or tuple(pred.var.shape) != tuple(y.shape):
        raise ModelError(
            f"predictive distribution of shape mean {tuple(pred.mean.shape)}, var "
            f"{tuple(pred.var.shape)} does not match the observations {tuple(y.shape)}; "
            "the model must be used on data with the channels it was trained on"
        )
    cov = getattr(pred, "cov", None)
    if cov is not None and tuple(cov.shape) != (*y.shape, y.shape[-1]):
        raise ModelError(
            f"predictive covariance of shape {tuple(cov.shape)} does not match the observations "
            f"{tuple(y.shape)}: expected {(*y.shape, y.shape[-1])}"
        )


def _innovation(y: Tensor, mean: Tensor, observed: Tensor) -> Tensor:
    """y - mean at observed entries, exactly 0 (value and gradient) at missing ones."""
    # Replace NaN targets by the mean so the difference (and its gradient) is exactly 0 there.
    y_filled = torch.where(observed, y.to(mean.dtype), mean.detach())
    return torch.where(observed, y_filled - mean, torch.zeros((), dtype=mean.dtype,
                                                              device=mean.device))


def _compute_dtype(pred: Gaussian) -> torch.dtype:
    # Half-precision inputs are computed in float32: a squared error over a tiny var overflows.
    return torch.promote_types(pred.mean.dtype, torch.float32)


def _diag_terms(y: Tensor, pred: Gaussian) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry squared standardised error and log-variance, with missing entries zeroed.

    Returns (z2 (B,T,C), log_var (B,T,C), observed (B,T,C) bool). ``z2 = (y-mean)^2/var``.
    """
    observed = observed_mask(y)
    dtype = _compute_dtype(pred)
    mean = pred.mean.to(dtype)
    var = pred.var.to(dtype).clamp_min(MIN_VAR)
    z2 = _innovation(y, mean, observed).square() / var
    zero = torch.zeros((), dtype=dtype, device=y.device)
    z2 = torch.where(observed, z2, zero)
    log_var = torch.where(observed, var.log(), zero)
    return z2, log_var, observed


def _masked_cov(cov: Tensor, observed: Tensor) -> Tensor:
    """cov (B,T,C,C) with the rows and columns of missing channels replaced by the identity's:
    the observed channels' marginal covariance, decoupled from placeholders for the others."""
    o = observed.to(cov.dtype)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov * (o.unsqueeze(-1) * o.unsqueeze(-2)) + eye * (1.0 - o).unsqueeze(-1)


def _cholesky(S: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):
        raise NumericalError(
            f"{int((info != 0).sum())} predictive covariances are not positive definite; the "
            "model's covariance parameters (or the data's scale) are not finite or degenerate"
        )
    return L


def _full_terms(y: Tensor, pred: Gaussian) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chain-rule terms of the joint density, from the Cholesky factor of the masked covariance.

    Returns (w2 (B,T,C), log_diag (B,T,C), observed (B,T,C), innovation e (B,T,C)) with
    ``w = L^-1 e`` so that ``sum_c w2 = e' cov^-1 e`` and ``sum_c log_diag = 0.5 log det cov``
    (per observed channel c: ``-log p(y_c | y_<c) = 0.5 w_c^2 + log L_cc + 0.5 log 2 pi``).
    """
    observed = observed_mask(y)
    dtype = _compute_dtype(pred)
    mean = pred.mean.to(dtype)
    e = _innovation(y, mean, observed)
    L = _cholesky(_masked_cov(pred.cov.to(dtype), observed))
    w = torch.linalg.solve_triangular(L, e.unsqueeze(-1), upper=False).squeeze(-1)
    zero = torch.zeros((), dtype=dtype, device=y.device)
    w2 = torch.where(observed, w.square(), zero)
    log_diag = torch.where(observed, torch.diagonal(L, dim1=-2, dim2=-1).log(), zero)
    return w2, log_diag, observed, e


def gaussian_nll(y: Tensor, pred: Gaussian, reduction: str = "mean") -> Tensor:
    """Gaussian negative log predictive density of the observed entries of ``y``.

    y: (B, T, C), NaN = missing. pred: Gaussian with mean/var (B, T, C) (and optionally cov
    (B, T, C, C): then the joint density of the observed channels of every step).
    reduction: "mean" (scalar, averaged over observed entries; 0.0 if none is observed),
    "sum" (scalar) or "none" ((B, T, C), 0.0 at missing entries; with ``cov`` the chain-rule
    terms, which sum to the joint density of each step).
    The constant 0.5*log(2*pi) is included, so values are true log densities.

    This is the training loss; it does not check for non-finite model outputs (that would force a
    device sync every step); ``anomaly_scores`` does.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"gaussian_nll reduction must be one of {REDUCTIONS}; got {reduction!r}")
    _check_shapes(y, pred)
    if getattr(pred, "cov", None) is not None:
        w2, log_diag, observed, _ = _full_terms(y, pred)
        per_entry = 0.5 * w2 + log_diag
    else:
        z2, log_var, observed = _diag_terms(y, pred)
        per_entry = 0.5 * (z2 + log_var)
    nll = torch.where(observed, per_entry + _HALF_LOG_2PI, torch.zeros_like(per_entry))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    count = observed.sum().clamp_min(1)
    return nll.sum() / count


def check_finite(score: Tensor) -> None:
    if not bool(torch.isfinite(score).all()):
        bad = int((~torch.isfinite(score)).sum())
        raise NumericalError(
            f"{bad} anomaly scores are not finite: the model's predictive mean or variance, or "
            "the data, is NaN/inf at those steps (check the input for inf values, the "
            "input scaling, and the model's parameters)"
        )


class StepTerms(NamedTuple):
    """Per-step, per-channel pieces of a score; all (B, T, C), 0 at missing entries."""

    contrib: Tensor  # additive share of the step score (sums over C to the score)
    whitened: Tensor  # whitened innovation (z for independent channels, cov^-1/2 e with cov)
    observed: Tensor  # bool


def _inverse_sqrt(S: Tensor) -> Tensor:
    """Symmetric inverse square root of SPD matrices (..., C, C) by an eigendecomposition."""
    lam, V = torch.linalg.eigh(S)
    if bool((lam <= 0).any()):
        raise NumericalError("a predictive covariance is not positive definite (eigenvalue <= 0)")
    return (V * lam.rsqrt().unsqueeze(-2)) @ V.mT


def step_terms(y: Tensor, pred: Gaussian, kind: str = "nis", check: bool = True) -> StepTerms:
    """Per-channel contributions and whitened innovations of every step (see the module doc).

    y: (B, T, C) with NaN for missing; pred: one-step Gaussian for ``y``. The step score is
    ``contrib.sum(-1)`` (= ``anomaly_scores(y, pred, kind)`` where a channel is observed).
    Raises NumericalError on non-finite results. ``check=False``: the caller checks instead
    (the check waits for a GPU; a non-finite term makes its step's score, and every window
    score that sums it, non-finite, so checking those is enough: tsssm.scoring.scorer).
    """
    if kind not in SCORE_KINDS:
        raise ConfigError(f"anomaly score kind must be one of {SCORE_KINDS}; got {kind!r}")
    _check_shapes(y, pred)
    with torch.no_grad():
        if kind != "nis" and getattr(pred, "cov", None) is not None:
            w2, log_diag, observed, e = _full_terms(y, pred)
            S = _masked_cov(pred.cov.to(e.dtype), observed)
            whitened = (_inverse_sqrt(S) @ e.unsqueeze(-1)).squeeze(-1)
            if kind == "mahalanobis":
                per_entry = whitened.square()
            else:  # nll: the chain-rule terms of the joint density
                per_entry = 0.5 * w2 + log_diag + _HALF_LOG_2PI
        else:
            z2, log_var, observed = _diag_terms(y, pred)
            sign = torch.sign(_innovation(y, pred.mean.to(z2.dtype), observed))
            whitened = z2.sqrt() * sign
            per_entry = 0.5 * (z2 + log_var) + _HALF_LOG_2PI if kind == "nll" else z2
        zero = torch.zeros((), dtype=per_entry.dtype, device=per_entry.device)
        per_entry = torch.where(observed, per_entry, zero)
        whitened = torch.where(observed, whitened, zero)
        n_obs = observed.sum(dim=-1, keepdim=True).clamp_min(1)  # (B, T, 1)
        contrib = per_entry / n_obs
        if check:
            check_finite(contrib)
            check_finite(whitened)
    return StepTerms(contrib, whitened, observed)


def anomaly_scores(y: Tensor, pred: Gaussian, kind: str = "nis", fill: float = 0.0,
                   check: bool = True) -> Tensor:
    """Per-timestep anomaly score (B, T) from the one-step predictive distribution.

    y: (B, T, C) observations, NaN = missing. pred: one-step Gaussian (B, T, C) for ``y``.
    kind: "nis", "mahalanobis" or "nll" (module docstring); each is averaged over the observed
    channels. Steps with no observed channel get ``fill``.
    Raises NumericalError if the model produced a non-finite score (NaN never leaves here);
    ``check=False``: the caller checks the scores (as :func:`step_terms`).
    """
    terms = step_terms(y, pred, kind, check)
    score = terms.contrib.sum(dim=-1)
    any_obs = terms.observed.any(dim=-1)
    return torch.where(any_obs, score, torch.full_like(score, fill))


def score_contributions(y: Tensor, pred: Gaussian, kind: str = "nis") -> Tensor:
    """Each channel's additive share of :func:`anomaly_scores` (B, T, C): the shares of a step
    sum to its score, a missing channel's share is 0 (see :func:`step_terms`)."""
    return step_terms(y, pred, kind).contrib


def _window_sums(x: np.ndarray, window: int, align: str) -> np.ndarray:
    """Sums of x (..., T, K) over each row's window along the time axis (-2)."""
    T = x.shape[-2]
    zero = np.zeros((*x.shape[:-2], 1, x.shape[-1]), dtype=np.float64)
    cs = np.concatenate([zero, np.cumsum(x, axis=-2, dtype=np.float64)], axis=-2)
    t = np.arange(T)
    stop = t + 1 if align == "trailing" else np.minimum(T, t + 1 + window // 2)
    start = np.maximum(0, stop - window)
    return cs[..., stop, :] - cs[..., start, :]


def window_scores(terms: StepTerms | tuple, window: int, kind: str = "mean",
                  align: str = "trailing", fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Window scores and their additive per-channel contributions from the step terms.

    terms: StepTerms (torch or numpy) of one or several streams, (..., T, C). Returns
    (score (..., T), contrib (..., T, C)) as float64 numpy arrays with ``contrib.sum(-1) ==
    score``. ``window=1`` returns the step score (both kinds). Rows whose window holds no
    observation get ``fill`` (and zero contributions).
    """
    if kind not in WINDOW_KINDS:
        raise ConfigError(f"score window kind must be one of {WINDOW_KINDS}; got {kind!r}")
    if align not in WINDOW_ALIGNS:
        raise ConfigError(f"score window align must be one of {WINDOW_ALIGNS}; got {align!r}")
    contrib, whitened, observed = (np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach")
                                              else t) for t in terms)
    sums = _window_sums(window_inputs(contrib, whitened, observed, kind), window, align)
    return window_values(sums, kind, fill)


def covering_scores(score: np.ndarray, contrib: np.ndarray | None, window: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The score of every row under the rule "a row is anomalous when every trailing window
    that holds it is": ``cover[t] = min(score[t], ..., score[t + window - 1])`` (the windows
    that end after the stream's last row do not exist: the minimum runs over those that do).

    score (..., T) trailing window scores; contrib (..., T, C) their contributions or None.
    Against the trailing score's own threshold, ``cover > threshold`` flags a row exactly
    when all the windows that hold it are flagged: an alarm keeps its onset and loses the
    ``window - 1`` rows its window drags past the end, and alarms shorter than a window
    vanish. This is how SKAB's window detectors (its Conv-AE notebook) flag rows; it reads up
    to ``window - 1`` rows after t, so it is for batch scoring. The contributions are those of
    the window that gives the minimum (they sum to the covering score).
    """
    score = np.asarray(score, dtype=np.float64)
    if window <= 1:
        return score, contrib
    T = score.shape[-1]
    pad = np.full((*score.shape[:-1], window - 1), np.inf)
    # (..., T, window): row t's view holds the windows ending at t .. t + window - 1
    views = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([score, pad], axis=-1), window, axis=-1)
    first = views.argmin(axis=-1)  # (..., T): offset of the window with the smallest score
    end = np.minimum(np.arange(T) + first, T - 1)  # (..., T)
    cover = np.take_along_axis(score, end, axis=-1)
    if contrib is None:
        return cover, None
    return cover, np.take_along_axis(np.asarray(contrib), end[..., None], axis=-2)


def window_inputs(contrib: np.ndarray, whitened: np.ndarray, observed: np.ndarray,
                  kind: str, out: np.ndarray | None = None) -> np.ndarray:
    """What a window of ``kind`` sums over its rows, (..., T, K) float64: for "mean" the step
    contributions and whether the step has an observation (K = C + 1), for "shift" the whitened
    innovations and the observed indicators (K = 2C). ``out``: an array to write them into."""
    C = contrib.shape[-1]
    shape = (*contrib.shape[:-1], C + 1 if kind == "mean" else 2 * C)
    out = np.empty(shape) if out is None else out
    if kind == "mean":
        out[..., :C] = contrib
        np.any(observed, axis=-1, out=out[..., C])  # the step has an observation
    else:
        out[..., :C] = whitened
        out[..., C:] = observed
    return out


def window_values(sums: np.ndarray, kind: str, fill: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Window scores (..., T) and contributions (..., T, C) from the window sums of
    :func:`window_inputs` (the same formula for a whole stream and a streamed one).

    A window without observations has sums exactly 0 (its entries are exact zeros), so its
    contributions come out 0 without masking; its score is ``fill``.
    """
    if kind == "mean":
        count = sums[..., -1:]
        out = sums[..., :-1] / np.maximum(count, 1.0)
        has = count[..., 0] > 0
    else:
        C = sums.shape[-1] // 2
        s, n = sums[..., :C], sums[..., C:]
        out = s * s
        out /= np.maximum(n, 1.0)
        n_channels = np.count_nonzero(n > 0, axis=-1)[..., None]
        out /= np.maximum(n_channels, 1)
        has = n_channels[..., 0] > 0
    score = out.sum(axis=-1)
    if fill != 0.0 or not has.all():
        score = np.where(has, score, fill)
    return score, out
