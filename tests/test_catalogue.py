"""The bad-input and fault catalogue (issue 11), as data: each case is one line of input, command,
expected exit code, words the message must contain, the MLflow run status and what may be left.

Every case runs the CLI in-process (``tsssm.cli.main``) in a folder of its own, with its own
MLflow experiment in the session's store, and then checks the guarantees every failure owes the
user: exactly one ``error:`` line (no traceback) holding the case's words, the exit code, the
run's status, and nothing that looks like a result left behind (no bundle in ``models/``, no
staged or temporary files, no scores file, no artifacts on a run that did not finish).

Real signals (SIGTERM, SIGINT, SIGKILL) and concurrent processes are in test_interrupts.py.
To add a case, add one line to CASES (and, if it needs one, a file maker or a setup function).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from tsssm.cli import main

N_ROWS = 300


# -- input files ---------------------------------------------------------------------------------
def rows(n: int = N_ROWS, seed: int = 0) -> list[str]:
    """A small labelled 2-channel stream: integer time, channels a and b, label."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    a = np.sin(t / 10) + 0.1 * rng.standard_normal(n)
    b = np.cos(t / 7) + 0.1 * rng.standard_normal(n)
    label = ((t >= 250) & (t < 260)).astype(int)
    return [f"{i},{x:.5f},{y:.5f},{k}" for i, x, y, k in zip(t, a, b, label)]


def csv(header: str = "ts,a,b,label", edit: dict[int, str] | None = None, n: int = N_ROWS,
        sep: str = ",", drop: tuple[int, ...] = ()) -> str:
    body = rows(n)
    for i, line in (edit or {}).items():
        body[i] = line
    body = [r for i, r in enumerate(body) if i not in drop]
    return sep.join(header.split(",")) + "\n" + "\n".join(r.replace(",", sep) for r in body) + "\n"


def renamed(header: str) -> str:
    return csv(header=header)


def wide() -> str:
    """Five channels p..t, named unlike any model's."""
    body = [f"{r.rsplit(',', 1)[0]},{r.split(',')[1]},{r.split(',')[2]},0.5" for r in rows()]
    return "ts,p,q,r,s,t\n" + "\n".join(body) + "\n"


def timestamps(kind: str) -> str:
    """CSV files with real timestamps: mixed formats, a repeated daylight-saving hour, a few
    rows out of order."""
    start = np.datetime64("2020-10-25T00:00:00")
    times = [str(start + np.timedelta64(10 * i, "m")).replace("T", " ") for i in range(N_ROWS)]
    if kind == "mixed":
        times[137] = "10/25/2020 22:50:00"
    elif kind == "dst":  # 02:00-02:50 happens twice (clocks go back at 03:00)
        repeat = [t for t in times if " 02:" in t][:6]
        at = times.index(repeat[-1]) + 7
        times = times[:at] + repeat + times[at:]
        times = times[:N_ROWS + 6]
    elif kind == "unsorted":
        times[50], times[51] = times[51], times[50]
        times[120], times[122] = times[122], times[120]
    body = [f"{t},{r.split(',', 1)[1]}" for t, r in zip(times, rows(len(times)))]
    return "ts,a,b,label\n" + "\n".join(body) + "\n"


def parquet_bytes(corrupt: bool, d: Path) -> bytes:
    """The sample stream as Parquet; ``corrupt``: one byte of a data page overwritten so that a
    value leaves the range the file's footer records (what a careful reader can detect)."""
    frame = pl.read_csv(csv().encode(), schema_overrides={"label": pl.Int64})
    path = d / "clean.parquet"
    frame.write_parquet(path, compression="uncompressed")
    raw = bytearray(path.read_bytes())
    path.unlink()
    if not corrupt:
        return bytes(raw)
    column = np.asarray(frame["a"], dtype=np.float64).tobytes()
    at = bytes(raw).find(column[8 * 40 : 8 * 40 + 8])  # the 41st value of column a
    assert at > 0
    raw[at + 7] = 0x7F  # its sign and exponent: the value becomes ~1e308, far out of range
    raw[at + 6] = (raw[at + 6] & 0x0F) | 0xE0
    return bytes(raw)


# -- setups needing more than a file ---------------------------------------------------------
def _copy_bundle(d: Path, bundle: Path) -> Path:
    target = d / "bundle"
    shutil.copytree(bundle, target)
    return target


def truncated_bundle(d: Path, ctx) -> None:
    weights = _copy_bundle(d, ctx.bundle2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def future_bundle(d: Path, ctx) -> None:
    meta = _copy_bundle(d, ctx.bundle2) / "meta.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "format": 99, "tsssm_version": "9.0.0"}))


def per_stream_bundle_without_rows(d: Path, ctx) -> None:
    """The Mamba bundle with per-stream thresholds (refitted on each stream's first
    data.train_rows rows) but no data.train_rows (as a bundle written by hand)."""
    meta = _copy_bundle(d, ctx.bundle2) / "meta.json"
    doc = json.loads(meta.read_text())
    doc["data_config"].pop("train_rows", None)
    meta.write_text(json.dumps({**doc, "threshold_scope": "per_stream"}))


def hostile_bundle(d: Path, ctx) -> None:
    meta = _copy_bundle(d, ctx.bundle2) / "meta.json"
    doc = json.loads(meta.read_text())
    doc["net_config"] = {"_target_": "os.system", "command": "touch pwned"}
    meta.write_text(json.dumps(doc))


def pickled_bundle(d: Path, ctx) -> None:
    """A format-1 bundle whose model.pt holds a pickled object: torch.load(weights_only=True)
    refuses it instead of running it."""
    import torch

    target = _copy_bundle(d, ctx.bundle2)
    doc = json.loads((target / "meta.json").read_text())
    net_config = doc.pop("net_config")
    (target / "meta.json").write_text(json.dumps({**doc, "format": 1}))
    (target / "model.safetensors").unlink()
    torch.save({"state_dict": {}, "net_config": net_config, "payload": _Payload()},
               target / "model.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def truncated_checkpoint(d: Path, ctx) -> None:
    folder = d / "ckpt"
    shutil.copytree(ctx.ckpt.parent, folder)
    ckpt = folder / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-200])


def foreign_checkpoint(d: Path, ctx) -> None:
    (d / "ckpt").mkdir()
    shutil.copy(ctx.ckpt, d / "ckpt" / "last.ckpt")  # no fingerprint.json beside it


def unwritable_artifact_store(d: Path, ctx) -> None:
    """An existing experiment whose artifact store (under /proc) cannot be written, even by
    root."""
    MlflowClient(ctx.db).create_experiment(f"{d.name}-x", artifact_location="file:///proc/tsssm")


# -- faults injected in-process --------------------------------------------------------------
def interrupt_in_epoch_1(monkeypatch) -> None:
    """Ctrl-C arriving inside Lightning's loop (which turns it into sys.exit(1))."""
    from tsssm.tasks.forecast import ForecastTask

    original = ForecastTask.training_step

    def step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ForecastTask, "training_step", step)


def _half_then_full(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(target))


def artifact_store_fills_up(monkeypatch) -> None:
    """The artifact store runs out of space while a run logs its files: a truncated file lands."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def log_artifacts(self, local_dir, artifact_path=None):
        first = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())[0]
        dest = Path(self.artifact_dir) / (artifact_path or "") / first.name
        _half_then_full(dest, first.read_bytes())

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", log_artifacts)


def output_dir_fills_up(monkeypatch) -> None:
    """The output folder runs out of space while the figure report is written."""
    from tsssm import plots

    def save_report(figures, path, title=""):
        _half_then_full(Path(path), b"<html>" + b"x" * 1000)

    monkeypatch.setattr(plots, "save_report", save_report)


def stdin_with_a_bad_row(monkeypatch) -> None:
    """Live scoring from standard input: the third data row holds text in a channel."""
    import io
    import sys

    lines = csv().splitlines()
    lines[3] = "2,0.1,oops,0"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))


FAULTS: dict[str, Callable] = {
    "interrupt": interrupt_in_epoch_1,
    "artifacts_full": artifact_store_fills_up,
    "output_full": output_dir_fills_up,
    "stdin_bad_row": stdin_with_a_bad_row,
}


# -- the catalogue -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    command: str
    args: tuple[str, ...]
    code: int = 2
    words: tuple[str, ...] = ()
    status: str | None = "FAILED"  # the command's MLflow run; None: the command makes no run
    files: tuple[tuple[str, str | Callable], ...] = ()  # name -> text, or maker(d) -> bytes
    setup: Callable | None = None
    fault: str | None = None
    check: Callable | None = None  # more checks on (d, ctx, stderr) after the common ones


CSV = ("data=csv", "data.path={d}/s.csv", "data.time_column=ts", "data.label_column=label",
       "data.input_len=28", "data.horizon=4", "data.eval_stride=16")
EM = ("model=kalman", "model.fit=em", "model.em_iters=1")
# the default anomaly task (Mahalanobis score, 30-row shift window, POT threshold): the batch,
# many-file and live scorers stream it
MAMBA = ("model=mamba", "model.net.d_model=8", "model.net.n_layers=1", "model.net.d_state=4",
         "trainer.max_epochs=2")
SCORE2 = ("data=csv", "data.path={d}/s.csv", "data.time_column=ts", "model.checkpoint={bundle2}")
SCORE1 = ("data=csv", "data.path={d}/s.csv", "data.time_column=ts", "model.checkpoint={bundle1}")
GOOD = (("s.csv", csv()),)


def _file(name: str, content) -> tuple[tuple[str, str | Callable], ...]:
    return ((name, content),)


def _scaler_is_finite(d: Path, ctx, err: str) -> None:
    (bundle,) = (d / "out" / "models").iterdir()
    scaler = json.loads((bundle / "meta.json").read_text())["scaler"]
    assert np.isfinite(scaler["mean"]).all() and np.isfinite(scaler["std"]).all()


def _nothing_unpickled(d: Path, ctx, err: str) -> None:
    assert "unpickled!" not in err
    assert not (d / "pwned").exists() and not Path("pwned").exists()


def fleet_with_a_bad_file(d: Path, ctx) -> None:
    """A folder of three streams to score, one of them with text in a channel at row 40."""
    (d / "fleet").mkdir()
    for name in ("p1", "p2"):
        (d / "fleet" / f"{name}.csv").write_text(csv())
    (d / "fleet" / "bad.csv").write_text(csv(edit={39: "39,0.5,broken,0"}))


def _fleet_scored(d: Path, ctx, err: str) -> None:
    # each good file's scores and flagged intervals; nothing of the bad one
    assert sorted(p.name for p in (d / "many").iterdir()) == [
        "p1.intervals.parquet", "p1.parquet", "p2.intervals.parquet", "p2.parquet"]
    assert "fleet/bad.csv" in err


def _scores_written(d: Path, ctx, err: str) -> None:
    # the scores Parquet with each channel's share of the score and, beside it, the flagged
    # intervals with the sensors that caused them (streamed in batches)
    files = sorted((d / "out" / "scores").glob("*.parquet"))
    (scores,) = [f for f in files if not f.name.endswith(".intervals.parquet")]
    frame = pl.read_parquet(scores)
    assert frame.height == N_ROWS and frame["score"].is_finite().all()
    shares = frame.select(pl.col("^contrib:.*$")).to_numpy().sum(1)
    assert np.allclose(shares, frame["score"].to_numpy(), rtol=1e-4, atol=1e-5)
    (intervals,) = [f for f in files if f.name.endswith(".intervals.parquet")]
    assert intervals.name == f"{scores.stem}.intervals.parquet"
    found = pl.read_parquet(intervals)
    assert {"stream", "start", "end", "rows", "peak_score", "top"} <= set(found.columns)
    assert found["rows"].sum() == int(frame["flag"].sum())


CASES: list[Case] = [
    # config: composition and validation (no run is made)
    Case("unknown-command", "fly", (), status=None, words=("unknown command 'fly'",)),
    Case("unknown-group-option", "train", ("model=lstm",), status=None,
         words=("unknown option 'lstm' for config group 'model'",
                "kalman, kalman_ct, kalman_ett, mamba, spring")),
    Case("unknown-key", "train", ("data.colour=red",), status=None,
         words=("unknown config key 'data.colour'",)),
    Case("bad-type", "train", ("data.input_len=many",), status=None,
         words=("bad value in 'data.input_len=many'",)),
    Case("bad-range", "train", ("data.input_len=0",), status=None,
         words=("'data.input_len' must be a positive integer",)),
    Case("bad-enum", "train", ("data.gaps=sometimes",), status=None,
         words=("expected one of [keep, mask, fill, time]",)),
    Case("bad-duplicates-option", "train", ("data.duplicates=median",), status=None,
         words=("data.duplicates=median", "[error, first, last, mean]")),
    Case("threshold-q", "train", ("task.threshold.q=1.5",), status=None,
         words=("'task.threshold.q' must lie in (0, 1)",)),
    Case("optimizer", "train", ("model.optimizer.name=sgd",), status=None,
         words=("'model.optimizer.name' is 'sgd'",)),
    Case("kalman-lr", "train", ("model=hybrid_residual", "model.optimizer.kalman_lr=-0.1"),
         status=None, words=("'model.optimizer.kalman_lr' must be >= 0",)),
    Case("kalman-part-fit", "train", ("model=hybrid_residual", "model.net.kalman_fit.fit=mle"),
         status=None, words=("'model.net.kalman_fit.fit' is 'mle'",)),
    Case("checkpoint-every", "train", ("trainer.checkpoint_every_n_epochs=0",), status=None,
         words=("trainer.checkpoint_every_n_epochs", "must be >= 1")),
    Case("max-time", "train", ("trainer.max_time=0",), status=None,
         words=("trainer.max_time", "must be > 0 seconds")),
    Case("threads", "train", ("trainer.threads=0",), status=None,
         words=("trainer.threads", "must be >= 1")),
    Case("unquoted-separator", "train", ("data.separator=;",), status=None,
         words=("data.separator=;", """'data.separator=";"'""", "quote it")),
    Case("separator-eaten-by-shell", "train", ("data.separator=",), status=None,
         words=("'data.separator' must be one character", """'data.separator=";"'""")),
    Case("help-unknown-option", "train", ("--bogus",), status=None,
         words=("unknown option --bogus",)),
    Case("ensemble-unknown-member", "train", ("model=ensemble", "model.members=[kalman,lstm]"),
         status=None, words=("model.members", "'lstm'", "not a model config")),
    Case("ensemble-member-reads-other-data", "train",
         ("model=ensemble", "model.members=[kalman,mamba]",
          'model.member_overrides=["mamba:data.input_len=8"]'),
         status=None, words=("model.member_overrides", "mamba:data.input_len=8", "data")),
    Case("ensemble-member-fails", "train",
         (*CSV, "model=ensemble", "model.members=[kalman]",
          'model.member_overrides=["kalman:model.net.colour=red"]'), files=GOOD,
         words=("ensemble member 'kalman'", "model.net.colour")),
    Case("gpu-without-cuda", "train", (*CSV, *MAMBA, "trainer=gpu"), files=GOOD,
         words=("trainer=gpu", "no CUDA device", "trainer=cpu")),
    # data files
    Case("file-missing", "train", ("data=csv", "data.path={d}/nope.csv"),
         words=("{d}/nope.csv", "not found")),
    Case("path-is-folder", "train", ("data=csv", "data.path={d}"), words=("is a directory",)),
    Case("root-without-dataset", "train", ("data=skab", "data.root={d}"),
         words=("matches no file under {d}",)),
    Case("unsupported-type", "train", (*CSV[:1], "data.path={d}/s.xlsx", *CSV[2:], *EM),
         files=_file("s.xlsx", "PK"), words=("{d}/s.xlsx", "unsupported file type '.xlsx'")),
    Case("empty-file", "train", (*CSV, *EM), files=_file("s.csv", ""),
         words=("{d}/s.csv", "is empty")),
    Case("header-only", "train", (*CSV, *EM), files=_file("s.csv", "ts,a,b,label\n"),
         words=("{d}/s.csv", "has a header but no rows")),
    Case("wrong-separator", "train", (*CSV, *EM), files=_file("s.csv", csv(sep=";")),
         words=("{d}/s.csv", """set 'data.separator=";"'""")),
    Case("time-column-missing", "train", (*CSV, *EM, "data.time_column=when"), files=GOOD,
         words=("{d}/s.csv", "column 'when' not found", "data.time_column")),
    Case("channel-missing", "train", (*CSV, *EM, "data.channels=[a,z]"), files=GOOD,
         words=("{d}/s.csv", "column 'z' not found", "data.channels")),
    Case("label-column-missing", "train", (*CSV, *EM, "data.label_column=fault"), files=GOOD,
         words=("{d}/s.csv", "column 'fault' not found", "data.label_column")),
    Case("label-as-channel", "train", (*CSV, *EM, "data.channels=[a,label]"), files=GOOD,
         words=("{d}/s.csv", "'label'", "never an input channel")),
    Case("label-not-binary", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={5: "5,1,1,2"})),
         words=("{d}/s.csv", "label column 'label' must hold 0/1", "row 6")),
    Case("label-empty", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={5: "5,1,1,"})),
         words=("{d}/s.csv", "label column 'label' is empty at row 6")),
    Case("no-channels-left", "train", (*CSV, *EM, "data.ignore_columns=[a,b]"), files=GOOD,
         words=("{d}/s.csv", "no channel columns left")),
    Case("not-numeric", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={7: "7,1,x,0"})),
         words=("{d}/s.csv", "column 'b' is not numeric", "row 8", "'x'")),
    Case("infinite", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={9: "9,inf,1,0"})),
         words=("{d}/s.csv", "column 'a'", "infinite value at row 10")),
    Case("beyond-float32-1e308", "train", (*CSV, *EM),
         files=_file("s.csv", csv(edit={11: "11,1e308,1,0"})),
         words=("{d}/s.csv", "column 'a'", "1e+308", "row 12", "float32")),
    Case("beyond-float32-4e38", "train", (*CSV, *EM),
         files=_file("s.csv", csv(edit={260: "260,1,-4e38,0"})),
         words=("{d}/s.csv", "column 'b'", "row 261", "float32")),
    Case("overflows-once-scaled-3e38", "train", (*CSV, *EM),
         files=_file("s.csv", csv(edit={270: "270,3e38,1,0"})),
         words=("{d}/s.csv", "column 'a' row 271", "3e+38", "overflows float32 once scaled")),
    Case("huge-but-finite-in-training", "train", (*CSV, *EM), code=0, status="FINISHED",
         files=_file("s.csv", csv(edit={20: "20,3e38,1,0"})), check=_scaler_is_finite),
    # inputs and physical models (continuous time, issue 14)
    Case("input-missing", "train", (*CSV, *EM, "data.inputs=[u]"), files=GOOD,
         words=("s.csv", "column 'u' not found (set data.inputs)")),
    Case("input-also-a-channel", "train", (*CSV, *EM, "data.channels=[a,b]", "data.inputs=[b]"),
         status=None, words=("data.inputs", "both name ['b']")),
    Case("physical-expression-refused", "train",
         (*CSV, "data.channels=[a]", "model=kalman_ct", "model.net.physical.A=[['os.getcwd()']]",
          "model.net.physical.C=[[1]]", "model.net.physical.Qc=[[1]]",
          "model.net.physical.R=[[1]]", "+model.net.physical.params.k=1"), files=GOOD,
         words=("model.net.physical.A[0][0]", "calling this is not allowed")),
    Case("too-short", "train", (*CSV, *EM, "data.input_len=250"), files=GOOD,
         words=("{d}/s.csv", "data.input_len + data.horizon = 250 + 4")),
    Case("too-few-rows-for-split", "train", (*CSV, *EM), files=_file("s.csv", csv(n=2)),
         words=("{d}/s.csv", "too few")),
    # time axis
    Case("time-empty", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={3: ",1,1,0"})),
         words=("{d}/s.csv", "time column 'ts' is empty at row 4")),
    Case("time-not-a-time", "train", (*CSV, *EM),
         files=_file("s.csv", csv(edit={0: "noon,1,1,0"})),
         words=("{d}/s.csv", "does not parse as timestamps", "row 1", "'noon'")),
    Case("time-mixed-formats", "train", (*CSV, *EM), files=_file("s.csv", timestamps("mixed")),
         words=("{d}/s.csv", "row 138", "'10/25/2020 22:50:00'", "another format than row 1")),
    Case("time-format-mismatch", "train", (*CSV, *EM, "data.time_format='%d.%m.%Y %H:%M'"),
         files=_file("s.csv", timestamps("plain")),
         words=("{d}/s.csv", "row 1", "does not match data.time_format='%d.%m.%Y %H:%M'")),
    Case("time-duplicate", "train", (*CSV, *EM), files=_file("s.csv", csv(edit={8: "7,1,1,0"})),
         words=("{d}/s.csv", "duplicate timestamp", "rows 8 and 9", "data.duplicates=")),
    Case("time-unsorted", "train", (*CSV, *EM), files=_file("s.csv", timestamps("unsorted")),
         words=("{d}/s.csv", "not sorted", "row 51", "data.sort=true")),
    Case("time-unsorted-sorted", "train", (*CSV, *EM, "data.sort=true"), code=0,
         status="FINISHED", files=_file("s.csv", timestamps("unsorted")),
         check=lambda d, ctx, err: _said(err, "data.sort=true put 4 of 300 rows into time order")),
    Case("time-dst-repeated-hour", "train", (*CSV, *EM), files=_file("s.csv", timestamps("dst")),
         words=("{d}/s.csv", "not sorted", "row 25", "data.sort=true")),
    Case("time-dst-sorted", "train", (*CSV, *EM, "data.sort=true"),
         files=_file("s.csv", timestamps("dst")),
         words=("{d}/s.csv", "duplicate timestamp 2020-10-25T02:00",
                "data.duplicates=first|last|mean")),
    Case("time-dst-merged", "train", (*CSV, *EM, "data.sort=true", "data.duplicates=mean"),
         code=0, status="FINISHED", files=_file("s.csv", timestamps("dst")),
         check=lambda d, ctx, err: _said(err, "data.duplicates=mean merged 12 rows sharing a "
                                              "timestamp into 6")),
    Case("duplicates-first", "train", (*CSV, *EM, "data.duplicates=first"), code=0,
         status="FINISHED", files=_file("s.csv", csv(edit={8: "7,1,1,0"})),
         check=lambda d, ctx, err: _said(err, "data.duplicates=first merged 2 rows")),
    # Parquet
    Case("parquet-ok", "train", (*CSV[:1], "data.path={d}/s.parquet", *CSV[2:], *EM), code=0,
         status="FINISHED", files=_file("s.parquet", lambda d: parquet_bytes(False, d))),
    Case("parquet-corrupt", "train", (*CSV[:1], "data.path={d}/s.parquet", *CSV[2:], *EM),
         files=_file("s.parquet", lambda d: parquet_bytes(True, d)),
         words=("{d}/s.parquet", "is corrupt", "column 'a'", "restore the file")),
    Case("parquet-truncated", "train", (*CSV[:1], "data.path={d}/s.parquet", *CSV[2:], *EM),
         files=_file("s.parquet", lambda d: parquet_bytes(False, d)[:-300]),
         words=("{d}/s.parquet", "cannot be read")),
    Case("csv-binary-garbage", "train", (*CSV, *EM),
         files=_file("s.csv", lambda d: bytes(range(256)) * 4), words=("{d}/s.csv",)),
    # tracking store, artifact store, output folder
    Case("sqlite-unwritable", "train", (*CSV, *EM, "tracking.uri=sqlite:////proc/x.db"),
         files=GOOD, status=None, words=("tracking.uri=sqlite:////proc/x.db", "writable")),
    Case("server-unreachable", "train", (*CSV, *EM, "tracking.uri=http://127.0.0.1:9"),
         files=GOOD, status=None,
         words=("tracking.uri=http://127.0.0.1:9", "no MLflow tracking server answers")),
    Case("output-dir-unwritable", "train", (*CSV, *EM, "tracking.output_dir=/proc/tsssm"),
         files=GOOD, status=None, words=("tracking.output_dir=/proc/tsssm", "cannot write")),
    Case("artifact-root-uncreatable", "train",
         (*CSV, *EM, "tracking.artifact_root=/proc/tsssm-art"), files=GOOD, status=None,
         words=("tracking.artifact_root=", "/proc/tsssm-art", "cannot write")),
    Case("artifact-store-unwritable", "train", (*CSV, *EM, "tracking.experiment={d.name}-x"),
         files=GOOD, setup=unwritable_artifact_store,
         words=("artifact store of experiment", "/proc/tsssm", "cannot be written")),
    Case("artifact-store-fills-up", "train", (*CSV, *EM), files=GOOD, fault="artifacts_full",
         words=("No space left on device", "run the command again")),
    Case("output-dir-fills-up", "train", (*CSV, *EM), files=GOOD, fault="output_full",
         words=("No space left on device",)),
    # interrupts inside Lightning's loop (real signals: test_interrupts.py)
    Case("interrupt-in-training", "train", (*CSV, *MAMBA), files=GOOD, fault="interrupt",
         code=130, status="KILLED", words=("interrupted; resume with tsssm train",
                                           "trainer.resume=last")),
    # resuming
    Case("resume-nothing", "train", (*CSV, *MAMBA, "trainer.resume=last"), files=GOOD,
         words=("trainer.resume=last: no checkpoint in",)),
    Case("resume-missing-path", "train", (*CSV, *MAMBA, "trainer.resume={d}/x.ckpt"),
         files=GOOD, words=("trainer.resume={d}/x.ckpt: no checkpoint at",)),
    Case("resume-other-config", "train", (*CSV, *MAMBA, "model.net.d_model=16",
                                          "tracking.output_dir={train_out}",
                                          "trainer.resume=last"),
         files=GOOD, words=("trainer.resume=last", "model.net.d_model was 8, now 16")),
    Case("resume-other-data", "train", (*CSV, *MAMBA, "trainer.resume={ckpt}"),
         files=_file("s.csv", csv(edit={1: "1,0.5,0.5,0"})),
         words=("trainer.resume=", "data file 's' changed")),
    Case("resume-foreign-checkpoint", "train", (*CSV, *MAMBA, "trainer.resume={d}/ckpt"),
         files=GOOD, setup=foreign_checkpoint, words=("not written by `tsssm train`",)),
    Case("resume-truncated-checkpoint", "train", (*CSV, *MAMBA, "trainer.resume={d}/ckpt"),
         files=GOOD, setup=truncated_checkpoint, words=("{d}/ckpt/last.ckpt",
                                                        "truncated or corrupt")),
    Case("resume-em", "train", (*CSV, *EM, "trainer.resume={ckpt}"), files=GOOD,
         words=("model.fit=em trains without checkpoints",)),
    # scoring
    Case("score-no-model", "score", ("data=csv", "data.path={d}/s.csv", "data.time_column=ts"),
         files=GOOD, words=("run `tsssm train` first",)),
    Case("score-not-a-bundle", "score", (*SCORE2[:3], "model.checkpoint={d}"), files=GOOD,
         words=("not a tsssm model bundle",)),
    Case("score-no-such-run", "score", (*SCORE2[:3], "model.run_id=deadbeef"), files=GOOD,
         words=("model.run_id", "'deadbeef'")),
    Case("score-ok", "score", SCORE2, files=GOOD, code=0, status="FINISHED",
         check=_scores_written),
    Case("score-other-names", "score", SCORE2, files=_file("s.csv", renamed("ts,x,y,label")),
         words=("{d}/s.csv", "column 'a' not found", "expects 2 channel(s) [a, b]",
                "data.channels=[...]")),
    Case("score-mapped-names", "score", (*SCORE2, "data.channels=[x,y]"), code=0,
         status="FINISHED", files=_file("s.csv", renamed("ts,x,y,label")), check=_scores_written),
    Case("score-mapping-wrong-count", "score", (*SCORE2, "data.channels=[x]"),
         files=_file("s.csv", renamed("ts,x,y,label")),
         words=("data.channels names 1 columns", "give exactly 2")),
    Case("score-1ch-model-5ch-file", "score", SCORE1,
         files=_file("s.csv", wide()),
         words=("{d}/s.csv", "column 'a' not found", "expects 1 channel(s) [a]")),
    Case("score-1ch-model-mapped", "score", (*SCORE1, "data.channels=[q]"), code=0,
         status="FINISHED", files=_file("s.csv", wide())),
    Case("score-output-unwritable", "score", (*SCORE2, "score.output=/proc/tsssm/s.parquet"),
         files=GOOD, words=("score.output=/proc/tsssm/s.parquet", "cannot write")),
    Case("score-truncated-weights", "score", (*SCORE2[:3], "model.checkpoint={d}/bundle"),
         files=GOOD, setup=truncated_bundle,
         words=("{d}/bundle/model.safetensors", "cannot be read safely", "truncated")),
    Case("score-future-bundle", "score", (*SCORE2[:3], "model.checkpoint={d}/bundle"),
         files=GOOD, setup=future_bundle,
         words=("bundle format 99", "tsssm 9.0.0", "upgrade tsssm")),
    Case("score-hostile-bundle", "score", (*SCORE2[:3], "model.checkpoint={d}/bundle"),
         files=GOOD, setup=hostile_bundle, check=_nothing_unpickled,
         words=("'os.system'", "not a tsssm model class")),
    Case("score-pickled-bundle", "score", (*SCORE2[:3], "model.checkpoint={d}/bundle"),
         files=GOOD, setup=pickled_bundle, check=_nothing_unpickled,
         words=("{d}/bundle/model.pt", "cannot be read safely")),
    Case("score-knows-its-model", "score", ("data.path={d}/s.csv", "model.checkpoint={bundle2}"),
         code=0, status="FINISHED", files=GOOD, check=_scores_written),
    Case("score-per-stream-threshold-no-rows", "score",
         (*SCORE2[:3], "model.checkpoint={d}/bundle"), files=GOOD,
         setup=per_stream_bundle_without_rows,
         words=("fits a threshold per stream", "data.train_rows is 0", "data.train_rows=N")),
    Case("score-bad-row-deep-in-a-long-file", "score", SCORE2,
         files=_file("s.csv", csv(n=20_000, edit={12_344: "12344,0.5,oops,0"})),
         words=("{d}/s.csv", "column 'b' is not numeric", "row 12345", "'oops'")),
    Case("score-many-one-bad-file", "score", ("data.path={d}/fleet", "score.workers=1",
                                              "score.output={d}/many",
                                              "model.checkpoint={bundle2}"),
         setup=fleet_with_a_bad_file, check=_fleet_scored,
         words=("1 of 3 files failed", "{d}/fleet/bad.csv", "row 40", "other files' scores")),
    Case("score-unknown-engine", "score", (*SCORE2, "score.engine=spark"), status=None,
         words=("'score.engine' is 'spark'", "local or dask")),
    Case("score-live-bad-row", "score", ("data.path=-", "model.checkpoint={bundle2}"),
         fault="stdin_bad_row", words=("standard input", "column 'b' is not numeric",
                                       "row 3", "'oops'")),
    Case("train-unknown-strategy", "train", (*CSV, *EM, "trainer.strategy=fsdp"), status=None,
         words=("'trainer.strategy' is 'fsdp'", "auto or ddp")),
    # compare
    Case("compare-no-such-run", "compare", ("compare.runs=[deadbeef]",),
         words=("compare.runs", "'deadbeef'")),
]


def _said(err: str, words: str) -> None:
    assert words in err, err


# -- running a case --------------------------------------------------------------------------
@dataclass
class Context:
    db: str
    bundle2: Path  # a tiny 2-channel (a, b) Mamba trained on the small stream
    bundle1: Path  # a 1-channel (a) Kalman fitted by EM
    ckpt: Path  # the Mamba training's checkpoint
    train_out: Path  # the Mamba training's output folder


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, mlflow_db) -> Context:
    root = tmp_path_factory.mktemp("catalogue-models")
    (root / "s.csv").write_text(csv())
    common = [f"tracking.uri={mlflow_db}", "tracking.experiment=catalogue-models",
              f"tracking.artifact_root={root}/artifacts", f"tracking.output_dir={root}/out",
              "trainer.enable_progress_bar=false"]
    data = [a.format(d=root) for a in CSV]
    assert main(["train", *common, *data, *MAMBA]) == 0
    assert main(["train", *common, *data, *EM, "data.channels=[a]"]) == 0
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name("catalogue-models")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    mamba, kalman = (root / "out" / "models" / r.info.run_id for r in runs)
    (ckpt,) = (root / "out" / "checkpoints" / runs[0].info.run_id).glob("last.ckpt")
    return Context(mlflow_db, mamba, kalman, ckpt, root / "out")


def _overrides(case: Case, d: Path, ctx: Context, experiment: str) -> list[str]:
    fmt = {"d": d, "bundle1": ctx.bundle1, "bundle2": ctx.bundle2, "ckpt": ctx.ckpt,
           "train_out": ctx.train_out}
    args = [a.format(**fmt) for a in case.args]
    given = {a.split("=", 1)[0] for a in args}
    base = {"tracking.uri": ctx.db, "tracking.experiment": experiment,
            "tracking.artifact_root": f"{d}/artifacts", "tracking.output_dir": f"{d}/out",
            "trainer.enable_progress_bar": "false"}
    return [f"{k}={v}" for k, v in base.items() if k not in given] + args


def _runs(db: str, experiments: list[str]) -> list:
    client = MlflowClient(db)
    found = [client.get_experiment_by_name(e) for e in experiments]
    ids = [e.experiment_id for e in found if e is not None]
    return client.search_runs(ids) if ids else []


def _left_behind(out: Path) -> list[str]:
    """Anything under an output folder that looks like a result or a half-written file."""
    bad = []
    for sub in ("models", "staging", "scores"):
        if (out / sub).exists():
            bad += [str(p) for p in (out / sub).iterdir()]
    bad += [str(p) for p in out.rglob(".*.tmp")] if out.exists() else []
    return bad


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, ctx: Context, tmp_path, capsys, monkeypatch):
    d = tmp_path / case.id
    d.mkdir()
    for name, content in case.files:
        data = content(d) if callable(content) else content
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    if case.setup is not None:
        case.setup(d, ctx)
    if case.fault is not None:
        FAULTS[case.fault](monkeypatch)
    experiment = f"catalogue-{case.id}"
    argv = [case.command, *_overrides(case, d, ctx, experiment)]
    code = main(argv)
    out, err = capsys.readouterr()
    fmt = {"d": d, "ckpt": ctx.ckpt}

    assert code == case.code, f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    if case.code == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err
        for word in case.words:
            assert word.format(**fmt) in lines[0], lines[0]
    elif case.code == 130:
        (line,) = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
        for word in case.words:
            assert word.format(**fmt) in line, line
    runs = _runs(ctx.db, [experiment, f"{d.name}-x"])
    assert [r.info.status for r in runs] == ([case.status] if case.status else []), err
    if case.code != 0:
        assert _left_behind(d / "out") == []
        client = MlflowClient(ctx.db)
        for r in runs:
            assert client.list_artifacts(r.info.run_id) == [], "a failed run kept artifacts"
            assert r.data.tags.get("tsssm.error")
    if case.check is not None:
        case.check(d, ctx, err)


def test_catalogue_covers_the_issue():
    """Every kind of case issue 11 lists is in the catalogue (a guard against losing rows)."""
    ids = {c.id for c in CASES}
    for needed in ("interrupt-in-training", "resume-other-config", "resume-foreign-checkpoint",
                   "artifact-store-fills-up", "output-dir-fills-up", "beyond-float32-1e308",
                   "label-column-missing", "score-mapped-names", "score-1ch-model-5ch-file",
                   "server-unreachable", "sqlite-unwritable", "output-dir-unwritable",
                   "artifact-root-uncreatable", "score-truncated-weights",
                   "score-output-unwritable", "compare-no-such-run", "unquoted-separator",
                   "time-mixed-formats", "parquet-corrupt", "time-dst-merged",
                   "time-unsorted-sorted", "score-future-bundle"):
        assert needed in ids, needed
    assert len(CASES) >= 70


def test_bundle_folders_follow_the_umask(ctx, tmp_path):
    """mkdtemp makes 0700 folders; a saved bundle is readable as the umask allows."""
    import os

    from tsssm.bundle import load_bundle, save_bundle

    bundle = load_bundle(ctx.bundle2)
    for umask, mode in ((0o022, 0o755), (0o027, 0o750)):
        old = os.umask(umask)
        try:
            folder = save_bundle(bundle, tmp_path / f"b{umask:o}")
        finally:
            os.umask(old)
        assert folder.stat().st_mode & 0o777 == mode
        assert all(f.stat().st_mode & 0o777 == mode & 0o666 for f in folder.iterdir())
