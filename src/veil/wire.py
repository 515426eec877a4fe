"""A compact binary tensor format for the split endpoints.

Layout (all integers little-endian):
    offset 0   4 bytes   magic b"VTN1"
    offset 4   u8        format version (1)
    offset 5   u8        dtype code (see `DTYPE_CODES`)
    offset 6   u8        ndim, 1..8
    offset 7   u8        reserved, 0
    offset 8   ndim x u64 shape
    then       prod(shape) * itemsize bytes, C order, little-endian

`decode` checks every field and that the payload length is exact; any violation is `WireFormatError`
(a `ValueError`) whose message names the constraint.
"""

from __future__ import annotations

import struct

import torch

MAGIC = b"VTN1"
VERSION = 1
MAX_NDIM = 8
_HEADER = struct.Struct("<4sBBBB")

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class WireFormatError(ValueError):
    """Bytes that are not a well-formed tensor in this format."""


def encode(tensor: torch.Tensor) -> bytes:
    """Serialize a CPU tensor."""
    if tensor.dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {tensor.dtype} has no wire code; supported: {list(DTYPE_CODES)}")
    if not 1 <= tensor.dim() <= MAX_NDIM:
        raise ValueError(f"ndim must be in 1..{MAX_NDIM}, got {tensor.dim()}")
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[tensor.dtype], tensor.dim(), 0)
    shape = struct.pack(f"<{tensor.dim()}Q", *tensor.shape)
    data = tensor.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw 16-bit words
        data = data.view(torch.int16)
    return header + shape + data.numpy().tobytes()


def decode(blob: bytes, *, max_bytes: int | None = None) -> torch.Tensor:
    """Parse one tensor; the result owns its memory."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise WireFormatError(f"tensor of {len(blob)} bytes exceeds the limit of {max_bytes}")
    if len(blob) < _HEADER.size:
        raise WireFormatError(f"need at least {_HEADER.size} header bytes, got {len(blob)}")
    magic, version, code, ndim, reserved = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise WireFormatError("bad magic: not a veil tensor")
    if version != VERSION:
        raise WireFormatError(f"unsupported version {version}, expected {VERSION}")
    if code not in _DTYPES:
        raise WireFormatError(f"unknown dtype code {code}")
    if not 1 <= ndim <= MAX_NDIM or reserved != 0:
        raise WireFormatError(f"ndim must be in 1..{MAX_NDIM} and the reserved byte 0")
    offset = _HEADER.size + 8 * ndim
    if len(blob) < offset:
        raise WireFormatError("truncated shape")
    shape = struct.unpack_from(f"<{ndim}Q", blob, _HEADER.size)
    dtype = _DTYPES[code]
    numel = 1
    for n in shape:
        numel *= n
    expected = numel * dtype.itemsize
    if len(blob) - offset != expected:
        raise WireFormatError(f"payload is {len(blob) - offset} bytes, shape {shape} needs {expected}")
    raw = bytearray(blob[offset:])
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(raw, dtype=storage_dtype) if raw else torch.empty(0, dtype=storage_dtype)
    return tensor.view(dtype).view(shape)
