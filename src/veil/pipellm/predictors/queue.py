"""Queue predictor: transfers named by the engine's waiting requests (LoRA adapters, S-LoRA style).

A multi-LoRA engine keeps many adapters in host memory and a few device slots. The adapters the
waiting requests need, in queue order, are the adapters that will be loaded next; each adapter is a
fixed list of chunks (its byte ranges in host memory).
"""

from __future__ import annotations

from collections.abc import Sequence

from veil.pipellm.keys import TransferKey
from veil.pipellm.predictors.base import Predictor


class QueuePredictor(Predictor):
    """Predicts the chunks of the adapters the waiting queue names, in queue order.

    The engine registers each adapter's chunks once (`register`) and reports the waiting queue after
    each scheduling step (`set_waiting`, adapter ids in the order their requests will run; duplicates
    and adapters already resident on the device may be included or not: a duplicate counts once,
    and `set_resident` removes adapters that need no transfer). Without these calls the predictor
    predicts nothing, which is correct: it has no pattern to learn on its own.

    An observed chunk of an adapter marks that adapter as loading: its remaining chunks come next.
    """

    def __init__(self) -> None:
        self._chunks: dict[int, tuple[TransferKey, ...]] = {}
        self._owner: dict[TransferKey, tuple[int, int]] = {}  # chunk -> (adapter id, index)
        self._waiting: list[int] = []
        self._resident: set[int] = set()
        self._loading: tuple[int, int] | None = None  # (adapter id, next chunk index)

    def register(self, adapter_id: int, chunks: Sequence[TransferKey]) -> None:
        """Declare the host byte ranges (chunks, in load order) of adapter `adapter_id`."""
        if not chunks:
            raise ValueError(f"adapter {adapter_id} must have at least one chunk")
        for key in self._chunks.get(adapter_id, ()):
            self._owner.pop(key, None)
        self._chunks[adapter_id] = tuple(chunks)
        for index, key in enumerate(chunks):
            self._owner[key] = (adapter_id, index)

    def set_waiting(self, adapter_ids: Sequence[int]) -> None:
        """The adapters of the waiting requests, in the order they will be scheduled."""
        unknown = [a for a in adapter_ids if a not in self._chunks]
        if unknown:
            raise ValueError(f"adapters {unknown} were never registered")
        self._waiting = list(dict.fromkeys(adapter_ids))

    def set_resident(self, adapter_ids: Sequence[int]) -> None:
        """Adapters already on the device (no transfer will happen for them)."""
        self._resident = set(adapter_ids)

    def observe(self, key: TransferKey) -> None:
        owner = self._owner.get(key)
        if owner is None:
            return
        adapter_id, index = owner
        if index + 1 < len(self._chunks[adapter_id]):
            self._loading = (adapter_id, index + 1)
            return
        self._loading = None  # fully loaded: it is resident now
        self._resident.add(adapter_id)
        if adapter_id in self._waiting:
            self._waiting.remove(adapter_id)

    def predict(self, n: int) -> list[TransferKey]:
        out: list[TransferKey] = []
        loading_id = None
        if self._loading is not None:
            loading_id, index = self._loading
            out.extend(self._chunks[loading_id][index:])
        for adapter_id in self._waiting:
            if len(out) >= n:
                break
            if adapter_id != loading_id and adapter_id not in self._resident:
                out.extend(self._chunks[adapter_id])
        return out[: max(n, 0)]
