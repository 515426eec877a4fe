"""End to end against a real uvicorn server on loopback: CMIF, the baselines, and what is refused."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import httpx
import pytest
import torch

from conftest import Served
from veil import wire
from veil.attest.evidence import Evidence
from veil.client import CmifClient, ServerError
from veil.enclave.enclave import Backend, Enclave, open_enclave
from veil.eval.partition import PartitionClient, plain_generate, tee_only_generate
from veil.model.generate import GenerationRequest, generate
from veil.privacy.accountant import BudgetExceededError, PrivacyAccountant
from veil.privacy.neighbours import CandidateSet

pytestmark = pytest.mark.filterwarnings("ignore::veil.enclave.simulated.SimulationModeWarning")
PROMPT = "My name is Alice Smith and I live at 42 Baker Street. Where do I live?"
NEW_TOKENS = 6


def _local(served: Served, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> list[int]:
    request = GenerationRequest(
        max_new_tokens, prompt_ids=[ids], stop_token_ids=served.loaded.config.eos_token_ids
    )
    return generate(served.loaded.model, request)[0]


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


def test_health(http: httpx.Client) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m-instruct"
    assert health["limits"] == {"max_prompt_tokens": 64, "max_new_tokens": 16}


def test_cmif_answer_equals_local_inference_on_sanitized_tokens(
    served: Served, http: httpx.Client, enclave: Enclave
) -> None:
    client = CmifClient(http, enclave, served.loaded.tokenizer, accountant=PrivacyAccountant(100.0))
    client.provision(use_sealed=False)
    enclave.enable_sanitizer(
        served.loaded.tokenizer, epsilon=2.0, candidates=CandidateSet.TOP_K, rng=7, allow_top_k=True
    )
    streamed: list[int] = []
    answer = client.generate(PROMPT, max_tokens=NEW_TOKENS, on_token=lambda t, _: streamed.append(t))
    assert answer.sanitized.epsilon_spent > 0 and answer.sanitized.replaced_positions
    assert answer.token_ids == streamed == _local(served, list(answer.sanitized.token_ids))
    assert answer.meter.round_trips == 1
    assert (
        client.accountant is not None and client.accountant.spent("default") == answer.sanitized.epsilon_spent
    )
    assert served.requests()[-1] == ("POST", "/v1/cmif/generate")


def test_sealed_weights_need_no_second_provisioning(
    served: Served, http: httpx.Client, enclave: Enclave
) -> None:
    CmifClient(http, enclave, served.loaded.tokenizer).provision(use_sealed=False)
    before = len(served.requests())
    with open_enclave(served.config, backend=Backend.SIMULATED, cache_dir=served.cache) as second:
        CmifClient(http, second, served.loaded.tokenizer).provision()
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(second.embed(ids), served.loaded.model.embed(ids))
    assert not [r for r in served.requests()[before:] if r[1].startswith("/v1/cmif/")]  # /health only


def test_spent_budget_refuses_before_sending(served: Served, http: httpx.Client, enclave: Enclave) -> None:
    client = CmifClient(http, enclave, served.loaded.tokenizer, accountant=PrivacyAccountant(0.5))
    client.provision()
    enclave.enable_sanitizer(
        served.loaded.tokenizer, epsilon=1.0, candidates=CandidateSet.TOP_K, rng=1, allow_top_k=True
    )
    before = len(served.requests())
    with pytest.raises(BudgetExceededError):
        client.generate(PROMPT, max_tokens=2)
    assert len(served.requests()) == before


def _evidence(http: httpx.Client, enclave: Enclave) -> Evidence:
    return enclave.evidence(bytes.fromhex(http.post("/v1/cmif/challenge").json()["nonce"]))


def _forge(evidence: Evidence) -> Evidence:
    report = bytearray(evidence.report)
    report[10] ^= 1  # inside the measurement, so the signature no longer matches
    return Evidence(evidence.provider, evidence.public_key, evidence.nonce, bytes(report))


@pytest.mark.parametrize(
    "attack", ["forged-signature", "replayed-nonce", "unknown-nonce", "wrong-measurement"]
)
def test_bad_evidence_gets_no_weights(
    served: Served, http: httpx.Client, enclave: Enclave, attack: str
) -> None:
    if attack == "wrong-measurement":
        other = type(served.config)("another-model", served.config.vocab_size, served.config.hidden_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enclave = open_enclave(other, backend=Backend.SIMULATED, cache_dir=served.cache)
    evidence = _evidence(http, enclave)
    if attack == "forged-signature":
        evidence = _forge(evidence)
    elif attack == "replayed-nonce":
        assert http.post("/v1/cmif/provision", json=evidence.to_json()).status_code == 200
    elif attack == "unknown-nonce":
        evidence = enclave.evidence(bytes(32))
    response = http.post("/v1/cmif/provision", json=evidence.to_json())
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "attestation failed"
    assert not response.content.startswith(b"VEILWRP1")


def _tensor(served: Served, t: int, dtype: torch.dtype = torch.float32) -> bytes:
    return wire.encode({"embeddings": torch.zeros(1, t, served.loaded.config.hidden_size, dtype=dtype)})


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("garbage", 400),
        ("truncated", 400),
        ("wrong-dtype", 400),
        ("wrong-hidden", 422),
        ("batch-of-two", 422),
        ("too-long", 422),
        ("empty-prompt", 422),
        ("not-finite", 422),
        ("oversized", 413),
        ("too-many-tokens", 400),
    ],
)
def test_bad_tensors_get_4xx_and_server_stays_up(
    served: Served, http: httpx.Client, case: str, status: int
) -> None:
    hidden = served.loaded.config.hidden_size
    bodies = {
        "garbage": b"\x00" * 100,
        "truncated": _tensor(served, 4)[:-3],
        "wrong-dtype": _tensor(served, 4, torch.float16),
        "wrong-hidden": wire.encode({"embeddings": torch.zeros(1, 4, hidden - 1)}),
        "batch-of-two": wire.encode({"embeddings": torch.zeros(2, 4, hidden)}),
        "too-long": _tensor(served, 65),
        "empty-prompt": _tensor(served, 0),
        "not-finite": wire.encode({"embeddings": torch.full((1, 2, hidden), float("nan"))}),
        "oversized": _tensor(served, 200),
        "too-many-tokens": _tensor(served, 4),
    }
    max_tokens = 17 if case == "too-many-tokens" else 2
    response = http.post(f"/v1/cmif/generate?max_tokens={max_tokens}", content=bodies[case])
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"provider": "x"}', b"{" * 70000])
def test_bad_provisioning_requests(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/cmif/provision", content=body)
    assert 400 <= response.status_code < 500 and "error" in response.json()


@pytest.mark.parametrize(("prompt", "max_tokens"), [(list(range(1, 70)), 2), ([], 2), (PROMPT, 1000)])
def test_bad_requests_are_refused_before_charging(
    served: Served, http: httpx.Client, enclave: Enclave, prompt: object, max_tokens: int
) -> None:
    """Issue 12: the client charged epsilon, then the server refused the request (--max-tokens 1000)."""
    accountant = PrivacyAccountant(100.0)
    client = CmifClient(http, enclave, served.loaded.tokenizer, accountant=accountant)
    client.provision()
    enclave.enable_sanitizer(served.loaded.tokenizer, epsilon=1.0, rng=1)
    before = len(served.requests())
    with pytest.raises(ValueError):
        client.generate(prompt, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert accountant.spent("default") == 0.0 and len(served.requests()) == before


def test_server_refusal_reaches_the_client(served: Served, http: httpx.Client, enclave: Enclave) -> None:
    client = CmifClient(http, enclave, served.loaded.tokenizer)
    client.provision()
    client._limits = {"max_prompt_tokens": 1000, "max_new_tokens": 16}  # a client that trusts too much
    with pytest.raises(ServerError) as info:
        client.generate(list(range(1, 70)), max_tokens=2, sanitize=False)
    assert info.value.status == 422


def test_plain_completions_match_local(served: Served, http: httpx.Client) -> None:
    ids = served.loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    greedy = {"max_tokens": NEW_TOKENS, "temperature": 0}
    by_ids = http.post("/v1/completions", json={"prompt": ids, **greedy}).json()
    assert by_ids["veil"]["token_ids"] == _local(served, ids)
    text = http.post("/v1/completions", json={"prompt": PROMPT, **greedy}).json()
    assert text["veil"]["token_ids"] == by_ids["veil"]["token_ids"]
    # the partition evaluation's plain baseline asks for greedy decoding (the API's default samples)
    assert plain_generate(http, ids, max_tokens=NEW_TOKENS).token_ids == by_ids["veil"]["token_ids"]
    assert http.post("/v1/completions", json={"prompt": [], "max_tokens": 2}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": [10**9], "max_tokens": 2}).status_code == 400


def test_baselines_compute_the_same_answer(served: Served, http: httpx.Client, enclave: Enclave) -> None:
    ids = served.loaded.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    expected = _local(served, ids, 4)
    assert tee_only_generate(served.loaded, ids, max_tokens=4).token_ids == expected
    CmifClient(http, enclave, served.loaded.tokenizer).provision(use_sealed=False)
    result = PartitionClient(http, served.loaded, enclave.session_token).generate(ids, max_tokens=4)
    assert result.token_ids == expected
    layers = served.loaded.config.num_layers
    assert served.loaded.config.tie_word_embeddings  # the head runs in the enclave
    assert result.meter.round_trips == 4 * layers * len(expected)  # 4 per layer, per step
    attested = {"authorization": f"Bearer {enclave.session_token.hex()}"}
    x = wire.encode({"x": torch.zeros(1, 1, 4)})
    assert http.post(f"/v1/partition/{layers}/wqkv", content=x, headers=attested).status_code == 400
