"""The binary tensor format: round trips, and every malformed input is a WireFormatError."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil import wire


@pytest.mark.parametrize("dtype", list(wire.DTYPE_CODES))
@pytest.mark.parametrize("shape", [(3,), (1, 5, 7), (2, 0, 4), (1, 1, 1, 1, 1, 1, 1, 2)])
def test_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = (torch.randn(shape) * 100).to(dtype)
    out = wire.decode(wire.encode(tensor))
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(out, tensor)


def test_layout_is_little_endian_and_documented() -> None:
    blob = wire.encode(torch.tensor([[1.0, 2.0]]))
    assert blob[:4] == b"VTN1" and blob[4:8] == bytes([1, 1, 2, 0])
    assert struct.unpack("<2Q", blob[8:24]) == (1, 2)
    assert blob[24:] == struct.pack("<2f", 1.0, 2.0)


def _valid() -> bytes:
    return wire.encode(torch.zeros(1, 2, 3))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "header"),
        (b"XXXX" + _valid()[4:], "magic"),
        (_valid()[:4] + b"\x02" + _valid()[5:], "version"),
        (_valid()[:5] + b"\x63" + _valid()[6:], "dtype"),
        (_valid()[:6] + b"\x00" + _valid()[7:], "ndim"),
        (_valid()[:6] + b"\x09" + _valid()[7:], "ndim"),
        (_valid()[:7] + b"\x01" + _valid()[8:], "reserved"),
        (_valid()[:12], "shape"),
        (_valid()[:-1], "payload"),
        (_valid() + b"\x00", "payload"),
        (_valid()[:8] + struct.pack("<3Q", 1, 2**40, 3) + _valid()[32:], "payload"),
    ],
)
def test_malformed(blob: bytes, message: str) -> None:
    with pytest.raises(wire.WireFormatError, match=message):
        wire.decode(blob)


def test_size_limit_checked_before_parsing() -> None:
    with pytest.raises(wire.WireFormatError, match="limit"):
        wire.decode(_valid(), max_bytes=10)


def test_encode_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="wire code"):
        wire.encode(torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ndim"):
        wire.encode(torch.tensor(1.0))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=128))
def test_random_bytes_never_crash(blob: bytes) -> None:
    """Any input either decodes to a tensor or raises the format error: nothing else escapes."""
    try:
        out = wire.decode(blob)
    except wire.WireFormatError:
        return
    assert isinstance(out, torch.Tensor)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=40), st.integers(0, 40))
def test_mutated_headers_never_crash(suffix: bytes, cut: int) -> None:
    try:
        out = wire.decode(_valid()[:cut] + suffix)
    except wire.WireFormatError:
        return
    assert isinstance(out, torch.Tensor)
