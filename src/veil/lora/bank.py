"""Adapter slots in the device arena, loaded through the transport: the mechanism beside `SlotTable`.

Every registered adapter is packed once into its own host tensor in the slot layout (a `HostBuffer`,
its own source for PipeLLM's predictors), so loading it is one `transport.h2d` into its slot of one
device buffer `(num_slots, layout.numel)`. Which slot, and which adapter to evict, is decided by the
pure `SlotTable` (the scheduler's side, like the block manager for KV blocks); this class only moves
bytes and hands out `LoraBatch`es, like the model runner.

What an engine does:
    table = SlotTable(num_slots)                                        # scheduler: policy
    bank = DeviceAdapterBank(transport, config, num_slots=num_slots, rank=16)   # runner: mechanism
    bank.add("sql", load_peft(path, config))                            # host memory; nothing moves
    placement = table.acquire("sql")          # on admitting a request: pins; None = all pinned, defer
    if placement.load: bank.load("sql", placement.slot)                 # runner: one async h2d
    bank.hint(["chat", "sql"])                # adapters the waiting requests need next (PipeLLM)
    batch = bank.batch([slot_of_row_0, None, ...])    # per forward; waits for those slots' loads
    decoder_layer(..., project=lora_projection(weights, layer, batch))
    table.release("sql")                      # when the request finishes or is preempted
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
from veil.model.config import ModelConfig
from veil.transport.base import Transport

SLOT_DTYPE = torch.float32


class DeviceAdapterBank:
    """`num_slots` adapter slots of maximum rank `rank` over `targets`, in `transport`'s device arena.

    One caller drives it (the engine's step loop); it is not thread-safe. Loads are asynchronous:
    `load` issues one `h2d` and returns; `batch` waits for the loads of the slots its rows use. The
    caller must not load into a slot that a batch still computing with uses (the `SlotTable`'s pins
    guarantee it: a pinned adapter is never evicted).

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
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.layout = SlotLayout(config, rank=rank, targets=tuple(targets))
        self.transport = transport
        self._host: dict[str, HostBuffer] = {}
        self._holds: list[str | None] = [None] * num_slots  # what each slot holds (or is loading)
        self._loading: dict[int, Event] = {}  # slot -> its load in flight
        self.loads = 0  # adapter loads issued (one h2d each)
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
    def num_slots(self) -> int:
        return len(self._holds)

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

    def load(self, name: str, slot: int) -> None:
        """Copy adapter `name` into `slot` (one asynchronous h2d), replacing what the slot held.

        Raises:
            KeyError: if `name` is not registered. ValueError: if `slot` is out of range.
            Errors of the transport's host half, and of an earlier load into this slot.
        """
        host = self._host[name]
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range: the bank has {self.num_slots} slots")
        self._holds[slot] = None
        previous = self._loading.pop(slot, None)
        if previous is not None:
            previous.wait()  # an earlier load into this slot: its error must not go unseen
        self._loading[slot] = self.transport.h2d(
            host, self._device, dst_offset=slot * self.slot_bytes, nbytes=self.slot_bytes
        )
        self._holds[slot] = name
        self.loads += 1

    def batch(self, row_slots: Sequence[int | None]) -> LoraBatch:
        """The `LoraBatch` of a batch whose row i uses the adapter in slot `row_slots[i]` (None: base).

        Waits for the loads into those slots.

        Raises:
            ValueError: if a slot is out of range or holds no adapter. Errors of a load (`IntegrityError`
            under CC), after which that slot holds no adapter.
        """
        for slot in dict.fromkeys(s for s in row_slots if s is not None):
            if not 0 <= slot < self.num_slots or self._holds[slot] is None:
                raise ValueError(f"slot {slot} holds no adapter; load one first")
            event = self._loading.pop(slot, None)
            if event is not None:
                try:
                    event.wait()
                except BaseException:
                    self._holds[slot] = None
                    raise
        return LoraBatch.of(self.layout, self._device.tensor, row_slots)

    def hint(self, names: Sequence[str]) -> None:
        """Tell the transport which adapters will be loaded next (in order); resident ones are skipped.

        Raises:
            KeyError: if a name is not registered.
        """
        for name in dict.fromkeys(names):
            if name not in self._holds:
                self.transport.hint(self._host[name], nbytes=self.slot_bytes)

    def holds(self, slot: int) -> str | None:
        """The adapter in `slot` (loaded or loading), or None."""
        return self._holds[slot]

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
