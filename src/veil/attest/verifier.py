"""The verifier's policy, one-time nonces, and the verifier itself (server side).

Security contract:
- `Verifier.verify` accepts evidence only if: the nonce was issued by this verifier, has not expired and
  has not been used by an earlier successful verification (`veil.attest.nonces`); the report is
  signed by a signer the policy trusts; the report data equals `report_data(kem, public_key, nonce)`; the
  measurement is one the policy accepts; simulated evidence is accepted only if the policy opts in;
  no debug guest (SEV-SNP policy bit DEBUG, TDX attribute DEBUG) unless the policy opts in; an SEV-SNP
  report comes from VMPL <= `max_snp_vmpl` (0 by default: the guest kernel, not a lower-privileged
  layer); a TDX quote's RTMR0..3 are one of `accepted_rtmrs` (none accepted by default).
- Every failure raises `VerificationError`. Its message says nothing about which check failed; the
  `reason` attribute does, for the verifier's own logs only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from veil.attest import reports
from veil.attest.evidence import (
    Evidence,
    VerificationError,
    VerifiedEnclave,
    report_data,
)
from veil.attest.nonces import NonceStore
from veil.attest.wrap import load_public_key


@dataclass(frozen=True)
class Policy:
    """What the model owner accepts before releasing embedding weights.

    `trusted_signers` holds signer identities as `reports` defines them: a raw Ed25519 public key (the
    simulated platform), a DER SubjectPublicKeyInfo (an SEV-SNP VCEK, a TDX attestation key).
    """

    accepted_measurements: frozenset[bytes]
    trusted_signers: frozenset[bytes]
    allow_simulated: bool = False  # explicit opt-in: simulated evidence proves nothing about hardware
    nonce_ttl_s: float = 60.0
    # TDX: the accepted RTMR0..3 values (192 bytes each set): MRTD measures only the firmware image, the
    # RTMRs the kernel, command line and what the guest loaded. Empty: no TDX quote is accepted.
    accepted_rtmrs: frozenset[bytes] = frozenset()
    max_snp_vmpl: int = 0  # SEV-SNP: reports requested from a less privileged VMPL are refused
    allow_debug: bool = False  # SNP DEBUG policy bit / TDX DEBUG attribute: the host can read memory

    def digest(self) -> bytes:
        """SHA-256 of a canonical encoding; bound into the wrapped weights' associated data."""
        canonical = json.dumps(
            {
                "measurements": sorted(m.hex() for m in self.accepted_measurements),
                "signers": sorted(s.hex() for s in self.trusted_signers),
                "allow_simulated": self.allow_simulated,
                "rtmrs": sorted(r.hex() for r in self.accepted_rtmrs),
                "max_snp_vmpl": self.max_snp_vmpl,
                "allow_debug": self.allow_debug,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).digest()


class Verifier:
    """Checks evidence against a policy; owns the nonces it issues."""

    def __init__(self, policy: Policy, nonces: NonceStore | None = None) -> None:
        self.policy = policy
        self.nonces = nonces if nonces is not None else NonceStore(ttl_s=policy.nonce_ttl_s)

    def challenge(self) -> bytes:
        return self.nonces.issue()

    def verify(self, evidence: Evidence) -> VerifiedEnclave:
        """Return the verified enclave, or raise `VerificationError` (see the module's contract)."""
        self.nonces.check(evidence.nonce)
        try:
            load_public_key(evidence.kem, evidence.public_key)  # the wrap must not fail on it later
        except ValueError:
            raise VerificationError("malformed public key") from None
        if evidence.provider == reports.SIMULATED and not self.policy.allow_simulated:
            raise VerificationError("simulated evidence not allowed by policy")
        try:
            claims = reports.parse_and_check_signature(
                evidence.provider, evidence.report, self.policy.trusted_signers
            )
        except reports.ReportError as exc:
            raise VerificationError(f"report rejected: {exc}") from None
        if not secrets.compare_digest(
            claims.report_data, report_data(evidence.kem, evidence.public_key, evidence.nonce)
        ):
            raise VerificationError("report data does not bind this key and nonce")
        if claims.measurement not in self.policy.accepted_measurements:
            raise VerificationError(f"measurement {claims.measurement.hex()[:16]}... not accepted")
        self._check_platform(evidence.provider, claims)
        self.nonces.consume(evidence.nonce)  # last: only a successful verification uses a nonce up
        return VerifiedEnclave(evidence.public_key, claims.measurement, evidence.provider, evidence.kem)

    def _check_platform(self, provider: str, claims: reports.Claims) -> None:
        """What decides trust on real hardware beyond the measurement (policy, not parsing)."""
        if claims.debug and not self.policy.allow_debug:
            raise VerificationError("debug guest")
        if provider == reports.SNP and claims.vmpl > self.policy.max_snp_vmpl:
            raise VerificationError(f"SEV-SNP report from VMPL {claims.vmpl}")
        if provider == reports.TDX and claims.rtmrs not in self.policy.accepted_rtmrs:
            raise VerificationError("TDX RTMRs not accepted (an unmeasured kernel or command line)")
