"""The confidential-computing protocol: sealed channels, bounce buffers, the secure link, the emulated device.

See docs/cc-protocol.md for the protocol and the threat model.
"""

from veil.cc.channel import ReceiverChannel, Reservation, SenderChannel
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import DeviceOutOfMemory, IntegrityError, RekeyRequired, ReservationError
from veil.cc.host import HostBuffer
from veil.cc.link import LinkConfig, SecureLink
from veil.cc.stream import Event, Stream

__all__ = [
    "Device",
    "DeviceBuffer",
    "DeviceOutOfMemory",
    "Event",
    "HostBuffer",
    "IntegrityError",
    "LinkConfig",
    "ReceiverChannel",
    "RekeyRequired",
    "Reservation",
    "ReservationError",
    "SecureLink",
    "SenderChannel",
    "Stream",
]
