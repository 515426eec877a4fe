"""One direction of the secure channel: AES-256-GCM under receiver-owned counter IVs.

Message n of an epoch is sealed with IV(n) = n (12 bytes, big-endian) XOR iv_mask. The receiver opens
the next message with IV(its own counter): nothing that travels through the bounce ring chooses an IV,
so replayed, reordered, dropped or truncated messages fail to authenticate. A message carries at most
`max_message_bytes` of plaintext (the ring's slot size minus the tag); a zero-length message is a NOP
that still consumes one IV on both sides.

Sender side (`SenderChannel`, `Reservation`): the sender channel is the one owner of its counter.
- `reserve()` hands out the next counter; `at(n)` returns counter n's reservation, reserving the ones
  below it on the way (speculation seals ahead of the counter). A `Reservation` keeps the keys of the
  epoch that issued it and seals exactly once (data or NOP), possibly out of order and on any thread;
  a second seal raises `ReservationError`. Sealing two plaintexts under one key and IV is therefore
  impossible through this API, across re-keys too.
- Sealing writes into private staging, never into the shared ring; `emit()` copies the message into a
  bounce slot and publishes it, strictly in counter order (emitting n+1 before n raises).
- A dropped reservation always burns its IV: if unsealed it is sealed as a NOP; if a worker is sealing
  it, `drop()` waits for that seal; if sealed, its ciphertext is still emitted and the receiver
  authenticates and discards it (`receive(None)`). No IV is ever skipped.
- Counters stop at `counter_limit`: `reserve()` then raises `RekeyRequired`; they never wrap.

Receiver side (`ReceiverChannel`): copies each message out of the untrusted slot once (so a concurrent
writer cannot change it between GCM's passes), decrypts in place in private staging, and copies the
plaintext into the destination only after the tag verified. Any failure raises `IntegrityError`, leaves
the destination untouched, poisons the channel and closes the ring until `rekey()`.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
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


def message_pieces(data: memoryview, max_message_bytes: int) -> list[memoryview]:
    """`data` cut into its messages' slices, in order (one empty slice for empty data: a NOP)."""
    step = max_message_bytes
    return [data[i : i + step] for i in range(0, len(data), step)] or [data[:0]]


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


@dataclass(frozen=True, eq=False)
class _EpochKeys:
    """One epoch's AEAD and IV mask; a reservation keeps the keys of the epoch that issued it."""

    aead: AESGCM
    mask: bytes
    epoch: int


class StagingPool:
    """Free private buffers of one bounce slot each, reused: messages are sealed and opened there,
    never in untrusted memory. Holds at most what was in flight at once."""

    def __init__(self, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        return memoryview(buffer if buffer is not None else bytearray(self.slot_bytes))

    def give(self, buffer: memoryview) -> None:
        """Return a buffer from `take` (a view of part of one is ignored)."""
        if len(buffer) == self.slot_bytes and isinstance(buffer.obj, bytearray):
            with self._lock:
                self._free.append(buffer.obj)


@dataclass
class TakenMessage:
    """A message taken off the ring by `ReceiverChannel.take`: its counter and epoch keys are bound,
    its bytes copied out of untrusted memory into the caller's staging; not yet authenticated."""

    counter: int
    keys: _EpochKeys
    staged: memoryview  # ciphertext + tag, in the caller's staging buffer
    well_formed: bool  # False: wrong length or past the counter limit (it cannot authenticate)


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
        return self._keys.epoch

    def _install(self, secrets: ChannelSecrets) -> None:
        self._keys = _EpochKeys(AESGCM(secrets.key), secrets.iv_mask, secrets.epoch)
        self._counter = 0


class SenderChannel(_Endpoint):
    """The sealing end of one direction, and the one owner of its message counter.

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
        self._unemitted: dict[int, Reservation] = {}  # reserved and not yet emitted, by counter
        self._next_emit = 0
        self.staging = StagingPool(ring.slot_bytes)  # private buffers where messages are sealed

    @property
    def next_counter(self) -> int:
        """The counter of the next message to be emitted."""
        return self._next_emit

    def remaining(self) -> int:
        """IVs that can still be reserved in this epoch."""
        return self.counter_limit - self._counter

    def lacks_ivs(self, messages: int, *, used: int | None = None, margin: int = 0) -> bool:
        """True if this epoch cannot serve `messages` more, keeping `margin` IVs (capped at the epoch's
        size) beyond the `used` ones already spoken for (default: the counters reserved)."""
        left = self.remaining() if used is None else self.counter_limit - used
        return left < max(messages, min(margin, self.counter_limit))

    def reserve(self) -> Reservation:
        """Reserve the next IV.

        Raises:
            RekeyRequired: if the epoch's counters are used up.
        """
        with self._lock:
            if self._counter >= self.counter_limit:
                raise RekeyRequired(f"all {self.counter_limit} IVs of epoch {self.epoch} are used")
            reservation = Reservation(self, self._counter, self._keys)
            self._unemitted[self._counter] = reservation
            self._counter += 1
            return reservation

    def at(self, counter: int) -> Reservation:
        """The reservation of `counter`, reserving every counter up to it first.

        Speculation seals ahead of the counter: its mechanism asks for the reservation of the IV the
        policy chose, and the counters below it are reserved in order on the way (a reserved counter
        is just a number until something is sealed under it).

        Raises:
            ReservationError: if `counter` was already emitted in this epoch.
            RekeyRequired: if `counter` is beyond the epoch's limit.
        """
        with self._lock:
            if counter < self._next_emit:
                raise ReservationError(f"counter {counter} was already emitted in this epoch")
            while self._counter <= counter:
                self.reserve()
            return self._unemitted[counter]

    def emit(self, reservation: Reservation, *, bell: bool = True) -> None:
        """Publish a sealed reservation; it must be the oldest one not yet emitted.

        Copies the sealed message from private staging into a bounce slot (blocking while the ring is
        full) and publishes it; `bell=False` publishes it quietly (`BounceRing.publish`).

        Raises:
            ReservationError: if it is not next in counter order, not sealed, or stale.
            IntegrityError: if the ring is closed (the receiver poisoned the channel).
        """
        with self._lock:
            if reservation._channel is not self or reservation._keys is not self._keys:
                raise ReservationError("reservation belongs to another channel or epoch")
            if reservation.counter != self._next_emit:
                raise ReservationError("reservations must be emitted in counter order")
            if reservation._state is not _State.SEALED:
                raise ReservationError("only a sealed reservation can be emitted")
            reservation._publish(bell=bell)
            del self._unemitted[reservation.counter]
            self._next_emit += 1

    def emit_run(self, reservations: Sequence[Reservation]) -> None:
        """Emit consecutive sealed reservations as one submission: the consumer is woken once, after
        the last (or when a full ring makes the producer wait, or on a failure part way).

        Raises:
            As `emit`, for the first reservation that cannot be emitted (those before it are).
        """
        with self._lock:
            try:
                for reservation in reservations:
                    self.emit(reservation, bell=False)
            finally:
                self.ring.ring_bell()

    def emit_ready(self) -> int:
        """Emit the longest run of sealed reservations at the head; return how many were emitted."""
        emitted = 0
        with self._lock:
            while (head := self._unemitted.get(self._next_emit)) is not None and head._state is _State.SEALED:
                self.emit(head)
                emitted += 1
        return emitted

    def send(self, plaintext: memoryview | bytes) -> None:
        """Reserve, seal and emit one message (a NOP if empty).

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
        with self._lock:
            if self.remaining() < message_count(len(data), self.max_message_bytes):
                raise RekeyRequired("not enough IVs left in this epoch for the transfer")
            for piece in message_pieces(data, self.max_message_bytes):
                self.send(piece)

    def rekey(self, secrets: ChannelSecrets) -> None:
        """Install a new epoch's secrets; reset the counter; outstanding reservations become stale.

        A stale reservation keeps its own epoch's keys: if a worker seals it after this call, the
        ciphertext is under the old key and IV (still sealed once) and `emit` refuses it.
        """
        with self._lock:
            self._install(secrets)
            self._unemitted.clear()
            self._next_emit = 0
            self.stats.rekeys += 1

    def _seal(self, reservation: Reservation, plaintext: memoryview | bytes, out: memoryview) -> None:
        """Seal under the reservation's own epoch keys (the seam the IV-audit tests wrap)."""
        keys = reservation._keys
        keys.aead.encrypt_into(iv_for(reservation.counter, keys.mask), plaintext, self._aad, out)


class Reservation:
    """One reserved IV of a `SenderChannel`; seals exactly once, data or NOP.

    Not created directly: use `SenderChannel.reserve()` or `at()`. Sealing writes into private
    staging memory, never into the shared bounce ring (a GCM implementation may read back the
    ciphertext it wrote while computing the tag, and shared memory can change under it); `emit`
    copies the finished message into a slot.
    """

    def __init__(self, channel: SenderChannel, counter: int, keys: _EpochKeys) -> None:
        self._channel = channel
        self.counter = counter
        self._keys = keys
        self.dropped = False
        self._state = _State.RESERVED
        self._cond = threading.Condition()
        self._out: memoryview | None = None  # the sealed message in private staging
        self._slot: int | None = None  # the bounce slot it was staged into, if any (`stage`)
        self._snapshot_out: memoryview | None = None
        self._length = 0

    @property
    def epoch(self) -> int:
        """The epoch whose keys this reservation seals under."""
        return self._keys.epoch

    @property
    def sealed(self) -> bool:
        """True once sealed (and until and after emission)."""
        return self._state in (_State.SEALED, _State.EMITTED)

    @property
    def carries_data(self) -> bool:
        """True once sealed with a non-empty plaintext."""
        return self.sealed and self._length > TAG_BYTES

    @property
    def emitted(self) -> bool:
        """True once published into the ring."""
        return self._state is _State.EMITTED

    def seal(self, plaintext: memoryview | bytes, *, in_place: bool = False) -> None:
        """Seal `plaintext` under this reservation's IV, into private staging.

        Args:
            plaintext: at most `max_message_bytes` bytes; empty seals a NOP.
            in_place: `plaintext` is a view of the first bytes of a staging buffer from
                `snapshot()`: seal it where it lies (the source is then read exactly once).

        Raises:
            ReservationError: if already sealed (or being sealed) or stale after a re-key.
            ValueError: if the plaintext is too long.
        """
        channel = self._channel
        length = len(plaintext) + TAG_BYTES
        if length - TAG_BYTES > channel.max_message_bytes:
            raise ValueError(f"a message carries at most {channel.max_message_bytes} bytes")
        with self._cond:
            if self._keys is not channel._keys:
                raise ReservationError("reservation is stale: the channel was re-keyed")
            if self._state is not _State.RESERVED:
                raise ReservationError("a reservation seals exactly once")
            self._state = _State.SEALING
        if in_place and self._snapshot_out is None:
            raise ValueError("in_place sealing needs a snapshot() first")
        out = self._snapshot_out if in_place and self._snapshot_out is not None else channel.staging.take()
        try:
            channel._seal(self, plaintext, out[:length])
        except BaseException:
            channel.staging.give(out)
            with self._cond:
                self._state = _State.RESERVED
                self._cond.notify_all()
            raise
        with self._cond:
            self._out, self._length = out, length
            self._state = _State.SEALED
            self._cond.notify_all()

    def message(self) -> bytes:
        """A copy of the sealed message (ciphertext + tag) before emission (for published vectors).

        Raises:
            ReservationError: if not sealed, or already emitted.
        """
        with self._cond:
            if self._state is not _State.SEALED:
                raise ReservationError("only a sealed, unemitted reservation has a message")
            if self._slot is not None:
                return bytes(self._channel.ring.slot(self._slot)[: self._length])
            assert self._out is not None
            return bytes(self._out[: self._length])

    def snapshot(self, source: memoryview) -> memoryview:
        """Copy `source` once into this reservation's staging and return that private copy.

        Pair with `seal(copy, in_place=True)`: what is hashed or checked and what is sealed are then
        the same bytes, whatever writes the source meanwhile.
        """
        self._snapshot_out = self._channel.staging.take()
        copy = self._snapshot_out[: len(source)]
        copy_bytes(copy, source)
        return copy

    def seal_nop(self) -> None:
        """Seal a zero-length NOP (burns the IV); same contract as `seal`."""
        self.seal(b"")

    def drop(self) -> None:
        """Give up this reservation; its IV is burned, never reused.

        Unsealed: sealed now as a NOP. Being sealed on another thread: waits for that seal to end.
        Sealed: the ciphertext stays. Either way it is still emitted in order and the receiver
        consumes it with `receive(None)`.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._state is not _State.SEALING)
            reserved = self._state is _State.RESERVED
            self.dropped = True
        if reserved:
            try:
                self.seal(b"")
            except ReservationError:  # sealed by a worker between the check and here: keep it
                with self._cond:
                    self._cond.wait_for(lambda: self._state is not _State.SEALING)

    def stage(self, *, keep_free: int = 1) -> bool:
        """Copy the sealed message into a bounce slot ahead of emission, if a slot is free to spare.

        For a sealing worker: the copy then happens on the worker, not on the emitting caller. Only
        a finished message is copied (the tag was computed in private staging), and never into one
        of the last `keep_free` free slots, so staged messages can never hold every slot while the
        emitter waits for one. The slot is published when the reservation is emitted (a staged
        message that is dropped is emitted from its slot and discarded by the receiver). Must not
        run concurrently with a re-key of the channel (the sealer waits for its workers first).

        Returns:
            True if the message now sits in a slot; False if not sealed, already staged or emitted,
            stale, or no slot could be spared (emission then copies it as usual).
        """
        ring = self._channel.ring
        with self._cond:
            if self._state is not _State.SEALED or self._slot is not None or self._out is None:
                return False
            if self._keys is not self._channel._keys:
                return False
            slot = ring.try_acquire(keep_free=keep_free)
            if slot is None:
                return False
            copy_bytes(ring.slot(slot)[: self._length], self._out[: self._length])
            self._slot, staging, self._out = slot, self._out, None
        self._channel.staging.give(staging)  # outside our lock: emit locks the channel, then us
        return True

    def _publish(self, *, bell: bool = True) -> None:
        ring = self._channel.ring
        with self._cond:
            slot = self._slot
            if slot is None:
                assert self._out is not None
                slot = ring.acquire()
                try:
                    copy_bytes(ring.slot(slot)[: self._length], self._out[: self._length])
                except BaseException:
                    ring.release(slot)
                    raise
            try:
                ring.publish(slot, self._length, bell=bell)
            except BaseException:
                ring.release(slot)
                self._slot = None
                raise
            self._slot = None
            self._state = _State.EMITTED
            staging, self._out = self._out, None
        stats = self._channel.stats
        stats.messages += 1
        stats.nops += self._length == TAG_BYTES
        stats.plaintext_bytes += self._length - TAG_BYTES
        if staging is not None:
            self._channel.staging.give(staging)


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
            message = self.take(None if out is None else len(out), self._staging, timeout=timeout)
            plaintext = self.open(message)
            if out is not None:
                copy_bytes(out, plaintext)
            self.delivered((len(plaintext),))

    def take(
        self, expected: int | None, staging: memoryview, *, timeout: float | None = None
    ) -> TakenMessage:
        """The first half of `receive`, for openers that authenticate outside the receiver's lock.

        Under the lock: refuse if poisoned; pop the next message; bind it to this receiver's own
        counter and the current epoch's keys (nothing carried with the data chooses the IV); copy it
        out of its untrusted slot exactly once into `staging` (a whole slot's bytes); release the
        slot; advance the counter. Messages must then be opened (`open`) and their plaintext used in
        the order they were taken, and a failure of any kind reported with `fail_closed`.

        Args:
            expected: the plaintext length the caller expects (None: any); another length makes the
                message malformed, and its `open` fails.

        Raises:
            IntegrityError: if poisoned (nothing is consumed).
            TimeoutError: if no message arrives in time (nothing is consumed).
        """
        with self._lock:
            if self._poisoned:
                self.stats.refused_messages += 1
                raise IntegrityError(POISONED_MESSAGE)
            descriptor = self.ring.pop(timeout)
            length = descriptor.length
            well_formed = (
                TAG_BYTES <= length <= min(self.ring.slot_bytes, len(staging))
                and (expected is None or length == expected + TAG_BYTES)
                and self._counter < self.counter_limit
            )
            staged = staging[:length] if well_formed else staging[:0]
            try:
                if well_formed:
                    copy_bytes(staged, self.ring.slot(descriptor.slot)[:length])  # read untrusted memory once
            finally:
                self.ring.release(descriptor.slot)
            message = TakenMessage(self._counter, self._keys, staged, well_formed)
            self._counter += 1
            return message

    def open(self, message: TakenMessage) -> memoryview:
        """Authenticate and decrypt a taken message in place (no lock held while AES-GCM runs: lanes
        open in parallel); returns its plaintext, a view of the staging.

        Raises:
            IntegrityError: if it does not authenticate; the receiver is poisoned first.
        """
        if message.well_formed:
            sealed, keys = message.staged, message.keys
            try:
                keys.aead.decrypt_into(
                    iv_for(message.counter, keys.mask), sealed, self._aad, sealed[:-TAG_BYTES]
                )
                return sealed[:-TAG_BYTES]
            except InvalidTag:
                pass
        with self._lock:
            self._poison()
        raise IntegrityError()

    def delivered(self, plaintext_lengths: Sequence[int]) -> None:
        """Count opened messages whose plaintext reached its destination, by length (0: a NOP)."""
        with self._lock:
            self.stats.messages += len(plaintext_lengths)
            self.stats.nops += sum(1 for n in plaintext_lengths if n == 0)
            self.stats.plaintext_bytes += sum(plaintext_lengths)

    def fail_closed(self) -> None:
        """Poison the receiver after a failure outside it (a lane's error): nothing opens and the
        device stops (the ring closes) until a re-key. Not counted as an integrity failure."""
        with self._lock:
            self._poisoned = True
            self.ring.close()

    def receive_chunked(self, out: memoryview, *, timeout: float | None = None) -> None:
        """Receive what `SenderChannel.send_chunked` sent, chunk by chunk into `out` as each arrives."""
        with self._lock:
            for piece in message_pieces(out, self.max_message_bytes):
                self.receive(piece, timeout=timeout)

    def rekey(self, secrets: ChannelSecrets) -> None:
        """Install a new epoch's secrets, reset the counter and lift the poison."""
        with self._lock:
            self._install(secrets)
            self._poisoned = False
            self.stats.rekeys += 1

    def _poison(self) -> None:
        self._poisoned = True
        self.stats.integrity_failures += 1
        self.ring.close()
