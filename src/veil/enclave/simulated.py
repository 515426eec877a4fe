"""SIMULATION MODE platform: an Ed25519 "platform key" on local disk signs enclave reports.

Like SGX's simulation mode, this exercises the whole protocol and protects NOTHING: the platform key is
a file any local user with access to the cache can read, the "enclave" is ordinary process memory that
a debugger, the OS or the client's owner can read, and the measurement is computed by the code being
measured. A verifier accepts simulated evidence only if its policy sets `allow_simulated=True`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attest.evidence import SIM_MAGIC, SIMULATED, simulated_signed_bytes
from veil.enclave.measurement import code_measurement

PLATFORM_KEY_FILE = "simulated-platform.ed25519"


class SimulationModeWarning(UserWarning):
    """Emitted whenever a simulated platform is opened: it provides no protection."""


class SimulatedPlatform:
    """SIMULATION: signs reports with a platform key kept in `cache_dir` (created on first use)."""

    provider = SIMULATED

    def __init__(self, cache_dir: Path, config_encoding: bytes) -> None:
        warnings.warn(
            "veil CMIF enclave in SIMULATION MODE: no hardware isolation, no real attestation",
            SimulationModeWarning,
            stacklevel=2,
        )
        self._key = load_platform_key(cache_dir, create=True)
        self._measurement = code_measurement(config_encoding)

    @property
    def signer(self) -> bytes:
        """The raw Ed25519 public key a verifier must trust to accept this platform's reports."""
        return _raw_public(self._key)

    def report(self, data: bytes) -> tuple[str, bytes]:
        signed = simulated_signed_bytes(self._measurement, data, self.signer)
        assert signed.startswith(SIM_MAGIC)
        return self.provider, signed + self._key.sign(signed)

    def sealing_key(self, label: bytes) -> bytes:
        """A key bound to this platform and the measurement (as SGX's MRENCLAVE sealing policy)."""
        secret = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        info = b"veil-sim-sealing-v1" + self._measurement + label
        return HKDF(hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def load_platform_key(cache_dir: Path, *, create: bool) -> ed25519.Ed25519PrivateKey:
    """The simulated platform key under `cache_dir/cmif`; created (mode 0600) if `create`."""
    path = cache_dir / "cmif" / PLATFORM_KEY_FILE
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no simulated platform key at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        create_secret_file(path, os.urandom(32))
    return ed25519.Ed25519PrivateKey.from_private_bytes(path.read_bytes())


def platform_signer(cache_dir: Path) -> bytes:
    """The simulated platform's public key (to trust it on a loopback demo server)."""
    return _raw_public(load_platform_key(cache_dir, create=True))


def _raw_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def create_secret_file(path: Path, secret: bytes) -> None:
    """Create `path` (mode 0600) holding `secret` unless it exists; never overwrites."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    try:
        os.link(tmp, path)  # first writer wins; a concurrent creator reads the winner's key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
