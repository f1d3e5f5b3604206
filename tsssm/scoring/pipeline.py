"""Threads that let the stages of file scoring overlap: reading the next batch, scoring this one,
writing the last one's scores.

Scoring a file is read -> validate -> scale -> model -> scores -> write, batch after batch. In one
thread the stages add up; on a GPU the model is the cheapest of them and the host waits on itself.
:func:`prefetch` runs an iterator (the validated batches of a StreamReader) on a thread a bounded
number of items ahead; :class:`OrderedWorker` runs calls (the scores sink) on a thread in the
order they were submitted. numpy, pyarrow and torch release the GIL in their bulk work and in a
wait on the device, so the three stages run side by side on three cores, and the slowest one sets
the pace. Order is kept (one thread per stage, FIFO queues), so the output is the same as in one
thread; an error in either thread is raised in the caller at its next call, unchanged (a
DataError naming the row stays that DataError).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()
#: seconds between checks of a stop request while a queue is full or empty
_POLL_S = 0.1


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put item unless stopped first (False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterator[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """``items`` produced on a thread up to ``depth`` ahead of the consumer (bounded memory).

    The thread ends with the iteration, with the first error (raised here), or when the consumer
    stops early (the generator is closed or collected)."""
    ahead: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(ahead, item, stop):
                    return
            _put(ahead, _DONE, stop)
        except BaseException as err:  # handed to the consumer
            _put(ahead, _Failure(err), stop)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class OrderedWorker:
    """Calls run one after another on a thread, in submission order: ``submit(f, *args)``,
    then ``join()`` (waits, raises the first error). After an error the remaining calls are
    skipped and the error is raised by the next ``submit`` or ``join``. ``cancel()`` stops
    without raising (the caller is handling another error)."""

    def __init__(self, depth: int = 2, name: str = "ordered-worker") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _DONE:
                return
            if self._error is not None or self._stop.is_set():
                continue  # skip: an earlier call failed, or cancelled
            fn, args = item
            try:
                fn(*args)
            except BaseException as err:  # handed to the submitting thread
                self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._stop.set()
            raise err

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise()
        if not _put(self._queue, (fn, args), self._stop):  # stopped meanwhile
            self._raise()
            raise RuntimeError("the worker thread was cancelled")

    def join(self) -> None:
        """Wait for every call submitted; raise the first error."""
        if self._thread.is_alive():
            _put(self._queue, _DONE, self._stop)
            self._thread.join()
        self._raise()

    def cancel(self) -> None:
        """Stop after the call in progress; drop the rest and any error."""
        self._stop.set()
        self._thread.join()
        self._error = None


def ordered_map(fn: Callable[[T], Any], items: Iterator[T], workers: int,
                name: str = "ordered-map") -> Iterator[Any]:
    """``fn(item)`` for each item, computed on ``workers`` threads, yielded in the items' order.

    At most ``workers + 1`` items are taken from ``items`` ahead of the consumer (bounded memory).
    An error in ``fn`` is raised here when its item's turn comes, after every earlier item's
    result: the same first error as a loop in one thread. ``workers <= 0``: that loop itself.
    Pending calls are cancelled when the consumer stops early (the generator is closed)."""
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
