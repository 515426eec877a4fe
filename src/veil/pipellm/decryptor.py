"""Asynchronous decryption of device-to-host traffic: a pool of lanes, a force-on-touch path.

A device-to-host transfer's host half is queued here instead of running in the caller, as an
`Opening` in three phases:

1. `take`, one transfer at a time, in submission order (which is the order its messages sit in the
   ring): consume the transfer's messages from the ring into private staging, each bound to the
   receiver's own next counter. This fixes every message's IV exactly as sequential opening would.
2. `open`, on any lane, in parallel (AES-GCM releases the GIL): authenticate and decrypt in private
   staging. Nothing is written into the destination yet.
3. `commit` then `finish`, strictly in submission order: the transfer's plaintext is written into its
   destination only if it and every transfer before it succeeded. The first failure (an integrity
   failure or any other error) fails every later transfer too, without writing their destinations,
   until `reset()` (after a re-key); transfers before it complete normally.

`lanes` background threads (a `ThreadPoolExecutor`, one task per submitted transfer) run the three
phases for the oldest transfer not yet taken. A reader that needs a transfer earlier *forces* it: it
runs, in its own thread, the same three phases for every transfer not yet taken up to and including
the one it needs (`Decryptor.force`, or simply `PendingTransfer.wait()`). A thread only ever waits
for the commit turn of a transfer it took itself, and every earlier transfer was taken by a thread
that will reach its own turn, so forcing never deadlocks with the lanes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Protocol, runtime_checkable

from veil.cc.bounce import POISONED_MESSAGE
from veil.cc.errors import IntegrityError
from veil.cc.stream import Event


@runtime_checkable
class Opening(Protocol):
    """One transfer's host half, in the decryptor's three phases (see module docstring)."""

    def take(self) -> None:
        """Consume the transfer's messages, fixing each one's counter (one transfer at a time, in order)."""

    def open(self) -> None:
        """Authenticate and decrypt into private staging (any lane, in parallel with other openings)."""

    def commit(self) -> None:
        """Write the plaintext into the destination (in order; only if nothing failed up to here)."""

    def finish(self, error: BaseException | None) -> BaseException | None:
        """Release the transfer's resources (in order, always, last); return the error to report."""


class PendingTransfer(Event):
    """The event of an asynchronous device-to-host transfer; `wait()` forces its decryption.

    Attributes:
        forced: True if a reader ran the decryption before a background lane reached it.
    """

    def __init__(self, decryptor: Decryptor, opening: Opening, turn: int) -> None:
        super().__init__()
        self._decryptor = decryptor
        self._opening = opening
        self._turn = turn  # its place in submission (= counter) order
        self._taken = False  # set under the decryptor's queue lock when a thread takes it
        self.forced = False

    def wait(self, timeout: float | None = None) -> None:
        """Force the decryption (in this thread if no lane has taken it yet), then wait for it.

        Raises:
            TimeoutError: if another thread is still decrypting it after `timeout` seconds.
            BaseException: the decryption's error (e.g. IntegrityError).
        """
        self._decryptor.force(self)
        super().wait(timeout)


class Decryptor:
    """A pool of lanes opening device-to-host transfers (see module docstring).

    Args:
        name: the lanes' thread name prefix.
        lanes: background lanes; 0 starts no thread: transfers are decrypted only when forced (or
            drained, or at close), in the reader's thread (lazy decryption).

    Raises:
        ValueError: if `lanes` < 0.
    """

    def __init__(self, name: str = "veil-pipellm-decrypt", *, lanes: int = 1) -> None:
        if lanes < 0:
            raise ValueError(f"lanes must be >= 0, got {lanes}")
        self.name = name
        self.lanes = lanes
        self.forced = 0  # transfers a reader decrypted before a background lane reached them
        self._running = False
        self._queue: deque[PendingTransfer] = deque()  # submitted, not yet taken
        self._cond = threading.Condition()  # guards the queue, the turns and the failure
        self._take_lock = threading.Lock()  # one taker at a time: ring order = submission order
        self._submitted = 0  # turns handed out
        self._next_commit = 0  # the turn whose commit is next
        self._failed = False  # a transfer failed; every later one fails until reset()
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: list[Future[bool]] = []

    def __enter__(self) -> Decryptor:
        if self._running:
            raise RuntimeError("decryptor is already started")
        self._running = True
        if self.lanes:
            self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix=self.name)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def submit(self, opening: Opening) -> PendingTransfer:
        """Queue a transfer's host half (call in ring order); returns its event.

        Raises:
            TypeError: if `opening` lacks a phase of `Opening`.
            RuntimeError: if the decryptor is not running.
        """
        if not isinstance(opening, Opening):
            raise TypeError(
                f"an Opening (take, open, commit, finish) is required, got {type(opening).__name__}"
            )
        with self._cond:
            if not self._running:
                raise RuntimeError("decryptor is not running")
            job = PendingTransfer(self, opening, self._submitted)
            self._submitted += 1
            self._queue.append(job)
            if self._pool is not None:
                self._tasks = [t for t in self._tasks if not t.done()]
                self._tasks.append(self._pool.submit(self._run_next, None, forced=False))
            return job

    def force(self, job: PendingTransfer) -> None:
        """Run every transfer not yet taken, up to and including `job`, in this thread (in order)."""
        while not job.query() and self._run_next(job, forced=True):
            pass

    def drain(self) -> None:
        """Return once every transfer submitted so far has finished (running the rest in this thread)."""
        with self._cond:
            if self._next_commit == self._submitted:
                return
            last = self._queue[-1] if self._queue else None
            turn = self._submitted - 1
        if last is not None:
            self.force(last)
        with self._cond:
            self._cond.wait_for(lambda: self._next_commit > turn)

    def reset(self) -> None:
        """Lift the failure after a re-key (later transfers open again); call with nothing in flight.

        Raises:
            RuntimeError: if a transfer is still queued or being opened.
        """
        with self._cond:
            if self._next_commit != self._submitted:
                raise RuntimeError("reset() needs every submitted transfer finished; drain() first")
            self._failed = False

    def close(self) -> None:
        """Finish what is queued, then stop the lanes (idempotent).

        Raises:
            BaseException: an error that escaped a lane (a bug in the decryptor, never a transfer's
                error: those are kept in their events).
        """
        with self._cond:
            pool, self._pool, self._running = self._pool, None, False
            tasks, self._tasks = self._tasks, []
        self.drain()
        if pool is not None:
            pool.shutdown(wait=True)
        for task in tasks:
            task.result()

    # the three phases --------------------------------------------------------------------------------
    def _run_next(self, upto: PendingTransfer | None, *, forced: bool) -> bool:
        """Take the oldest queued transfer, open it, commit it in turn; False if none was taken.

        With `upto`, takes nothing once `upto` itself has been taken (by this or another thread).
        """
        with self._take_lock:
            with self._cond:
                if not self._queue or (upto is not None and upto._taken):
                    return False
                job = self._queue.popleft()
                job._taken, job.forced = True, forced
                self.forced += forced
            error = _attempt(job._opening.take)
        if error is None:
            error = _attempt(job._opening.open)
        self._commit_in_turn(job, error)
        return True

    def _commit_in_turn(self, job: PendingTransfer, error: BaseException | None) -> None:
        """Wait for `job`'s turn, then commit it (or fail it), finish it and pass the turn on."""
        with self._cond:
            self._cond.wait_for(lambda: self._next_commit == job._turn)
            failed_before = self._failed
        # This thread owns the turn until it advances it: commits never overlap and follow the turns.
        if failed_before:
            error = IntegrityError(POISONED_MESSAGE)
        elif error is None:
            error = _attempt(job._opening.commit)
        try:
            reported = job._opening.finish(error)
        except BaseException as exc:  # a finish that raises still reports, and still passes the turn
            reported = exc
        with self._cond:
            self._failed = self._failed or error is not None or reported is not None
            self._next_commit += 1
            self._cond.notify_all()
        job._complete(reported)


def _attempt(phase: Callable[[], None]) -> BaseException | None:
    """Run one phase; return what it raised instead of raising it (it is the transfer's error)."""
    try:
        phase()
    except BaseException as exc:
        return exc
    return None
