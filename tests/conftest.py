"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct, converted into the user cache on first use."""
    from veil.model.loader import load_model

    return load_model(progress=False)
