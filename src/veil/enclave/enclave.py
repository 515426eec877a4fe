"""The client-side enclave: holds a key pair, attests, receives the embedding weights, embeds tokens.

Security contract:
- The private key (X25519, or the hybrid ML-KEM-768 + X25519) is generated inside the enclave and never
  leaves it; evidence binds its public key and a verifier's nonce to the platform's measurement
  (`veil.attest.evidence.report_data`).
- Wrapped weights are opened (RFC 9180 HPKE, `veil.attest.wrap`) only inside `install`; the plaintext
  embedding table lives only in the enclave's private state. The public API offers `embed(token_ids)`,
  never the weights. At rest the weights are sealed (AES-256-GCM) under the platform's sealing key in
  `$VEIL_CACHE/cmif/`, with a monotonic version (`veil.enclave.sealed`).
- The sanitizer (Report-Noisy-Max over candidate sets derived from the embeddings) also runs inside:
  `enable_sanitizer` builds it from the enclave's weights, `sanitize` returns only its output.
- `close` (or leaving the `with` block) zeroes and drops the weights.
- In Python this boundary is a convention of the API. What enforces it is the platform: a TDX/SEV-SNP
  confidential VM (configfs-tsm backend) or nothing at all (SIMULATION MODE, see `veil.enclave.simulated`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from veil.attest.evidence import Evidence, Kem, VerificationError, report_data
from veil.enclave.keys import RecipientKey
from veil.enclave.measurement import code_measurement
from veil.enclave.sealed import SealedWeights
from veil.enclave.simulated import SimulatedPlatform
from veil.enclave.tsm import DEFAULT_TSM_ROOT, TsmPlatform, tsm_available
from veil.privacy.neighbours import CandidateSet, ProgressFn, load_or_build
from veil.privacy.sanitizer import SanitizedPrompt, Sanitizer
from veil.privacy.vocabulary import Vocabulary


def default_cache_dir() -> Path:
    """$VEIL_CACHE, or ~/.cache/veil."""
    return Path(os.environ.get("VEIL_CACHE") or Path.home() / ".cache" / "veil")


@dataclass(frozen=True)
class EnclaveConfig:
    """What the enclave is for: the model whose embedding layer it will hold."""

    model_id: str  # a stable name of the checkpoint (the server's `model_id`)
    vocab_size: int
    hidden_size: int

    def encode(self) -> bytes:
        return json.dumps(
            {"model_id": self.model_id, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size},
            sort_keys=True,
        ).encode()

    def simulated_measurement(self) -> bytes:
        """The measurement a simulated enclave of this code and config reports."""
        return code_measurement(self.encode())


class Platform(Protocol):
    """What a backend provides: signed reports and a sealing key."""

    def report(self, data: bytes) -> tuple[str, bytes]: ...  # (provider, report) over 64 bytes
    def sealing_key(self, label: bytes) -> bytes: ...


class Backend(enum.Enum):
    AUTO = "auto"  # configfs-tsm if the kernel offers it, else simulation (with a warning)
    TSM = "tsm"
    SIMULATED = "simulated"


class Enclave:
    """An attestable holder of a model's embedding layer. Use as a context manager."""

    def __init__(
        self, platform: Platform, config: EnclaveConfig, cache_dir: Path, kem: Kem = Kem.X25519
    ) -> None:
        self.config = config
        self._platform = platform
        self._key = RecipientKey(kem)
        self._weights: torch.Tensor | None = None
        self._sanitizer: Sanitizer | None = None
        self._session = b""
        name = f"{hashlib.sha256(config.encode()).hexdigest()[:24]}.sealed"
        self._sealed = SealedWeights(
            cache_dir / "cmif" / name, platform.sealing_key(config.encode()), config.encode()
        )

    @property
    def kem(self) -> Kem:
        return self._key.kem

    @property
    def public_key(self) -> bytes:
        return self._key.public_bytes()

    @property
    def session_token(self) -> bytes:
        """The server's token for this provisioning (empty if none): authorizes the partition baseline."""
        return self._session

    @property
    def provisioned(self) -> bool:
        return self._weights is not None

    def evidence(self, nonce: bytes) -> Evidence:
        """Evidence binding this enclave's public key to `nonce` (32 bytes from the verifier)."""
        provider, report = self._platform.report(report_data(self.kem, self.public_key, nonce))
        return Evidence(provider, self.public_key, nonce, report, self.kem)

    def install(self, wrapped: bytes) -> None:
        """Unwrap weights provisioned for this enclave and seal them at rest.

        Raises `VerificationError` if they were not wrapped for this key, were tampered with, or are
        for another model than `config`.
        """
        header, weights, self._session = self._key.open(wrapped)
        if header.model_id != self.config.model_id or header.shape != self._shape:
            raise VerificationError("wrapped weights are for another model")
        self._sealed.store(weights)
        self._weights = weights

    def load_sealed(self) -> bool:
        """Load weights sealed by an earlier `install` on this platform; False if there are none.

        Raises `VerificationError` if the sealed file was tampered with, sealed elsewhere, or is older
        than the last one this enclave sealed (rollback; see `veil.enclave.sealed`).
        """
        if not self._sealed.exists():
            return False
        self._weights = self._sealed.load(self._shape)
        return True

    @property
    def _shape(self) -> tuple[int, int]:
        return (self.config.vocab_size, self.config.hidden_size)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, hidden) of token ids (B, T), computed inside the enclave."""
        if self._weights is None:
            raise RuntimeError("enclave not provisioned: call install() or load_sealed() first")
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("token_ids must be an integer tensor of shape (B, T)")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return F.embedding(token_ids.long(), self._weights)

    def enable_sanitizer(
        self,
        tokenizer: Any,
        *,
        epsilon: float,
        candidates: CandidateSet = CandidateSet.GROUPS,
        k: int = 20,
        rng: int | None = None,
        allow_top_k: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        """Build the Report-Noisy-Max sanitizer from the enclave's embeddings (per-unit `epsilon`).

        TOP_K candidates are charged as unbounded unless `allow_top_k` (see `veil.privacy.sanitizer`).
        The candidate table is built once per model and cached; `progress` hears about that build.
        """
        if self._weights is None:
            raise RuntimeError("enclave not provisioned: call install() or load_sealed() first")
        embeddings = self._weights.numpy()
        vocabulary = Vocabulary.from_tokenizer(tokenizer, size=embeddings.shape[0])
        table = load_or_build(embeddings, vocabulary.eligible, kind=candidates, k=k, progress=progress)
        self._sanitizer = Sanitizer(
            table=table,
            embeddings=embeddings,
            vocabulary=vocabulary,
            epsilon=epsilon,
            rng=rng,
            allow_top_k=allow_top_k,
        )

    def sanitize(self, token_ids: Sequence[int]) -> SanitizedPrompt:
        """The sanitized prompt and its privacy cost; see `veil.privacy.sanitizer` for the guarantee."""
        if self._sanitizer is None:
            raise RuntimeError("sanitizer not enabled: call enable_sanitizer() first")
        return self._sanitizer.sanitize(token_ids)

    def close(self) -> None:
        self._sanitizer = None
        if self._weights is not None:
            self._weights.zero_()
            self._weights = None

    def __enter__(self) -> Enclave:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_enclave(
    config: EnclaveConfig,
    *,
    backend: Backend = Backend.AUTO,
    cache_dir: Path | None = None,
    tsm_root: Path = DEFAULT_TSM_ROOT,
    kem: Kem = Kem.X25519,
) -> Enclave:
    """An enclave on the chosen backend. AUTO picks configfs-tsm when `tsm_root` is usable."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if backend is Backend.TSM or (backend is Backend.AUTO and tsm_available(tsm_root)):
        return Enclave(TsmPlatform(cache, root=tsm_root), config, cache, kem)
    return Enclave(SimulatedPlatform(cache, config.encode()), config, cache, kem)
