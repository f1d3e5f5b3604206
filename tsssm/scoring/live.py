"""Live scoring from the command line: CSV rows in (standard input, or a file that keeps
growing), one line ``time,score,flag`` out per row, as each arrives.

The first line is the header; the time column and the model's channels (or ``data.channels``
mapped onto them) are picked by name, other columns are ignored. A row's values go through
:meth:`tsssm.scoring.scorer.Scorer.update`: constant work and memory per row, and the scores
equal batch scoring of the same rows. A model that scales each stream by its own first rows, or
fits its threshold on them, holds those rows back and prints them once it can score them; a
centered score window prints each row ``window // 2`` rows late.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from tsssm.data.io import ReadSpec
from tsssm.errors import DataError
from tsssm.scoring.scorer import ScoredRows, Scorer

_MISSING = {"", "nan", "na", "null"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class LiveSummary:
    rows: int = 0
    flagged: int = 0


def stdin_lines() -> Iterator[str]:
    """Lines of standard input as they come (until it closes)."""
    yield from sys.stdin


def follow_lines(path: Path, interval: float = 0.2) -> Iterator[str]:
    """Complete lines of a file, then the ones appended to it, polling every ``interval``
    seconds, until interrupted (Ctrl-C)."""
    with open(path, encoding="utf-8", newline="") as f:
        partial = ""
        while True:
            chunk = f.readline()
            if not chunk:
                time.sleep(interval)
                continue
            partial += chunk
            if partial.endswith("\n"):
                yield partial
                partial = ""


def score_lines(lines: Iterable[str], scorer: Scorer, spec: ReadSpec, where: str,
                out: TextIO) -> LiveSummary:
    """Score CSV lines (a header first) and write ``time,score,flag`` per row to ``out``."""
    it = iter(lines)
    header = next(it, None)
    if header is None:
        raise DataError(f"{where}: no header line (the first line names the columns)")
    columns = next(csv.reader([header.rstrip("\r\n")], delimiter=spec.separator))
    columns = [c.strip() for c in columns]
    if spec.time_column not in columns:
        raise DataError(f"{where}: column '{spec.time_column}' not found (set data.time_column);"
                        f" columns are: {', '.join(columns)}")
    missing = [c for c in spec.channels if c not in columns]
    if missing:
        raise DataError(f"{where}: column '{missing[0]}' not found ({spec.channel_advice}); "
                        f"columns are: {', '.join(columns)}")
    t_col = columns.index(spec.time_column)
    idx = [columns.index(c) for c in spec.channels]
    width = len(columns)
    scorer.reset(source=where)
    waiting: deque[str] = deque()  # times of rows held for calibration
    summary = LiveSummary()
    out.write("time,score,flag\n")
    out.flush()

    def emit(scored: ScoredRows) -> None:
        for s, f in zip(scored.score.tolist(), scored.flag.tolist()):
            out.write(f"{waiting.popleft()},{s:.6g},{int(f)}\n")
            summary.flagged += int(f)
        summary.rows += len(scored)
        out.flush()

    row = np.empty(len(idx), np.float32)
    for number, line in enumerate(it, start=1):
        text = line.rstrip("\r\n")
        if not text:
            continue
        cells = next(csv.reader([text], delimiter=spec.separator))
        if len(cells) != width:
            raise DataError(f"{where}: row {number} has {len(cells)} fields, the header "
                            f"{width}; every row needs one value per column")
        for j, k in enumerate(idx):
            row[j] = _value(cells[k], where, number, spec.channels[j])
        stamp = cells[t_col].strip()
        if not stamp:
            raise DataError(f"{where}: time column '{spec.time_column}' is empty at row "
                            f"{number}")
        waiting.append(stamp)
        if not scorer.immediate or scorer.moments:
            emit(scorer.update_many(row[None]))
        else:
            score, flag = scorer.update(row)
            out.write(f"{waiting.popleft()},{score:.6g},{int(flag)}\n")
            out.flush()
            summary.rows += 1
            summary.flagged += int(flag)
    emit(scorer.finish())
    return summary


def _value(cell: str, where: str, row: int, column: str) -> float:
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: column '{column}' is not numeric (row {row} holds "
                        f"{cell!r}); send an empty cell for a missing reading") from None
    if math.isinf(value):
        raise DataError(f"{where}: column '{column}' holds an infinite value at row {row}; "
                        "send an empty cell (missing) or a real reading")
    if abs(value) > _FLOAT32_MAX:
        raise DataError(f"{where}: column '{column}' holds {value:g} at row {row}, beyond the "
                        f"float32 range (|x| <= {_FLOAT32_MAX:.3g}) tsssm computes in")
    return value
