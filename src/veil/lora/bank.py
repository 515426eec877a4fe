"""Adapter slots in the device arena, loaded through the transport (the mechanism beside `SlotTable`).

Every registered adapter is packed once into its own host tensor in the slot layout (a `HostBuffer`,
its own source for PipeLLM's predictors), so loading it is one `transport.h2d` into its slot of one
device buffer `(num_slots, layout.numel)`. Which slot, and which adapter to evict, is `SlotTable`'s
decision; this class only moves bytes and hands out `LoraBatch`es.

Lifecycle (what an engine does):
    bank = DeviceAdapterBank(transport, config, num_slots=4, rank=16)   # with bank: ... frees it
    bank.add("sql", load_peft(path, config))
    slot = bank.acquire("sql")      # when a request is admitted: pins; None = every slot pinned, defer
    bank.hint(["chat", "sql"])      # adapters the waiting requests will need (PipeLLM seals ahead)
    batch = bank.batch(["sql", None, ...])   # per row; waits for the rows' loads
    decoder_layer(..., project=lora_projection(weights, layer, batch))
    bank.release("sql")             # when the request finishes or is preempted
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch

from veil.cc.host import HostBuffer
from veil.cc.stream import Event
from veil.lora.adapter import Adapter, AdapterError
from veil.lora.layout import TARGETS, SlotLayout
from veil.lora.projection import LoraBatch
from veil.lora.slots import SlotTable
from veil.model.config import ModelConfig
from veil.transport.base import Transport

SLOT_DTYPE = torch.float32


class DeviceAdapterBank:
    """`num_slots` adapter slots of maximum rank `rank` over `targets`, in `transport`'s device arena.

    One caller drives it (the engine's step loop); it is not thread-safe. Loads are asynchronous:
    `acquire` issues one `h2d` and returns, `batch` waits for the loads its rows need.

    Args:
        transport: a started transport; its device holds the slots.
        config: the base model's shape.
        num_slots: device slots (adapters resident at once).
        rank: the largest adapter rank the slots hold; smaller ranks are zero-padded.
        targets: the target modules the slots hold (an adapter may adapt a subset).

    Raises:
        ValueError: on num_slots < 1, rank < 1 or an unknown target.
        DeviceOutOfMemory: if the arena cannot hold the slots.
    """

    def __init__(
        self,
        transport: Transport,
        config: ModelConfig,
        *,
        num_slots: int,
        rank: int,
        targets: Sequence[str] = TARGETS,
    ) -> None:
        self.layout = SlotLayout(config, rank=rank, targets=tuple(targets))
        self._slots = SlotTable(num_slots)
        self.transport = transport
        self._host: dict[str, HostBuffer] = {}
        self._loading: dict[int, Event] = {}  # slot -> its load in flight
        self.loads = 0  # adapter loads issued (one h2d each)
        self.evictions = 0
        self._device = transport.device.empty((num_slots, self.layout.numel), SLOT_DTYPE)

    @staticmethod
    def device_bytes(
        config: ModelConfig, *, num_slots: int, rank: int, targets: Sequence[str] = TARGETS
    ) -> int:
        """Arena bytes a bank of these dimensions takes (for sizing the device)."""
        return num_slots * SlotLayout(config, rank=rank, targets=tuple(targets)).numel * SLOT_DTYPE.itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: what one adapter load moves."""
        return self.layout.numel * SLOT_DTYPE.itemsize

    @property
    def names(self) -> tuple[str, ...]:
        """Registered adapters."""
        return tuple(self._host)

    def add(self, name: str, adapter: Adapter) -> None:
        """Register `adapter` under `name` in host memory (packed into the slot layout; nothing moves yet).

        Raises:
            ValueError: if `name` is taken.
            AdapterError: if the adapter does not fit the base model or the slots (rank, targets).
        """
        if name in self._host:
            raise ValueError(f"adapter {name!r} is already registered")
        try:
            packed = adapter.pack(self.layout)
        except AdapterError as error:
            raise AdapterError(f"adapter {name!r}: {error}") from None
        self._host[name] = HostBuffer(packed)

    def acquire(self, name: str) -> int | None:
        """Pin `name` in a slot, loading it (asynchronously) if it is not resident.

        Returns:
            Its slot, or None if it is not resident and every slot is pinned (defer the request).

        Raises:
            KeyError: if `name` is not registered. Errors of the transport's host half.
        """
        host = self._host[name]
        placement = self._slots.acquire(name)
        if placement is None or not placement.load:
            return None if placement is None else placement.slot
        slot = placement.slot
        previous = self._loading.pop(slot, None)
        try:
            if previous is not None:
                previous.wait()  # an earlier load into this slot: its error must not go unseen
            self._loading[slot] = self.transport.h2d(
                host, self._device, dst_offset=slot * self.slot_bytes, nbytes=self.slot_bytes
            )
        except BaseException:
            self._slots.discard(name)
            raise
        self.loads += 1
        self.evictions += placement.evicted is not None
        return slot

    def release(self, name: str) -> None:
        """Drop one pin of `name` (see `SlotTable.release`)."""
        self._slots.release(name)

    def batch(self, row_adapters: Sequence[str | None]) -> LoraBatch:
        """The `LoraBatch` of a batch whose row i uses adapter `row_adapters[i]` (None: base model).

        Waits for the loads of those adapters. Each named adapter must be acquired (pinned).

        Raises:
            ValueError: if an adapter is not pinned. Errors of its load (`IntegrityError` under CC),
            after which that adapter is no longer resident.
        """
        slots = []
        for name in row_adapters:
            slot = None if name is None else self._slots.slot_of(name)
            if name is not None and (slot is None or not self._slots.pins(name)):
                raise ValueError(f"adapter {name!r} is not acquired; call acquire() first")
            slots.append(slot)
        for name, slot in zip(row_adapters, slots, strict=True):
            event = None if slot is None else self._loading.pop(slot, None)
            if event is not None:
                try:
                    event.wait()
                except BaseException:
                    assert name is not None
                    self._slots.discard(name)
                    raise
        return LoraBatch.of(self.layout, self._device.tensor, slots)

    def hint(self, names: Sequence[str]) -> None:
        """Tell the transport which adapters will be needed next (in order); resident ones are skipped."""
        for name in dict.fromkeys(names):
            if self._slots.slot_of(name) is None:
                self.transport.hint(self._host[name], nbytes=self.slot_bytes)

    def resident(self) -> dict[str, int]:
        """Resident adapters and their slots, least recently acquired first."""
        return self._slots.resident()

    def pins(self, name: str) -> int:
        return self._slots.pins(name)

    def slot_tensor(self, slot: int) -> torch.Tensor:
        """The flat device tensor of `slot` (for inspection and tests)."""
        return self._device.tensor[slot]

    def host_tensor(self, name: str) -> torch.Tensor:
        """The packed host copy of `name` (what a load sends)."""
        return self._host[name].tensor

    def close(self) -> None:
        """Wait for loads in flight and free the slots (idempotent)."""
        loading, self._loading = list(self._loading.values()), {}
        try:
            for event in loading:
                event.wait()
        finally:
            self._device.free()

    def __enter__(self) -> DeviceAdapterBank:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
