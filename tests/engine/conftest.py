"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from veil.model.llama import Llama

from .support import random_llama, tiny_config


@pytest.fixture(scope="session")
def tiny() -> Llama:
    return random_llama(tiny_config())
