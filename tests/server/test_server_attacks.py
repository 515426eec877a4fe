"""What an attacker tried against the server (defects 2, 4, 7, 8 of issue 12), each refused."""

from __future__ import annotations

import json
import struct
import threading
import time
import warnings
from collections.abc import Iterator

import httpx
import pytest
import torch

from conftest import Served
from veil import wire
from veil.attest.evidence import Kem
from veil.client import CmifClient
from veil.enclave.enclave import Backend, Enclave, open_enclave

pytestmark = pytest.mark.filterwarnings("ignore::veil.enclave.simulated.SimulationModeWarning")


@pytest.fixture
def enclave(served: Served) -> Iterator[Enclave]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened = open_enclave(served.config, backend=Backend.SIMULATED, cache_dir=served.cache)
    with opened:
        yield opened


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client


def _identity(n: int, rows: int = 16) -> bytes:
    """Rows of the identity: what an attacker sends to read a weight matrix out, 16 columns a request."""
    return wire.encode({"x": torch.eye(n)[:rows].unsqueeze(0)})


def test_partition_needs_an_attested_session_and_never_serves_the_tied_head(
    served: Served, http: httpx.Client, enclave: Enclave
) -> None:
    """Defect 2: identity matrices recovered the embedding table (tied head) and wqkv without attesting."""
    config = served.loaded.config
    for layer, op in [(0, "wqkv"), (config.num_layers, "head")]:
        anonymous = http.post(f"/v1/partition/{layer}/{op}", content=_identity(config.hidden_size))
        assert anonymous.status_code == 401
        forged = {"authorization": "Bearer " + "00" * 32}
        assert http.post(f"/v1/partition/{layer}/{op}", content=b"", headers=forged).status_code == 401
    CmifClient(http, enclave, served.loaded.tokenizer).provision(use_sealed=False)
    attested = {"authorization": f"Bearer {enclave.session_token.hex()}"}
    head = http.post(
        f"/v1/partition/{config.num_layers}/head", content=_identity(config.hidden_size), headers=attested
    )
    assert head.status_code == 403
    ok = http.post("/v1/partition/0/wqkv", content=_identity(config.hidden_size), headers=attested)
    assert ok.status_code == 200


def test_huge_completion_body_refused_before_parsing(http: httpx.Client) -> None:
    """Defect 4: a 16 MiB body took 19 s and doubled memory before its 400."""
    body = json.dumps({"prompt": "word " * (16 << 18), "max_tokens": 2}).encode()
    started = time.perf_counter()
    response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert time.perf_counter() - started < 5.0
    assert (
        http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}).status_code
        == 400
    )


def _zero_size_huge_dim() -> bytes:
    header = json.dumps({"embeddings": {"dtype": "F32", "shape": [1, 0, 2**63], "data_offsets": [0, 0]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(raw)) + raw


def test_unbounded_or_huge_embeddings_refused(served: Served, http: httpx.Client) -> None:
    """Defect 7: a zero-size tensor with a 2^63 dimension gave 500; finite-but-huge values gave NaN, 200."""
    assert http.post("/v1/cmif/generate?max_tokens=2", content=_zero_size_huge_dim()).status_code == 400
    huge = torch.full((1, 3, served.loaded.config.hidden_size), 1e30)
    response = http.post("/v1/cmif/generate?max_tokens=2", content=wire.encode({"embeddings": huge}))
    assert response.status_code == 422 and "within" in response.json()["error"]["message"]


def test_health_answers_while_weights_are_wrapped(
    served: Served, http: httpx.Client, enclave: Enclave
) -> None:
    """Defect 8: provisioning ran its 100 MB wrap on the event loop and stalled every other request."""
    evidence = enclave.evidence(bytes.fromhex(http.post("/v1/cmif/challenge").json()["nonce"]))
    done: list[float] = []

    def provision() -> None:
        with served.client() as other:
            assert other.post("/v1/cmif/provision", json=evidence.to_json()).status_code == 200
        done.append(time.perf_counter())

    thread = threading.Thread(target=provision)
    thread.start()
    time.sleep(0.15)  # the server is now wrapping
    assert http.get("/health").status_code == 200
    answered = time.perf_counter()
    thread.join()
    assert answered < done[0], "health waited for the wrap to finish"


def test_hybrid_post_quantum_kem_provisions_over_http(served: Served, http: httpx.Client) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opened = open_enclave(
            served.config, backend=Backend.SIMULATED, cache_dir=served.cache, kem=Kem.MLKEM768_X25519
        )
    with opened as enclave:
        CmifClient(http, enclave, served.loaded.tokenizer).provision(use_sealed=False)
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(enclave.embed(ids), served.loaded.model.embed(ids))
