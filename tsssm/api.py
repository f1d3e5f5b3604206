"""The Python API: the CLI's train, load, forecast and score, from Python.

    import tsssm
    m = tsssm.train(data="skab_sample", model="kalman", model__fit="em")  # = `tsssm train ...`
    m = tsssm.load("tsssm_runs/models/<run id>")                          # or an MLflow run id
    m.forecast(frame, horizon=24)   # polars: time, <channel>, std:<channel> (original units)
    m.score(frame)                  # polars: stream, time, score, flag, label, contrib:<channel>
    m.save("my_model")              # a bundle folder, as `tsssm train` writes

``train`` composes the same Hydra config as ``tsssm train`` (the same groups, keys, schema
checks and one-line errors) and runs the same command: one tracked MLflow run, the same
artifacts and the same model bundle. A :class:`Model` reads new data exactly as ``tsssm score``
reads a file (the model's own time column, channels, label column, separator, gap handling and
scaling), so its scores equal that command's. Errors a user can cause are
:class:`tsssm.errors.TsssmError` subclasses with one line naming the key, file or column.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from tsssm.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:  # the heavy imports happen on first use, so `import tsssm` stays fast
    import numpy as np
    import polars as pl
    from omegaconf import DictConfig

    from tsssm.bundle import Bundle
    from tsssm.data.datasets import Part
    from tsssm.data.scaling import StandardScaler

#: what data arguments accept: a CSV/Parquet path or a polars DataFrame
DataLike = Union[str, os.PathLike, "pl.DataFrame"]

#: the config groups train() takes as arguments (the others through keys or overrides)
_GROUPS = ("data", "model", "task", "trainer", "tracking", "experiment")
_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
#: a config key written as a Python keyword: model__net__d_model -> model.net.d_model
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: how a DataFrame argument is named in error messages instead of its temporary file
_FRAME = "the DataFrame"

log = logging.getLogger("tsssm")


# --------------------------------------------------------------------------- config


def override_value(value: Any) -> str:
    """A Python value in Hydra's override syntax: strings quoted (so ``"1"``, ``"true"``,
    ``";"`` stay strings), lists and mappings element by element, None as null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config values must be finite numbers; got {value}")
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise ConfigError(f"config value {value!r} of type {type(value).__name__} cannot be set; "
                      "use numbers, strings, booleans, None, lists or dicts")


def _key_overrides(keys: Mapping[str, Any]) -> list[str]:
    """``{"model__epochs": 3, "data.horizon": 8}`` -> ``["model.epochs=3", "data.horizon=8"]``."""
    out = []
    for name, value in keys.items():
        key = name.replace("__", ".")
        if not _KEY.match(key):
            raise ConfigError(f"{name!r} is not a config key; write keys as model__epochs=3 "
                              "or **{'model.epochs': 3}")
        out.append(f"{key}={override_value(value)}")
    return out


def _group_override(group: str, option: Any) -> str:
    from tsssm.cli import group_options

    options = group_options().get(group, [])
    if not isinstance(option, str) or option not in options:
        raise ConfigError(f"unknown option {option!r} for config group '{group}'; choose one "
                          f"of: {', '.join(options)}")
    return f"{group}={option}"


def _data_overrides(data: Any, keys: list[str], output_dir: Path) -> list[str]:
    """The overrides that make ``data`` the training data: a data config's name, a file
    (``data=csv data.path=...``) or a polars DataFrame (kept as a Parquet file under the
    output folder, named by its content, so the run's data.path stays valid and a resumed
    training finds the same data)."""
    import polars as pl

    from tsssm.cli import group_options

    if isinstance(data, pl.DataFrame):
        path = _keep_frame(data, output_dir / "frames")
        extra = []
        if not any(k.startswith("data.time_column=") for k in keys):
            extra = _guess_time_column(data)
        return ["data=csv", f"data.path={override_value(str(path))}", *extra]
    if isinstance(data, str | os.PathLike):
        text = os.fspath(data)
        if text in group_options().get("data", []):
            return [f"data={text}"]
        path = Path(text).expanduser()
        if path.suffix.lower() in _FILE_SUFFIXES or path.exists():
            shown = str(path.resolve()) if path.exists() else text
            return ["data=csv", f"data.path={override_value(shown)}"]
        raise ConfigError(f"data={text!r} is neither a data config (one of: "
                          f"{', '.join(group_options().get('data', []))}) nor a .csv/.parquet "
                          "file")
    raise ConfigError(f"data must be a data config name, a .csv/.parquet path or a polars "
                      f"DataFrame; got {type(data).__name__}")


def _guess_time_column(frame: pl.DataFrame) -> list[str]:
    """data.time_column for a DataFrame that has no 'timestamp' column but one temporal one."""
    if "timestamp" in frame.columns:
        return []
    temporal = [c for c, t in frame.schema.items() if t.is_temporal()]
    return [f"data.time_column={override_value(temporal[0])}"] if len(temporal) == 1 else []


def _keep_frame(frame: pl.DataFrame, folder: Path) -> Path:
    """Write ``frame`` as ``folder/<content hash>.parquet`` (atomically; reused if there)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".parquet", dir=folder, prefix=".frame-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        frame.write_parquet(tmp)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
        path = folder / f"{digest}.parquet"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def compose(data: DataLike | None = None, model: str | None = None, *, task: str | None = None,
            trainer: str | None = None, tracking: str | None = None,
            experiment: str | None = None, overrides: Sequence[str] = (),
            **keys: Any) -> DictConfig:
    """The validated config ``tsssm train`` would use for these arguments.

    Groups are chosen by name (``model="mamba"``), keys set as keywords with ``__`` for the
    dots (``model__epochs=3``, ``data__input_len=96``) or as Hydra ``overrides``
    (``["model.epochs=3"]``, applied last). ``data`` is a data config's name, a CSV/Parquet
    path (read as ``data=csv data.path=...``) or a polars DataFrame. Raises ConfigError with
    one line naming an unknown group option, key or bad value.
    """
    from tsssm.cli import compose as cli_compose

    return cli_compose(_overrides(data, model, task=task, trainer=trainer, tracking=tracking,
                                  experiment=experiment, overrides=overrides, **keys))


def _overrides(data: DataLike | None = None, model: str | None = None, *,
               task: str | None = None, trainer: str | None = None,
               tracking: str | None = None, experiment: str | None = None,
               overrides: Sequence[str] = (), **keys: Any) -> list[str]:
    """The command-line overrides of :func:`compose`'s arguments."""
    from tsssm.cli import _compose_unchecked

    key_args = _key_overrides(keys) + list(overrides)
    groups = {"model": model, "task": task, "trainer": trainer, "tracking": tracking,
              "experiment": experiment}
    chosen = [_group_override(g, o) for g, o in groups.items() if o is not None]
    if data is not None:
        # where a DataFrame is kept: the output folder of the config without the data
        output_dir = Path(_compose_unchecked(chosen + key_args).tracking.output_dir)
        chosen = _data_overrides(data, key_args, output_dir) + chosen
    return chosen + key_args


@contextlib.contextmanager
def _command_environment(verbose: bool) -> Iterator[None]:
    """The process state a CLI command runs in (denormals flushed, libraries' loggers quiet
    unless ``verbose``), restored afterwards with torch's thread count: the caller's session
    is left as it was."""
    import torch

    from tsssm.cli import _flush_denormals

    threads = torch.get_num_threads()
    quiet = {}
    if not verbose:
        import lightning  # noqa: F401 - it sets its loggers' levels on import; ours after

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                     "alembic", "mlflow"):
            quiet[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.WARNING)
    flushed = _flush_denormals()
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)
        torch.set_num_threads(threads)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def train(data: DataLike | None = None, model: str | None = None, *, task: str | None = None,
          trainer: str | None = None, tracking: str | None = None,
          experiment: str | None = None, overrides: Sequence[str] = (), verbose: bool = False,
          **keys: Any) -> Model:
    """Train a forecaster as ``tsssm train`` does and return it.

    The arguments compose the config as :func:`compose` says; the training is the CLI
    command itself: the same MLflow run (parameters, metrics, artifacts, the bundle published
    to ``<tracking.output_dir>/models/<run id>``), the same seed, the same summary printed.
    ``verbose``: show Lightning's and MLflow's log messages.

        m = tsssm.train(data="skab_sample", model="kalman", model__fit="em")
        m = tsssm.train(data=frame, data__channels=["flow"], model="mamba", model__epochs=5)
    """
    from tsssm.bundle import load_bundle
    from tsssm.cli import compose as cli_compose
    from tsssm.commands.train import train as train_command

    chosen = _overrides(data, model, task=task, trainer=trainer, tracking=tracking,
                        experiment=experiment, overrides=overrides, **keys)
    cfg = cli_compose(chosen)
    with _command_environment(verbose):
        run_id = train_command(cfg, chosen)
    folder = Path(cfg.tracking.output_dir) / "models" / run_id
    return Model(load_bundle(folder), run_id=run_id, source=str(folder))


def load(source: str | os.PathLike, *, tracking: str | None = None,
         overrides: Sequence[str] = (), **keys: Any) -> Model:
    """A trained model from a bundle folder (``tsssm_runs/models/<run id>``, or a folder that
    :meth:`Model.save` wrote) or an MLflow train run id (its published bundle in
    ``tracking.output_dir``, else its logged ``model`` artifact from the tracking store chosen by
    ``tracking``/keys, e.g. ``tracking__uri="http://host:5000"``). Nothing is unpickled."""
    from tsssm.bundle import load_bundle

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return Model(load_bundle(path), source=str(path))
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise ModelError(f"{text}: no such bundle folder, and not an MLflow run id (32 hex "
                         "digits); give tsssm_runs/models/<run id> or a run id")
    from tsssm.commands.common import load_trained
    from tsssm.tracking import Tracker

    chosen = [_group_override("tracking", tracking)] if tracking is not None else []
    cfg = compose(overrides=[*chosen, *_key_overrides(keys), *overrides])
    published = Path(cfg.tracking.output_dir) / "models" / text
    if published.exists():
        return Model(load_bundle(published), run_id=text, source=str(published))
    bundle, run_id = load_trained(text, Tracker.from_config(cfg.tracking), key="source")
    return Model(bundle, run_id=run_id, source=f"run {text}")


# --------------------------------------------------------------------------- the model


class Model:
    """A trained forecaster with its scaling and fitted anomaly threshold (a model bundle).

    Made by :func:`train` or :func:`load`. ``forecast``, ``one_step`` and ``score`` take a
    polars DataFrame or a CSV/Parquet path laid out like the training data (the same time
    column and channel columns; ``channels=[...]`` maps differently named columns onto the
    model's channels, in order) and return polars DataFrames in the data's original units.
    """

    def __init__(self, bundle: Bundle, *, run_id: str | None = None,
                 source: str | None = None) -> None:
        self.bundle = bundle
        #: the MLflow run that trained it (None for a bundle loaded from a folder)
        self.run_id = run_id
        self.source = source or "the model"

    def __repr__(self) -> str:
        run = f", run_id={self.run_id!r}" if self.run_id else ""
        return f"tsssm.Model({self.model_name!r}, channels={self.channels}{run})"

    # ---- what it is

    @property
    def model_name(self) -> str:
        """The model config it was trained with (``kalman``, ``mamba``, ...)."""
        return self.bundle.model_name

    @property
    def channels(self) -> list[str]:
        """The channels it forecasts, in order."""
        return list(self.bundle.channels)

    @property
    def inputs(self) -> list[str]:
        """The input columns (``data.inputs``) it was trained with."""
        return list(self.bundle.inputs)

    @property
    def time_column(self) -> str:
        """The time column of the data it reads."""
        return str(self.bundle.data_config.get("time_column", "timestamp"))

    @property
    def threshold(self) -> float | None:
        """The fitted anomaly threshold on the score scale (None if none was fitted)."""
        return None if self.bundle.threshold is None else self.bundle.threshold.value

    @property
    def scaler(self) -> StandardScaler:
        """The training scaler (``transform`` / ``inverse_transform``)."""
        return self.bundle.scaler

    @property
    def input_len(self) -> int:
        """The context a forecast sees by default (``data.input_len`` in training)."""
        return int(self.bundle.data_config.get("input_len", 1))

    @property
    def horizon(self) -> int:
        """The horizon it was trained and evaluated for (``data.horizon``)."""
        return int(self.bundle.data_config.get("horizon", 1))

    # ---- reading data as `tsssm score` does

    def _read(self, data: DataLike, channels: Sequence[str] | None, name: str | None) -> Part:
        """``data`` read, validated, regularised and scaled as ``tsssm score`` reads a file:
        the model's reading config with ``data.path`` set; -> the stream's one Part."""
        import polars as pl
        from omegaconf import OmegaConf

        from tsssm.commands.score import load_file, with_training_preprocessing

        cfg = OmegaConf.create(dict(self.bundle.data_config))
        cfg.channels = list(channels or [])
        cfg = with_training_preprocessing(cfg, self.bundle)
        with contextlib.ExitStack() as stack:
            if isinstance(data, pl.DataFrame):
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tsssm-")))
                path = folder / "frame.parquet"
                data.write_parquet(path)
                default_name = "frame"
            elif isinstance(data, str | os.PathLike):
                path = Path(os.fspath(data)).expanduser()
                default_name = None
            else:
                raise DataError(f"data must be a polars DataFrame or a .csv/.parquet path; got "
                                f"{type(data).__name__}")
            cfg.path = str(path)
            try:
                prepared = load_file(cfg, self.bundle, self.source)
            except DataError as err:
                if default_name is None:
                    raise
                # name the caller's DataFrame, not the temporary file it went through
                raise type(err)(str(err).replace(str(path), _FRAME)) from err
        part = prepared.parts[0]
        if name or default_name:
            part.stream.name = name or default_name
        return part

    # ---- predictions

    def one_step(self, data: DataLike, *, channels: Sequence[str] | None = None
                 ) -> pl.DataFrame:
        """The one-step-ahead forecast of every row of ``data`` (each from all rows before
        it), as ``tsssm train`` logs them (``forecasts/test_one_step.parquet``), in original
        units: the time column, then per channel ``<channel>`` (the mean) and
        ``std:<channel>``."""
        import numpy as np

        part = self._read(data, channels, None)
        pred = self._predict(part)
        mean = part.scaler.inverse_transform(pred.mean)
        std = part.scaler.inverse_std(np.sqrt(pred.var))
        return self._wide(part.stream.time, mean, std, None)

    def forecast(self, data: DataLike, horizon: int | None = None, *,
                 quantiles: Sequence[float] | None = None, context: int | None = None,
                 channels: Sequence[str] | None = None, adapt: int = 0,
                 adapt_rate: float = 0.005) -> pl.DataFrame:
        """Forecast the ``horizon`` steps after the last row of ``data`` (default: the
        model's training horizon), in original units.

        The forecast sees the last ``context`` rows (default ``data.input_len`` of training,
        as the horizon metrics of ``tsssm train`` do; fewer if ``data`` is shorter). Returns
        one row per step: the time column (the last time plus the median step), then per
        channel ``<channel>`` (the predictive mean) and ``std:<channel>``, or with
        ``quantiles=[0.05, 0.95]`` the Gaussian's quantiles ``q0.05:<channel>`` instead of the
        std. A model with inputs (``data.inputs``) holds the last input over the horizon.

        ``adapt=N``: first forecast from each of the last N origins of ``data`` whose
        forecast lies inside it, and let the band follow how those forecasts did (the
        adaptive band of ``task.adaptive_calibration``, step ``adapt_rate``; see
        tsssm.tasks.adaptive_calibration): the std columns then carry each lead time's
        adapted factor, as ``tsssm train``'s adaptive test metrics do. 0: the fitted band.
        """
        import numpy as np
        import torch

        from tsssm.models.base import Exog, call_forecast, uses_exog
        from tsssm.tasks.evaluate import _device_of

        horizon = self.horizon if horizon is None else horizon
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ConfigError(f"horizon must be a positive integer; got {horizon!r}")
        levels = _check_quantiles(quantiles)
        context = self.input_len if context is None else context
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ConfigError(f"context must be a positive number of rows; got {context!r}")
        if not isinstance(adapt, int) or isinstance(adapt, bool) or adapt < 0:
            raise ConfigError(f"adapt must be a number of forecast origins >= 0; got {adapt!r}")
        part = self._read(data, channels, None)
        factor = self._adapted_factor(part, context, horizon, adapt, adapt_rate) if adapt \
            else None
        values = part.stream.values[-context:]  # (L, C)
        device = _device_of(self.bundle.model)
        ctx = torch.from_numpy(np.ascontiguousarray(values)).float().unsqueeze(0).to(device)
        exog = None
        if uses_exog(self.bundle.model):
            u, dt = part.exog(len(part.stream) - len(values))
            exog = Exog(None if u is None else torch.from_numpy(u).float()[None].to(device),
                        None if dt is None else torch.from_numpy(dt).double()[None].to(device))
        with torch.no_grad():
            pred = call_forecast(self.bundle.model, ctx, horizon, None, exog)
        mean = part.scaler.inverse_transform(pred.mean[0].float().cpu().numpy())  # (H, C)
        var = pred.var[0].double().cpu().numpy()  # (H, C)
        if factor is not None:
            var = var * factor[:, None]
        std = part.scaler.inverse_std(np.sqrt(var))
        return self._wide(_future_times(part.stream.time, horizon), mean, std, levels)

    def _adapted_factor(self, part: Part, context: int, horizon: int, adapt: int,
                        rate: float):
        """(H,) the adaptive band's variance factor per lead after the forecasts from the last
        ``adapt`` origins of ``part`` whose targets it holds (scaled units)."""
        from tsssm.tasks.adaptive_calibration import AdaptiveCalibration
        from tsssm.tasks.evaluate import forecast_origin_rows, horizon_metrics

        n = len(part.stream)
        origins = forecast_origin_rows((0, n), context, horizon, 1)[-adapt:]
        if len(origins) == 0:
            raise DataError(f"adapt={adapt}: the data has {n} rows, too few for one "
                            f"{context}-row context and its {horizon}-row forecast; pass more "
                            "rows or adapt=0")
        try:
            calibration = AdaptiveCalibration(horizon, rate)
        except ValueError as err:
            raise ConfigError(f"adapt_rate: {err}") from None
        # the evaluation's own loop over those origins, run for the calibration it moves
        horizon_metrics(self.bundle.model, [(part.stream.values, (int(origins[0]), n),
                                             part.exog())], context, horizon, 1,
                        adaptive=[calibration])
        return calibration.factors_at(n)  # for the forecast from just after the last row

    def _predict(self, part: Part, chunk_size: int = 100_000):
        from tsssm.anomaly.scores import ScoreSpec
        from tsssm.tasks.evaluate import predict_stream

        spec = ScoreSpec.from_dict(self.bundle.score, self.bundle.score_kind)
        return predict_stream(self.bundle.model, part.stream.values, spec, chunk_size,
                              exog=part.exog())

    def _wide(self, time: np.ndarray, mean: np.ndarray, std: np.ndarray,
              levels: list[float] | None) -> pl.DataFrame:
        """Time column + per channel the mean and its std or quantile columns."""
        import polars as pl

        columns: dict[str, Any] = {self.time_column: time}
        for j, ch in enumerate(self.channels):
            columns[ch] = mean[:, j]
            if levels is None:
                columns[f"std:{ch}"] = std[:, j]
            else:
                from statistics import NormalDist

                for q in levels:
                    columns[f"q{q:g}:{ch}"] = mean[:, j] + NormalDist().inv_cdf(q) * std[:, j]
        return pl.DataFrame(columns)

    def score(self, data: DataLike, *, channels: Sequence[str] | None = None,
              name: str | None = None, chunk_size: int = 100_000) -> pl.DataFrame:
        """Per-row anomaly scores of ``data`` with the model's fitted threshold, as ``tsssm
        score`` writes them: ``stream`` (``name``, else the file's stem, or "frame"),
        ``time``, ``score``, ``flag``, ``label`` (when the data has the model's label column),
        then ``contrib:<channel>`` per channel: its additive share of the score (a row's
        shares sum to its score)."""
        from tsssm.commands.common import stream_frame
        from tsssm.commands.score import stream_threshold

        if self.bundle.threshold is None:
            raise ModelError(f"the model from {self.source} has no fitted threshold")
        from tsssm.anomaly.scores import ScoreSpec
        from tsssm.tasks.evaluate import flag_stream

        part = self._read(data, channels, name)
        # as `tsssm score`: the bundle's threshold, or (per-stream scope) its rule refitted on
        # this stream's own first training rows (and the re-anchored score around it, if the
        # bundle's task.window.reanchor is on)
        train_rows = int(self.bundle.data_config.get("train_rows", 0))
        pred, threshold = flag_stream(
            self.bundle.model, part.stream.values,
            ScoreSpec.from_dict(self.bundle.score, self.bundle.score_kind),
            lambda s: stream_threshold(self.bundle, s, train_rows, part.stream.name),
            chunk_size, exog=part.exog())
        flags = threshold.flags(pred.score)
        return stream_frame(part, pred, flags, (0, len(part.stream)), threshold)

    # ---- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a bundle folder (``model.safetensors`` + ``meta.json``, as
        ``tsssm train`` publishes it; replaces ``path`` if it is a bundle). ``tsssm.load(path)``
        and ``tsssm score model.checkpoint=path`` read it. Returns the folder."""
        from tsssm.bundle import META, save_bundle

        folder = Path(os.fspath(path)).expanduser()
        if folder.exists() and not (folder / META).exists() and (
                folder.is_file() or any(folder.iterdir())):
            raise ModelError(f"{folder} exists and is not a tsssm bundle; choose a new folder "
                             "(save never replaces other files)")
        return save_bundle(self.bundle, folder)


def _check_quantiles(quantiles: Sequence[float] | None) -> list[float] | None:
    if quantiles is None:
        return None
    levels = [float(q) for q in quantiles]
    bad = [q for q in levels if not 0.0 < q < 1.0]
    if bad or not levels:
        raise ConfigError(f"quantiles must lie strictly between 0 and 1; got {list(quantiles)}")
    return levels


def _future_times(time: np.ndarray, horizon: int) -> np.ndarray:
    """The ``horizon`` times after the last of ``time`` (T,), spaced by its median step."""
    import numpy as np

    if len(time) < 2:
        step = np.ones((), dtype=np.int64) if not np.issubdtype(time.dtype, np.datetime64) \
            else np.timedelta64(1, "s")
    else:
        step = np.median(np.diff(time).astype(np.int64)).astype(np.int64)
        if np.issubdtype(time.dtype, np.datetime64):
            step = step.astype(f"timedelta64[{np.datetime_data(time.dtype)[0]}]")
    return time[-1] + step * np.arange(1, horizon + 1)
