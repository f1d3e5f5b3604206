"""trainer=ddp on 2 CPU processes (gloo): one MLflow run (rank 0 only), and the full-batch
Kalman fit equals the fit in one process (the loss is reduced over ranks exactly)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tsssm.bundle import load_bundle
from tsssm.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=2", "model.optimizer.max_iter=3"]


def runs(mlflow_db, experiment):
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id],
                                      order_by=["attributes.start_time ASC"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_ddp_on_two_cpu_processes_equals_one_process(tmp_path, tracking_overrides, mlflow_db,
                                                     experiment, capsys):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    ddp = subprocess.run(
        [sys.executable, "-m", "tsssm.cli", "train", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", *tracking_overrides, *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trained kalman") == 1  # rank 1 prints nothing, evaluates nothing
    client, found = runs(mlflow_db, experiment)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.params["trainer.strategy"] == "ddp_find_unused_parameters_true"
    assert not list((tmp_path / "out" / "ddp").glob("*.yaml"))  # the workers' config is gone

    assert main(["train", *tracking_overrides, *FAST]) == 0, capsys.readouterr().err
    client, found = runs(mlflow_db, experiment)
    assert len(found) == 2
    losses = [[m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
              for r in found]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    # validation: the mean over every rank's streams' scored entries, as in one process (not
    # the mean of the ranks' means)
    for name in ("val/loss", "val/nll_one_step"):
        vals = [[m.value for m in client.get_metric_history(r.info.run_id, name)] for r in found]
        assert len(vals[0]) == 2 and vals[0] == pytest.approx(vals[1], rel=1e-6), name
    # throughput counts every rank's share: as many streams and rows an epoch as one process
    for name in ("samples", "rows"):
        counts = []
        for r in found:
            rate, seconds = (client.get_metric_history(r.info.run_id, f"train/{k}")
                             for k in (f"{name}_per_s", "epoch_seconds"))
            assert len(rate) == 2 and all(m.value > 0 for m in rate)
            counts.append([a.value * b.value for a, b in zip(rate, seconds)])
        assert counts[0] == pytest.approx(counts[1], rel=1e-9)
    thetas = [load_bundle(tmp_path / "out" / "models" / r.info.run_id).model.theta.detach()
              for r in found]
    torch.testing.assert_close(thetas[0], thetas[1], rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_ddp_windows_count_each_window_once(tmp_path, tracking_overrides, mlflow_db, experiment,
                                            capsys):
    """Window training on 2 ranks: the bundled sample's 635 training and 219 validation
    windows are odd in number, so DistributedSampler repeats one of each to even the shards
    out; the repeats are left out of the losses. With a learning rate of 1e-30 the model stays
    where it starts (a step moves a weight by about 1e-30, far below float32's resolution of
    all but zero weights), so the epoch's train/loss (the mean over every training window) and the
    validation metrics must equal one process's, whatever the batches."""
    tiny = ["model=mamba", "model.net.d_model=8", "model.net.n_layers=1", "model.net.d_state=4",
            "model.optimizer.lr=1e-30", "model.optimizer.weight_decay=0", "trainer.max_epochs=1",
            "data.eval_stride=64", "task.calibration=none"]
    env = {k: v for k, v in {**os.environ, "PYTHONWARNINGS": "ignore"}.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    ddp = subprocess.run(
        [sys.executable, "-m", "tsssm.cli", "train", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", *tracking_overrides, *tiny],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(["train", *tracking_overrides, *tiny]) == 0, capsys.readouterr().err
    client, found = runs(mlflow_db, experiment)
    assert len(found) == 2 and found[0].data.params["trainer.strategy"].startswith("ddp")
    names = ("train/loss", "train/nll_one_step", "train/nll_horizon", "val/loss",
             "val/nll_one_step", "val/nll_horizon", "val/mse_horizon")
    for name in names:
        values = [r.data.metrics[name] for r in found]
        assert values[0] == pytest.approx(values[1], rel=1e-6), name
    samples = [r.data.metrics["train/samples_per_s"] * r.data.metrics["train/epoch_seconds"]
               for r in found]
    assert samples == pytest.approx([635, 635], rel=1e-9)  # the repeat is not counted
