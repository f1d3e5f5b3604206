"""model=ensemble through the commands on the bundled sample: `tsssm train` trains the members
as nested runs and fits the weights, the ensemble's bundle scores a new file the same in chunks
of any size; (slow tier) `tsssm run` trains, scores and compares it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tsssm.bundle import load_bundle
from tsssm.cli import main
from tsssm.models.ensemble import Ensemble

MEMBERS = ["model=ensemble", "model.members=[kalman,mamba]",
           'model.member_overrides=["kalman:model.fit=em","kalman:model.em_iters=1",'
           '"mamba:trainer.limit_train_batches=2","mamba:model.net.d_model=8",'
           '"mamba:model.net.n_layers=1","mamba:model.net.d_state=4"]']
TINY = ["trainer.max_epochs=1", "data.eval_stride=64"]


def test_ensemble_trains_its_members_and_scores_in_chunks(capsys, tmp_path, tracking_overrides,
                                                         finished_runs, sample_csv):
    code = main(["train", *tracking_overrides, *MEMBERS, *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "ensemble member kalman" in out and "weights (" in out

    _, runs = finished_runs()
    trains = {r.data.tags["tsssm.model"]: r for r in runs}
    assert sorted(trains) == ["ensemble", "kalman", "mamba"]
    parent = trains["ensemble"].info.run_id
    for name in ("kalman", "mamba"):  # nested under the ensemble's run
        assert trains[name].data.tags["mlflow.parentRunId"] == parent
        assert trains["ensemble"].data.tags[f"tsssm.member.{name}"] == trains[name].info.run_id
    m = trains["ensemble"].data.metrics
    for lead in ("first", "last"):
        w = [m[f"ensemble/weight_kalman_{lead}"], m[f"ensemble/weight_mamba_{lead}"]]
        assert min(w) >= 0 and abs(sum(w) - 1) < 1e-9
    for key in ("test/h8_mse", "test/h8_coverage95", "test/f1", "val/ensemble_mse",
                "val/variance_scale_first"):
        assert key in m and m[key] == m[key], key

    bundle = load_bundle(tmp_path / "out" / "models" / parent)
    assert isinstance(bundle.model, Ensemble) and bundle.model.names == ["kalman", "mamba"]
    scored = []
    for i, chunk in enumerate((100_000, 97)):  # whole, and in chunks of 97 rows
        code = main(["score", *tracking_overrides, f"model.run_id={parent}",
                     f"data.path={sample_csv}", f"score.output={tmp_path}/s{i}.parquet",
                     f"score.chunk_size={chunk}"])
        assert code == 0, capsys.readouterr().err
        scored.append(pl.read_parquet(tmp_path / f"s{i}.parquet"))
    assert scored[0].height == 1145 and scored[0]["score"].is_finite().all()
    np.testing.assert_allclose(scored[1]["score"].to_numpy(), scored[0]["score"].to_numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ensemble_runs_end_to_end(capsys, tracking_overrides, finished_runs):
    """`tsssm run`: train (members nested), score and compare, every run FINISHED."""
    code = main(["run", *tracking_overrides, *MEMBERS, *TINY, "run.models=[ensemble]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "== tsssm compare ==" in out and "ensemble" in out.split("== tsssm compare ==")[1]
    _, runs = finished_runs()
    assert sorted(r.data.tags["tsssm.command"] for r in runs) == [
        "compare", "score", "train", "train", "train"]


def test_members_inherit_the_command_but_not_the_ensemble_keys():
    from tsssm.cli import compose
    from tsssm.commands.ensemble import member_overrides

    overrides = ["experiment=ett", "data=ett_m1", "data.horizon=192", "model=ensemble",
                 "model.jobs=3", "model.members=[kalman_ett,mamba]", "trainer.max_time=60",
                 'model.member_overrides=["mamba:model.epochs=2","mamba:trainer.max_time=9"]',
                 "run_name=mine"]
    cfg = compose(overrides)
    got = member_overrides(cfg, overrides, "mamba", "abc")
    assert got == ["experiment=ett", "data=ett_m1", "data.horizon=192", "trainer.max_time=60",
                   "model=mamba", "model.epochs=2", "trainer.max_time=9", "parent_run=abc"]
    member = compose(got)  # the member's own config: its optimiser, the experiment's recipe
    assert member.model.name == "mamba" and member.model.epochs == 2
    assert member.model.optimizer.lr_decay == 0.5 and member.trainer.max_time == 9
    assert member.parent_run == "abc"
    kalman = compose(member_overrides(cfg, overrides, "kalman_ett", "abc"))
    assert kalman.model.fit == "multistep" and kalman.trainer.max_time == 60
