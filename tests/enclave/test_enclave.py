"""Enclave backends, evidence and the verifier: what gets weights and what does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.attest.envelope import WrapHeader
from veil.attest.evidence import SIMULATED, Evidence, VerificationError, simulated_signed_bytes
from veil.attest.nonces import NonceStore
from veil.attest.verifier import Policy, Verifier
from veil.attest.wrap import wrap
from veil.enclave.enclave import Backend, Enclave, EnclaveConfig, open_enclave
from veil.enclave.simulated import SimulatedPlatform, SimulationModeWarning, platform_signer
from veil.enclave.tsm import TsmError

pytestmark = pytest.mark.filterwarnings("ignore::veil.enclave.simulated.SimulationModeWarning")
CONFIG = EnclaveConfig("toy-model", vocab_size=12, hidden_size=4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def enclave(cache: Path) -> Iterator[Enclave]:
    with open_enclave(CONFIG, backend=Backend.SIMULATED, cache_dir=cache) as opened:
        yield opened


def _policy(cache: Path, **overrides: object) -> Policy:
    fields: dict[str, object] = {
        "accepted_measurements": frozenset({CONFIG.simulated_measurement()}),
        "trusted_signers": frozenset({platform_signer(cache)}),
        "allow_simulated": True,
    }
    fields.update(overrides)
    return Policy(**fields)  # type: ignore[arg-type]


def _provision(enclave: Enclave, verifier: Verifier, weights: torch.Tensor) -> None:
    verified = verifier.verify(enclave.evidence(verifier.challenge()))
    header = WrapHeader(CONFIG.model_id, tuple(weights.shape), verifier.policy.digest(), verified.measurement)
    enclave.install(wrap(weights, verified.public_key, header))


def test_simulation_is_loud(cache: Path) -> None:
    with pytest.warns(SimulationModeWarning, match="SIMULATION MODE"):
        SimulatedPlatform(cache, CONFIG.encode())


def test_provision_and_embed(enclave: Enclave, cache: Path) -> None:
    weights = torch.randn(12, 4)
    assert not enclave.provisioned
    with pytest.raises(RuntimeError, match="not provisioned"):
        enclave.embed(torch.tensor([[1]]))
    _provision(enclave, Verifier(_policy(cache)), weights)
    ids = torch.tensor([[3, 0, 11]])
    assert torch.equal(enclave.embed(ids), weights[ids])
    assert not any(isinstance(v, torch.Tensor) for k, v in vars(enclave).items() if not k.startswith("_"))
    with pytest.raises(ValueError, match="token ids"):
        enclave.embed(torch.tensor([[12]]))


def test_sealed_at_rest_and_reloaded(enclave: Enclave, cache: Path) -> None:
    weights = torch.randn(12, 4)
    _provision(enclave, Verifier(_policy(cache)), weights)
    sealed = list((cache / "cmif").glob("*.sealed"))
    assert len(sealed) == 1 and weights.numpy().tobytes()[:64] not in sealed[0].read_bytes()
    with open_enclave(CONFIG, backend=Backend.SIMULATED, cache_dir=cache) as second:
        assert second.load_sealed()
        assert torch.equal(second.embed(torch.tensor([[5]])), weights[torch.tensor([[5]])])
    blob = bytearray(sealed[0].read_bytes())
    blob[-1] ^= 1
    sealed[0].write_bytes(bytes(blob))
    with (
        open_enclave(CONFIG, backend=Backend.SIMULATED, cache_dir=cache) as third,
        pytest.raises(VerificationError),
    ):
        third.load_sealed()


def test_close_wipes(enclave: Enclave, cache: Path) -> None:
    _provision(enclave, Verifier(_policy(cache)), torch.randn(12, 4))
    enclave.close()
    assert not enclave.provisioned


def test_weights_for_another_key_or_model_refused(enclave: Enclave, cache: Path) -> None:
    verifier = Verifier(_policy(cache))
    verified = verifier.verify(enclave.evidence(verifier.challenge()))
    with open_enclave(CONFIG, backend=Backend.SIMULATED, cache_dir=cache) as other:
        header = WrapHeader(CONFIG.model_id, (12, 4), b"", verified.measurement)
        with pytest.raises(VerificationError):
            enclave.install(wrap(torch.randn(12, 4), other.public_key, header))
    with pytest.raises(VerificationError):
        enclave.install(wrap(torch.randn(12, 4), enclave.public_key, WrapHeader("other", (12, 4), b"", b"")))


def _forged_signature(evidence: Evidence) -> Evidence:
    report = bytearray(evidence.report)
    report[-1] ^= 1
    return Evidence(evidence.provider, evidence.public_key, evidence.nonce, bytes(report))


def _other_platform(evidence: Evidence) -> Evidence:
    key = ed25519.Ed25519PrivateKey.generate()
    signer = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = simulated_signed_bytes(evidence.report[8:56], evidence.report[56:120], signer)
    return Evidence(evidence.provider, evidence.public_key, evidence.nonce, body + key.sign(body))


def _swapped_key(evidence: Evidence) -> Evidence:
    return Evidence(evidence.provider, bytes(32), evidence.nonce, evidence.report)


@pytest.mark.parametrize(
    ("tamper", "policy_change", "reason"),
    [
        (None, {"accepted_measurements": frozenset({bytes(48)})}, "measurement"),
        (None, {"allow_simulated": False}, "simulated"),
        (None, {"trusted_signers": frozenset()}, "untrusted"),
        (_forged_signature, {}, "signature"),
        (_other_platform, {}, "untrusted"),
        (_swapped_key, {}, "bind"),
    ],
)
def test_rejected_evidence(enclave: Enclave, cache: Path, tamper, policy_change, reason: str) -> None:  # type: ignore[no-untyped-def]
    verifier = Verifier(_policy(cache, **policy_change))
    evidence = enclave.evidence(verifier.challenge())
    with pytest.raises(VerificationError, match="verification failed") as info:
        verifier.verify(tamper(evidence) if tamper else evidence)
    assert reason in info.value.reason


def test_nonces_are_one_time_and_expire(enclave: Enclave, cache: Path) -> None:
    clock = FakeClock()
    verifier = Verifier(_policy(cache), NonceStore(ttl_s=10.0, clock=clock))
    evidence = enclave.evidence(verifier.challenge())
    verifier.verify(evidence)
    with pytest.raises(VerificationError) as replay:
        verifier.verify(evidence)
    assert "replayed" in replay.value.reason
    late = enclave.evidence(verifier.challenge())
    clock.now = 10.5
    with pytest.raises(VerificationError) as expired:
        verifier.verify(late)
    assert "expired" in expired.value.reason
    with pytest.raises(VerificationError) as unknown:
        verifier.verify(enclave.evidence(bytes(32)))  # never issued
    assert "unknown" in unknown.value.reason


def test_challenge_flood_does_not_lock_enclaves_out(enclave: Enclave, cache: Path) -> None:
    """Defect 6: 10,000 unauthenticated challenges exhausted the nonce store for the nonce lifetime."""
    verifier = Verifier(_policy(cache))
    for _ in range(20_000):
        verifier.challenge()
    verifier.verify(enclave.evidence(verifier.challenge()))


def test_auto_falls_back_to_simulation(tmp_path: Path, cache: Path) -> None:
    with pytest.warns(SimulationModeWarning):
        enclave = open_enclave(CONFIG, cache_dir=cache, tsm_root=tmp_path / "absent")
    with enclave:
        assert enclave.evidence(bytes(32)).provider == SIMULATED
    with pytest.raises(TsmError):
        open_enclave(CONFIG, backend=Backend.TSM, cache_dir=cache, tsm_root=tmp_path / "absent")


def test_rolled_back_sealed_state_is_refused(enclave: Enclave, cache: Path) -> None:
    """Defect 8: an older sealed file put back in place loaded silently."""
    verifier = Verifier(_policy(cache))
    _provision(enclave, verifier, torch.randn(12, 4))
    sealed = next((cache / "cmif").glob("*.sealed"))
    old = sealed.read_bytes()
    _provision(enclave, verifier, torch.randn(12, 4))  # re-provisioned: version 2
    sealed.write_bytes(old)
    with open_enclave(CONFIG, backend=Backend.SIMULATED, cache_dir=cache) as later:
        with pytest.raises(VerificationError) as info:
            later.load_sealed()
        assert "rollback" in info.value.reason
