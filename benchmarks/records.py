"""Benchmark result records: one JSON list per file in benchmarks/results/, merged by key.

A record is a flat dict of JSON scalars. ``merge_records`` replaces the records whose key fields
equal a new record's and keeps every other, so re-running one dataset x horizon x model updates
its line without losing the rest; the file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The checkout's commit (short), with ``-dirty`` when tracked files are modified; the
    ``TSSSM_COMMIT`` environment variable when set (a copy of the tree whose git metadata is
    not the branch's, as on the device machine, where it read main's commit)."""
    if os.environ.get("TSSSM_COMMIT"):
        return os.environ["TSSSM_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TSSSM_COMMIT", "unknown")
    return rev + ("-dirty" if dirty else "")


def device_name(accelerator: str = "cpu") -> str:
    """What ran it, in words: the GPU's name, or the CPU and its core count."""
    if accelerator in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def merge_records(path: Path, new: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    """Write ``new`` into the JSON list at ``path``, replacing records with the same ``key``."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else []
    new = list(new)
    fresh = {tuple(r.get(k) for k in key) for r in new}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in fresh] + new
    merged.sort(key=lambda r: tuple(str(r.get(k, "")) for k in key))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return merged
