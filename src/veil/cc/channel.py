"""One direction of the secure channel: AES-256-GCM under receiver-owned counter IVs.

Message n of an epoch is sealed with IV(n) = n (12 bytes, big-endian) XOR iv_mask. The receiver opens
the next message with IV(its own counter): nothing that travels through the bounce ring chooses an IV,
so replayed, reordered, dropped or truncated messages fail to authenticate. A message carries at most
`max_message_bytes` of plaintext (the ring's slot size minus the tag); a zero-length message is a NOP
that still consumes one IV on both sides.

Sender side (`SenderChannel`, `Reservation`):
- `reserve()` hands out the next counter. A `Reservation` seals exactly once (data or NOP), possibly
  out of order and on any thread; a second seal raises `ReservationError`. Sealing two plaintexts under
  one IV is therefore impossible through this API.
- `emit()` publishes sealed reservations into the ring strictly in counter order; emitting n+1 before n
  raises `ReservationError`.
- A dropped reservation always burns its IV: if unsealed it is sealed as a NOP on the spot; if already
  sealed its ciphertext is still emitted and the receiver authenticates and discards it
  (`receive(None)`). No IV is ever skipped, so the receiver's counter never falls out of step.
- Counters stop at `counter_limit`: `reserve()` then raises `RekeyRequired`; they never wrap.

Receiver side (`ReceiverChannel`): copies each message out of the untrusted slot once (so a concurrent
writer cannot change it between GCM's passes), decrypts in place in private staging, and copies the
plaintext into the destination only after the tag verified. Any failure raises `IntegrityError`, leaves
the destination untouched, poisons the channel and closes the ring until `rekey()`.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.cc.bounce import POISONED_MESSAGE, BounceRing
from veil.cc.errors import IntegrityError, RekeyRequired, ReservationError
from veil.cc.host import copy_bytes
from veil.cc.session import IV_BYTES, ChannelSecrets

TAG_BYTES = 16
MAX_MESSAGES = 2**32  # the H100 counter is 32-bit


def iv_for(counter: int, iv_mask: bytes) -> bytes:
    """IV(n) = n as 12 big-endian bytes XOR the 12-byte mask."""
    return (counter ^ int.from_bytes(iv_mask, "big")).to_bytes(IV_BYTES, "big")


def message_count(nbytes: int, max_message_bytes: int) -> int:
    """Messages needed for `nbytes` of plaintext (an empty transfer is one NOP)."""
    return max(1, -(-nbytes // max_message_bytes))


@dataclass
class ChannelStats:
    """Counters for operators (never shown to the peer)."""

    messages: int = 0
    nops: int = 0
    plaintext_bytes: int = 0
    integrity_failures: int = 0
    refused_messages: int = 0
    rekeys: int = 0


class _State(enum.Enum):
    RESERVED = "reserved"
    SEALING = "sealing"
    SEALED = "sealed"
    EMITTED = "emitted"


class _Endpoint:
    """What sender and receiver share: secrets, AEAD, counter limit, ring, stats."""

    def __init__(self, secrets: ChannelSecrets, ring: BounceRing, counter_limit: int, aad: bytes) -> None:
        if not 1 <= counter_limit <= MAX_MESSAGES:
            raise ValueError(f"counter_limit must be in [1, {MAX_MESSAGES}]")
        if ring.slot_bytes < TAG_BYTES:
            raise ValueError(f"ring slots must hold at least the {TAG_BYTES}-byte tag")
        self.ring = ring
        self.counter_limit = counter_limit
        self.stats = ChannelStats()
        self._aad = aad or None
        self._lock = threading.RLock()
        self._install(secrets)

    @property
    def max_message_bytes(self) -> int:
        """Largest plaintext one message carries."""
        return self.ring.slot_bytes - TAG_BYTES

    @property
    def epoch(self) -> int:
        """The epoch of the installed secrets."""
        return self._epoch

    def _install(self, secrets: ChannelSecrets) -> None:
        self._aead = AESGCM(secrets.key)
        self._mask = secrets.iv_mask
        self._epoch = secrets.epoch
        self._counter = 0


class SenderChannel(_Endpoint):
    """The sealing end of one direction.

    Args:
        secrets: key and IV mask of this direction.
        ring: the bounce ring messages are emitted into.
        counter_limit: IVs per epoch before `RekeyRequired` (2**32; smaller in tests).
        _aad: private seam for published test vectors; the protocol uses no associated data.
    """

    def __init__(
        self,
        secrets: ChannelSecrets,
        ring: BounceRing,
        *,
        counter_limit: int = MAX_MESSAGES,
        _aad: bytes = b"",
    ) -> None:
        super().__init__(secrets, ring, counter_limit, _aad)
        self._unemitted: deque[Reservation] = deque()

    def remaining(self) -> int:
        """IVs that can still be reserved in this epoch."""
        return self.counter_limit - self._counter

    def reserve(self) -> Reservation:
        """Reserve the next IV.

        Raises:
            RekeyRequired: if the epoch's counters are used up.
        """
        with self._lock:
            if self._counter >= self.counter_limit:
                raise RekeyRequired(f"all {self.counter_limit} IVs of epoch {self._epoch} are used")
            reservation = Reservation(self, self._counter, self._epoch)
            self._counter += 1
            self._unemitted.append(reservation)
            return reservation

    def emit(self, reservation: Reservation) -> None:
        """Publish a sealed reservation; it must be the oldest one not yet emitted.

        Raises:
            ReservationError: if it is not next in counter order, not sealed, or stale.
            IntegrityError: if the ring is closed (the receiver poisoned the channel).
        """
        with self._lock:
            if reservation._channel is not self or reservation.epoch != self._epoch:
                raise ReservationError("reservation belongs to another channel or epoch")
            if not self._unemitted or self._unemitted[0] is not reservation:
                raise ReservationError("reservations must be emitted in counter order")
            if reservation._state is not _State.SEALED:
                raise ReservationError("only a sealed reservation can be emitted")
            reservation._publish()
            self._unemitted.popleft()

    def emit_ready(self) -> int:
        """Emit the longest run of sealed reservations at the head; return how many were emitted."""
        emitted = 0
        with self._lock:
            while self._unemitted and self._unemitted[0]._state is _State.SEALED:
                self.emit(self._unemitted[0])
                emitted += 1
        return emitted

    def send(self, plaintext: memoryview | bytes) -> None:
        """Reserve, seal into a bounce slot and emit one message (a NOP if empty).

        Raises:
            RekeyRequired, IntegrityError, ReservationError: as `reserve`, `Reservation.seal`, `emit`.
        """
        with self._lock:
            reservation = self.reserve()
            reservation.seal(plaintext)
            self.emit(reservation)

    def send_chunked(self, data: memoryview) -> None:
        """Send `data` as consecutive messages of at most `max_message_bytes` (one NOP if empty).

        Raises:
            RekeyRequired: before sending anything, if the epoch has too few IVs left.
        """
        step = self.max_message_bytes
        with self._lock:
            if self.remaining() < message_count(len(data), step):
                raise RekeyRequired("not enough IVs left in this epoch for the transfer")
            if len(data) == 0:
                self.send(b"")
            for start in range(0, len(data), step):
                self.send(data[start : start + step])

    def rekey(self, secrets: ChannelSecrets) -> None:
        """Install a new epoch's secrets; reset the counter; outstanding reservations become stale."""
        with self._lock:
            self._install(secrets)
            self._unemitted.clear()
            self.stats.rekeys += 1

    def _seal(self, counter: int, plaintext: memoryview | bytes, out: memoryview) -> None:
        self._aead.encrypt_into(iv_for(counter, self._mask), plaintext, self._aad, out)


class Reservation:
    """One reserved IV of a `SenderChannel`; seals exactly once, data or NOP.

    Not created directly: use `SenderChannel.reserve()`.
    """

    def __init__(self, channel: SenderChannel, counter: int, epoch: int) -> None:
        self._channel = channel
        self.counter = counter
        self.epoch = epoch
        self.dropped = False
        self._state = _State.RESERVED
        self._slot: int | None = None
        self._out: memoryview | None = None
        self._length = 0

    @property
    def sealed(self) -> bool:
        """True once sealed (and until and after emission)."""
        return self._state in (_State.SEALED, _State.EMITTED)

    @property
    def emitted(self) -> bool:
        """True once published into the ring."""
        return self._state is _State.EMITTED

    def seal(self, plaintext: memoryview | bytes, *, into: memoryview | None = None) -> None:
        """Seal `plaintext` under this reservation's IV.

        Args:
            plaintext: at most `max_message_bytes` bytes; empty seals a NOP.
            into: private staging of at least len(plaintext) + 16 bytes that the caller leaves alone
                until emission (which copies from it); None seals straight into a bounce slot, which
                the reservation then holds until it is emitted.

        Raises:
            ReservationError: if already sealed (or being sealed) or stale after a re-key.
            ValueError: if the plaintext is too long or `into` too small.
            IntegrityError: if sealing into the ring and the ring is closed.
        """
        channel = self._channel
        length = len(plaintext) + TAG_BYTES
        if length - TAG_BYTES > channel.max_message_bytes:
            raise ValueError(f"a message carries at most {channel.max_message_bytes} bytes")
        if into is not None and len(into) < length:
            raise ValueError(f"into must hold at least {length} bytes")
        with channel._lock:
            if self.epoch != channel.epoch:
                raise ReservationError("reservation is stale: the channel was re-keyed")
            if self._state is not _State.RESERVED:
                raise ReservationError("a reservation seals exactly once")
            self._state = _State.SEALING
        try:
            if into is None:
                self._slot = channel.ring.acquire()
                into = channel.ring.slot(self._slot)
            channel._seal(self.counter, plaintext, into[:length])
        except BaseException:
            self._release_slot()
            with channel._lock:
                self._state = _State.RESERVED
            raise
        self._out, self._length = into, length
        with channel._lock:
            self._state = _State.SEALED

    def seal_nop(self, *, into: memoryview | None = None) -> None:
        """Seal a zero-length NOP (burns the IV); same contract as `seal`."""
        self.seal(b"", into=into)

    def drop(self) -> None:
        """Give up this reservation; its IV is burned, never reused.

        Unsealed: sealed now as a NOP in a private 16-byte buffer. Sealed: the ciphertext stays. Either
        way it is still emitted in order and the receiver must consume it with `receive(None)`.
        """
        if self._state is _State.RESERVED:
            self.seal(b"", into=memoryview(bytearray(TAG_BYTES)))
        self.dropped = True

    def _publish(self) -> None:
        ring = self._channel.ring
        if self._slot is None:
            assert self._out is not None
            self._slot = ring.acquire()
            copy_bytes(ring.slot(self._slot)[: self._length], self._out[: self._length])
        try:
            ring.publish(self._slot, self._length)
        except BaseException:
            self._release_slot()
            raise
        stats = self._channel.stats
        stats.messages += 1
        stats.nops += self._length == TAG_BYTES
        stats.plaintext_bytes += self._length - TAG_BYTES
        self._state = _State.EMITTED
        self._out = None

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._channel.ring.release(self._slot)
            self._slot = None


class ReceiverChannel(_Endpoint):
    """The opening end of one direction.

    Args:
        secrets: key and IV mask of this direction.
        ring: the bounce ring messages arrive through.
        counter_limit: must match the sender's.
        _aad: private seam for published test vectors.
    """

    def __init__(
        self,
        secrets: ChannelSecrets,
        ring: BounceRing,
        *,
        counter_limit: int = MAX_MESSAGES,
        _aad: bytes = b"",
    ) -> None:
        super().__init__(secrets, ring, counter_limit, _aad)
        self._staging = memoryview(bytearray(ring.slot_bytes))
        self._poisoned = False

    @property
    def poisoned(self) -> bool:
        """True after an integrity failure, until `rekey()`."""
        return self._poisoned

    @property
    def counter(self) -> int:
        """The counter of the next message to open."""
        return self._counter

    def receive(self, out: memoryview | None, *, timeout: float | None = None) -> None:
        """Open the next message with IV(own counter) and copy its plaintext into `out`.

        Args:
            out: destination of exactly the expected plaintext length; None authenticates and
                discards (NOPs, dropped reservations).
            timeout: seconds to wait for a message; None waits forever.

        Raises:
            IntegrityError: on any authentication failure or if poisoned; `out` is untouched.
            TimeoutError: if no message arrives in time (not an integrity failure: nothing consumed).
        """
        with self._lock:
            if self._poisoned:
                self.stats.refused_messages += 1
                raise IntegrityError(POISONED_MESSAGE)
            descriptor = self.ring.pop(timeout)
            try:
                plaintext = self._open(descriptor.slot, descriptor.length)
                if plaintext is None or (out is not None and len(out) != len(plaintext)):
                    self._poison()
                    raise IntegrityError()
                if out is not None:
                    copy_bytes(out, plaintext)
            finally:
                self.ring.release(descriptor.slot)
            self._counter += 1
            self.stats.messages += 1
            self.stats.nops += len(plaintext) == 0
            self.stats.plaintext_bytes += len(plaintext)

    def receive_chunked(self, out: memoryview, *, timeout: float | None = None) -> None:
        """Receive what `SenderChannel.send_chunked` sent, chunk by chunk into `out` as each arrives."""
        step = self.max_message_bytes
        with self._lock:
            if len(out) == 0:
                self.receive(out, timeout=timeout)
            for start in range(0, len(out), step):
                self.receive(out[start : start + step], timeout=timeout)

    def rekey(self, secrets: ChannelSecrets) -> None:
        """Install a new epoch's secrets, reset the counter and lift the poison."""
        with self._lock:
            self._install(secrets)
            self._poisoned = False
            self.stats.rekeys += 1

    def _open(self, slot: int, length: int) -> memoryview | None:
        """Authenticate+decrypt a message in private staging; None if it does not authenticate."""
        if not TAG_BYTES <= length <= self.ring.slot_bytes or self._counter >= self.counter_limit:
            return None
        staged = self._staging[:length]
        copy_bytes(staged, self.ring.slot(slot)[:length])  # read untrusted memory exactly once
        try:
            self._aead.decrypt_into(iv_for(self._counter, self._mask), staged, self._aad, staged[:-TAG_BYTES])
        except InvalidTag:
            return None
        return staged[:-TAG_BYTES]

    def _poison(self) -> None:
        self._poisoned = True
        self.stats.integrity_failures += 1
        self.ring.close()
