"""Shared fixtures: one MLflow store per test session (creating a SQLite store costs seconds),
a private experiment and output folder per test, the bundled sample file, the runs a test's
commands logged, and one intra-op thread for a test of tiny tensors."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: the bundled SKAB sample (1145 rows) the pipeline tests train and score on
SAMPLE_CSV = Path(__file__).resolve().parents[1] / "data" / "skab" / "valve1" / "1.csv"


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture()
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def tracking_overrides(tmp_path, mlflow_db, experiment) -> list[str]:
    """Hydra overrides that send this test's runs and outputs to its own experiment/folder."""
    return [
        f"tracking.uri={mlflow_db}",
        f"tracking.experiment={experiment}",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"tracking.output_dir={tmp_path}/out",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy runner the thread handoff
    costs 10x the work; pin this test to one thread and restore the setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    """The bundled SKAB sample file (data/skab/valve1/1.csv)."""
    return SAMPLE_CSV


@pytest.fixture()
def finished_runs(mlflow_db, experiment) -> Callable[[], tuple]:
    """A function giving (MlflowClient, every run of this test's experiment), having asserted
    that each run FINISHED."""
    from mlflow.tracking import MlflowClient

    def runs() -> tuple:
        client = MlflowClient(mlflow_db)
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id])
        assert all(r.info.status == "FINISHED" for r in found)
        return client, found

    return runs
