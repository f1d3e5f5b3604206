"""Joint (full-covariance) scores, windowed scores and per-channel attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.anomaly.attribution import flagged_intervals
from tsssm.anomaly.scores import (
    ScoreSpec,
    anomaly_scores,
    gaussian_nll,
    step_terms,
    window_scores,
)
from tsssm.errors import ConfigError
from tsssm.models.base import Gaussian


def _spd(C: int, g: torch.Generator, rho: float = 0.8) -> torch.Tensor:
    """A strongly correlated SPD matrix (C, C)."""
    A = torch.randn(C, C, generator=g, dtype=torch.float64)
    corr = rho * torch.ones(C, C, dtype=torch.float64) + (1 - rho) * torch.eye(C,
                                                                                dtype=torch.float64)
    scale = torch.diag(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    return scale @ corr @ scale + 0.05 * (A @ A.T) / C


def _joint(B=2, T=300, C=4, seed=0):
    """Observations drawn from a correlated joint predictive distribution (a correct model)."""
    g = torch.Generator().manual_seed(seed)
    S = _spd(C, g)
    mean = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(S)
    y = mean + torch.randn(B, T, C, generator=g, dtype=torch.float64) @ L.T
    cov = S.expand(B, T, C, C)
    return y, Gaussian(mean, torch.diagonal(cov, dim1=-2, dim2=-1), cov), S


def test_gaussian_keeps_two_field_construction():
    g = Gaussian(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))
    assert g.cov is None and len(g) == 3


def test_mahalanobis_is_the_joint_nis_and_calibrated():
    y, pred, S = _joint(B=4, T=2000, C=4)
    score = anomaly_scores(y, pred, "mahalanobis")
    e = y - pred.mean
    ref = torch.einsum("btc,cd,btd->bt", e, torch.linalg.inv(S), e) / 4
    torch.testing.assert_close(score, ref)
    assert float(score.mean()) == pytest.approx(1.0, abs=0.03)  # chi2_4 / 4
    # without cov it is the per-channel NIS
    diag = Gaussian(pred.mean, pred.var)
    torch.testing.assert_close(anomaly_scores(y, diag, "mahalanobis"),
                               anomaly_scores(y, diag, "nis"))
    # the per-channel NIS of a correlated model is not the joint score
    assert not torch.allclose(anomaly_scores(y, pred, "nis"), score)


def test_joint_nll_matches_torch_multivariate_normal():
    y, pred, S = _joint(B=2, T=50, C=3)
    ref = -torch.distributions.MultivariateNormal(pred.mean, S).log_prob(y)  # (B, T)
    per_entry = gaussian_nll(y, pred, "none")
    torch.testing.assert_close(per_entry.sum(-1), ref)
    torch.testing.assert_close(gaussian_nll(y, pred), ref.sum() / y.numel())
    torch.testing.assert_close(anomaly_scores(y, pred, "nll"), ref / 3)


def test_missing_channels_use_the_observed_marginal():
    y, pred, S = _joint(B=1, T=20, C=4)
    y = y.clone()
    y[0, 5, 1] = float("nan")
    y[0, 6, :] = float("nan")
    score = anomaly_scores(y, pred, "mahalanobis")
    keep = [0, 2, 3]
    e = (y - pred.mean)[0, 5, keep]
    ref = e @ torch.linalg.inv(S[keep][:, keep]) @ e / 3
    assert float(score[0, 5]) == pytest.approx(float(ref))
    assert float(score[0, 6]) == 0.0
    ref_nll = -torch.distributions.MultivariateNormal(
        pred.mean[0, 5, keep], S[keep][:, keep]).log_prob(y[0, 5, keep])
    assert float(gaussian_nll(y, pred, "none")[0, 5].sum()) == pytest.approx(float(ref_nll))
    # gradients stay finite through the masked covariance
    mean = pred.mean.clone().requires_grad_(True)
    cov = pred.cov.clone().requires_grad_(True)
    loss = gaussian_nll(y, Gaussian(mean, pred.var, cov))
    loss.backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(cov.grad).all()


@pytest.mark.parametrize("kind", ["nis", "mahalanobis", "nll"])
def test_contributions_are_additive(kind):
    y, pred, _ = _joint(B=2, T=40, C=5, seed=3)
    terms = step_terms(y, pred, kind)
    torch.testing.assert_close(terms.contrib.sum(-1), anomaly_scores(y, pred, kind))
    if kind != "nll":
        assert bool((terms.contrib >= 0).all())
    for window_kind in ("mean", "shift"):
        score, contrib = window_scores(terms, 7, window_kind)
        np.testing.assert_allclose(contrib.sum(-1), score, rtol=1e-12)


def _naive_window(x, w, align):
    T = x.shape[0]
    out = []
    for t in range(T):
        stop = t + 1 if align == "trailing" else min(T, t + 1 + w // 2)
        out.append(x[max(0, stop - w):stop])
    return out


@pytest.mark.parametrize("align", ["trailing", "centered"])
def test_window_scores_against_a_loop(align):
    y, pred, _ = _joint(B=1, T=60, C=3, seed=5)
    y = y.clone()
    y[0, 10, 0] = float("nan")
    y[0, 20:23, :] = float("nan")
    terms = step_terms(y, pred, "mahalanobis")
    u, obs, step = (terms.whitened[0].numpy(), terms.observed[0].numpy(),
                    terms.contrib[0].numpy())
    w = 6
    shift, _ = window_scores(terms, w, "shift", align)
    mean, _ = window_scores(terms, w, "mean", align)
    for t, (uw, ow, sw) in enumerate(zip(_naive_window(u, w, align), _naive_window(obs, w, align),
                                         _naive_window(step, w, align))):
        n = ow.sum(0)
        per = np.where(n > 0, uw.sum(0) ** 2 / np.maximum(n, 1), 0.0)
        assert shift[0, t] == pytest.approx(per.sum() / max((n > 0).sum(), 1))
        rows = ow.any(1)
        assert mean[0, t] == pytest.approx(sw[rows].sum() / max(rows.sum(), 1))
    # one row: both kinds are the step score
    one, _ = window_scores(terms, 1, "shift")
    np.testing.assert_allclose(one, terms.contrib.sum(-1).numpy())


def test_shift_window_sees_a_small_persistent_shift():
    """A level shift of half a standard deviation is invisible step by step, obvious over a
    window: the shift score grows linearly with the window, the noise does not."""
    g = torch.Generator().manual_seed(0)
    T, C = 4000, 3
    y = torch.randn(1, T, C, generator=g, dtype=torch.float64)
    y[0, 2000:, 1] += 0.5
    pred = Gaussian(torch.zeros(1, T, C, dtype=torch.float64), torch.ones(1, T, C,
                                                                           dtype=torch.float64))
    terms = step_terms(y, pred, "nis")
    step = terms.contrib.sum(-1).numpy()[0]
    shift, contrib = window_scores(terms, 40, "shift")
    ratio_step = step[2100:].mean() / step[:2000].mean()
    ratio_shift = shift[0, 2100:].mean() / shift[0, 100:2000].mean()
    assert ratio_step < 1.2 and ratio_shift > 3.0
    # and the shifted channel carries it
    assert contrib[0, 2100:].mean(0).argmax() == 1


def test_fault_in_one_channel_is_attributed_to_it():
    """Strongly correlated channels (a joint model): a fault injected in one channel is
    attributed to that channel, for each channel in turn, by the complete decomposition."""
    g = torch.Generator().manual_seed(1)
    C, T = 5, 600
    S = _spd(C, g, rho=0.85)
    L = torch.linalg.cholesky(S)
    for faulty in range(C):
        y = (torch.randn(1, T, C, generator=g, dtype=torch.float64) @ L.T).clone()
        y[0, 300:400, faulty] += 4.0 * float(S[faulty, faulty].sqrt())
        cov = S.expand(1, T, C, C)
        pred = Gaussian(torch.zeros(1, T, C, dtype=torch.float64),
                        torch.diagonal(cov, dim1=-2, dim2=-1), cov)
        score, contrib = window_scores(step_terms(y, pred, "mahalanobis"), 10, "shift")
        flags = score[0] > np.quantile(score[0, :300], 0.999)
        intervals = flagged_intervals(flags, score[0], contrib[0], [f"c{j}" for j in range(C)])
        longest = max(intervals, key=lambda iv: iv.stop - iv.start)
        assert 300 <= longest.start < 320
        top, share = longest.top(1)[0]
        assert top == f"c{faulty}" and share > 0.4
        assert sum(longest.shares.values()) == pytest.approx(1.0)


def test_score_spec_round_trip_and_errors():
    spec = ScoreSpec("mahalanobis", 30, "shift", "centered").check()
    assert ScoreSpec.from_dict(spec.to_dict()) == spec
    assert ScoreSpec.from_dict(None, "nll") == ScoreSpec("nll")
    for bad in (ScoreSpec("bogus"), ScoreSpec(window=0), ScoreSpec(window_kind="max"),
                ScoreSpec(align="left")):
        with pytest.raises(ConfigError):
            bad.check()
