"""The ETT accuracy driver's plumbing (benchmarks/accuracy_ett.py): overrides per dataset, the
order trainings start in, records written as each run ends, the time limit."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy_ett  # noqa: E402


def _args(tmp_path: Path, **kw) -> SimpleNamespace:
    base = dict(root=str(tmp_path), set=[], data_format="csv", small=False, accelerator="cpu",
                store="sqlite", jobs=2, datasets=None, horizons=None, models=None,
                out=tmp_path / "accuracy.json", logs=tmp_path / "logs", time_limit=None)
    return SimpleNamespace(**{**base, **kw})


def test_set_with_dataset_prefix_applies_only_to_matching_datasets(tmp_path):
    args = _args(tmp_path, set=["ett_m*:trainer.max_epochs=3", "model.epochs=4",
                                "ett_h1:data.batch_size=32"])
    assert accuracy_ett.extra_overrides(args, "ett_m2") == ["trainer.max_epochs=3",
                                                           "model.epochs=4"]
    assert accuracy_ett.extra_overrides(args, "ett_h1") == ["model.epochs=4",
                                                           "data.batch_size=32"]
    # a value holding a colon is not a prefix
    args = _args(tmp_path, set=["tracking.uri=file:///x"])
    assert accuracy_ett.extra_overrides(args, "ett_h1") == ["tracking.uri=file:///x"]


def test_parquet_copies_are_named_per_dataset(tmp_path):
    csv = accuracy_ett.data_overrides(_args(tmp_path), "ett_m1")
    assert not any(o.startswith("data.files") for o in csv)
    pq = accuracy_ett.data_overrides(_args(tmp_path, data_format="parquet"), "ett_m1")
    assert "data.files=[ETTm1.parquet]" in pq and "data=ett_m1" in pq


def test_seed_goes_into_the_command_and_the_selection_fields_into_the_record(tmp_path):
    job = tmp_path / "job"
    assert "seed=0" in accuracy_ett.train_command(_args(tmp_path), "ett_h1", 96, "mamba", job)
    cmd = accuracy_ett.train_command(_args(tmp_path, seed=3), "ett_h1", 96, "mamba", job)
    assert "seed=3" in cmd and "seed=0" not in cmd
    assert accuracy_ett._selection({"val/best_epoch": -1.0, "val/start_mse_horizon": 0.5}) == {
        "best_epoch": -1, "val_start_mse": 0.5}
    assert accuracy_ett._selection({"test/h96_mse": 0.4}) == {}


def test_jobs_start_model_by_model_longest_first():
    jobs = accuracy_ett.job_order(["ett_h1", "ett_m1"], [96, 720],
                                  ["hybrid_dssm", "mamba", "last_value"])
    assert [j[2] for j in jobs] == ["hybrid_dssm"] * 4 + ["mamba"] * 4  # baselines run apart
    assert jobs[:4] == [("ett_m1", 720, "hybrid_dssm"), ("ett_m1", 96, "hybrid_dssm"),
                        ("ett_h1", 720, "hybrid_dssm"), ("ett_h1", 96, "hybrid_dssm")]


def test_records_are_written_as_each_run_ends_and_failures_reported(tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "accuracy.json"
    writes: list[int] = []
    merge = accuracy_ett.merge_records

    def spy(path, new, key):
        new = list(new)
        writes.append(len(new))
        return merge(path, new, key)

    def fake_run(args, dataset, horizon, model, deadline=None):
        if horizon == 192:
            raise accuracy_ett.TimeLimitError(f"{dataset} h{horizon} {model}: not started")
        time.sleep(0.05)
        return {"dataset": dataset, "task": "forecast", "horizon": horizon, "model": model,
                "mse": 0.5, "mae": 0.5, "coverage95": 0.95}

    monkeypatch.setattr(accuracy_ett, "_run_trained", fake_run)
    monkeypatch.setattr(accuracy_ett, "merge_records", spy)
    args = _args(tmp_path, jobs=1, datasets=["ett_h1"], horizons=[96, 192, 336],
                 models=["mamba"])
    records = accuracy_ett.run(args)
    assert sorted(r["horizon"] for r in records) == [96, 336]
    assert writes == [1, 1]  # one write per finished run, not one at the end
    assert len(json.loads(out.read_text())) == 2
    assert "not started" in capsys.readouterr().err


def test_a_training_past_the_deadline_is_not_started(tmp_path):
    with pytest.raises(accuracy_ett.TimeLimitError, match="not started"):
        accuracy_ett._run_trained(_args(tmp_path), "ett_h1", 96, "mamba",
                                  deadline=time.monotonic() - 1.0)
    assert not (tmp_path / "logs").exists()


def test_combination_weights_are_the_simplex_minimiser():
    """benchmarks/ett_combine.py: the convex weights minimise w' G w over the simplex (checked
    against a fine grid), including when the unconstrained optimum has a negative weight."""
    import ett_combine
    import numpy as np

    rng = np.random.default_rng(0)
    grid = [np.array((a, b, 1 - a - b)) for a in np.linspace(0, 1, 51)
            for b in np.linspace(0, 1, 51) if a + b <= 1 + 1e-12]
    for _ in range(30):
        E = rng.normal(size=(3, 40))
        E[1] += E[0] * rng.uniform(0, 2)  # correlated errors: a negative unconstrained weight
        G = E @ E.T
        w = ett_combine.simplex_weights(G)
        assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
        assert w @ G @ w <= min(v @ G @ v for v in grid) + 1e-9


def test_skab_false_alarms_are_located_by_hand():
    """The SKAB suite's FAR breakdown: before each file's first anomalous row, after its last,
    and on the rows Conv-AE's notebook can flag (not the first 59 or the last 118)."""
    import accuracy_skab
    import numpy as np

    y = np.zeros(300, bool)
    y[100:150] = True
    f = np.zeros(300, bool)
    f[[10, 60, 160, 170, 250]] = True  # 2 before (of 100 normal rows), 3 after (of 150)
    got = accuracy_skab.far_where([y, np.zeros(200, bool)], [f, np.zeros(200, bool)])
    # the second file has no anomaly: all its rows are "before", none "after"
    assert got["far_before"] == pytest.approx(2 / 300)
    assert got["far_after"] == pytest.approx(3 / 150)
    # rows 59..181 of the first file (73 normal, flags at 60, 160, 170), 59..81 of the second
    assert got["far_convae_rows"] == pytest.approx(3 / (73 + 23))


def test_skab_reanchor_grid_on_the_bundled_sample():
    """The SKAB suite's re-anchored score grid (reanchor_cells): every setting of the space
    fixed beforehand, thresholds from the plain score's validation rows, the cells without a
    moving reference equal to the plain trailing shift score, untested streams never flagged."""
    import accuracy_skab
    import numpy as np

    from tsssm.anomaly.scores import ScoreSpec, StepTerms
    from tsssm.anomaly.thresholds import build_threshold
    from tsssm.cli import compose
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import fit_thresholds, window_prediction

    cfg = compose(["data=skab_sample", "task=anomaly"])
    data = build_dataset(cfg.data).load()
    rng = np.random.default_rng(0)
    terms = []
    for p in data.parts:
        T, C = p.stream.values.shape
        u = rng.standard_normal((T, C))
        if p.stream.labels is not None:
            u[p.stream.labels.astype(bool)] += 2.0  # a fault the scores can see
        obs = np.ones((T, C), bool)
        terms.append((np.zeros((T, C)), np.ones((T, C)), StepTerms(u * u / C, u, obs)))
    risk = 1e-3
    cells = accuracy_skab.reanchor_cells(data, cfg, terms, "mahalanobis", risk)
    settings = [c[0] for c in cells]
    assert len(settings) == len(set(settings)) == 98
    tested = [i for i, p in enumerate(data.parts) if p.split is not None]
    untested = [i for i, p in enumerate(data.parts) if p.split is None]
    assert untested  # the anomaly-free recording
    for w in accuracy_skab.REANCHOR_WINDOWS:
        spec = ScoreSpec("mahalanobis", w, "shift", "trailing")
        plain = [window_prediction(*t, spec) for t in terms]
        _, own = fit_thresholds(data, plain, lambda s: build_threshold(
            "pot", q=risk, level=cfg.task.threshold.level).fit(s),
            scope=cfg.task.threshold.scope, fit_on=cfg.task.threshold.fit_on)
        (_, preds, flags), = [c for c in cells if c[0] == (w, 0.0, 0.5, 0.0, 10)]
        for i in tested:
            np.testing.assert_allclose(preds[i].score, plain[i].score, rtol=1e-10, atol=1e-12)
            np.testing.assert_array_equal(flags[i], plain[i].score > own[i].value)
        for i in untested:
            assert not flags[i].any()


def test_ensemble_is_one_user_command_whose_members_train_at_once(tmp_path):
    """--models ensemble: the record's command is the user's `tsssm train ... model=ensemble`
    with its members trained at once (model.jobs=3), and it composes to a valid config."""
    from tsssm.cli import compose

    command = accuracy_ett.train_command(_args(tmp_path), "ett_m1", 336, "ensemble", tmp_path)
    assert command[:2] == ["tsssm", "train"]
    assert "model=ensemble" in command and "model.jobs=3" in command
    cfg = compose(command[2:])
    assert list(cfg.model.members) == ["kalman_ett", "mamba", "hybrid_residual"]
    assert cfg.model.net.horizon == 336


def test_skab_apriori_reanchor_space_contains_the_old_one():
    """The clean space ([reanchor-apriori]) is at least as wide as the old one in every axis and
    holds every old cell, so the old records come from the same run (same tie order)."""
    import accuracy_skab as s

    for old, new in ((s.REANCHOR_WINDOWS, s.APRIORI_WINDOWS), (s.REANCHOR_ALPHAS, s.APRIORI_ALPHAS),
                     (s.REANCHOR_GAMMAS, s.APRIORI_GAMMAS), (s.REANCHOR_RHOS, s.APRIORI_RHOS),
                     (s.REANCHOR_HOLDS, s.APRIORI_HOLDS)):
        assert set(old) <= set(new) and len(new) >= len(old)
    apriori = s.reanchor_settings(s.APRIORI_WINDOWS, s.APRIORI_ALPHAS, s.APRIORI_GAMMAS,
                                  s.APRIORI_RHOS, s.APRIORI_HOLDS)
    assert len(apriori) == len(set(apriori)) == 351
    old = [apriori.index(c) for c in s.reanchor_settings()]
    assert len(old) == 98 and old == sorted(old)  # the old order is kept: ties break alike


def test_skab_injected_faults_stay_in_the_training_rows_declared():
    """inject_fault: one fault of the declared length inside the evaluation rows, ending by
    INJECT_END, on 1-3 channels, the other rows and channels untouched, missing entries kept."""
    import accuracy_skab as s
    import numpy as np

    base = np.random.default_rng(1).standard_normal((1150, 8))
    base[100:110, 2] = np.nan
    shapes = set()
    for seed in range(60):
        out, fault = s.inject_fault(base, np.random.default_rng(seed))
        rows = np.flatnonzero(fault)
        assert s.INJECT_DURATION[0] <= len(rows) <= s.INJECT_DURATION[1]
        assert rows[0] >= s.INJECT_ROWS[0] and rows[-1] < s.INJECT_END
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))  # one run
        moved = np.nonzero(np.nan_to_num(out - base, nan=0.0))
        assert set(moved[0]) <= set(rows)
        touched = set(moved[1])
        assert 1 <= len(touched) <= s.INJECT_CHANNELS[1]
        assert np.array_equal(np.isnan(out), np.isnan(base))
        diff = (out - base)[rows][:, sorted(touched)]
        if np.allclose(diff, diff[0]):
            shapes.add("step")
        elif np.all(np.abs(diff[-1]) > np.abs(diff[0])) and np.allclose(
                diff / diff[-1], np.arange(1, len(rows) + 1)[:, None] / len(rows)):
            shapes.add("ramp")
        else:
            shapes.add("noise")
    assert shapes == set(s.INJECT_SHAPES)
