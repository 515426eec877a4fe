"""Provisioning over RFC 9180 HPKE: the library against the RFC's vectors, round trips, tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from veil import wire
from veil.attest.envelope import WrapHeader
from veil.attest.evidence import Kem, VerificationError
from veil.attest.wrap import wrap
from veil.enclave.keys import RecipientKey

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc9180-base-x25519-sha256.json").read_text())
_AEADS = {1: hpke.AEAD.AES_128_GCM, 2: hpke.AEAD.AES_256_GCM}


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"aead{v['aead_id']}")
def test_rfc9180_vectors_open(vector: dict[str, object]) -> None:
    """The HPKE veil calls (cryptography's) opens the RFC's ciphertext to the RFC's plaintext."""
    h = {k: bytes.fromhex(v) for k, v in vector.items() if isinstance(v, str)}
    assert (vector["mode"], vector["kem_id"], vector["kdf_id"]) == (0, 32, 1)
    private = x25519.X25519PrivateKey.from_private_bytes(h["skRm"])
    assert private.public_key().public_bytes_raw() == h["pkRm"]
    aead = _AEADS[int(vector["aead_id"])]  # type: ignore[call-overload]
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, aead)
    decrypt = rust_openssl.hpke._decrypt_with_aad  # the RFC's vectors carry aad; the public API has none
    assert decrypt(suite, h["enc"] + h["ct"], private, info=h["info"], aad=h["aad"]) == h["pt"]
    with pytest.raises(InvalidTag):
        decrypt(suite, h["enc"] + h["ct"], private, info=h["info"][:-1], aad=h["aad"])


def _header(kem: Kem = Kem.X25519, shape: tuple[int, ...] = (10, 4)) -> WrapHeader:
    return WrapHeader("toy", shape, policy_digest=b"\x01" * 32, measurement=b"\x02" * 48, kem=kem)


@pytest.mark.parametrize("kem", list(Kem))
def test_round_trip(kem: Kem) -> None:
    key = RecipientKey(kem)
    assert len(key.public_bytes()) == kem.public_key_size
    weights = torch.randn(10, 4)
    blob = wrap(weights, key.public_bytes(), _header(kem))
    assert weights.numpy().tobytes() not in blob
    header, opened, session = key.open(blob)
    assert header == _header(kem) and torch.equal(opened, weights) and session == b""
    assert key.open(wrap(weights, key.public_bytes(), _header(kem), session=b"t" * 32))[2] == b"t" * 32
    parts = wire.decode(blob, names=("header", "ciphertext"))  # the blob is a safetensors message
    assert json.loads(parts["header"].numpy().tobytes())["kem"] == kem.value


def test_wrong_recipient_or_kem() -> None:
    blob = wrap(torch.randn(10, 4), RecipientKey().public_bytes(), _header())
    for other in (RecipientKey(), RecipientKey(Kem.MLKEM768_X25519)):
        with pytest.raises(VerificationError, match=r"^verification failed$"):
            other.open(blob)


def _rebuild(blob: bytes, header: bytes | None = None, ciphertext: bytes | None = None) -> bytes:
    parts = {k: v.numpy().tobytes() for k, v in wire.decode(blob, names=("header", "ciphertext")).items()}
    parts["header"] = header if header is not None else parts["header"]
    parts["ciphertext"] = ciphertext if ciphertext is not None else parts["ciphertext"]
    return wire.encode({k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in parts.items()})


@pytest.mark.parametrize("mutation", ["header", "flip", "truncate", "enc"])
def test_tampering_fails_opaquely(mutation: str) -> None:
    key = RecipientKey()
    blob = wrap(torch.randn(10, 4), key.public_bytes(), _header())
    ct = bytearray(wire.decode(blob, names=("header", "ciphertext"))["ciphertext"].numpy().tobytes())
    if mutation == "header":  # another policy digest: bound as HPKE info
        forged = WrapHeader("toy", (10, 4), policy_digest=b"\x03" * 32, measurement=b"\x02" * 48)
        blob = _rebuild(blob, header=forged.encode())
    elif mutation == "flip":
        ct[len(ct) // 2] ^= 1
        blob = _rebuild(blob, ciphertext=bytes(ct))
    elif mutation == "truncate":
        blob = _rebuild(blob, ciphertext=bytes(ct[:-1]))
    else:
        ct[0] ^= 1
        blob = _rebuild(blob, ciphertext=bytes(ct))
    with pytest.raises(VerificationError, match=r"^verification failed$"):
        key.open(blob)


@pytest.mark.parametrize("blob", [b"", b"VEILWRP1" + bytes(100), wire.encode({"x": torch.zeros(3)})])
def test_malformed_blob(blob: bytes) -> None:
    with pytest.raises(VerificationError):
        RecipientKey().open(blob)


def test_wrap_misuse() -> None:
    public = RecipientKey().public_bytes()
    with pytest.raises(ValueError, match="float32"):
        wrap(torch.randn(10, 4).half(), public, _header())
    with pytest.raises(ValueError, match="shape"):
        wrap(torch.randn(4, 10), public, _header())
    with pytest.raises(ValueError, match="1216 bytes"):
        wrap(torch.randn(10, 4), public, _header(Kem.MLKEM768_X25519))
