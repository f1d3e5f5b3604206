"""Fitting an ensemble's combination weights on the validation split (never on test).

The weights w (convex: w >= 0, sum 1) of the pooled mean minimise the validation mean squared
error, a quadratic form of the members' error cross-products: for errors e_k = mu_k - y,
``MSE(w) = w' G w / n`` with ``G[j, k] = sum e_j e_k`` over the validation targets. So one pass
over the validation windows accumulates G per lead time (H, K, K) and every candidate scheme is
then solved exactly from it:

- ``one``: one vector for the whole horizon (G summed over the leads);
- ``per_lead``: a vector per lead time (G of that lead);
- ``blocks``: a vector per block of consecutive lead times (``blocks`` equal blocks).

``weights=auto`` chooses among them on the validation split itself: the validation windows are
cut in time into a fitting part and a later held-out part (the last ``holdout`` share of the
origins, with a gap of ``horizon`` origins so no fitting target lies in the held-out targets);
each scheme is fitted on the first and scored on the second (again a quadratic form), the best
is refitted on all validation windows. The test split is never read here: the ensemble sees
test rows only when it is evaluated, after everything is fixed.

The one-step weights (the anomaly score's forecast) minimise the one-step validation MSE the
same way (G from the members' one-step errors on the validation rows, states carried from the
stream's start).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from tsssm.models.base import uses_exog
from tsssm.models.ensemble import Ensemble
from tsssm.tasks.evaluate import forecast_origin_rows, iter_forecasts, stream_terms

SCHEMES = ("one", "per_lead", "blocks")
#: the exact solver visits every subset of members: 2^K - 1 small solves
MAX_MEMBERS = 12


def simplex_weights(G: np.ndarray) -> np.ndarray:
    """argmin_w w' G w over {w >= 0, sum w = 1} for a small PSD G (K x K), exactly.

    On each support S the minimiser under the equality constraint alone solves the KKT system
    [[G_S, 1], [1', 0]] [w; l] = [0; 1] (consistent for a PSD G, as the objective is bounded
    below on the affine set; solved by least squares so that a singular G_S, e.g. fewer errors
    than members, still gives one of its minimisers). The minimiser over the simplex is the
    best of those that come out non-negative: at the true one, restricted to its support, the
    constraint w >= 0 is inactive. 2^K - 1 small solves. -> (K,) weights on the simplex."""
    G = np.asarray(G, dtype=np.float64)
    K = G.shape[0]
    if G.shape != (K, K) or K < 1:
        raise ValueError(f"G must be a square (K, K) matrix, got shape {G.shape}")
    if K > MAX_MEMBERS:
        raise ValueError(f"the exact simplex solver takes at most {MAX_MEMBERS} members, got {K}")
    G = (G + G.T) / 2
    scale = max(float(np.abs(G).max()), 1e-300)
    best, best_w = np.inf, None
    for size in range(1, K + 1):
        for S in itertools.combinations(range(K), size):
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = G[np.ix_(S, S)] / scale
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            x = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if not np.isfinite(x).all() or (x < -1e-10).any():
                continue
            full = np.zeros(K)
            full[list(S)] = np.clip(x, 0.0, None)
            full /= full.sum()
            value = float(full @ G @ full)
            if value < best:
                best, best_w = value, full
    assert best_w is not None  # every single member (size 1) is a feasible candidate
    return best_w


def block_edges(horizon: int, blocks: int) -> np.ndarray:
    """Edges of ``blocks`` near-equal blocks of lead times 0..horizon -> (n_blocks + 1,)."""
    n = max(1, min(int(blocks), horizon))
    return np.unique(np.linspace(0, horizon, n + 1).round().astype(int))


def fit_scheme(G: np.ndarray, scheme: str, blocks: int = 8) -> np.ndarray:
    """Weights (H, K) of ``scheme`` from the per-lead cross-products G (H, K, K)."""
    H, K, _ = G.shape
    if scheme == "one":
        return np.repeat(simplex_weights(G.sum(0))[None], H, axis=0)
    if scheme == "per_lead":
        return np.stack([simplex_weights(G[h]) for h in range(H)])
    if scheme == "blocks":
        out = np.empty((H, K))
        edges = block_edges(H, blocks)
        for a, b in zip(edges[:-1], edges[1:]):
            out[a:b] = simplex_weights(G[a:b].sum(0))
        return out
    raise ValueError(f"model.weights must be auto or one of {SCHEMES}, got {scheme!r}")


def quadratic_error(G: np.ndarray, W: np.ndarray) -> float:
    """sum_h w_h' G_h w_h: the pooled squared error of weights W (H, K) under G (H, K, K)."""
    return float(np.einsum("hk,hkj,hj->", W, G, W))


@dataclass
class ErrorProducts:
    """Accumulated error cross-products of K members' forecasts, per lead time."""

    G: np.ndarray  # (H, K, K) sum over targets of e_j e_k
    n: np.ndarray  # (H,) observed targets per lead

    @classmethod
    def zeros(cls, horizon: int, k: int) -> ErrorProducts:
        return cls(np.zeros((horizon, k, k)), np.zeros(horizon))

    def add(self, means: np.ndarray, target: np.ndarray) -> None:
        """means (K, b, H, C), target (b, H, C) with NaN where missing."""
        observed = np.isfinite(target)
        err = np.where(observed, means - np.where(observed, target, 0.0), 0.0)  # (K, b, H, C)
        self.G += np.einsum("jbhc,kbhc->hjk", err, err)
        self.n += observed.sum(axis=(0, 2))

    def mse_each(self) -> np.ndarray:
        """(K,) each member's MSE over all leads."""
        return np.diagonal(self.G.sum(0)) / max(self.n.sum(), 1)


@dataclass
class CombinationFit:
    """What was fitted, and how the scheme was chosen (validation numbers only)."""

    scheme: str
    horizon_weights: np.ndarray  # (H, K)
    step_weights: np.ndarray  # (K,)
    val_mse: float  # pooled mean's MSE on all validation windows, fitted weights
    val_mse_each: np.ndarray  # (K,) each member's validation MSE
    #: scheme -> MSE on the held-out validation windows when fitted on the others
    holdout_mse: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    holdout_windows: int = 0


def split_origins(origins: np.ndarray, holdout: float, horizon: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fitting origins, gap, held-out origins) in time order: the last ``holdout`` share of the
    origins held out, and the ``horizon`` origins before them (the gap) kept out of the fitting
    part so that no fitting target is a held-out target. The final weights use all three."""
    n_hold = int(round(len(origins) * holdout))
    if holdout <= 0 or n_hold == 0:
        return origins, origins[:0], origins[:0]
    cut = len(origins) - n_hold
    start_gap = max(0, cut - horizon)
    return origins[:start_gap], origins[start_gap:cut], origins[cut:]


def _member_windows(model: Ensemble, values: np.ndarray, origins: np.ndarray, context: int,
                    horizon: int, exog, future_inputs: str, batch_size: int = 256):
    """Member means (K, b, H, C) and targets (b, H, C), batch by batch."""
    streams = [iter_forecasts(m, values, origins, context, horizon, batch_size,
                              exog if uses_exog(m) else None, future_inputs)
               for m in model.members]
    for preds in zip(*streams):
        yield (np.stack([p[0].mean.numpy().astype(np.float64) for p in preds]),
               preds[0][1].astype(np.float64))


@torch.no_grad()
def validation_products(model: Ensemble, data, context: int, horizon: int, stride: int = 1,
                        holdout: float = 0.3, future_inputs: str = "known"
                        ) -> tuple[ErrorProducts, ErrorProducts, ErrorProducts, int, int, int]:
    """(products of the fitting part, of the gap, of the held-out part, the fitting and held-out
    window counts) over every stream's VALIDATION windows (``data``: PreparedData; see
    ``split_origins``). Test rows are never read."""
    K = len(model.members)
    fit, gap, hold = (ErrorProducts.zeros(horizon, K) for _ in range(3))
    n_fit = n_hold = n_all = 0
    for part in data.parts:
        rows = part.rows("val")
        if rows[1] <= rows[0]:
            continue
        origins = forecast_origin_rows(rows, context, horizon, stride)
        first, between, second = split_origins(origins, holdout, horizon)
        for acc, chosen in ((fit, first), (gap, between), (hold, second)):
            if len(chosen) == 0:
                continue
            for means, target in _member_windows(model, part.stream.values, chosen, context,
                                                 horizon, part.exog(), future_inputs):
                acc.add(means, target)
        n_fit += len(first)
        n_hold += len(second)
        n_all += len(origins)
    return fit, gap, hold, n_fit, n_hold, n_all


@torch.no_grad()
def one_step_products(model: Ensemble, data, chunk_size: int = 100_000) -> ErrorProducts:
    """Cross-products (1, K, K) of the members' one-step errors on the validation rows (each
    member run from the stream's start, its state carried; rows after validation unread)."""
    K = len(model.members)
    acc = ErrorProducts.zeros(1, K)
    for part in data.parts:
        a, b = part.rows("val")
        if b <= a:
            continue
        values = part.stream.values[:b]
        exog = part.exog(0, b)
        means = []
        for m in model.members:
            mean, _, _ = stream_terms(m, values, "nis", chunk_size,
                                      exog=exog if uses_exog(m) else None)
            means.append(mean[a:b].astype(np.float64))
        # rows as the batch, one "lead": (K, n, 1, C) and (n, 1, C)
        acc.add(np.stack(means)[:, :, None], values[a:b].astype(np.float64)[:, None])
    return acc


def fit_combination(model: Ensemble, data, context: int, horizon: int, stride: int = 1,
                    weights: str = "auto", blocks: int = 8, holdout: float = 0.3,
                    future_inputs: str = "known", chunk_size: int = 100_000) -> CombinationFit:
    """Fit and install the ensemble's weights on the validation split of ``data`` (see the
    module docstring). ``weights``: auto | one | per_lead | blocks."""
    if weights != "auto" and weights not in SCHEMES:
        raise ValueError(f"model.weights must be auto or one of {SCHEMES}, got {weights!r}")
    was_training = model.training
    model.eval()
    fit, gap, hold, n_fit, n_hold, n_all = validation_products(
        model, data, context, horizon, stride, holdout if weights == "auto" else 0.0,
        future_inputs)
    if not (fit.n.sum() + gap.n.sum() + hold.n.sum()):
        raise ValueError("the data has no validation window to fit the ensemble's weights on "
                         f"(context {context}, horizon {horizon})")
    holdout_mse: dict[str, float] = {}
    if weights == "auto" and n_hold and n_fit and hold.n.sum():
        for scheme in SCHEMES:
            W = fit_scheme(fit.G, scheme, blocks)
            holdout_mse[scheme] = quadratic_error(hold.G, W) / hold.n.sum()
        # ties (e.g. one member dominating everywhere) go to the simpler scheme: SCHEMES order
        chosen = min(SCHEMES, key=lambda s: (holdout_mse[s], SCHEMES.index(s)))
    else:
        chosen = "one" if weights == "auto" else weights
    everything = ErrorProducts(fit.G + gap.G + hold.G, fit.n + gap.n + hold.n)
    W = fit_scheme(everything.G, chosen, blocks)
    step = one_step_products(model, data, chunk_size)
    w_step = simplex_weights(step.G[0]) if step.n.sum() else W[0]
    model.set_weights(torch.from_numpy(W), torch.from_numpy(w_step), chosen)
    model.train(was_training)
    return CombinationFit(
        scheme=chosen, horizon_weights=W, step_weights=w_step,
        val_mse=quadratic_error(everything.G, W) / max(everything.n.sum(), 1),
        val_mse_each=everything.mse_each(), holdout_mse=holdout_mse,
        windows=n_all, holdout_windows=n_hold)
