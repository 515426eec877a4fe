"""A real uvicorn server on loopback (random free port) serving the bundled model, for the whole module."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from veil.attest.verifier import Policy, Verifier
from veil.enclave.enclave import EnclaveConfig
from veil.enclave.simulated import platform_signer
from veil.engine.engine import EngineConfig
from veil.model.loader import LoadedModel, load_model
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind

MODEL_ID = "smollm2-135m-instruct"


@dataclass
class Served:
    url: str
    app: object
    loaded: LoadedModel
    cache: Path  # the client's enclave cache (sealed weights, simulated platform key)
    config: EnclaveConfig
    policy: Policy
    service: InferenceService

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)

    def requests(self) -> list[tuple[str, str]]:
        return list(self.app.state.requests)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model(progress=False)


@pytest.fixture(scope="session")
def served(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cache = tmp_path_factory.mktemp("enclave-cache")
    config = EnclaveConfig(MODEL_ID, loaded.config.vocab_size, loaded.config.hidden_size)
    policy = Policy(
        accepted_measurements=frozenset({config.simulated_measurement()}),
        trusted_signers=frozenset({platform_signer(cache)}),
        allow_simulated=True,
    )
    limits = Limits(
        max_prompt_tokens=64, max_new_tokens=16, max_body_bytes=128 * loaded.config.hidden_size * 4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = EngineConfig(transport=TransportKind.PIPELLM)  # what `veil serve` runs by default
        with InferenceService(loaded, MODEL_ID, limits, engine) as service:
            app = create_app(service, Verifier(policy), enable_partition=True)
            with ServerThread(app) as server:
                yield Served(server.url, app, loaded, cache, config, policy, service)


API_KEY = "sk-veil-test"


@pytest.fixture(scope="session")
def keyed(served: Served) -> Iterator[str]:
    """A second app on the same engine that needs `API_KEY` on /v1; yields its URL."""
    app = create_app(served.service, Verifier(served.policy), api_key=API_KEY)
    with ServerThread(app) as server:
        yield server.url
