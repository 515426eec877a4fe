"""Fixtures for the CC data path: a channel pair over a small ring, and a started device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from veil.cc.device import Device

from .support import Pair, make_pair


@pytest.fixture
def pair() -> Pair:
    return make_pair()


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=64 << 20) as dev:
        yield dev
