"""The engine on its own thread, for callers on other threads (the HTTP server).

`LLMEngine` is single-threaded by design. `EngineLoop` gives it one thread that does everything to it:
commands from other threads (add a request, abort one, run a function between steps) wait in a queue
and run at the top of each iteration, then one `step()` runs if any request is in flight, and each
request's outputs go to the `Sink` given with it. With nothing in flight the thread sleeps until a
command arrives.

Lifecycle: `with EngineLoop(engine) as loop:` enters the engine on the caller's thread (device,
transport, weights), then starts the thread. Leaving stops the thread between steps, ends every
request still in flight with `Sink.fail`, and closes the engine. If a step raises (a swapped block
that fails to authenticate under `cc` or `pipellm`), the loop stops the same way and refuses new work:
the engine's state is then half done and nothing more may run on it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, TypeVar

import torch

from veil.engine.engine import LLMEngine, RequestOutput
from veil.model.sampling import SamplingParams

T = TypeVar("T")


class EngineStopped(RuntimeError):
    """The loop is not running (not started, closed, or stopped by a failed step)."""


class Sink(Protocol):
    """Where one request's outputs go; called on the loop's thread, so it must not block."""

    def put(self, output: RequestOutput, compute_s: float) -> None:
        """One step's output; `compute_s` is the request's share of the step's time."""

    def fail(self, error: BaseException) -> None:
        """The request ends without finishing: the engine stopped."""


@dataclass
class LoopStats:
    """Counters of the loop (the engine keeps its own)."""

    steps: int = 0
    busy_s: float = 0.0  # time inside `step()`
    requests: int = 0  # requests added
    aborted: int = 0  # requests aborted by a caller
    in_flight: int = 0  # requests added and not yet finished
    errors: list[str] = field(default_factory=list)  # the step failure that stopped the loop, if any


class EngineLoop:
    """Runs `engine` on one thread; `submit`, `abort` and `call` are safe from any thread."""

    def __init__(self, engine: LLMEngine, *, name: str = "veil-engine") -> None:
        self.engine = engine
        self.stats = LoopStats()
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders posting against the thread's final drain
        self._closed = False  # no command is accepted any more
        self._sinks: dict[int, Sink] = {}  # loop thread only
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self._failure: BaseException | None = None
        self._started = False

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> EngineLoop:
        if self._started:
            raise RuntimeError("the loop was already started")
        self.engine.__enter__()
        self._started = True
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop between steps, fail every request in flight, close the engine (idempotent)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._closed = True
        self._drain_commands()  # never started: refuse what was posted
        self.engine.close()

    @property
    def running(self) -> bool:
        return self._started and not self._stopping and self._failure is None

    # commands (any thread) -------------------------------------------------------------------------
    def submit(
        self,
        sink: Sink,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> int:
        """Add a request whose outputs go to `sink`; returns its id once the engine accepted it.

        Raises:
            ValueError: what `LLMEngine.add_request` refuses (the request is not added).
            EngineStopped: if the loop is not running.
        """

        def add() -> int:
            request_id = self.engine.add_request(
                prompt_token_ids, params, prompt_embeds=prompt_embeds, adapter=adapter
            )
            self._sinks[request_id] = sink
            self.stats.requests += 1
            self.stats.in_flight = len(self._sinks)
            return request_id

        return self.call(add)

    def abort(self, request_id: int) -> None:
        """Abort a request (its sink hears nothing more); a no-op for a finished or unknown one.
        Does not wait: the blocks are free before the next step."""

        def abort() -> None:
            if self._sinks.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self.stats.aborted += 1
                self.stats.in_flight = len(self._sinks)

        if self.running:
            self._post(_Command(abort, None))

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop's thread between steps and return its result (or raise its error).

        Raises:
            EngineStopped: if the loop is not running, or stops before `fn` runs.
        """
        if not self.running:
            raise self._stopped()
        future: Future[T] = Future()
        self._post(_Command(fn, future))
        return future.result()

    # the thread ------------------------------------------------------------------------------------
    def _post(self, command: _Command) -> None:
        with self._lock:
            if self._closed:
                command.refuse(self._stopped())
                return
            self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._drain_commands()
                    if self._stopping:
                        break
                    if not self.engine.has_unfinished():
                        self._wake.wait()
                        self._wake.clear()
                        continue
                    self._step()
        except BaseException as exc:  # a failed step: the engine is half done, stop for good
            self._failure = exc
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._stopping = True
            with self._lock:
                self._closed = True
            self._drain_commands()  # refuse what arrived after the last iteration
            error = self._stopped()
            for sink in self._sinks.values():
                sink.fail(error)
            self._sinks.clear()
            self.stats.in_flight = 0

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if self._stopping:
                command.refuse(self._stopped())
            else:
                command.run()

    def _step(self) -> None:
        started = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - started
        self.stats.steps += 1
        self.stats.busy_s += elapsed
        share = elapsed / max(len(outputs), 1)
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            sink.put(out, share)
        self.stats.in_flight = len(self._sinks)

    def _stopped(self) -> EngineStopped:
        if self._failure is not None:
            return EngineStopped(f"the engine stopped after a failed step: {self._failure}")
        return EngineStopped("the engine is not running")


@dataclass(frozen=True)
class _Command:
    """A function to run on the loop's thread, and where its result goes (None: nowhere)."""

    fn: Callable[[], object]
    future: Future | None

    def run(self) -> None:
        if self.future is None:
            self.fn()
        elif self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except BaseException as exc:
                self.future.set_exception(exc)

    def refuse(self, error: EngineStopped) -> None:
        if self.future is not None and self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)
