"""Anomaly scores and the Gaussian NLL loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsssm.anomaly.scores import anomaly_scores, gaussian_nll, observed_steps
from tsssm.errors import ConfigError, ModelError, NumericalError
from tsssm.models.base import Gaussian


def _calibrated(B=8, T=500, C=5, seed=0):
    """Observations drawn from the predictive distribution itself: a perfectly correct model."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    var = torch.rand(B, T, C, generator=g, dtype=torch.float64) * 3 + 0.1
    y = mean + var.sqrt() * torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return y, Gaussian(mean, var)


def test_nis_of_a_correct_model_averages_one():
    y, pred = _calibrated()
    s = anomaly_scores(y, pred, "nis")
    assert s.shape == (8, 500)
    # mean of 20,000 chi2_5/5 values: sd of the mean = sqrt(2/5/20000) ~ 0.0045
    assert float(s.mean()) == pytest.approx(1.0, abs=0.025)
    # and its variance is that of chi2_C / C = 2 / C
    assert float(s.var()) == pytest.approx(2 / 5, rel=0.08)


def test_nll_matches_torch_distribution_and_loss_is_its_mean():
    y, pred = _calibrated(B=2, T=40, C=3)
    ref = -torch.distributions.Normal(pred.mean, pred.var.sqrt()).log_prob(y)  # (B, T, C)
    torch.testing.assert_close(gaussian_nll(y, pred, "none"), ref)
    torch.testing.assert_close(anomaly_scores(y, pred, "nll"), ref.mean(-1))
    torch.testing.assert_close(gaussian_nll(y, pred), ref.mean())
    torch.testing.assert_close(gaussian_nll(y, pred, "sum"), ref.sum())


def test_missing_entries_are_skipped_with_finite_gradients():
    y, pred = _calibrated(B=2, T=30, C=4)
    y[0, 3, 1] = float("nan")
    y[1, 5, :] = float("nan")  # a step with nothing observed
    y[1, 6, :3] = float("nan")  # only channel 3 observed
    mean = pred.mean.clone().requires_grad_(True)
    var = pred.var.clone().requires_grad_(True)
    p = Gaussian(mean, var)
    nis = anomaly_scores(y, p, "nis")
    assert torch.isfinite(nis).all()
    full = ((y - pred.mean) ** 2 / pred.var)
    assert float(nis[0, 3]) == pytest.approx(float(full[0, 3, [0, 2, 3]].mean()))
    assert float(nis[1, 6]) == pytest.approx(float(full[1, 6, 3]))
    assert float(nis[1, 5]) == 0.0  # documented fill for unobserved steps
    assert float(anomaly_scores(y, p, "nll", fill=-7.0)[1, 5]) == -7.0
    assert not bool(observed_steps(y)[1, 5]) and bool(observed_steps(y)[1, 6])

    loss = gaussian_nll(y, p)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()
    assert float(mean.grad[1, 5].abs().sum()) == 0.0 and float(var.grad[0, 3, 1]) == 0.0
    observed = ~torch.isnan(y)
    ref = -torch.distributions.Normal(pred.mean, pred.var.sqrt()).log_prob(
        torch.where(observed, y, pred.mean)
    )
    assert float(loss.detach()) == pytest.approx(float(ref[observed].mean()))


def test_nan_never_comes_out():
    y = torch.full((1, 4, 2), float("nan"))
    pred = Gaussian(torch.zeros(1, 4, 2), torch.ones(1, 4, 2))
    assert torch.equal(anomaly_scores(y, pred), torch.zeros(1, 4))
    assert float(gaussian_nll(y, pred)) == 0.0
    bad = Gaussian(torch.tensor([[[float("nan"), 0.0]]]), torch.ones(1, 1, 2))
    with pytest.raises(NumericalError, match="not finite"):
        anomaly_scores(torch.zeros(1, 1, 2), bad)
    # zero variance (underflow) is floored, not a division by zero
    s = anomaly_scores(torch.zeros(1, 1, 2), Gaussian(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)))
    assert torch.isfinite(s).all()


def test_half_precision_is_computed_in_float32():
    y, pred = _calibrated(B=1, T=10, C=2)
    half = Gaussian(pred.mean.half(), pred.var.half())
    s = anomaly_scores(y.half(), half)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()


def test_bad_kind_and_shape_errors():
    y, pred = _calibrated(B=1, T=5, C=2)
    with pytest.raises(ConfigError, match="kind"):
        anomaly_scores(y, pred, "bogus")
    with pytest.raises(ConfigError, match="reduction"):
        gaussian_nll(y, pred, "max")
    with pytest.raises(ModelError, match="channels"):
        anomaly_scores(y[..., :1], pred)
    assert math.isfinite(float(gaussian_nll(y, pred)))


def test_covering_score_flags_a_row_only_when_every_window_holding_it_is_flagged():
    from tsssm.anomaly.scores import covering_scores

    rng = np.random.default_rng(3)
    w = 4
    for _ in range(20):
        score = rng.exponential(size=(2, 37))
        contrib = rng.dirichlet(np.ones(3), size=(2, 37)) * score[..., None]
        cover, part = covering_scores(score, contrib, w)
        thr = np.quantile(score, 0.3)
        flags = score > thr
        for b in range(2):
            for t in range(37):
                held_by = flags[b, t:min(t + w, 37)]  # the windows ending at t .. t + w - 1
                assert (cover[b, t] > thr) == held_by.all()
        np.testing.assert_allclose(part.sum(-1), cover, rtol=1e-12)
    # hand-worked: an alarm of 6 rows keeps its onset, loses the w - 1 rows its window drags
    # past the end; one shorter than the window vanishes
    flags = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=float)
    cover, none = covering_scores(flags, None, w)
    assert none is None
    np.testing.assert_array_equal(cover > 0.5, [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(covering_scores(flags, None, 1)[0], flags)
