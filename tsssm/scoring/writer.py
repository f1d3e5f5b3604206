"""Write a scores table to Parquet incrementally: row groups as batches come, into a temporary file
next to the target that is renamed onto it only when every row is written. A crash, an error in
row 10^8 or Ctrl-C leaves no file at the target (and removes the temporary one).

Row groups are encoded and compressed on a background thread (pyarrow releases the GIL), so on a
machine with a second core writing overlaps with scoring.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tsssm.errors import DataError

#: rows buffered before a row group is written (small batches are merged)
ROW_GROUP_ROWS = 1 << 18
_DONE = object()


class ParquetStreamWriter:
    """``with ParquetStreamWriter(path) as w: w.write(table)`` - atomic on success.

    Tables must share the first one's schema. ``options`` go to ``pyarrow.parquet.ParquetWriter``
    (e.g. ``use_dictionary``, ``column_encoding``). ``rows`` counts the rows handed over.
    """

    def __init__(self, path: str | Path, row_group_rows: int = ROW_GROUP_ROWS,
                 options: dict[str, Any] | None = None, threaded: bool = True) -> None:
        self.path = Path(path)
        self.row_group_rows = row_group_rows
        self.options = {"compression": "snappy", **(options or {})}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the folder of {self.path}: {err.strerror}") from err
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:  # fail now, not after hours of scoring, when the target cannot be written
            self.tmp.touch()
        except OSError as err:
            raise DataError(f"cannot write {self.path}: {err.strerror}; choose another "
                            "score.output") from err
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=2)  # bounded: memory stays a few row groups
            self._thread = threading.Thread(target=self._drain, name="parquet-writer",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ writing
    def write(self, table: pa.Table) -> None:
        """Append rows (buffered to ``row_group_rows`` per row group)."""
        self._raise_pending_error()
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = self._pending[0] if len(self._pending) == 1 else pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._queue is None:
            self._write_group(table)
        else:
            self._queue.put(table)

    def _write_group(self, table: pa.Table) -> None:
        if self._writer is None:
            try:
                self._writer = pq.ParquetWriter(self.tmp, table.schema, **self.options)
            except OSError as err:
                raise DataError(f"cannot write {self.path}: {err}") from err
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def _drain(self) -> None:
        """The background thread: write every queued row group, keep the first error."""
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._write_group(item)
                except BaseException as err:  # handed to the scoring thread
                    self._error = err

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
            self._thread = None

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, DataError):
                raise err
            raise DataError(f"cannot write {self.path}: {err}") from err

    # ------------------------------------------------------------------ ending
    def close(self, schema: pa.Schema | None = None) -> Path:
        """Write what is buffered and move the file into place. ``schema``: for a stream with no
        rows at all, write an empty file of this schema."""
        self._flush()
        self._stop_thread()
        self._raise_pending_error()
        if self._writer is None:
            if schema is None:
                raise DataError(f"no rows to write to {self.path}")
            self._writer = pq.ParquetWriter(self.tmp, schema, **self.options)
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written: no file at the target, no temporary left behind."""
        self._pending = []
        self._stop_thread()
        self._error = None
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the file is being thrown away
                self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetStreamWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()
        elif self._writer is not None or self._pending or self._thread is not None:
            self.close()
