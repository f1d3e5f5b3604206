"""Datasets named by ``data._target_``: read streams, regularise gaps, split, fit the scaler.

``load()`` returns :class:`PreparedData`: every stream normalised with a scaler fitted on the
training rows only, and each stream's split ranges.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tsssm.config import option_value
from tsssm.data.io import ReadSpec, Stream, forward_fill, read_stream, regularise, time_steps
from tsssm.data.scaling import StandardScaler
from tsssm.data.splits import Split, ett_split, fraction_split, skab_split
from tsssm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: the repository root (where the bundled data/ lives in a source checkout)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | None, key: str) -> Path:
    """A relative path resolves against the working directory, then the tsssm checkout."""
    if not path:
        raise ConfigError(f"config key '{key}' must be set (e.g. {key}=/path/to/data)")
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    bundled = _PROJECT_ROOT / p
    if bundled.exists():
        return bundled
    raise DataError(f"{key}={path}: no such file or directory (from {Path.cwd()})")


def fetch_hint(root: Path) -> str:
    """Advice for a dataset folder that lacks its files: fetch it, or point data.root at it."""
    from tsssm.data.fetch import SOURCES, data_home

    try:
        name = root.resolve().relative_to(data_home().resolve()).parts[0]
    except (ValueError, IndexError):
        return ""
    if name not in SOURCES:
        return ""
    return f"; fetch the dataset with `tsssm data fetch {name}`, or set data.root=<its folder>"


@dataclass
class Part:
    """One stream and its split ranges; ``values`` are normalised."""

    stream: Stream
    split: Split | None  # None: extra training data, all of it trains
    scaler: StandardScaler | None = None  # the scaler applied to this stream
    input_scaler: StandardScaler | None = None  # the scaler applied to its inputs
    #: (T,) time since the previous row (real steps with data.gaps=time, else the median)
    dt: np.ndarray | None = None

    def rows(self, name: str) -> tuple[int, int]:
        if self.split is None:
            return (0, len(self.stream)) if name == "train" else (0, 0)
        return getattr(self.split, name)

    def scaling_rows(self, train_rows: int) -> int:
        """How many first rows a per-stream scaler of this stream is fitted on. A stream with a
        test split: its first ``train_rows`` (data.train_rows; SKAB's protocol, and exactly the
        rows `tsssm score` fits on a file it scores), never reaching into the test split (a
        fraction split with fewer rows before it fits on those). An extra training file (no
        split, nothing of it is tested): all its rows, so that the normal recording the model
        learns from is centred on its own operating point."""
        if self.split is None:
            return len(self.stream)
        return min(int(train_rows), self.pre_test_rows())

    def pre_test_rows(self) -> int:
        """Number of rows before the test split (training + validation; all of an extra file)."""
        if self.split is None:
            return len(self.stream)
        return self.split.test[0]

    def exog(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray | None,
                                                                     np.ndarray | None]:
        """(inputs (n, K) or None, dt (n,) or None) of rows start:stop."""
        u = None if self.stream.inputs is None else self.stream.inputs[start:stop]
        dt = None if self.dt is None else self.dt[start:stop]
        return u, dt


@dataclass
class PreparedData:
    name: str
    channels: list[str]
    parts: list[Part]
    scaler: StandardScaler
    has_labels: bool
    gap_notes: list[str] = field(default_factory=list)
    #: input columns (data.inputs) and their pooled training scaler
    inputs: list[str] = field(default_factory=list)
    input_scaler: StandardScaler | None = None

    def padded(self, name: str) -> torch.Tensor:
        """Every stream's rows of one split, NaN-padded to the longest.  -> (B, T, C)"""
        arrays = self.split_arrays(name)
        longest = max(len(a) for a in arrays)
        y = torch.full((len(arrays), longest, len(self.channels)), float("nan"))
        for i, a in enumerate(arrays):
            y[i, : len(a)] = torch.from_numpy(a)
        return y

    def split_arrays(self, name: str) -> list[np.ndarray]:
        """The rows of every stream in one split.  -> [(T_i, C)]"""
        out = []
        for part in self.parts:
            start, stop = part.rows(name)
            if stop > start:
                out.append(part.stream.values[start:stop])
        return out

    def with_time_steps(self, real: bool) -> PreparedData:
        """The same data with real time steps (as data.gaps=time gives) or the median step
        everywhere (keep): the rows are identical, so models trained either way compare on
        one load. (After mask/fill the inserted rows make every step the median anyway.)"""
        parts = [dataclasses.replace(p, dt=time_steps(p.stream.time, real)) for p in self.parts]
        return dataclasses.replace(self, parts=parts)

    def labelled_rows(self, name: str) -> int:
        """How many rows of one split are labelled as anomalies (0 without labels)."""
        total = 0
        for part in self.parts:
            start, stop = part.rows(name)
            if part.stream.labels is not None and stop > start:
                total += int(part.stream.labels[start:stop].sum())
        return total

    def without_labelled(self, names: tuple[str, ...] = ("train", "val")) -> PreparedData:
        """The same data with the labelled anomaly rows of these splits set missing (NaN in
        every channel), for fitting a model on normal rows only; the other rows, the labels
        and the scalers are unchanged."""
        parts = []
        for part in self.parts:
            labels = part.stream.labels
            if labels is None:
                parts.append(part)
                continue
            hide = np.zeros(len(labels), dtype=bool)
            for name in names:
                start, stop = part.rows(name)
                hide[start:stop] = labels[start:stop] == 1
            if not hide.any():
                parts.append(part)
                continue
            values = part.stream.values.copy()
            values[hide] = np.nan
            stream = dataclasses.replace(part.stream, values=values)
            parts.append(dataclasses.replace(part, stream=stream))
        return dataclasses.replace(self, parts=parts)

    def padded_exog(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inputs (B, T, K) and steps (B, T) aligned with :meth:`padded` (padding repeats each
        stream's last input and median step; the padded rows of y are NaN)."""
        rows = [(p, p.rows(name)) for p in self.parts if p.rows(name)[1] > p.rows(name)[0]]
        longest = max(b - a for _, (a, b) in rows)
        us, dts = [], []
        for p, (a, b) in rows:
            u, dt = p.exog(a, b)
            pad = longest - (b - a)
            if u is not None:
                us.append(np.concatenate([u, np.repeat(u[-1:], pad, 0)]))
            if dt is not None:
                dts.append(np.concatenate([dt, np.full(pad, np.median(dt))]))
        u = torch.from_numpy(np.stack(us)) if us else None
        dt = torch.from_numpy(np.stack(dts)) if dts else None
        return u, dt


def read_spec(cfg) -> ReadSpec:
    return ReadSpec(
        time_column=cfg.time_column,
        channels=tuple(cfg.channels),
        label_column=cfg.label_column,
        changepoint_column=cfg.get("changepoint_column"),
        ignore_columns=tuple(cfg.ignore_columns),
        separator=cfg.separator,
        time_format=cfg.time_format,
        duplicates=option_value(cfg.get("duplicates", "error")),
        sort=bool(cfg.get("sort", False)),
        inputs=tuple(cfg.get("inputs") or ()),
    )


def prepare_stream(path: Path, cfg, name: str | None = None,
                   channels: list[str] | None = None, label_required: bool = False,
                   channel_advice: str | None = None) -> tuple[Stream, str | None]:
    """Read, check channels and regularise one file as the config says. ``label_required``:
    a configured data.label_column must be in the file (training files; SKAB's extra
    anomaly-free file and files to score may have none)."""
    spec = read_spec(cfg)
    changes: dict = {"label_required": label_required}
    if channels is not None:
        changes["channels"] = tuple(channels)
    if channel_advice is not None:
        changes["channel_advice"] = channel_advice
    spec = ReadSpec(**{**spec.__dict__, **changes})
    stream = read_stream(path, spec, name=name)
    stream, gaps = regularise(stream, option_value(cfg.gaps), cfg.gap_factor)
    note = None
    if gaps.n_gaps:
        note = (f"{stream.name}: {gaps.n_gaps} gaps longer than {cfg.gap_factor:g}x the median step"
                f" (longest {gaps.longest / max(gaps.median_step, 1):.0f} steps); data.gaps="
                f"{option_value(cfg.gaps)}, {gaps.rows_inserted} rows inserted")
        log.info(note)
    fill = option_value(cfg.fill)
    if fill == "forward":
        stream.values = forward_fill(stream.values)
    elif fill == "zero":
        stream.values = np.nan_to_num(stream.values, nan=0.0)
    return stream, note


def check_scaled(stream: Stream, raw: np.ndarray, scaler: StandardScaler) -> None:
    """Scaled values must stay finite in float32 (a reading far outside the training rows'
    range can overflow); name the file, row and column where one does not.  raw (T, C)"""
    inf = np.isinf(stream.values)
    if inf.any():
        row, col = (int(i[0]) for i in np.nonzero(inf))
        raise DataError(
            f"{stream.path}: column '{stream.channels[col]}' row {row + 1} holds "
            f"{raw[row, col]:g}, which overflows float32 once scaled by the training rows "
            f"(mean {scaler.mean[col]:g}, std {scaler.std[col]:g}); blank or fix the reading, "
            "or leave the column out of data.channels"
        )


class BaseDataset:
    """Reads the files a config names and splits them by the dataset's protocol."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def files(self) -> list[tuple[Path, str]]:
        raise NotImplementedError

    def extra_train_files(self) -> list[tuple[Path, str]]:
        return []

    def split(self, stream: Stream) -> Split:
        raise NotImplementedError

    def load(self, scaler: StandardScaler | None = None,
             input_scaler: StandardScaler | None = None) -> PreparedData:
        """Read, split and normalise. ``scaler``, ``input_scaler``: pooled scalers of the
        channels and inputs fitted earlier (a trained model's), used instead of fitting them."""
        cfg = self.cfg
        parts: list[Part] = []
        notes: list[str] = []
        channels: list[str] | None = list(cfg.channels) or None
        for extra, listing in ((False, self.files()), (True, self.extra_train_files())):
            for path, name in listing:
                stream, note = prepare_stream(path, cfg, name, channels,
                                              label_required=not extra)
                if channels is None:
                    channels = stream.channels
                if note:
                    notes.append(note)
                parts.append(Part(stream, None if extra else self.split(stream)))
        if not parts:
            raise DataError(f"data={cfg.name}: no files to read (check data.root and data.files)")
        self._check_lengths(parts)
        train = [p.stream.values[slice(*p.rows("train"))] for p in parts]
        scaler = scaler or StandardScaler.fit(train, channels)
        per_stream = option_value(cfg.scaler) == "per_stream"
        for p in parts:
            # per_stream (SKAB's protocol): each tested file is scaled by its own first
            # data.train_rows rows (SKAB's first 400: training and validation rows), exactly the
            # rows `tsssm score` fits a file's scaler on; an extra training file by all its rows
            p.scaler = (StandardScaler.fit([p.stream.values[: p.scaling_rows(cfg.train_rows)]],
                                           channels) if per_stream else scaler)
            raw = p.stream.values
            with np.errstate(over="ignore"):
                p.stream.values = p.scaler.transform(raw)
            check_scaled(p.stream, raw, p.scaler)
        inputs = list(cfg.get("inputs") or [])
        input_scaler = self._scale_inputs(parts, inputs, input_scaler, per_stream,
                                          cfg.train_rows)
        real = option_value(cfg.gaps) == "time"
        for p in parts:
            p.dt = time_steps(p.stream.time, real)
        has_labels = any(p.stream.labels is not None for p in parts if p.split is not None)
        return PreparedData(cfg.name, channels, parts, scaler, has_labels, notes, inputs,
                            input_scaler)

    @staticmethod
    def _scale_inputs(parts: list[Part], inputs: list[str], scaler: StandardScaler | None,
                      per_stream: bool, train_rows: int) -> StandardScaler | None:
        """Standardise the input columns as the channels are (pooled on the training rows, or
        per stream on the same first rows as the channels)."""
        if not inputs:
            return None
        train = [p.stream.inputs[slice(*p.rows("train"))] for p in parts]
        scaler = scaler or StandardScaler.fit(train, inputs)
        for p in parts:
            p.input_scaler = (StandardScaler.fit([p.stream.inputs[: p.scaling_rows(train_rows)]],
                                                 inputs) if per_stream else scaler)
            raw = p.stream.inputs
            with np.errstate(over="ignore"):
                p.stream.inputs = p.input_scaler.transform(raw)
            if np.isinf(p.stream.inputs).any():
                row, col = (int(i[0]) for i in np.nonzero(np.isinf(p.stream.inputs)))
                raise DataError(
                    f"{p.stream.path}: input column '{inputs[col]}' row {row + 1} holds "
                    f"{raw[row, col]:g}, which overflows float32 once scaled by the training "
                    "rows; fix the reading or leave the column out of data.inputs")
        return scaler

    def _check_lengths(self, parts: list[Part]) -> None:
        window = self.cfg.input_len + self.cfg.horizon
        for p in parts:
            start, stop = p.rows("train")
            if stop - start < window:
                raise DataError(
                    f"{p.stream.path}: the training part has {stop - start} rows, fewer than "
                    f"one window of data.input_len + data.horizon = {self.cfg.input_len} + "
                    f"{self.cfg.horizon}; lower data.input_len or data.horizon, or give a longer "
                    "series"
                )


class SKABDataset(BaseDataset):
    """SKAB: one fault experiment per file; first ``train_rows`` rows train, rest test."""

    def _glob(self, patterns: list[str]) -> list[tuple[Path, str]]:
        root = resolve_path(self.cfg.root, "data.root")
        out = []
        for pattern in patterns:
            matches = sorted(glob.glob(str(root / pattern)), key=_natural_key)
            if not matches:
                raise DataError(f"data.files: '{pattern}' matches no file under {root}"
                                f"{fetch_hint(root)}")
            for m in matches:
                rel = Path(m).relative_to(root)
                out.append((Path(m), str(rel.with_suffix(""))))
        return out

    def files(self) -> list[tuple[Path, str]]:
        return self._glob(list(self.cfg.files))

    def extra_train_files(self) -> list[tuple[Path, str]]:
        return self._glob(list(self.cfg.extra_train_files))

    def split(self, stream: Stream) -> Split:
        return skab_split(len(stream), self.cfg.train_rows, self.cfg.val_fraction, stream.path)


class ETTDataset(SKABDataset):
    """ETT: one file, Informer's 12/4/4-month split."""

    def split(self, stream: Stream) -> Split:
        return ett_split(len(stream), self.cfg.rows_per_hour, stream.path)


class TableDataset(BaseDataset):
    """Any CSV/Parquet file named by ``data.path``, split by fractions in time order."""

    def files(self) -> list[tuple[Path, str]]:
        path = resolve_path(self.cfg.path, "data.path")
        return [(path, path.stem)]

    def split(self, stream: Stream) -> Split:
        if self.cfg.protocol == "skab":
            return skab_split(len(stream), self.cfg.train_rows, self.cfg.val_fraction, stream.path)
        return fraction_split(len(stream), self.cfg.train_fraction, self.cfg.val_fraction,
                              stream.path)


def _natural_key(s: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def build_dataset(cfg) -> BaseDataset:
    """Instantiate the dataset class named by ``cfg._target_``."""
    from hydra.utils import get_class

    try:
        cls = get_class(cfg._target_)
    except Exception as err:
        raise DataError(f"data._target_={cfg._target_} is not a tsssm dataset class") from err
    return cls(cfg)
