"""PCA T²+Q and MSET detectors, and comparators fitted on the real training rows (no padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsssm.baselines import MSETDetector, PCAT2QDetector, build_baseline, is_detector
from tsssm.errors import ConfigError, ModelError


def _correlated(T=1500, C=6, seed=0):
    """Six sensors driven by two common factors, plus their own noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(T, 2))
    mix = np.random.default_rng(100).normal(size=(2, C))
    return latent @ mix + 0.5 * rng.normal(size=(T, C))


@pytest.mark.parametrize("cls", [PCAT2QDetector, MSETDetector])
def test_detector_flags_a_broken_correlation_and_names_the_channel(cls):
    train = _correlated()
    det = cls().fit(torch.from_numpy(train[None]))
    assert is_detector(det)
    for channel in range(train.shape[1]):  # each channel in turn leaves its relation to the rest
        test = _correlated(seed=1)
        test[700:800, channel] += 5.0 * train[:, channel].std()
        score = det.score(torch.from_numpy(test[None]))[0]
        contrib = det.contributions(torch.from_numpy(test[None]))[0]
        np.testing.assert_allclose(contrib.sum(-1), score, rtol=1e-10)
        assert score[700:800].mean() > 3 * np.median(score[:700])
        assert contrib[700:800].sum(0).argmax() == channel


def test_detectors_reject_bad_arguments_and_unfitted_use():
    with pytest.raises(ConfigError):
        PCAT2QDetector(explained_variance=1.5)
    with pytest.raises(ConfigError):
        MSETDetector(memory=1)
    with pytest.raises(ModelError, match="not fitted"):
        MSETDetector().score(torch.zeros(1, 3, 2))


@pytest.mark.parametrize("name", ["isolation_forest", "pca_t2q", "mset", "ewma", "last_value"])
def test_fit_on_streams_of_different_lengths_uses_only_real_rows(name):
    rng = np.random.default_rng(3)
    streams = [rng.normal(size=(n, 3)) for n in (50, 400, 120)]
    model = build_baseline(name).fit(streams)
    if hasattr(model, "n_train_rows"):
        assert model.n_train_rows == 570
    # the same data as a NaN-padded batch would have been 3 x 400 rows for a detector
    y = torch.from_numpy(rng.normal(size=(2, 60, 3)))
    out = model.score(y) if hasattr(model, "score") else model.one_step(y)[0].mean
    assert np.isfinite(np.asarray(out)).all()


def test_compare_fits_comparators_on_the_real_training_rows():
    """`tsssm compare` used to fit on data.padded("train"), whose NaN padding IsolationForest
    forward-fills: most of its training rows were copies of each file's last row."""
    from omegaconf import OmegaConf

    from tsssm.cli import compose
    from tsssm.commands.compare import _baselines
    from tsssm.data.datasets import build_dataset

    cfg = compose(["data=skab_sample", "task=anomaly",
                   "task.baselines=[isolation_forest,seasonal_naive,pca_t2q]"])
    data = build_dataset(cfg.data).load()
    real = sum(len(a) for a in data.split_arrays("train"))
    padded = data.padded("train")
    assert padded.shape[0] * padded.shape[1] > 3 * real  # what the padding would have fed
    fitted, notes = _baselines(cfg, data)
    names = [n for n, _ in fitted]
    assert names == ["isolation_forest", "pca_t2q"]
    for _, model in fitted:
        assert model.n_train_rows == real
    assert len(notes) == 1 and "seasonal_naive skipped" in notes[0] and "period" in notes[0]
    with_period = OmegaConf.merge(cfg, {"data": {"seasonal_period": 60}})
    fitted, notes = _baselines(with_period, data)
    assert "seasonal_naive" in [n for n, _ in fitted] and not notes


def test_per_stream_detector_fits_each_stream_on_its_own_first_rows():
    a = _correlated(T=900, seed=2)
    b = 10.0 + 3.0 * _correlated(T=900, seed=3)  # another operating point and scale
    b[600:700, 2] += 15.0
    y = torch.from_numpy(np.stack([a, b]))
    det = build_baseline("pca_t2q_file", train_rows=400).fit([a[:400], b[:400]])
    score = det.score(y)
    ref = PCAT2QDetector().fit(torch.from_numpy(b[None, :400])).score(torch.from_numpy(b[None]))
    np.testing.assert_allclose(score[1], ref[0])  # stream b: its own model, its first rows only
    assert score[1, 600:700].mean() > 5 * np.median(score[1, 400:600])
    np.testing.assert_allclose(det.contributions(y).sum(-1), score, rtol=1e-10)
    with pytest.raises(Exception, match="rows"):
        det.score(y[:, :300])
