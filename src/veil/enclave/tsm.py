"""Linux configfs-tsm platform: hardware attestation reports from a TDX or SEV-SNP confidential VM.

The kernel ABI (Documentation/ABI/testing/configfs-tsm-report): `mkdir $root/$name` creates a report
instance whose attributes appear at once; writing up to 64 bytes to `inblob` sets the report data;
reading `outblob` returns the provider's signed report over it; `provider` names the format
("tdx_guest", "sev_guest"); `generation` counts writes to the instance (from 0), so a reader that finds
it other than 1 after its single write lost a race with another writer and must retry.

Here the "enclave" is the whole confidential VM. Sealing at rest has no hardware key on this path (TDX
has none; SEV-SNP's derived keys are not exposed through configfs-tsm): sealed weights use a random key
file in the cache, so their confidentiality at rest rests on the VM's encrypted disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.enclave.simulated import create_secret_file

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
SEALING_KEY_FILE = "tsm-sealing.key"


class TsmError(OSError):
    """The configfs-tsm interface failed or kept racing with other writers."""


def tsm_available(root: Path = DEFAULT_TSM_ROOT) -> bool:
    return root.is_dir() and os.access(root, os.W_OK)


class TsmPlatform:
    """Reports through configfs-tsm under `root` (injectable: tests use a fake tree)."""

    def __init__(
        self, cache_dir: Path, *, root: Path = DEFAULT_TSM_ROOT, attempts: int = 3, wait_s: float = 2.0
    ) -> None:
        if not root.is_dir():
            raise TsmError(f"configfs-tsm report directory {root} does not exist")
        self.root = root
        self._cache_dir = cache_dir
        self._attempts = attempts
        self._wait_s = wait_s
        self.provider = ""  # known after the first report

    def report(self, data: bytes) -> tuple[str, bytes]:
        """(provider, outblob) for 64 bytes of report data."""
        if len(data) != 64:
            raise ValueError(f"report data must be 64 bytes, got {len(data)}")
        for _ in range(self._attempts):
            entry = self.root / f"veil-{secrets.token_hex(8)}"
            entry.mkdir()
            try:
                result = self._read_report(entry, data)
            finally:
                _remove_entry(entry)
            if result is not None:
                self.provider = result[0]
                return result
        raise TsmError(f"configfs-tsm report kept changing under {self.root} (concurrent writers)")

    def _read_report(self, entry: Path, data: bytes) -> tuple[str, bytes] | None:
        (entry / "inblob").write_bytes(data)
        outblob = self._read_attribute(entry / "outblob")
        provider = (entry / "provider").read_text().strip()
        # The instance is new and randomly named, so ours must be its only write (generation 1).
        if _read_generation(entry) != 1:
            return None
        return provider, outblob

    def _read_attribute(self, path: Path) -> bytes:
        # configfs creates attributes with the directory; the wait only covers slow fake trees.
        deadline = time.monotonic() + self._wait_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise TsmError(f"{path} did not appear")
            time.sleep(0.001)
        blob = path.read_bytes()
        if not blob:
            raise TsmError(f"{path} is empty")
        return blob

    def sealing_key(self, label: bytes) -> bytes:
        """Derived from a random key file in the cache (see the module docstring)."""
        path = self._cache_dir / "cmif" / SEALING_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            create_secret_file(path, os.urandom(32))
        secret = path.read_bytes()
        return HKDF(hashes.SHA256(), length=32, salt=None, info=b"veil-tsm-sealing-v1" + label).derive(secret)


def _read_generation(entry: Path) -> int:
    path = entry / "generation"
    return int(path.read_text().strip()) if path.exists() else 0


def _remove_entry(entry: Path) -> None:
    # configfs removes the attributes with the directory; a fake tree keeps its files (names are random)
    with contextlib.suppress(OSError):
        entry.rmdir()
