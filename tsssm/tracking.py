"""Experiment tracking with MLflow: the only module of tsssm that imports mlflow.

One MLflow run per command. Parameters are the resolved config, flattened; metrics are named
``split/metric``; artifacts go under ``forecasts/``, ``scores/``, ``figures/``, ``tables/`` and
``model/``. A run whose command fails is marked FAILED, an interrupted one KILLED.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from tsssm.errors import ModelError

log = logging.getLogger(__name__)

# MLflow's own chatter (database migrations, progress bars) is not the user's business; it
# configures its loggers on import, so quieten them after it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_MAX_PARAM_LEN = 500


def _absolute_sqlite(uri: str) -> str:
    """Make ``sqlite:///relative.db`` absolute and create its folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


class Tracker:
    """Where runs go: a tracking URI and an experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None) -> None:
        self.uri = _absolute_sqlite(uri)
        self.experiment = experiment
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if artifact_root:
                    root = Path(artifact_root).resolve()
                    root.mkdir(parents=True, exist_ok=True)
                    location = root.as_uri()
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
            else:
                self.experiment_id = found.experiment_id
        self.run_id: str | None = None

    @classmethod
    def from_config(cls, cfg) -> Tracker:
        return cls(cfg.uri, cfg.experiment, cfg.artifact_root or None)

    @contextmanager
    def start(self, name: str, command: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        """One run for one command; FAILED on a raised error, KILLED on Ctrl-C."""
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"tsssm.command": command, **(tags or {})},
        )
        self.run_id = run.info.run_id
        try:
            self.log_params(params)
            yield self
        except KeyboardInterrupt:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as err:
            self.client.set_tag(self.run_id, "tsssm.error", str(err)[:5000])
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        else:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    # -- logging ------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_series(self, name: str, values, first_step: int = 0) -> None:
        """One metric as a curve: ``values[i]`` at step ``first_step + i`` (NaN entries skipped)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, first_step + i) for i, v in enumerate(values)
                 if v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_dir(self, path: str | Path, folder: str) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=folder)

    # -- finding runs -------------------------------------------------------------------------
    def latest_run(self, command: str, model: str | None = None) -> str:
        """The newest FINISHED run of ``command`` (and model) in this experiment."""
        query = f"tags.`tsssm.command` = '{command}' and attributes.status = 'FINISHED'"
        if model:
            query += f" and tags.`tsssm.model` = '{model}'"
        runs = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if not runs:
            what = f"'{command}'" + (f" of model '{model}'" if model else "")
            raise ModelError(
                f"no finished {what} run in experiment '{self.experiment}' at {self.uri}; "
                "run `tsssm train` first or name one with model.run_id=... / model.checkpoint=..."
            )
        return runs[0].info.run_id

    def latest_runs_per_model(self, command: str, data: str) -> dict[str, str]:
        """{model name: newest FINISHED run id} of ``command`` on dataset ``data``."""
        query = (f"tags.`tsssm.command` = '{command}' and attributes.status = 'FINISHED' "
                 f"and tags.`tsssm.data` = '{data}'")
        runs = self.client.search_runs([self.experiment_id], query,
                                       order_by=["attributes.start_time DESC"], max_results=500)
        found: dict[str, str] = {}
        for run in runs:
            found.setdefault(run.data.tags.get("tsssm.model", "?"), run.info.run_id)
        return found

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def download(self, run_id: str, folder: str) -> Path:
        """Fetch a run's artifact folder into a temporary directory."""
        try:
            self.client.get_run(run_id)
        except Exception as err:
            raise ModelError(
                f"model.run_id={run_id}: no such run at {self.uri} ({str(err).splitlines()[0]})"
            ) from err
        target = Path(tempfile.mkdtemp(prefix="tsssm-"))
        try:
            local = self.client.download_artifacts(run_id, folder, str(target))
        except Exception as err:
            shutil.rmtree(target, ignore_errors=True)
            raise ModelError(f"run {run_id} has no '{folder}' artifact: {err}") from err
        return Path(local)


# -- reading runs (the dashboard) -----------------------------------------------------------------
class RunRecord(NamedTuple):
    """One run as a viewer shows it. Times are milliseconds since the epoch (end None while the
    run is RUNNING); metrics are each key's latest value."""

    run_id: str
    name: str
    experiment: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    start_time: int | None
    end_time: int | None
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]

    @property
    def command(self) -> str:
        return self.tags.get("tsssm.command", "")


class RunStore:
    """Read-only access to every run of a tracking store (all experiments): the only way the
    dashboard sees MLflow. A local SQLite file that does not exist yet is an empty store (it
    is not created)."""

    def __init__(self, uri: str) -> None:
        self.uri = _absolute_sqlite_path(uri)
        self._client: MlflowClient | None = None
        self._names: dict[str, str] = {}
        self._cache = Path(tempfile.mkdtemp(prefix="tsssm-dashboard-"))

    @property
    def missing(self) -> bool:
        """True for a local SQLite store whose file does not exist (nothing logged yet)."""
        prefix = "sqlite:///"
        return self.uri.startswith(prefix) and not Path(self.uri[len(prefix):]).exists()

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._client = MlflowClient(self.uri)
        return self._client

    @staticmethod
    def _record(run, experiments: dict[str, str]) -> RunRecord:
        info, data = run.info, run.data
        return RunRecord(
            run_id=info.run_id, name=info.run_name or info.run_id[:8],
            experiment=experiments.get(info.experiment_id, info.experiment_id),
            status=info.status, start_time=info.start_time, end_time=info.end_time,
            tags={k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
            metrics=dict(data.metrics), params=dict(data.params),
        )

    def _experiments(self, needed: str | None = None) -> dict[str, str]:
        """{experiment id: name}, read again when ``needed`` is not among them."""
        if needed is None or needed not in self._names:
            self._names = {e.experiment_id: e.name for e in self._mlflow().search_experiments()}
        return self._names

    def runs(self, max_results: int = 5000) -> list[RunRecord]:
        """Every run of every experiment, newest first."""
        if self.missing:
            return []
        experiments = self._experiments()
        if not experiments:
            return []
        found, token = [], None
        while len(found) < max_results:
            page = self._mlflow().search_runs(
                list(experiments), order_by=["attributes.start_time DESC"],
                max_results=min(1000, max_results - len(found)), page_token=token)
            found += [self._record(r, experiments) for r in page]
            token = page.token
            if not token:
                break
        return found

    def run(self, run_id: str) -> RunRecord:
        """One run; ModelError naming the id and the store if there is none."""
        if self.missing:
            raise ModelError(f"no run {run_id}: the store {self.uri} does not exist yet")
        try:
            run = self._mlflow().get_run(run_id)
        except Exception as err:
            raise ModelError(f"no run {run_id} in {self.uri} "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                             ) from err
        return self._record(run, self._experiments(run.info.experiment_id))

    def artifacts(self, run_id: str, folder: str = "") -> list[str]:
        """Paths of the files under ``folder`` of a run's artifacts, recursively."""
        out, todo = [], [folder or None]
        while todo:
            for f in self._mlflow().list_artifacts(run_id, todo.pop()):
                (todo if f.is_dir else out).append(f.path)
        return sorted(out)

    def fetch(self, run_id: str, path: str, refresh: bool = False) -> Path:
        """A local copy of one artifact file (downloaded once per viewer process; ``refresh``
        downloads again, for runs that are still RUNNING). ModelError if the run has none."""
        target = self._cache / run_id / path
        if target.exists() and not refresh:
            return target
        folder = Path(tempfile.mkdtemp(prefix="fetch-", dir=self._cache))
        try:
            local = Path(self._mlflow().download_artifacts(run_id, path, str(folder)))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)
        except Exception as err:
            raise ModelError(f"run {run_id} has no artifact '{path}' in {self.uri} "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                             ) from err
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return target

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, in step order."""
        history = self._mlflow().get_metric_history(run_id, key)
        return sorted((m.step, m.value) for m in history)

    def close(self) -> None:
        shutil.rmtree(self._cache, ignore_errors=True)


def _absolute_sqlite_path(uri: str) -> str:
    """``sqlite:///relative.db`` made absolute, without creating anything."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri
