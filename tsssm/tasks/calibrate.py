"""Fitted variance calibration: a factor per lead time on a model's horizon variances, fitted on
validation windows after training (never on test).

A network trained by Gaussian likelihood learns variances that fit its training windows, which
it has partly memorised: on new data its errors are larger than it says (the Mamba forecaster's
val horizon NLL ~47 against ~5 on train, ETTm1). The factor s of ``var -> s * var`` is fitted per
lead time, which also corrects a growth of the variance with the lead that training got wrong:

- ``method="coverage"`` (default): s = (q / 1.96)^2 with q the 95% quantile of the standardised
  absolute errors |e| / sd on validation, so that the ±1.96 sd band covers 95% of them. Robust:
  sensor errors are heavy-tailed, and one near-constant context with a tiny predicted variance
  followed by a jump would dominate a mean of squares.
- ``method="nll"``: s = mean(e^2 / var), the maximum-likelihood factor of the Gaussian scale
  family (optimal for the NLL, at the mercy of the tails).
Models opt in by holding a :class:`tsssm.models.heads.HorizonVarianceScale` (saved with their
weights, so `score` and `compare` use the fitted factors).
"""

from __future__ import annotations

import numpy as np
import torch

from tsssm.models.base import Gaussian, uses_exog
from tsssm.models.heads import HorizonVarianceScale
from tsssm.tasks.evaluate import forecast_origins

#: fewest observed (window, channel) errors at a lead time for its own factor; leads with fewer
#: share the factor pooled over all leads
MIN_SAMPLES = 50
SCALE_RANGE = (1e-3, 1e3)
METHODS = ("coverage", "nll")
#: the two-sided 95% point of the standard normal
Z95 = 1.959963984540054


def window_origins(model, values: np.ndarray, rows: tuple[int, int], context: int, horizon: int,
                   stride: int = 1) -> tuple[Gaussian, np.ndarray]:
    """Forecasts from every origin in ``rows`` (each with the ``context`` rows before it) and
    their targets: (Gaussian (N, H, C), targets (N, H, C)). Raises ValueError when none fits."""
    found = forecast_origins(model, values, rows, context, horizon, stride)
    if found is None:
        raise ValueError(f"no forecast origin in rows {rows} for context {context} and horizon "
                         f"{horizon}")
    return found[0], found[1]


def calibration_modules(model: torch.nn.Module) -> list[HorizonVarianceScale]:
    """The variance factors calibration fits: those the model names (``variance_scales()``,
    e.g. an ensemble's own, not its members', which were fitted with them), else every one
    it holds."""
    if hasattr(model, "variance_scales"):
        return list(model.variance_scales())
    return [m for m in model.modules() if isinstance(m, HorizonVarianceScale)]


@torch.no_grad()
def calibrate_horizon_variance(model: torch.nn.Module, data, context: int, horizon: int,
                               stride: int = 1, method: str = "coverage",
                               future_inputs: str = "known") -> np.ndarray | None:
    """Fit the model's variance factors on the validation windows of ``data`` (PreparedData),
    forecast as evaluation does (with each stream's inputs and time steps, ``future_inputs``).

    Returns the fitted factors (horizon,), or None when the model has no
    HorizonVarianceScale or the data has no validation window.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    mods = calibration_modules(model)
    if not mods:
        return None
    was_training = model.training
    model.eval()
    for m in mods:
        m.scale.fill_(1.0)
    z2s = []
    for part in data.parts:
        rows = part.rows("val")
        if rows[1] <= rows[0]:
            continue
        found = forecast_origins(model, part.stream.values, rows, context, horizon, stride,
                                 exog=part.exog() if uses_exog(model) else None,
                                 future_inputs=future_inputs)
        if found is None:
            continue
        pred, target, _ = found
        z2 = (target - pred.mean.numpy()) ** 2 / pred.var.numpy()  # (N, H, C)
        z2s.append(z2.transpose(1, 0, 2).reshape(horizon, -1))  # (H, N*C)
    model.train(was_training)
    if not z2s:
        return None
    z2 = np.concatenate(z2s, axis=1)  # (H, n), NaN where the target is missing
    counts = np.isfinite(z2).sum(axis=1)
    if counts.sum() == 0:
        return None
    if method == "coverage":
        by_lead = np.nanquantile(np.where(counts[:, None] > 0, z2, 0.0), 0.95, axis=1) / Z95**2
        pooled = np.nanquantile(z2, 0.95) / Z95**2
    else:
        by_lead = np.nanmean(np.where(counts[:, None] > 0, z2, 0.0), axis=1)
        pooled = np.nanmean(z2)
    scale = np.where(counts >= MIN_SAMPLES, by_lead, pooled)
    scale = np.clip(scale, *SCALE_RANGE)
    for m in mods:
        m.set(torch.as_tensor(scale[: m.scale.numel()], dtype=m.scale.dtype))
    return scale
