"""Anomaly-detection and forecast metrics.

Anomaly metrics follow SKAB's outlier-detection protocol (waico/SKAB ``core/metrics.py``,
``chp_score(metric="binary")``): point-wise confusion counts of the ``anomaly`` label against the
binary flags, summed over all files of a run (so call ``anomaly_metrics`` once on the concatenated
test parts, which is the same as summing counts), and

- F1  = TP / (TP + (FP + FN)/2)   (= the harmonic mean of precision and recall)
- FAR = FP / (FP + TN)            false alarm rate
- MAR = FN / (FN + TP)            missed alarm rate

reported here as fractions in [0, 1] (SKAB's leaderboard prints FAR and MAR in percent).

Degenerate cases never produce NaN or warnings; the convention (scikit-learn's
``zero_division=0``) is: precision = 0 when nothing is flagged, recall = 0 and MAR = 0 when there
is no positive label, F1 = 0 when TP = 0, FAR = 0 when there is no negative label, and
AUC-PR = 0 when there is no positive label (undefined). ``n_positive`` and ``n_flagged`` in the
result let a reader tell these cases apart from real zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tsssm.errors import DataError, NumericalError


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x: Any, what: str) -> np.ndarray:
    """Flatten a 0/1 (bool, int or float) array to bool, rejecting anything else."""
    arr = _to_numpy(x).reshape(-1)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = arr[~np.isin(arr, (0, 1))][:3]
        raise DataError(f"{what} must be binary 0/1; found values such as {bad.tolist()}")
    return arr.astype(bool)


def _ratio(num: int, den: int) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def confusion_counts(labels: Any, flags: Any) -> dict[str, int]:
    """Point-wise TP, FP, TN, FN of binary ``flags`` against binary ``labels`` (any shape)."""
    y = _binary(labels, "anomaly labels")
    p = _binary(flags, "anomaly flags")
    if y.shape != p.shape:
        raise DataError(f"labels ({y.size} values) and flags ({p.size} values) differ in length")
    tp = int(np.count_nonzero(y & p))
    fp = int(np.count_nonzero(~y & p))
    fn = int(np.count_nonzero(y & ~p))
    tn = int(y.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def anomaly_metrics(labels: Any, flags: Any, scores: Any = None) -> dict[str, float]:
    """Precision, recall, F1, FAR, MAR (+ AUC-PR if ``scores``) and counts.

    labels, flags: binary arrays (bool or 0/1; numpy or torch; any shape, flattened).
    scores: optional real-valued scores (higher = more anomalous), same size, finite; AUC-PR is
    scikit-learn's ``average_precision_score``. Counts are returned as floats so the dict can be
    logged as metrics directly.
    """
    counts = confusion_counts(labels, flags)
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    out: dict[str, float] = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "far": _ratio(fp, fp + tn),
        "mar": _ratio(fn, fn + tp),
    }
    if scores is not None:
        s = _to_numpy(scores).astype(np.float64).reshape(-1)
        y = _binary(labels, "anomaly labels")
        if s.shape != y.shape:
            raise DataError(f"scores ({s.size} values) and labels ({y.size}) differ in length")
        if not np.isfinite(s).all():
            raise NumericalError(
                f"anomaly scores contain {int((~np.isfinite(s)).sum())} non-finite values"
            )
        if tp + fn == 0:
            out["auc_pr"] = 0.0
        else:
            from sklearn.metrics import average_precision_score  # deferred: slow import

            out["auc_pr"] = float(average_precision_score(y, s))
    out.update({k: float(v) for k, v in counts.items()})
    out["n"] = float(tp + fp + tn + fn)
    out["n_positive"] = float(tp + fn)
    out["n_flagged"] = float(tp + fp)
    return out


def forecast_metrics(y_true: Any, y_pred: Any, mask: Any = None) -> dict[str, float]:
    """MAE and MSE over the entries where ``y_true`` is observed (not NaN) and ``mask`` is True.

    y_true, y_pred: same shape (numpy or torch). mask: optional boolean of that shape.
    Returns {"mae", "mse", "n"}; with no valid entry, mae = mse = 0.0 and n = 0.
    A non-finite prediction at a valid entry raises NumericalError (it is a model bug, not data).
    """
    t = _to_numpy(y_true).astype(np.float64)
    p = _to_numpy(y_pred).astype(np.float64)
    if t.shape != p.shape:
        raise DataError(f"forecast shape {p.shape} does not match the actual values {t.shape}")
    valid = ~np.isnan(t)
    if mask is not None:
        m = _to_numpy(mask).astype(bool)
        if m.shape != t.shape:
            raise DataError(f"mask shape {m.shape} does not match the values {t.shape}")
        valid &= m
    n = int(valid.sum())
    if n == 0:
        return {"mae": 0.0, "mse": 0.0, "n": 0.0}
    err = p[valid] - t[valid]
    if not np.isfinite(err).all():
        raise NumericalError(
            f"{int((~np.isfinite(err)).sum())} forecasts (or actual values) are not finite at "
            "observed entries"
        )
    return {"mae": float(np.abs(err).mean()), "mse": float(np.square(err).mean()), "n": float(n)}
