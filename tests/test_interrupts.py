"""Real signals and real concurrent processes against `tsssm train` (issue 11).

- SIGTERM / SIGINT mid-training: exit 130, the run KILLED, a printed command that resumes it;
  resuming continues after the last completed epoch and ends with exactly the metrics (and the
  per-epoch loss curve) of an uninterrupted run with the same seed.
- SIGKILL mid-training: the next command marks the orphaned RUNNING run FAILED (saying it was
  killed), and `trainer.resume=last` continues it to the same result.
- 2 and 4 trainings started at once on a brand-new SQLite store all FINISH.

Tiny configs (a 300-row stream, a one-layer Mamba of width 8) keep each process to seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tsssm.cli import main

EPOCHS = 6
DATA = ["data=csv", "data.time_column=ts", "data.label_column=label", "data.input_len=28",
        "data.horizon=4", "data.eval_stride=16", "data.stride=1"]
MAMBA = ["model=mamba", "model.net.d_model=8", "model.net.n_layers=1", "model.net.d_state=4",
         f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false", "seed=3"]
#: one thread everywhere, so in-process and subprocess runs compute bit for bit alike
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def stream_csv(path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(n)
    a = np.sin(t / 10) + 0.1 * rng.standard_normal(n)
    b = np.cos(t / 7) + 0.1 * rng.standard_normal(n)
    label = ((t >= 250) & (t < 260)).astype(int)
    path.write_text("ts,a,b,label\n" + "".join(
        f"{i},{x:.5f},{y:.5f},{k}\n" for i, x, y, k in zip(t, a, b, label)))
    return path


def overrides(folder: Path, db: str, experiment: str) -> list[str]:
    return [*DATA, f"data.path={folder.parent / 's.csv'}", *MAMBA, f"tracking.uri={db}",
            f"tracking.experiment={experiment}", f"tracking.artifact_root={folder}/artifacts",
            f"tracking.output_dir={folder}/out"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlflow_db):
    """An uninterrupted training (in-process): its final metrics and train/loss curve."""
    root = tmp_path_factory.mktemp("interrupts")
    stream_csv(root / "s.csv")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *overrides(root / "ref", mlflow_db, "interrupts-ref")]) == 0
    finally:
        torch.set_num_threads(before)
    (run,) = runs_of(mlflow_db, "interrupts-ref")
    return root, run.data.metrics, loss_curve(mlflow_db, run.info.run_id)


def runs_of(db: str, experiment: str) -> list:
    client = MlflowClient(db)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def loss_curve(db: str, run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(db).get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def start_and_stop(args: list[str], out: Path, signum: int) -> tuple[int, str, int]:
    """Run `tsssm train` in a process, send it ``signum`` once its checkpoint of epoch 1 is
    written; returns (exit code, stderr, the epoch its last checkpoint completed)."""
    proc = subprocess.Popen([sys.executable, "-m", "tsssm.cli", "train", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # generous: a loaded 2-core machine is slow, a hang still ends
    deadline = time.monotonic() + 900
    progress = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((out / "checkpoints").glob("*/last.json"))
        if found and json.loads(found[0].read_text())["epoch"] >= 1:
            progress = found[0]
            break
        time.sleep(0.05)
    assert progress is not None, proc.communicate()[1] if proc.poll() is not None else "timeout"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, json.loads(progress.read_text())["epoch"]


def assert_resumed_like_reference(db: str, experiment: str, stopped, epoch: int, reference):
    _, ref_metrics, ref_curve = reference
    resumed = runs_of(db, experiment)[-1]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["tsssm.resumed_from"] == stopped.info.run_id
    assert resumed.data.tags["tsssm.resumed_after_epoch"] == str(epoch)
    # its curve holds every epoch: those up to the checkpoint copied from the stopped run, the
    # rest trained (logged after the resumed run started)
    history = MlflowClient(db).get_metric_history(resumed.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    for m in history:
        assert (m.timestamp >= resumed.info.start_time) == (m.step > epoch), m
    # ... and ends where the uninterrupted run ends
    curve = loss_curve(db, resumed.info.run_id)
    assert [v for _, v in curve] == pytest.approx([v for _, v in ref_curve], rel=1e-6)
    for key in ("val/mae", "test/mae", "test/mse", "test/h4_mse", "test/auc_pr"):
        assert resumed.data.metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6), key


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_training_then_resume(signum, reference, mlflow_db, capsys, one_thread):
    root = reference[0]
    experiment = f"interrupts-{signum.name}"
    folder = root / signum.name
    code, err, epoch = start_and_stop(overrides(folder, mlflow_db, experiment), folder / "out",
                                      signum)
    assert code == 130, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert line.startswith("interrupted; resume with tsssm train ")
    assert epoch < EPOCHS - 1, "the signal came after training"
    (stopped,) = runs_of(mlflow_db, experiment)
    assert stopped.info.status == "KILLED"
    assert not (folder / "out" / "models").exists()
    if signum == signal.SIGINT:  # same path as SIGTERM from here on
        return
    command = shlex.split(line.split("resume with ", 1)[1])
    assert command[:2] == ["tsssm", "train"] and command[-1] == "trainer.resume=last"
    assert main(command[1:]) == 0, capsys.readouterr().err
    assert_resumed_like_reference(mlflow_db, experiment, stopped, epoch, reference)


def test_sigkill_leaves_an_orphan_that_the_next_command_closes(reference, mlflow_db, capsys,
                                                               one_thread):
    root = reference[0]
    experiment = "interrupts-SIGKILL"
    folder = root / "SIGKILL"
    args = overrides(folder, mlflow_db, experiment)
    code, _, epoch = start_and_stop(args, folder / "out", signal.SIGKILL)
    assert code == -signal.SIGKILL
    (orphan,) = runs_of(mlflow_db, experiment)
    assert orphan.info.status == "RUNNING"  # nobody could close it

    assert main(["train", *args, "trainer.resume=last"]) == 0
    err = capsys.readouterr().err
    assert f"run {orphan.info.run_id}" in err and "marked FAILED" in err
    closed = MlflowClient(mlflow_db).get_run(orphan.info.run_id)
    assert closed.info.status == "FAILED"
    assert "killed" in closed.data.tags["tsssm.error"]
    assert_resumed_like_reference(mlflow_db, experiment, orphan, epoch, reference)


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_trainings_on_a_new_store(n, tmp_path):
    """Brand-new SQLite store, n `tsssm train` at once: the store is created and migrated once
    (under its lock file), and every run FINISHES."""
    stream_csv(tmp_path / "s.csv")
    db = f"sqlite:///{tmp_path}/new/mlflow.db"
    args = [*DATA, f"data.path={tmp_path / 's.csv'}", "model=kalman", "model.fit=em",
            "model.em_iters=1", f"tracking.uri={db}", "tracking.experiment=together",
            f"tracking.artifact_root={tmp_path}/artifacts",
            f"tracking.output_dir={tmp_path}/out", "trainer.enable_progress_bar=false"]
    procs = [subprocess.Popen([sys.executable, "-m", "tsssm.cli", "train", *args,
                               f"run_name=together-{i}"], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    for code, err in results:
        assert code == 0, err
    runs = runs_of(db, "together")
    assert sorted(r.info.run_name for r in runs) == [f"together-{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(list((tmp_path / "out" / "models").iterdir())) == n
