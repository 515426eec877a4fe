"""The one tensor wire format of veil's HTTP endpoints and files: safetensors.

A message is a safetensors file (an 8-byte header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian data). The `safetensors` library checks that the
header is well formed and that every byte range matches its dtype and shape; this module adds what a
server must check before it allocates anything: the expected tensor names, allowed dtypes, at most
`MAX_NDIM` dimensions, each dimension at most `Bounds.max_dim`, and at most `Bounds.max_elements`
elements (a zero-size tensor with a dimension of 2^63 is refused here, not in torch).

Every violation is `WireFormatError` (a `ValueError`) whose message names the constraint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

MEDIA_TYPE = "application/vnd.veil.safetensors"
MAX_NDIM = 8
_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


class WireFormatError(ValueError):
    """Bytes that are not a well-formed message of the expected tensors."""


@dataclass(frozen=True)
class Bounds:
    """What a decoder accepts before it builds a tensor."""

    max_dim: int = 1 << 31  # any one dimension
    max_elements: int = 1 << 31  # product of a tensor's dimensions


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize CPU tensors by name (contiguous copies are made where needed)."""
    for name, tensor in tensors.items():
        if not 1 <= tensor.dim() <= MAX_NDIM:
            raise ValueError(f"tensor {name!r}: ndim must be in 1..{MAX_NDIM}, got {tensor.dim()}")
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode(
    blob: bytes | bytearray,
    *,
    names: tuple[str, ...],
    dtypes: frozenset[torch.dtype] | None = None,
    bounds: Bounds = Bounds(),
) -> dict[str, torch.Tensor]:
    """Exactly the tensors `names` (no more, no fewer), checked against `dtypes` and `bounds`.

    The results own their memory. Raises `WireFormatError`.
    """
    try:
        entries = safetensors.deserialize(bytes(blob))
    except Exception as exc:  # the library raises SafetensorError and others for malformed input
        raise WireFormatError(f"not a safetensors message: {exc}") from None
    found = {name for name, _ in entries}
    if found != set(names) or len(entries) != len(names):
        raise WireFormatError(f"expected tensors {sorted(names)}, got {sorted(found)}")
    return {name: _tensor(name, entry, dtypes, bounds) for name, entry in entries}


def _tensor(
    name: str, entry: dict[str, object], dtypes: frozenset[torch.dtype] | None, bounds: Bounds
) -> torch.Tensor:
    dtype = _DTYPES.get(str(entry["dtype"]))
    if dtype is None or (dtypes is not None and dtype not in dtypes):
        raise WireFormatError(f"tensor {name!r}: dtype {entry['dtype']} not accepted")
    shape = [int(n) for n in entry["shape"]]  # type: ignore[attr-defined]
    if not 1 <= len(shape) <= MAX_NDIM:
        raise WireFormatError(f"tensor {name!r}: ndim must be in 1..{MAX_NDIM}, got {len(shape)}")
    if any(n > bounds.max_dim for n in shape):
        raise WireFormatError(f"tensor {name!r}: a dimension exceeds {bounds.max_dim}")
    numel = 1
    for n in shape:
        numel *= n
    if numel > bounds.max_elements:
        raise WireFormatError(f"tensor {name!r}: more than {bounds.max_elements} elements")
    data = entry["data"]
    assert isinstance(data, bytearray) and len(data) == numel * dtype.itemsize  # checked by safetensors
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)
