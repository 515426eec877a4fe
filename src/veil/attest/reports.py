"""Platform report formats: parse a report, check its signature, return the claims it makes.

Three formats, named by configfs-tsm's `provider` attribute (or veil's own for simulation):
- `veil-simulated`: veil's simulated platform (see `veil.enclave.simulated`), signed with Ed25519. A
  signer is the raw 32-byte Ed25519 public key.
- `sev_guest`: an AMD SEV-SNP ATTESTATION_REPORT (1184 bytes), ECDSA P-384 / SHA-384 over its first
  0x2A0 bytes. A signer is the VCEK's public key as DER SubjectPublicKeyInfo. The chain from the VCEK to
  AMD's root (ARK -> ASK -> VCEK, fetched from AMD's key server) is NOT checked here: the policy pins
  VCEK keys it has checked by other means.
- `tdx_guest`: an Intel TDX quote, version 4, ECDSA P-256 attestation key. The signature over header
  and TD report body is checked with the attestation key carried in the quote, and that key must be
  pinned by the policy (DER SubjectPublicKeyInfo). The QE report and PCK certificate chain that tie the
  key to Intel (DCAP collateral) are NOT checked here.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.attest.evidence import SIM_MAGIC, SIMULATED

SNP = "sev_guest"
TDX = "tdx_guest"

SIM_SIZE = len(SIM_MAGIC) + 48 + 64 + 32 + 64  # magic, measurement, report data, signer, signature

SNP_SIZE = 0x4A0
SNP_SIGNED = 0x2A0  # bytes covered by the signature
SNP_POLICY = 0x08  # u64 guest policy
SNP_POLICY_DEBUG = 1 << 19  # the hypervisor may debug (read and write) the guest
SNP_VMPL = 0x30  # u32 privilege level of the software that asked for the report (0 is the highest)
SNP_REPORT_DATA = slice(0x50, 0x90)
SNP_MEASUREMENT = slice(0x90, 0xC0)

TDX_HEADER = 48
TDX_BODY = 584
TDX_SIGNED = TDX_HEADER + TDX_BODY
TDX_TD_ATTRIBUTES = TDX_HEADER + 120  # u64
TDX_ATTRIBUTE_DEBUG = 1 << 0  # the TD is a debug TD: the host can read its memory
TDX_MRTD = slice(TDX_HEADER + 136, TDX_HEADER + 184)
TDX_RTMR0 = TDX_HEADER + 328  # RTMR0..3, 48 bytes each: firmware, kernel, command line, user
TDX_REPORT_DATA = slice(TDX_HEADER + 520, TDX_HEADER + 584)


class ReportError(Exception):
    """A report that is malformed or not signed by a trusted signer (wrapped by the verifier)."""


@dataclass(frozen=True)
class Claims:
    """What a signed report says; the verifier's policy decides whether that is enough."""

    measurement: bytes  # simulated: SHA-384 of enclave code and config; SNP: MEASUREMENT; TDX: MRTD
    report_data: bytes  # 64 bytes
    signer: bytes  # identity of the key that signed, as the policy lists it
    debug: bool = False  # SNP policy DEBUG bit, TDX TD attribute DEBUG
    vmpl: int = 0  # SNP only: the VMPL that requested the report
    rtmrs: bytes = b""  # TDX only: RTMR0..3 concatenated (192 bytes)


def parse_and_check_signature(provider: str, report: bytes, trusted: frozenset[bytes]) -> Claims:
    """Claims of a report signed by one of `trusted`; `ReportError` otherwise."""
    if provider == SIMULATED:
        return _simulated(report, trusted)
    if provider == SNP:
        return _snp(report, trusted)
    if provider == TDX:
        return _tdx(report, trusted)
    raise ReportError(f"unknown provider {provider[:32]!r}")


def _simulated(report: bytes, trusted: frozenset[bytes]) -> Claims:
    if len(report) != SIM_SIZE or not report.startswith(SIM_MAGIC):
        raise ReportError("malformed simulated report")
    measurement, data, signer, signature = report[8:56], report[56:120], report[120:152], report[152:]
    if signer not in trusted:
        raise ReportError("untrusted simulated platform key")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(signer).verify(signature, report[:152])
    except InvalidSignature:
        raise ReportError("bad signature") from None
    return Claims(measurement, data, signer)


def _snp(report: bytes, trusted: frozenset[bytes]) -> Claims:
    if len(report) != SNP_SIZE:
        raise ReportError("malformed SEV-SNP report")
    version, signature_algo = (
        struct.unpack_from("<I", report, 0)[0],
        struct.unpack_from("<I", report, 0x34)[0],
    )
    if version < 2 or signature_algo != 1:
        raise ReportError("unsupported SEV-SNP report version or signature algorithm")
    r = int.from_bytes(report[SNP_SIGNED : SNP_SIGNED + 72], "little")
    s = int.from_bytes(report[SNP_SIGNED + 72 : SNP_SIGNED + 144], "little")
    signature = encode_dss_signature(r, s)
    for signer in trusted:
        key = _ec_key(signer, ec.SECP384R1)
        if key is None:
            continue
        try:
            key.verify(signature, report[:SNP_SIGNED], ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            continue
        policy, vmpl = (
            struct.unpack_from("<Q", report, SNP_POLICY)[0],
            struct.unpack_from("<I", report, SNP_VMPL)[0],
        )
        debug = bool(policy & SNP_POLICY_DEBUG)
        return Claims(report[SNP_MEASUREMENT], report[SNP_REPORT_DATA], signer, debug=debug, vmpl=vmpl)
    raise ReportError("SEV-SNP report not signed by a trusted VCEK")


def _tdx(quote: bytes, trusted: frozenset[bytes]) -> Claims:
    if len(quote) < TDX_SIGNED + 4 + 128:
        raise ReportError("malformed TDX quote")
    version, key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    if version != 4 or key_type != 2 or tee_type != 0x81:
        raise ReportError("unsupported TDX quote version, key type or TEE type")
    sig_len = struct.unpack_from("<I", quote, TDX_SIGNED)[0]
    sig_data = quote[TDX_SIGNED + 4 : TDX_SIGNED + 4 + sig_len]
    if sig_len < 128 or len(sig_data) != sig_len:
        raise ReportError("malformed TDX quote signature data")
    signer = tdx_attestation_key_der(sig_data[64:128])
    if signer not in trusted:
        raise ReportError("untrusted TDX attestation key")
    key = _ec_key(signer, ec.SECP256R1)
    assert key is not None
    signature = encode_dss_signature(
        int.from_bytes(sig_data[:32], "big"), int.from_bytes(sig_data[32:64], "big")
    )
    try:
        key.verify(signature, quote[:TDX_SIGNED], ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ReportError("bad signature") from None
    attributes = struct.unpack_from("<Q", quote, TDX_TD_ATTRIBUTES)[0]
    rtmrs = quote[TDX_RTMR0 : TDX_RTMR0 + 4 * 48]
    debug = bool(attributes & TDX_ATTRIBUTE_DEBUG)
    return Claims(quote[TDX_MRTD], quote[TDX_REPORT_DATA], signer, debug=debug, rtmrs=rtmrs)


def tdx_attestation_key_der(raw_xy: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a TDX attestation key given as raw x || y (64 bytes)."""
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_xy)
    except ValueError:
        raise ReportError("invalid TDX attestation key") from None
    return spki_der(key)


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _ec_key(der: bytes, curve: type[ec.EllipticCurve]) -> ec.EllipticCurvePublicKey | None:
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve):
        return key
    return None


def fingerprint(signer: bytes) -> str:
    """Short printable id of a signer, for logs and the CLI."""
    return hashlib.sha256(signer).hexdigest()[:16]
