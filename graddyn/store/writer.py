"""A background writer thread with a bounded queue.

Capture hands it jobs (write a shard, save a checkpoint) and goes on training; the queue
holds at most `max_pending` jobs, so a disk slower than training slows training down
(back-pressure) instead of filling memory. An error in a job is raised again in the
training thread at the next `submit`, `flush` or `close`.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable

_STOP = object()


class AsyncWriter:
    """Runs submitted jobs in order on one persistent thread."""

    def __init__(self, max_pending: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="graddyn-writer", daemon=True)
        self._thread.start()
        # A process that exits without close() still finishes its writes before the
        # interpreter tears down (a daemon thread killed inside HDF5 can crash the exit).
        atexit.register(self.close)

    def submit(self, job: Callable[[], object]) -> None:
        """Queue `job`; blocks while `max_pending` jobs are already waiting."""
        self._raise_pending_error()
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every submitted job has run."""
        self._queue.join()
        self._raise_pending_error()

    def close(self) -> None:
        """Finish the queued jobs and stop the thread."""
        atexit.unregister(self.close)
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_pending_error()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:
                    job()
            except BaseException as error:  # re-raised in the training thread
                self._error = error
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"a background write failed: {error}") from error
