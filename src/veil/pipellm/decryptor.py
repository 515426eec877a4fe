"""Asynchronous decryption of device-to-host traffic, with a force-on-touch path.

A device-to-host transfer's host half (open each sealed chunk, copy it into the destination) is
queued here instead of running in the caller. A background thread opens queued transfers in
submission order, which is the order their messages sit in the ring. A reader that needs the bytes
earlier *forces* them: it runs, in its own thread and still in order, every queued transfer up to and
including the one it needs (`Decryptor.force`, or simply `PendingTransfer.wait()`).

One opener at a time (`_run_lock`), so the receiver's counter and the ring stay in step whichever
thread opens.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType

from veil.cc.stream import Event


class PendingTransfer(Event):
    """The event of an asynchronous device-to-host transfer; `wait()` forces its decryption.

    Attributes:
        forced: True if a reader ran the decryption before the background thread reached it.
    """

    def __init__(self, decryptor: Decryptor, run: Callable[[], None]) -> None:
        super().__init__()
        self._decryptor = decryptor
        self._run = run
        self.forced = False

    def wait(self, timeout: float | None = None) -> None:
        """Force the decryption (in this thread if it has not started), then wait for it.

        Raises:
            TimeoutError: if another thread is still decrypting it after `timeout` seconds.
            BaseException: the decryption's error (e.g. IntegrityError).
        """
        self._decryptor.force(self)
        super().wait(timeout)

    def _execute(self, *, forced: bool) -> None:
        self.forced = forced
        try:
            self._run()
        except BaseException as exc:  # kept in the event, raised by wait()
            self._complete(exc)
        else:
            self._complete()


class Decryptor:
    """A background opener of device-to-host transfers (see module docstring).

    Args:
        name: the thread's name.
        background: False starts no thread: transfers are decrypted only when forced (or drained,
            or at close), in the reader's thread (lazy decryption).
    """

    def __init__(self, name: str = "veil-pipellm-decrypt", *, background: bool = True) -> None:
        self.name = name
        self.background = background
        self._running = False
        self._queue: deque[PendingTransfer] = deque()
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.forced = 0  # transfers a reader decrypted before the background thread reached them

    def __enter__(self) -> Decryptor:
        if self._running:
            raise RuntimeError("decryptor is already started")
        self._closing, self._running = False, True
        if self.background:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def submit(self, run: Callable[[], None]) -> PendingTransfer:
        """Queue a transfer's host half; returns its event.

        Raises:
            RuntimeError: if the decryptor is not running.
        """
        with self._cond:
            if not self._running or self._closing:
                raise RuntimeError("decryptor is not running")
            job = PendingTransfer(self, run)
            self._queue.append(job)
            self._cond.notify_all()
            return job

    def force(self, job: PendingTransfer) -> None:
        """Run every queued transfer up to and including `job` in this thread, unless already done."""
        while not job.query():
            with self._run_lock:
                if job.query():
                    return
                if not self._run_next(forced=True):
                    return  # not queued any more and not done: another opener has it; wait() waits

    def drain(self) -> None:
        """Decrypt everything queued so far (in this thread where the background has not started)."""
        with self._cond:
            last = self._queue[-1] if self._queue else None
        if last is not None:
            self.force(last)

    def close(self) -> None:
        """Decrypt what is queued, then stop the thread (idempotent)."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify_all()
        if thread is not None:
            thread.join()
            self._thread = None
        self.drain()  # lazy mode, or work queued while the thread was stopping
        self._running = False

    def _run_next(self, *, forced: bool) -> bool:
        """Open the oldest queued transfer (caller holds `_run_lock`); False if none is queued."""
        with self._cond:
            if not self._queue:
                return False
            job = self._queue.popleft()
        self.forced += forced
        job._execute(forced=forced)
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
            with self._run_lock:
                self._run_next(forced=False)
