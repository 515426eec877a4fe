"""The configfs-tsm backend against a fake kernel tree: real SNP / TDX report formats, signed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_tsm import FakeTsm

from veil.attest import reports
from veil.attest.envelope import WrapHeader
from veil.attest.evidence import VerificationError
from veil.attest.verifier import Policy, Verifier
from veil.attest.wrap import wrap
from veil.enclave.enclave import Enclave, EnclaveConfig, open_enclave
from veil.enclave.tsm import TsmError, TsmPlatform

CONFIG = EnclaveConfig("toy-model", vocab_size=12, hidden_size=4)
RTMRS = frozenset({bytes(192)})  # what the fake TD reports unless told otherwise


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _provision(enclave: Enclave, verifier: Verifier, weights: torch.Tensor) -> None:
    verified = verifier.verify(enclave.evidence(verifier.challenge()))
    header = WrapHeader(CONFIG.model_id, tuple(weights.shape), verifier.policy.digest(), verified.measurement)
    enclave.install(wrap(weights, verified.public_key, header))


@pytest.mark.parametrize("provider", [reports.SNP, reports.TDX])
def test_tsm_backend_against_fake_tree(tmp_path: Path, cache: Path, provider: str) -> None:
    measurement = bytes(range(48))
    fake = FakeTsm(tmp_path / "tsm", provider, measurement)
    other = FakeTsm(tmp_path / "other", provider, measurement)  # a platform key nobody trusts
    with fake, open_enclave(CONFIG, cache_dir=cache, tsm_root=fake.root) as enclave:  # AUTO finds it
        weights = torch.randn(12, 4)
        good = Policy(frozenset({measurement}), frozenset({fake.signer}), accepted_rtmrs=RTMRS)
        _provision(enclave, Verifier(good), weights)
        assert torch.equal(enclave.embed(torch.tensor([[7]])), weights[torch.tensor([[7]])])
        for policy in [
            Policy(frozenset({bytes(48)}), frozenset({fake.signer}), accepted_rtmrs=RTMRS),
            Policy(frozenset({measurement}), frozenset({other.signer}), accepted_rtmrs=RTMRS),
        ]:
            verifier = Verifier(policy)
            with pytest.raises(VerificationError):
                verifier.verify(enclave.evidence(verifier.challenge()))


def test_tsm_retries_a_racing_writer(tmp_path: Path, cache: Path) -> None:
    with FakeTsm(tmp_path / "tsm", reports.SNP, bytes(48), extra_writes=1) as fake:
        provider, report = TsmPlatform(cache, root=fake.root).report(bytes(64))
        assert provider == reports.SNP and len(report) == reports.SNP_SIZE
    with FakeTsm(tmp_path / "tsm2", reports.SNP, bytes(48), extra_writes=5) as fake, pytest.raises(TsmError):
        TsmPlatform(cache, root=fake.root, attempts=2).report(bytes(64))


@pytest.mark.parametrize(
    ("provider", "platform", "reason"),
    [
        (reports.SNP, {"policy": 0x30000 | reports.SNP_POLICY_DEBUG}, "debug"),
        (reports.SNP, {"vmpl": 3}, "VMPL 3"),
        (reports.TDX, {"attributes": reports.TDX_ATTRIBUTE_DEBUG}, "debug"),
        (reports.TDX, {"rtmrs": bytes(range(192))}, "RTMRs"),  # the user booted their own kernel
    ],
    ids=["snp-debug", "snp-vmpl3", "tdx-debug", "tdx-own-kernel"],
)
def test_platform_policy_refuses(
    tmp_path: Path, cache: Path, provider: str, platform: dict[str, object], reason: str
) -> None:
    """Defect 3: the verifier accepted a debug SNP guest, VMPL 3, a debug TD and arbitrary RTMRs."""
    measurement = bytes(range(48))
    with (
        FakeTsm(tmp_path / "tsm", provider, measurement, platform=platform) as fake,
        open_enclave(CONFIG, cache_dir=cache, tsm_root=fake.root) as enclave,
    ):
        verifier = Verifier(Policy(frozenset({measurement}), frozenset({fake.signer}), accepted_rtmrs=RTMRS))
        with pytest.raises(VerificationError) as info:
            verifier.verify(enclave.evidence(verifier.challenge()))
        assert reason in info.value.reason
