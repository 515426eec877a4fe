"""Multi-LoRA: PEFT adapters applied per row of a batch, from a few device slots loaded through the transport.

- `adapter`: `Adapter` (A/B matrices by (layer, target)), `random_adapter`, `AdapterError`.
- `peft_format`: `load_peft` / `save_peft` (PEFT's directory format).
- `layout`: where targets sit in veil's fused weights; the flat slot layout.
- `slots`: `SlotTable`, LRU eviction with pins (pure policy).
- `bank`: `DeviceAdapterBank`, the slots in the device arena, loaded through the transport (mechanism).
- `projection`: `LoraBatch`, `lora_projection` for `decoder_layer`.
"""

from __future__ import annotations

from veil.lora.adapter import Adapter, AdapterError, random_adapter
from veil.lora.bank import DeviceAdapterBank
from veil.lora.layout import TARGETS
from veil.lora.peft_format import load_peft, save_peft
from veil.lora.projection import LoraBatch, lora_projection
from veil.lora.slots import Placement, SlotTable

__all__ = [
    "TARGETS",
    "Adapter",
    "AdapterError",
    "DeviceAdapterBank",
    "LoraBatch",
    "Placement",
    "SlotTable",
    "load_peft",
    "lora_projection",
    "random_adapter",
    "save_peft",
]
