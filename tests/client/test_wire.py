"""The one tensor format (safetensors): round trips, and every malformed or unbounded input refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from veil import wire

F32 = frozenset({torch.float32})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("shape", [(3,), (1, 5, 7), (2, 0, 4), (1, 1, 1, 1, 1, 1, 1, 2)])
def test_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = (torch.randn(shape) * 100).to(dtype)
    out = wire.decode(wire.encode({"t": tensor}), names=("t",))["t"]
    assert out.dtype == dtype and tuple(out.shape) == shape and torch.equal(out, tensor)


def _raw(shape: list[int], dtype: str = "F32", data: int = 0, name: str = "t") -> bytes:
    """A safetensors message written by hand, as an attacker would."""
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, data]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(data)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "not a safetensors"),
        (b"\xff" * 16, "not a safetensors"),
        (_raw([2, 2], data=15), "not a safetensors"),  # length does not match the shape
        (_raw([0, 2**63]), "dimension exceeds"),  # zero-size, but a dimension of 2^63
        (_raw([0, 2**64 - 1]), "dimension exceeds"),
        (_raw([5, 4], data=80), "elements"),
        (_raw([2, 2], dtype="F64", data=32), "dtype"),
        (_raw([2], name="other", data=8), "expected tensors"),
        (_raw([], data=4), "ndim"),
        (_raw([1] * 9, data=4), "ndim"),
    ],
    ids=["empty", "garbage", "short-data", "dim-2^63", "dim-2^64", "elements", "f64", "name", "0-d", "9-d"],
)
def test_malformed_or_unbounded(blob: bytes, match: str) -> None:
    with pytest.raises(wire.WireFormatError, match=match):
        wire.decode(blob, names=("t",), dtypes=F32, bounds=wire.Bounds(max_dim=1 << 16, max_elements=16))


def test_extra_tensor_refused() -> None:
    blob = wire.encode({"t": torch.zeros(2), "u": torch.zeros(2)})
    with pytest.raises(wire.WireFormatError, match="expected tensors"):
        wire.decode(blob, names=("t",))
