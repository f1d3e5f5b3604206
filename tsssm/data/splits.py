"""Chronological splits, following each dataset's own evaluation protocol.

A split is a row range ``[start, stop)`` of a stream; models see the rows before ``start`` as
history (the state carried into val/test), never the rows after ``stop``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsssm.errors import DataError


@dataclass(frozen=True)
class Split:
    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


def skab_split(n_rows: int, train_rows: int, val_fraction: float, where: str) -> Split:
    """SKAB: the first ``train_rows`` rows train (the tail ``val_fraction`` of them validate),
    the rest is test."""
    if n_rows <= train_rows:
        raise DataError(
            f"{where}: {n_rows} rows, but SKAB's protocol trains on the first data.train_rows="
            f"{train_rows}; lower data.train_rows or drop the file"
        )
    n_val = int(round(train_rows * val_fraction))
    return Split((0, train_rows - n_val), (train_rows - n_val, train_rows), (train_rows, n_rows))


def ett_split(n_rows: int, rows_per_hour: int, where: str) -> Split:
    """Informer's ETT split: 12/4/4 months of 30 days; the rows after that are unused."""
    month = 30 * 24 * rows_per_hour
    bounds = (0, 12 * month, 16 * month, 20 * month)
    if n_rows < bounds[-1]:
        raise DataError(
            f"{where}: {n_rows} rows, the ETT protocol needs {bounds[-1]} "
            f"(20 months at data.rows_per_hour={rows_per_hour})"
        )
    return Split(bounds[0:2], bounds[1:3], bounds[2:4])


def fraction_split(n_rows: int, train_fraction: float, val_fraction: float, where: str) -> Split:
    n_train = int(n_rows * train_fraction)
    n_val = int(n_rows * val_fraction)
    if n_train < 2 or n_rows - n_train - n_val < 1:
        raise DataError(
            f"{where}: {n_rows} rows are too few for data.train_fraction={train_fraction} and "
            f"data.val_fraction={val_fraction}"
        )
    return Split((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_rows))
