"""Experiment tracking with MLflow: the only module of tsssm that imports mlflow.

One MLflow run per command. Parameters are the resolved config, flattened; metrics are named
``split/metric``; artifacts go under ``forecasts/``, ``scores/``, ``figures/``, ``tables/`` and
``model/``. A run whose command fails is marked FAILED, an interrupted one KILLED.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from tsssm.errors import ModelError, StorageError

log = logging.getLogger(__name__)

# MLflow's own chatter (database migrations, progress bars) is not the user's business; it
# configures its loggers on import, so quieten them after it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_MAX_PARAM_LEN = 500


_SQLITE = "sqlite:///"
#: seconds to wait for a tracking server to answer before giving up
_SERVER_TIMEOUT_S = 5.0


def _absolute_sqlite(uri: str) -> str:
    """Make ``sqlite:///relative.db`` absolute."""
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
        return _SQLITE + str(Path(uri[len(_SQLITE):]).resolve())
    return uri


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _unwritable(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (created if needed), or None. Tried for real:
    root ignores permission bits, so asking os.access is not enough."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tsssm-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return _reason(err)
    return None


def writable_dir(path: str | Path, key: str, shown: str | Path | None = None) -> Path:
    """``path`` created and proven writable; StorageError naming ``key`` (and ``shown``, the
    value the user gave, where that is a file in ``path``) otherwise."""
    folder = Path(path).expanduser()
    reason = _unwritable(folder)
    if reason:
        raise StorageError(f"{key}={shown or path}: cannot write in {folder} ({reason}); choose "
                           f"a writable place with {key}=... or fix its permissions")
    return folder


def _check_sqlite(uri: str) -> Path:
    """The SQLite file of ``uri``, its folder created and the file proven writable."""
    import sqlite3

    path = Path(uri[len(_SQLITE):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file
            conn.rollback()
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise StorageError(
            f"tracking.uri={uri}: cannot write the SQLite store {path} ({reason}); choose a "
            "writable path, e.g. tracking.uri=sqlite:///$HOME/tsssm_runs/mlflow.db"
        ) from err
    return path


def _check_server(uri: str) -> None:
    """Fail in seconds when no tracking server answers at ``uri`` (MLflow itself retries
    for minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_SERVER_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # something answers; MLflow will tell what it thinks of it
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise StorageError(
            f"tracking.uri={uri}: no MLflow tracking server answers there ({reason}); start "
            "one (mlflow server ...), fix the address, or use the local store (tracking=local)"
        ) from err


class _FileLock:
    """An exclusive lock on a file shared by every tsssm process using one SQLite store:
    creating/migrating the store and every write go through it, so concurrent commands
    neither race MLflow's schema migrations nor collide as writers. Re-entrant in a process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        import fcntl

        with self._local:
            if self._depth == 0:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None


class _LockedClient:
    """An MlflowClient whose calls hold the store's file lock (and retry a busy SQLite)."""

    def __init__(self, client: MlflowClient, lock: _FileLock) -> None:
        self._client = client
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for attempt in range(5):
                try:
                    with self._lock.held():
                        return attr(*args, **kwargs)
                except Exception as err:  # another program (mlflow ui) holding the database
                    if "database is locked" not in str(err) or attempt == 4:
                        raise
                    time.sleep(0.5 * (attempt + 1))
            raise AssertionError("unreachable")

        return call


def _process_tag() -> str:
    """host:pid:start time of this process, to tell later whether it still runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _process_gone(tag: str) -> bool:
    """Whether the process a run's tag names has ended (only knowable on its own host)."""
    host, _, rest = tag.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return ticks not in ("", "?") and _start_ticks(pid) not in (ticks, "?")


class Tracker:
    """Where runs go: a tracking URI and an experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None) -> None:
        self.uri = _absolute_sqlite(uri)
        self.experiment = experiment
        if self.uri.startswith(_SQLITE):
            db = _check_sqlite(self.uri)
            lock: _FileLock | None = _FileLock(db.with_name(db.name + ".lock"))
        else:
            lock = None
            if self.uri.startswith(("http://", "https://")):
                _check_server(self.uri)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.set_tracking_uri(self.uri)
            if lock is None:
                self.client = MlflowClient(self.uri)
                self.experiment_id = self._experiment_id(artifact_root)
            else:
                # One process at a time creates or migrates the store and the experiment.
                with lock.held():
                    self.client = _LockedClient(MlflowClient(self.uri), lock)
                    self.experiment_id = self._experiment_id(artifact_root)
        self.run_id: str | None = None

    def _experiment_id(self, artifact_root: str | None) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if artifact_root:
            location = writable_dir(Path(artifact_root).resolve(),
                                    "tracking.artifact_root").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    @classmethod
    def from_config(cls, cfg) -> Tracker:
        output_dir = getattr(cfg, "output_dir", None)
        if output_dir:
            writable_dir(output_dir, "tracking.output_dir")
        return cls(cfg.uri, cfg.experiment, cfg.artifact_root or None)

    # -- runs left behind ---------------------------------------------------------------------
    def close_orphans(self) -> list[str]:
        """Mark FAILED the RUNNING runs of this experiment whose process has ended without
        closing them (killed with SIGKILL, out of memory, a power cut); returns their ids."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                       max_results=200)
        closed = []
        for run in runs:
            tag = run.data.tags.get("tsssm.process", "")
            if tag and _process_gone(tag):
                why = (f"its process ({tag.split(':')[1]}) ended without closing the run: "
                       "killed (SIGKILL, out of memory) or crashed")
                self.client.set_tag(run.info.run_id, "tsssm.error", why)
                self.client.set_terminated(run.info.run_id,
                                           RunStatus.to_string(RunStatus.FAILED))
                log.warning("run %s (%s) was left RUNNING: %s; marked FAILED",
                            run.info.run_id, run.info.run_name, why)
                closed.append(run.info.run_id)
        return closed

    def _check_artifact_store(self, artifact_uri: str) -> None:
        """A local artifact store must be writable before anything is computed."""
        from mlflow.utils.file_utils import local_file_uri_to_path

        if artifact_uri.startswith("file:") or "://" not in artifact_uri:
            path = Path(local_file_uri_to_path(artifact_uri))
            reason = _unwritable(path)
            if reason:
                raise StorageError(
                    f"the artifact store of experiment '{self.experiment}' ({path}) cannot be "
                    f"written ({reason}); fix its permissions, or use another "
                    "tracking.experiment with a writable tracking.artifact_root"
                )

    def _remove_artifacts(self) -> None:
        """A failed run keeps no artifacts: nothing half-logged may look like a result."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            uri = self.client.get_run(self.run_id).info.artifact_uri
            get_artifact_repository(uri).delete_artifacts()
            self.client.set_tag(self.run_id, "tsssm.artifacts", "removed: the run did not finish")
        except Exception as err:  # best effort: the store may be what failed
            log.debug("could not remove the artifacts of run %s: %s", self.run_id, err)

    @contextmanager
    def start(self, name: str, command: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> Iterator[Tracker]:
        """One run for one command; FAILED on a raised error, KILLED on Ctrl-C."""
        from tsssm import __version__

        self.close_orphans()
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"tsssm.command": command, "tsssm.version": __version__,
                  "tsssm.process": _process_tag(), **(tags or {})},
        )
        self.run_id = run.info.run_id
        try:
            self._check_artifact_store(run.info.artifact_uri)
            self.log_params(params)
            yield self
        except KeyboardInterrupt:
            self._end_unfinished(RunStatus.KILLED, "interrupted")
            raise
        except BaseException as err:
            self._end_unfinished(RunStatus.FAILED, str(err)[:5000] or type(err).__name__)
            raise
        else:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def _end_unfinished(self, status: int, why: str) -> None:
        """Close a run that did not finish; its own failure (a dead store) must not hide the
        error that ended the command."""
        try:
            self._remove_artifacts()
            self.client.set_tag(self.run_id, "tsssm.error", why)
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        except Exception as err:
            log.warning("run %s could not be marked %s: %s", self.run_id,
                        RunStatus.to_string(status), str(err).splitlines()[0] if str(err) else err)

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

    def _newest_per_model(self, query: str) -> dict[str, str]:
        """{model name: newest run id} among the runs that match an MLflow search ``query``."""
        runs = self.client.search_runs([self.experiment_id], query,
                                       order_by=["attributes.start_time DESC"], max_results=500)
        found: dict[str, str] = {}
        for run in runs:
            found.setdefault(run.data.tags.get("tsssm.model", "?"), run.info.run_id)
        return found

    def latest_runs_per_model(self, command: str, data: str) -> dict[str, str]:
        """{model name: newest FINISHED run id} of ``command`` on dataset ``data``."""
        query = (f"tags.`tsssm.command` = '{command}' and attributes.status = 'FINISHED' "
                 f"and tags.`tsssm.data` = '{data}'")
        return self._newest_per_model(query)

    def child_runs(self, parent: str, command: str) -> dict[str, str]:
        """{model name: newest FINISHED run id} of ``command`` runs nested under ``parent``
        (tagged ``tsssm.parent``: an ensemble's members)."""
        query = (f"tags.`tsssm.command` = '{command}' and attributes.status = 'FINISHED' "
                 f"and tags.`tsssm.parent` = '{parent}'")
        return self._newest_per_model(query)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def copy_history(self, run_id: str, prefixes: tuple[str, ...], last_step: int) -> None:
        """Copy another run's per-epoch metric history (steps <= last_step) into this run, so a
        resumed training's run holds the whole learning curve."""
        from mlflow.entities import Metric

        source = self.client.get_run(run_id)
        items = []
        for key in source.data.metrics:
            if key.startswith(prefixes):
                items += [Metric(m.key, m.value, m.timestamp, m.step)
                          for m in self.client.get_metric_history(run_id, key)
                          if m.step <= last_step]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def download(self, run_id: str, folder: str, key: str = "model.run_id") -> Path:
        """Fetch a run's artifact folder into a temporary directory; ``key`` is the config key
        that named the run (for the error message)."""
        try:
            self.client.get_run(run_id)
        except Exception as err:
            raise ModelError(
                f"{key}: '{run_id}' is neither a bundle folder nor a run at {self.uri} "
                f"({str(err).splitlines()[0]})"
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
