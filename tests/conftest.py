"""Shared fixtures: one MLflow store per test session (creating a SQLite store costs seconds),
a private experiment and output folder per test."""

from __future__ import annotations

import uuid

import pytest


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
