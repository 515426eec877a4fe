"""HostBuffer: stable ids, the write-version contract, byte views of any dtype."""

from __future__ import annotations

import pytest
import torch

from veil.cc.host import HostBuffer, byte_view


def test_source_ids_are_unique_and_stable() -> None:
    a, b = HostBuffer(torch.zeros(4)), HostBuffer(torch.zeros(4))
    assert a.source_id != b.source_id
    assert HostBuffer(torch.zeros(1), source_id=7).source_id == 7


def test_write_bumps_version_on_entry_and_exit() -> None:
    buf = HostBuffer(torch.zeros(4))
    assert buf.stable_version() == 0
    with buf.write() as tensor:
        assert buf.writing and buf.stable_version() is None and buf.version == 1
        tensor.fill_(1)
    assert buf.version == 2 and buf.stable_version() == 2
    assert buf.mark_written() == 3


def test_byte_view_shares_memory_for_any_dtype() -> None:
    tensor = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    view = byte_view(tensor)
    assert view.dtype == torch.uint8 and view.numel() == 48
    view[:8] = 0
    assert tensor[0, 0] == 0 and tensor[0, 1] == 1


@pytest.mark.parametrize("tensor", [torch.zeros(4, 4).t(), torch.zeros(8)[::2]])
def test_non_contiguous_is_refused(tensor: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        HostBuffer(tensor)
