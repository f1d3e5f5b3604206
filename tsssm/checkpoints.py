"""Training checkpoints, tied to the run that wrote them and to what it was trained on.

Layout under ``tracking.output_dir``::

    checkpoints/<run id>/last.ckpt         Lightning checkpoint (weights, optimizer, loops, RNG)
    checkpoints/<run id>/last.json         {"epoch", "global_step"} of last.ckpt
    checkpoints/<run id>/fingerprint.json  the config keys and data files the training depends on

``trainer.resume=last`` continues the newest checkpoint whose fingerprint equals this command's;
``trainer.resume=<path>`` a given one, if its fingerprint matches. A mismatch is refused with one
line naming what differs. Resuming makes a *new* MLflow run tagged ``tsssm.resumed_from`` (the
interrupted run stays KILLED or FAILED, as it ended), with the earlier epochs' metric history
copied in, so the new run holds the whole learning curve.

Keys that do not change what training computes are left out of the fingerprint: the number of
epochs (resuming may extend a training), tracking, progress and checkpoint settings, the
threshold and scoring keys, and where the data lives (the files' contents are fingerprinted).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsssm.config import flatten, to_plain
from tsssm.errors import ConfigError

LAST = "last.ckpt"
FINGERPRINT = "fingerprint.json"

#: config keys (prefixes) that do not change what a training computes
_IGNORED = (
    "data.root", "data.path", "data.num_workers", "data.eval_stride",
    "model.epochs", "model.checkpoint", "model.run_id",
    "task.name", "task.score", "task.threshold", "task.baselines",
    "trainer.max_epochs", "trainer.resume", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.checkpoint_every", "trainer.early_stopping_patience",
    "trainer.devices", "trainer.accelerator",
)
_KEPT = ("data.", "model.", "task.", "trainer.", "seed")
#: files up to this size are hashed whole; larger ones by size, head and tail
_WHOLE_FILE = 64 << 20
_EDGE = 8 << 20


@dataclass(frozen=True)
class Resume:
    path: Path  # the .ckpt file
    run_id: str  # the run that wrote it
    epoch: int  # the last epoch it completed (-1 if unknown)


def checkpoint_dir(output_dir: str | Path, run_id: str) -> Path:
    return Path(output_dir) / "checkpoints" / run_id


def file_digest(path: Path) -> str:
    """sha256 of a data file (whole up to 64 MiB; beyond, its size, first and last 8 MiB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def fingerprint(cfg, files: list[tuple[Path, str]]) -> dict[str, Any]:
    """What a training depends on: its config keys and the content of its data files."""
    flat = flatten(to_plain(cfg))
    keys = {k: v for k, v in sorted(flat.items())
            if k.startswith(_KEPT) and not k.startswith(_IGNORED)}
    digests = {name: file_digest(Path(path)) if Path(path).is_file() else "missing"
               for path, name in files}
    # through JSON, so a fingerprint compares equal to one read back from disk
    return json.loads(json.dumps({"config": keys, "files": digests}, default=str))


def write_fingerprint(folder: Path, fp: dict[str, Any], run_id: str) -> None:
    from tsssm import __version__

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FINGERPRINT}.tmp"
    tmp.write_text(json.dumps({**fp, "run_id": run_id, "tsssm_version": __version__}, indent=1))
    os.replace(tmp, folder / FINGERPRINT)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def differences(saved: dict[str, Any], now: dict[str, Any], limit: int = 3) -> list[str]:
    """What makes two fingerprints differ, in words (at most ``limit`` items)."""
    out = []
    a, b = saved.get("config", {}), now.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key} was {a.get(key, '<unset>')!r}, now {b.get(key, '<unset>')!r}")
    fa, fb = saved.get("files", {}), now.get("files", {})
    for name in sorted(set(fa) | set(fb)):
        if name not in fa or name not in fb:
            out.append(f"data file '{name}' is {'new' if name in fb else 'no longer read'}")
        elif fa[name] != fb[name]:
            out.append(f"data file '{name}' changed")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _intact(path: Path) -> bool:
    """A torch checkpoint is a zip archive: truncation or corruption fails its CRC check."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def _resume_from(ckpt: Path) -> Resume:
    if not _intact(ckpt):
        raise ConfigError(f"trainer.resume: checkpoint {ckpt} is truncated or corrupt; resume an "
                          "older one (trainer.resume=<path>) or train without trainer.resume")
    saved = _read_json(ckpt.parent / FINGERPRINT) or {}
    progress = _read_json(ckpt.with_suffix(".json")) or {}
    return Resume(ckpt, str(saved.get("run_id", ckpt.parent.name)),
                  int(progress.get("epoch", -1)))


def find_resume(resume: str | None, output_dir: str | Path, fp: dict[str, Any]) -> Resume | None:
    """The checkpoint ``trainer.resume`` asks for, checked against this training's fingerprint;
    ConfigError with one line when there is none or it was made for something else."""
    if resume is None:
        return None
    if resume == "last":
        root = Path(output_dir) / "checkpoints"
        # checkpoints without a fingerprint (an older tsssm's, or foreign) are never candidates
        found = sorted((p for p in root.glob(f"*/{LAST}") if (p.parent / FINGERPRINT).exists()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for ckpt in found:
            saved = _read_json(ckpt.parent / FINGERPRINT)
            if saved is not None and not differences(saved, fp):
                return _resume_from(ckpt)
        if not found:
            raise ConfigError(f"trainer.resume=last: no checkpoint in {root}; train without "
                              "trainer.resume (checkpoints are written every "
                              "trainer.checkpoint_every_n_epochs epochs)")
        newest = _read_json(found[0].parent / FINGERPRINT) or {}
        raise ConfigError(
            f"trainer.resume=last: none of the {len(found)} checkpoints in {root} was made with "
            f"this config and data (the newest, {found[0]}: {'; '.join(differences(newest, fp))})"
            "; give the same overrides as the interrupted training, or train without "
            "trainer.resume"
        )
    ckpt = Path(resume).expanduser()
    if ckpt.is_dir():
        ckpt = ckpt / LAST
    if not ckpt.exists():
        raise ConfigError(f"trainer.resume={resume}: no checkpoint at {ckpt}")
    saved = _read_json(ckpt.parent / FINGERPRINT)
    if saved is None:
        raise ConfigError(f"trainer.resume={resume}: {ckpt} has no {FINGERPRINT} beside it, so "
                          "it was not written by `tsssm train`; it cannot be resumed safely")
    diff = differences(saved, fp)
    if diff:
        raise ConfigError(f"trainer.resume={resume}: that checkpoint was made with another "
                          f"config or data ({'; '.join(diff)}); give the same overrides as its "
                          "training, or train without trainer.resume")
    return _resume_from(ckpt)
