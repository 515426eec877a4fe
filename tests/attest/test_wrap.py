"""Wrapping weights for an enclave key (HPKE-style) and sealing at rest: round trips and tampering."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.attest import wrap as provisioning
from veil.attest.evidence import VerificationError
from veil.attest.wrap import WrapHeader, WrappedWeights, unwrap_weights, wrap_weights


def _raw(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture
def recipient() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def _header(shape: tuple[int, ...] = (10, 4)) -> WrapHeader:
    return WrapHeader("toy", shape, policy_digest=b"\x01" * 32, measurement=b"\x02" * 48)


@pytest.fixture(params=[1 << 30, 64], ids=["one-chunk", "many-chunks"])
def chunk_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(provisioning, "CHUNK_BYTES", request.param)
    return request.param


def test_round_trip_through_bytes(recipient: x25519.X25519PrivateKey, chunk_bytes: int) -> None:
    weights = torch.randn(10, 4)
    blob = wrap_weights(weights, _raw(recipient), _header()).to_bytes()
    assert weights.numpy().tobytes() not in blob
    assert torch.equal(unwrap_weights(WrappedWeights.from_bytes(blob), recipient), weights)


def test_wrong_recipient(recipient: x25519.X25519PrivateKey) -> None:
    wrapped = wrap_weights(torch.randn(10, 4), _raw(recipient), _header())
    with pytest.raises(VerificationError):
        unwrap_weights(wrapped, x25519.X25519PrivateKey.generate())


def test_header_is_authenticated(recipient: x25519.X25519PrivateKey) -> None:
    wrapped = wrap_weights(torch.randn(10, 4), _raw(recipient), _header())
    forged = WrapHeader("toy", (10, 4), policy_digest=b"\x03" * 32, measurement=b"\x02" * 48)
    with pytest.raises(VerificationError):
        unwrap_weights(WrappedWeights(forged, wrapped.encapsulated_key, wrapped.ciphertext), recipient)


@pytest.mark.parametrize("mutation", ["flip", "truncate-chunk", "drop-last-chunk", "swap-chunks", "empty"])
def test_ciphertext_tampering(recipient: x25519.X25519PrivateKey, chunk_bytes: int, mutation: str) -> None:
    wrapped = wrap_weights(torch.randn(10, 4), _raw(recipient), _header())
    ct, step = bytearray(wrapped.ciphertext), min(chunk_bytes, 160) + 16
    if mutation == "flip":
        ct[len(ct) // 2] ^= 1
    elif mutation == "truncate-chunk":
        ct = ct[:-1]
    elif mutation == "drop-last-chunk":
        ct = ct[:-step] if len(ct) > step else ct[:-1]
    elif mutation == "swap-chunks":
        ct = ct[step : 2 * step] + ct[:step] + ct[2 * step :] if len(ct) > step else ct[::-1]
    else:
        ct = bytearray()
    with pytest.raises(VerificationError):
        unwrap_weights(WrappedWeights(wrapped.header, wrapped.encapsulated_key, bytes(ct)), recipient)


@pytest.mark.parametrize("blob", [b"", b"VEILWRP1", b"NOTMAGIC" + bytes(100), b"VEILWRP1\xff\x00\x00\x00{}"])
def test_malformed_blob(blob: bytes) -> None:
    with pytest.raises(VerificationError):
        WrappedWeights.from_bytes(blob)


def test_wrap_misuse(recipient: x25519.X25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="float32"):
        wrap_weights(torch.randn(10, 4).half(), _raw(recipient), _header())
    with pytest.raises(ValueError, match="shape"):
        wrap_weights(torch.randn(4, 10), _raw(recipient), _header())


def test_seal_round_trip_and_binding(chunk_bytes: int) -> None:
    key, payload = bytes(range(32)), bytes(range(200))
    blob = provisioning.seal(key, payload, b"aad")
    assert provisioning.unseal(key, blob, b"aad") == payload
    assert provisioning.seal(key, payload, b"aad") != blob  # fresh nonce per blob
    for bad_key, aad in [(bytes(32), b"aad"), (key, b"other")]:
        with pytest.raises(VerificationError):
            provisioning.unseal(bad_key, blob, aad)
