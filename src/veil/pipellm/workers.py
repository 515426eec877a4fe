"""A bounded pool of worker threads with an explicit lifecycle (mechanism only, no policy).

The pool runs submitted callables on `count` threads started by `__enter__` and stopped by `close()`.
A task must handle its own errors (the sealing pipeline reports them to the speculator); an exception
that escapes a task anyway is kept and re-raised by `close()`, so it can never pass silently.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

Task = Callable[[], None]


class WorkerPool:
    """`count` threads draining one FIFO of tasks.

    Args:
        count: number of threads (>= 1).
        name: prefix of the thread names.

    Raises:
        ValueError: if count < 1.
    """

    def __init__(self, count: int, *, name: str = "veil-pipellm-worker") -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.count = count
        self.name = name
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._escaped: list[BaseException] = []

    def __enter__(self) -> WorkerPool:
        if self._threads:
            raise RuntimeError(f"worker pool {self.name!r} is already started")
        for index in range(self.count):
            thread = threading.Thread(target=self._run, name=f"{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """True between start and close."""
        return bool(self._threads)

    def submit(self, task: Task) -> None:
        """Queue `task` for the next free thread.

        Raises:
            RuntimeError: if the pool is not running.
        """
        if not self._threads:
            raise RuntimeError(f"worker pool {self.name!r} is not running")
        self._tasks.put(task)

    def close(self) -> None:
        """Finish queued tasks, stop every thread (idempotent).

        Raises:
            BaseException: the first exception a task let escape, if any.
        """
        threads, self._threads = self._threads, []
        for _ in threads:
            self._tasks.put(None)
        for thread in threads:
            thread.join()
        if self._escaped:
            escaped, self._escaped = self._escaped, []
            raise escaped[0]

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except BaseException as exc:  # tasks report their own errors; this is a bug net
                self._escaped.append(exc)
