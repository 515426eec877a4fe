"""Streams and events, in the manner of CUDA's.

A `Stream` runs submitted commands one at a time, in submission order, on its own worker thread. Each
submission returns an `Event` that completes when the command has run; a command's exception is stored
in its event and re-raised by `Event.wait()` and by the next `Stream.synchronize()`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

Command = Callable[[], None]


class Event:
    """Completion of one piece of work; carries its error, if any."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def completed(cls, error: BaseException | None = None) -> Event:
        """An event that is already complete (with `error`, if given)."""
        event = cls()
        event._complete(error)
        return event

    def query(self) -> bool:
        """True if the work has finished (successfully or not)."""
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        """The work's exception once finished, else None."""
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Block until the work finishes.

        Raises:
            TimeoutError: if it has not finished within `timeout` seconds.
            BaseException: the work's own exception, if it failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError("event did not complete in time")
        if self._error is not None:
            raise self._error

    def _complete(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()


class Stream:
    """An in-order command queue with a worker thread; started and stopped by its context manager.

    Args:
        name: thread name (shows in tracebacks and debuggers).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Command, Event] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._errors_lock = threading.Lock()

    def __enter__(self) -> Stream:
        if self._thread is not None:
            raise RuntimeError(f"stream {self.name!r} is already started")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """True between start and close."""
        return self._thread is not None

    def submit(self, command: Command) -> Event:
        """Queue `command`; return the event that completes after it ran.

        Raises:
            RuntimeError: if the stream is not running.
        """
        if self._thread is None:
            raise RuntimeError(f"stream {self.name!r} is not running; use it as a context manager")
        event = Event()
        self._queue.put((command, event))
        return event

    def wait_event(self, event: Event) -> Event:
        """Make later commands on this stream wait for `event` (which may belong to another stream)."""
        return self.submit(lambda: event.wait())

    def synchronize(self) -> None:
        """Wait for everything submitted so far.

        Raises:
            BaseException: the first error raised by any command since the last synchronize.
        """
        self.submit(lambda: None).wait()
        with self._errors_lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Finish queued work and stop the worker (idempotent)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            command, event = item
            try:
                command()
            except BaseException as exc:  # handed to the caller through the event
                with self._errors_lock:
                    self._errors.append(exc)
                event._complete(exc)
            else:
                event._complete()
