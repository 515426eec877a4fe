"""LoRA adapters behind the OpenAI API: a request's `model` selects an adapter (vLLM's convention);
`veil serve --lora-modules NAME=PATH` loads PEFT directories."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI

from veil.attest.verifier import Policy, Verifier
from veil.cli.main import main
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.lora import load_peft, random_adapter, save_peft
from veil.model.loader import LoadedModel
from veil.model.sampling import SamplingParams
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind

NAMES = ("support", "legal", "poetry")  # three adapters, two slots: loads and evictions happen
PROMPT = "The best way to learn a language is"


@pytest.fixture(scope="module")
def adapter_dirs(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for seed, name in enumerate(NAMES):
        adapter = random_adapter(
            loaded.config, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=seed, std=0.3
        )
        dirs[name] = tmp_path_factory.mktemp(name)
        save_peft(adapter, dirs[name])
    return dirs


@pytest.fixture(scope="module")
def lora_server(loaded: LoadedModel, adapter_dirs: dict[str, Path]) -> Iterator[tuple[str, InferenceService]]:
    engine = EngineConfig(
        transport=TransportKind.CC, num_device_blocks=32, lora=LoraConfig(num_slots=2, max_rank=8)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with InferenceService(
            loaded, "base", Limits(max_prompt_tokens=64, max_new_tokens=16), engine
        ) as service:
            for name, path in adapter_dirs.items():
                service.add_adapter(name, load_peft(path, loaded.config))
            app = create_app(service, Verifier(Policy(frozenset(), frozenset())))
            with ServerThread(app) as server:
                yield server.url, service


def offline(
    loaded: LoadedModel, adapter_dirs: dict[str, Path], name: str | None, ids: list[int]
) -> list[int]:
    config = EngineConfig(num_device_blocks=8, lora=LoraConfig(num_slots=1, max_rank=8))
    eos = loaded.stop_token_ids
    with LLMEngine(loaded.model, config, eos_token_ids=eos) as engine:
        if name is not None:
            engine.add_adapter(name, load_peft(adapter_dirs[name], loaded.config))
        engine.add_request(ids, SamplingParams(max_tokens=8), adapter=name)
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def test_the_model_field_selects_an_adapter(lora_server, loaded, adapter_dirs) -> None:
    url, service = lora_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["base", *NAMES]
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    answers = {}
    for name in (None, *NAMES, "support"):  # "support" again: after it was evicted
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": name or "base", "prompt": ids, "max_tokens": 8, "temperature": 0},
            timeout=120,
        ).json()
        answers[name] = response["veil"]["token_ids"]
        assert response["model"] == (name or "base")
        assert answers[name] == offline(loaded, adapter_dirs, name, ids), name
    assert len({tuple(tokens) for tokens in answers.values()}) > 1  # the adapters change the answer
    assert service.engine.stats.adapter_loads > 2  # more adapters than slots: some were reloaded
    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-modules", "nopath"], "NAME=PATH"),
        (["--lora-modules", "a=/x", "a=/y"], "twice"),
        (["--lora-modules", "a=/x", "--max-loras", "0"], "--max-loras"),
    ],
)
def test_bad_lora_modules_are_one_line_errors(args, message, capsys) -> None:
    assert main(["serve", "--port", "0", *args]) == 2
    assert message in capsys.readouterr().err
