"""The simulated measurement covers exactly the code the enclave runs."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

import veil.enclave
import veil.privacy
from veil.enclave import measurement


def test_every_enclave_and_privacy_module_is_measured() -> None:
    measured = measurement.trusted_modules()
    for package in (veil.enclave, veil.privacy):
        for info in pkgutil.iter_modules(package.__path__, prefix=package.__name__ + "."):
            assert info.name in measured
    # what the enclave imports from the protocol is measured with it
    assert {"veil.attest.evidence", "veil.attest.envelope", "veil.wire", "veil.errors"} <= set(measured)


@pytest.mark.parametrize(
    "server_side",
    [
        "veil.attest.verifier",
        "veil.attest.wrap",  # the server's half of provisioning (issue 12: it was measured)
        "veil.attest.reports",
        "veil.attest.nonces",
        "veil.server",
        "veil.client",
        "veil.eval",
        "veil.bench",
    ],
)
def test_server_and_evaluation_code_is_not_in_the_enclave(server_side: str) -> None:
    assert not any(m == server_side or m.startswith(server_side + ".") for m in measurement.trusted_modules())


def test_measurement_changes_with_any_measured_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = measurement.code_measurement(b"config")
    assert before != measurement.code_measurement(b"other config")
    modules = measurement.trusted_modules()
    changed = tmp_path / "evidence.py"
    changed.write_bytes(modules["veil.attest.evidence"].read_bytes() + b"\n# one more line\n")
    monkeypatch.setattr(measurement, "trusted_modules", lambda: {**modules, "veil.attest.evidence": changed})
    assert measurement.code_measurement(b"config") != before
