"""The emulated accelerator: a protected memory arena, a copy engine and streams.

Device memory is CPU memory that only the device hands out (`DeviceBuffer`); the arena enforces a
capacity in bytes. The copy engine is a `Stream` whose thread runs the device's half of every transfer
(opening host-to-device messages, sealing device-to-host ones). Nothing runs until the device is
entered as a context manager; leaving it drains and stops every stream.
"""

from __future__ import annotations

import math
import threading
from types import TracebackType

import torch

from veil.cc.errors import DeviceOutOfMemory
from veil.cc.host import memory_of
from veil.cc.stream import Stream


class DeviceBuffer:
    """A block of device memory; not created directly (use `Device.alloc` / `Device.empty`).

    Attributes:
        nbytes: size in bytes.
        dtype, shape: the typed view `tensor` presents.
    """

    def __init__(
        self, device: Device, memory: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> None:
        self.device = device
        self.nbytes = memory.numel()
        self.dtype = dtype
        self.shape = shape
        self._bytes: torch.Tensor | None = memory

    @property
    def freed(self) -> bool:
        """True after `free()`."""
        return self._bytes is None

    @property
    def bytes(self) -> torch.Tensor:
        """The memory as a flat uint8 tensor.

        Raises:
            RuntimeError: after `free()`.
        """
        if self._bytes is None:
            raise RuntimeError("device buffer was freed")
        return self._bytes

    @property
    def tensor(self) -> torch.Tensor:
        """The memory as a tensor of `dtype` and `shape` (a device tensor, for compute)."""
        return self.bytes.view(self.dtype).view(self.shape)

    def memory(self) -> memoryview:
        """The memory as a writable memoryview (for copy-engine work)."""
        return memory_of(self.bytes)

    def free(self) -> None:
        """Return the memory to the arena (idempotent)."""
        if self._bytes is not None:
            memory, self._bytes = self._bytes, None
            self.device._release(memory)


class Device:
    """An emulated accelerator.

    Args:
        capacity_bytes: size of the protected arena.
        name: prefix of the worker threads' names.

    Raises:
        ValueError: if capacity_bytes is negative.
    """

    def __init__(self, *, capacity_bytes: int, name: str = "veil-device") -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self._allocated = 0
        self._cache: dict[int, list[torch.Tensor]] = {}  # freed blocks by size, for reuse
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._copy_engine = Stream(f"{name}-copy-engine")
        self._streams: list[Stream] = []

    def __enter__(self) -> Device:
        self._copy_engine.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drain and stop every stream (idempotent)."""
        for stream in [*self._streams, self._copy_engine]:
            stream.close()
        self._streams.clear()

    @property
    def copy_engine(self) -> Stream:
        """The copy engine's stream.

        Raises:
            RuntimeError: if the device is not started.
        """
        if not self._copy_engine.running:
            raise RuntimeError("device is not started; use it as a context manager")
        return self._copy_engine

    def new_stream(self, name: str) -> Stream:
        """Start another stream (e.g. for compute); it is stopped with the device."""
        _ = self.copy_engine  # raises if not started
        stream = Stream(f"{self.name}-{name}").__enter__()
        self._streams.append(stream)
        return stream

    def synchronize(self) -> None:
        """Wait for all streams; raise the first error any of them hit since the last synchronize."""
        for stream in [self.copy_engine, *self._streams]:
            stream.synchronize()

    @property
    def allocated_bytes(self) -> int:
        """Bytes currently allocated."""
        return self._allocated

    @property
    def free_bytes(self) -> int:
        """Bytes still available."""
        return self.capacity_bytes - self._allocated

    def alloc(self, nbytes: int) -> DeviceBuffer:
        """Allocate `nbytes` of device memory (a uint8 buffer).

        Raises:
            ValueError: if nbytes is negative.
            DeviceOutOfMemory: if it exceeds the free capacity.
        """
        return self.empty((nbytes,), torch.uint8)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> DeviceBuffer:
        """Allocate an uninitialised device tensor of `shape` and `dtype`.

        Raises:
            ValueError: if a dimension is negative.
            DeviceOutOfMemory: if it exceeds the free capacity.
        """
        if any(dim < 0 for dim in shape):
            raise ValueError("shape dimensions must be >= 0")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            if nbytes > self.capacity_bytes - self._allocated:
                raise DeviceOutOfMemory(
                    f"cannot allocate {nbytes} bytes: {self.capacity_bytes - self._allocated} of "
                    f"{self.capacity_bytes} free"
                )
            self._allocated += nbytes
            memory = self._reuse(nbytes)
        if memory is None:
            with torch.inference_mode(False):  # device memory is written by the copy engine's thread
                memory = torch.empty(nbytes, dtype=torch.uint8)
        return DeviceBuffer(self, memory, dtype, shape)

    def _reuse(self, nbytes: int) -> torch.Tensor | None:
        """A cached block of exactly `nbytes` (caller holds the lock), evicting the cache beyond capacity.

        Freed blocks are kept for reuse, like an accelerator's caching allocator: allocating fresh
        host pages for every streamed layer would charge page faults to every transfer. Cached blocks
        plus live allocations never exceed the capacity; capacity checks count live bytes only.
        """
        memory = None
        blocks = self._cache.get(nbytes)
        if blocks:
            memory = blocks.pop()
            self._cached_bytes -= nbytes
            if not blocks:
                del self._cache[nbytes]
        while self._cached_bytes + self._allocated > self.capacity_bytes and self._cache:
            size, evicted = next(iter(self._cache.items()))
            evicted.pop()
            self._cached_bytes -= size
            if not evicted:
                del self._cache[size]
        return memory

    def _release(self, memory: torch.Tensor) -> None:
        with self._lock:
            self._allocated -= memory.numel()
            self._cache.setdefault(memory.numel(), []).append(memory)
            self._cached_bytes += memory.numel()
