"""Host memory a transport may read ahead of time.

`HostBuffer` contract (what a speculative transport relies on):
- It wraps one contiguous CPU tensor; its bytes are `tensor.view(uint8)`, flattened.
- `source_id` is a stable integer naming the buffer for its whole life (unique within the process).
- `version` is a write counter. Every writer that goes through veil announces its writes: either
  inside `with buf.write():` (the version is bumped when the write begins *and* when it ends) or by
  calling `mark_written()` after writing. A ciphertext sealed from the buffer is valid only if
  `stable_version()` returned v before sealing and `version == v` (with no write in progress) when it
  is used. Writes that bypass both announcements are the caller's bug: a transport may then send bytes
  it read before the write.
- Transports that *write* into a HostBuffer (device-to-host) bump its version through `write()`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_source_ids = itertools.count(1)  # process-wide id source; next() on a count is atomic under the GIL


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor of any dtype, as a flat uint8 tensor sharing its memory.

    Raises:
        ValueError: if the tensor is not on the CPU or not contiguous.
    """
    if tensor.device.type != "cpu":
        raise ValueError("tensor must be on the CPU")
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous")
    if tensor.dtype == torch.uint8:
        return tensor.reshape(-1)
    return tensor.reshape(-1).view(torch.uint8)


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """`dst[:] = src` for equal-length byte views, without holding the GIL during the copy.

    A memoryview slice assignment copies while holding the GIL; on the copy engine's thread that
    stalls layer compute on the caller's thread between its torch calls. numpy releases it.
    """
    if len(dst) != len(src):
        raise ValueError(f"copy of {len(src)} bytes into {len(dst)}")
    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def memory_of(byte_tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over a flat uint8 CPU tensor (for the AEAD calls)."""
    return memoryview(byte_tensor.numpy())


class HostBuffer:
    """A contiguous CPU tensor with a stable `source_id` and a write `version` (see module docstring).

    Args:
        tensor: contiguous CPU tensor of any dtype; wrapped, not copied.
        source_id: explicit stable id; a fresh unique one when None.

    Raises:
        ValueError: if the tensor is not a contiguous CPU tensor.
    """

    def __init__(self, tensor: torch.Tensor, *, source_id: int | None = None) -> None:
        self.bytes = byte_view(tensor)
        self.tensor = tensor
        self.source_id = next(_source_ids) if source_id is None else source_id
        self._version = 0
        self._writers = 0
        self._lock = threading.Lock()

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype, *, source_id: int | None = None) -> HostBuffer:
        """Allocate an uninitialised buffer."""
        return cls(torch.empty(shape, dtype=dtype), source_id=source_id)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.bytes.numel()

    @property
    def version(self) -> int:
        """The write counter."""
        return self._version

    @property
    def writing(self) -> bool:
        """True while a `write()` context is open."""
        return self._writers > 0

    def stable_version(self) -> int | None:
        """The version if no write is in progress, else None (do not seal now)."""
        with self._lock:
            return None if self._writers else self._version

    def memory(self) -> memoryview:
        """The buffer's bytes as a writable memoryview."""
        return memory_of(self.bytes)

    @contextmanager
    def write(self) -> Iterator[torch.Tensor]:
        """Announce a write: bumps `version` on entry and on exit; yields the tensor."""
        with self._lock:
            self._writers += 1
            self._version += 1
        try:
            yield self.tensor
        finally:
            with self._lock:
                self._writers -= 1
                self._version += 1

    def mark_written(self) -> int:
        """Announce a write that already happened; returns the new version."""
        with self._lock:
            self._version += 1
            return self._version

    def __repr__(self) -> str:
        return f"HostBuffer(source_id={self.source_id}, nbytes={self.nbytes}, version={self._version})"
