"""A fake configfs-tsm tree and the report formats a real TSM provider emits (for tests only)."""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from veil.attest import reports


def snp_report(
    key: ec.EllipticCurvePrivateKey, measurement: bytes, data: bytes, *, policy: int = 0x30000, vmpl: int = 0
) -> bytes:
    body = bytearray(reports.SNP_SIGNED)
    struct.pack_into("<I", body, 0, 3)  # version
    struct.pack_into("<Q", body, reports.SNP_POLICY, policy)  # bit 17 is reserved-1; bit 16 SMT
    struct.pack_into("<I", body, reports.SNP_VMPL, vmpl)
    struct.pack_into("<I", body, 0x34, 1)  # ECDSA P-384 with SHA-384
    body[reports.SNP_REPORT_DATA] = data
    body[reports.SNP_MEASUREMENT] = measurement
    r, s = decode_dss_signature(key.sign(bytes(body), ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(512 - 144)
    return bytes(body) + signature


def tdx_quote(
    key: ec.EllipticCurvePrivateKey,
    measurement: bytes,
    data: bytes,
    *,
    attributes: int = 0,
    rtmrs: bytes = bytes(192),
) -> bytes:
    signed = bytearray(reports.TDX_SIGNED)
    struct.pack_into("<HHI", signed, 0, 4, 2, 0x81)
    struct.pack_into("<Q", signed, reports.TDX_TD_ATTRIBUTES, attributes)
    signed[reports.TDX_RTMR0 : reports.TDX_RTMR0 + 192] = rtmrs
    signed[reports.TDX_MRTD] = measurement
    signed[reports.TDX_REPORT_DATA] = data
    r, s = decode_dss_signature(key.sign(bytes(signed), ec.ECDSA(hashes.SHA256())))
    point = key.public_key().public_numbers()
    sig_data = (
        r.to_bytes(32, "big")
        + s.to_bytes(32, "big")
        + point.x.to_bytes(32, "big")
        + point.y.to_bytes(32, "big")
    )
    sig_data += b"\x00" * 6  # empty certification data (type, size)
    return bytes(signed) + struct.pack("<I", len(sig_data)) + sig_data


class FakeTsm:
    """A thread playing the kernel: answers each report instance under `root` once inblob is written."""

    def __init__(
        self,
        root: Path,
        provider: str,
        measurement: bytes,
        *,
        extra_writes: int = 0,
        platform: dict[str, object] | None = None,
    ) -> None:
        self.root = root
        self.platform = platform or {}  # report fields: SNP policy/vmpl, TDX attributes/rtmrs
        self.provider = provider
        self.measurement = measurement
        self.key = ec.generate_private_key(ec.SECP384R1() if provider == reports.SNP else ec.SECP256R1())
        self.extra_writes = extra_writes  # simulate a racing writer on the first N instances
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        root.mkdir(parents=True, exist_ok=True)

    @property
    def signer(self) -> bytes:
        if self.provider == reports.TDX:
            point = self.key.public_key().public_numbers()
            return reports.tdx_attestation_key_der(point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big"))
        return reports.spki_der(self.key.public_key())

    def __enter__(self) -> FakeTsm:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            for entry in self.root.iterdir():
                inblob = entry / "inblob"
                if inblob.exists() and not (entry / "outblob").exists() and inblob.stat().st_size == 64:
                    self._answer(entry, inblob.read_bytes())

    def _answer(self, entry: Path, data: bytes) -> None:
        build = snp_report if self.provider == reports.SNP else tdx_quote
        generation = 1
        if self.extra_writes > 0:
            self.extra_writes -= 1
            generation = 2
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text(f"{generation}\n")
        tmp = entry / ".outblob"
        tmp.write_bytes(build(self.key, self.measurement, data, **self.platform))  # type: ignore[operator]
        tmp.rename(entry / "outblob")
