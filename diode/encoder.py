"""The transmitter's half of the protocol, sans I/O: records in, datagrams out.

``Encoder`` batches records into blocks. A block closes when the next record
would not fit in ``k`` symbols (a flood fills whole blocks) or when its first
record has waited ``linger_ms`` (a trickle still leaves within milliseconds);
the shell calls :meth:`Encoder.poll` at :meth:`Encoder.deadline`. A closed
block is signed once, split into k' source symbols, given FEC repair and
framed into n' equal datagrams (each ending with a link tag when the stream
has a link secret).

**Groups** (``[link.fec] group``, default 4). A full block (k' = ``k``) waits
for ``group`` - 1 more; the group is framed together and handed over as one
unit whose datagrams are already round-robin (stride ``group`` between two
datagrams of one block), so a burst of B lost datagrams costs each of its
blocks at most ceil(B / ``group``), and a full block carries
``group_repair_burst`` instead of ``repair_burst``. Held full blocks leave
within the linger of their first record all the same: when it is up (or at a
flush) before the group is complete, everything held is re-cut into blocks of
at most ``k`` - 1 symbols that go alone, with the whole burst repair. Only a
group ever holds ``k`` symbols, so n stays a function of k' alone.

**One signature per group** (wire generation 3). The blocks of a group are
signed together: each block's signed bytes are hashed, and one Ed25519
signature over the group (its header and the G digests) goes into every
block, with a manifest naming the block's slot and its neighbours' digests
(diode/wire.py). A block sent alone is a group of 1. A FEC group of more
than ``MAX_GROUP`` blocks is signed block by block.

``SendQueue`` holds framed units (a block, or a group) for the paced sender
and hands datagrams out round-robin across up to ``interleave`` of them. It
never reorders the datagrams of one unit: what is mixed in (other units, the
file lane, repeats) only widens a group's stride, never narrows it. It
never waits to interleave: an idle link sends a lone block at once, and the
per-block burst repair covers it. It has two bounds: at
``limit`` it is :attr:`SendQueue.full` and the shell frames no more (the
records wait unframed, where a bound in bytes drops the newest) until it
holds fewer than ``resume`` (:attr:`SendQueue.has_room`); past ``capacity``
it drops the oldest units not yet started, counted.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from diode import aead, fec
from diode.config.link import LinkSettings
from diode.errors import DiodeError
from diode.keys import SigningKey
from diode.records import Record, encode_record
from diode.wire import (
    AEAD_TAG_SIZE,
    BLOCK_OVERHEAD,
    FLAG_ENCRYPTED,
    GENERATION,
    MAX_GROUP,
    BlockHeader,
    DatagramHeader,
    code_of,
    datagram_generation,
    gate_key,
    group_message,
    manifest_size,
    pack_block_datagrams,
    pack_block_header,
    pack_manifest,
    signed_message,
    symbol_size,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedBlock:
    """One signed block framed into its n datagrams, or a group of ``blocks`` of them.

    A group's blocks have consecutive sequence numbers from ``seq``, the same n,
    and their datagrams in round-robin order: what must go on the wire in that order.
    """

    seq: int
    records: int
    datagrams: tuple[bytes, ...]
    blocks: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sealed:
    """A block's signed bytes (header, payload sealed if the stream has a secret), not yet
    signed: what a group's signature needs from each of its blocks."""

    header: BlockHeader
    signed: bytes
    records: int


class Encoder:
    """Batches records into signed, FEC-protected blocks of one stream and epoch."""

    def __init__(
        self,
        *,
        link: LinkSettings,
        key: SigningKey,
        stream_id: int,
        epoch: int,
        psk: bytes | None = None,
        generation: int = GENERATION,
    ) -> None:
        self._generation = generation
        self._key = key
        self._stream_id = stream_id
        self._epoch = epoch
        self._psk = psk
        # A link secret also gates every datagram (wire version 6): a link tag the
        # receiver checks before anything else.
        self._gate = gate_key(psk, stream_id) if psk else None
        self._symbol = symbol_size(link.datagram_size, gated=psk is not None)
        self._linger_s = link.linger_ms / 1000
        self._fec = link.fec
        # How many blocks one signature covers: a whole FEC group, when it is small enough.
        fec_group = link.fec.group if link.fec.grouped else 1
        self._signed_group = fec_group if fec_group <= MAX_GROUP else 1
        overhead = BLOCK_OVERHEAD + (AEAD_TAG_SIZE if psk else 0)
        self._full_overhead = overhead + manifest_size(generation, self._signed_group)
        self._full_capacity = link.fec.k * self._symbol - self._full_overhead
        # The largest record: one that a block sent alone (a group of 1) can hold.
        alone_overhead = overhead + manifest_size(generation, 1)
        self.capacity = link.fec.k_alone * self._symbol - alone_overhead
        self._parts: list[bytes] = []
        self._size = 0
        self._opened_at = 0.0
        # Full blocks (k symbols) waiting for their group, and when the first one's
        # first record came.
        self._full: list[list[bytes]] = []
        self._full_since = 0.0
        # Whether the open block fills to k symbols and waits for a group: the last
        # block filled fast enough for a group to fill within the linger (until one
        # has, or since the linger last sent what was held, it is assumed to).
        self._grouping = link.fec.grouped
        # The open block's fill time without its pauses, and the last record's time.
        self._pause_s = self._linger_s / link.fec.group
        self._filling_s = 0.0
        self._last_add = 0.0
        self._seq = 0
        self._next_record = 0
        self._closed: list[EncodedBlock] = []

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def pending_records(self) -> int:
        """Records held: in the open block and in full blocks waiting for their group."""
        return len(self._parts) + sum(map(len, self._full))

    @property
    def full_blocks_held(self) -> int:
        """Full blocks waiting for the rest of their group."""
        return len(self._full)

    @property
    def room(self) -> int:
        """Bytes of records the open block can still take before it closes."""
        return self._block_capacity() - self._size

    def _block_capacity(self) -> int:
        """A block that will wait for its group holds k symbols; one that goes alone k - 1."""
        return self._full_capacity if self._grouping else self.capacity

    @property
    def blocks_ready(self) -> bool:
        """Whether closed blocks wait for :meth:`take`."""
        return bool(self._closed)

    def add(self, record: Record, now: float) -> None:
        """Queue one record; closes the open block first if the record would not fit."""
        data = encode_record(record)
        if len(data) > self.capacity:
            raise DiodeError(
                f"a record of {len(data)} bytes exceeds a block's {self.capacity}",
                reason="record_too_large",
            )
        if self._size + len(data) > self._block_capacity():
            self._close_by_size(now)
        if not self._parts:
            self._opened_at = now
            self._filling_s = 0.0
        elif (gap := now - self._last_add) <= self._pause_s:
            self._filling_s += gap
        self._last_add = now
        self._parts.append(data)
        self._size += len(data)

    def deadline(self) -> float | None:
        """When :meth:`poll` must run next, or None while no record is held."""
        since = self._oldest()
        return None if since is None else since + self._linger_s

    def poll(self, now: float) -> None:
        """Send what is held alone if its first record has waited the linger."""
        since = self._oldest()
        if since is not None and now - since >= self._linger_s:
            # Not busy enough to fill a group in the linger: blocks fill to k - 1 for
            # now (one filled to k would be cut in two at the next linger).
            self._grouping = False
            self.flush()

    def flush(self) -> None:
        """Close what is held now, alone (shutdown, heartbeats that must not wait)."""
        self._send_alone()

    def _oldest(self) -> float | None:
        """When the first record held came, or None while none is."""
        if self._full:
            return self._full_since
        return self._opened_at if self._parts else None

    def take(self) -> list[EncodedBlock]:
        """The blocks closed since the last call, oldest first."""
        closed, self._closed = self._closed, []
        return closed

    def _close_by_size(self, now: float) -> None:
        """The open block is full: it waits for its group, or goes alone.

        How long it took to fill says whether the next one is worth holding for a
        group: ``group`` blocks filled at that pace must fit in the linger, or the
        linger would send them alone anyway, cut at k - 1 with a small block left
        over. Not worth it, a block fills to k - 1 symbols only, and goes at once.
        A pause between two records longer than a group's share of the linger
        (the framer held by a full send queue, a source between two poll cycles)
        is not the pace: counted, it sent the blocks around every pause alone.
        """
        fec = self._fec
        k = -(-(self._full_overhead + self._size) // self._symbol)
        busy = (self._filling_s + min(now - self._last_add, self._pause_s)) * fec.group <= (
            self._linger_s
        )
        grouping, self._grouping = self._grouping, fec.grouped and busy
        if not (grouping and k == fec.k):
            # Alone: closed at k - 1, or short of k (the next record is large); what
            # waited for a group goes first, alone too.
            self._send_alone()
            return
        if not self._full:
            self._full_since = self._opened_at
        self._full.append(self._parts)
        self._parts, self._size = [], 0
        if len(self._full) == fec.group:
            self._frame_group()
        elif not self._grouping:
            self._send_alone()  # the pace dropped: the group would not fill in time

    def _frame_group(self) -> None:
        sealed = [self._seal(parts, self._signed_group) for parts in self._full]
        self._full = []
        blocks: list[EncodedBlock] = []
        for start in range(0, len(sealed), self._signed_group):
            blocks += self._sign(sealed[start : start + self._signed_group])
        self._closed.append(
            EncodedBlock(
                seq=blocks[0].seq,
                records=sum(b.records for b in blocks),
                # Round-robin: datagram i of every block, then i + 1. Every block of a
                # group has the same n, so the stride between two datagrams of one
                # block is exactly the group's size.
                datagrams=tuple(
                    d for row in zip(*(b.datagrams for b in blocks), strict=True) for d in row
                ),
                blocks=len(blocks),
            )
        )

    def _send_alone(self) -> None:
        """Cut everything held into blocks of at most ``k`` - 1 symbols, each sent alone."""
        held = [*(data for parts in self._full for data in parts), *self._parts]
        self._full, self._parts, self._size = [], [], 0
        for data in held:
            if self._size + len(data) > self.capacity:
                self._close()
            self._parts.append(data)
            self._size += len(data)
        if self._parts:
            self._close()

    def _close(self) -> None:
        self._closed += self._sign([self._seal(self._parts, 1)])
        self._parts, self._size = [], 0

    def _seal(self, parts: list[bytes], group: int) -> _Sealed:
        """The signed bytes of one block of records, to be signed in a group of ``group``;
        it takes the next sequence number."""
        count = len(parts)
        flags = FLAG_ENCRYPTED if self._psk else 0
        payload_length = sum(map(len, parts)) + (AEAD_TAG_SIZE if self._psk else 0)
        extra = manifest_size(self._generation, group)
        k = -(-(BLOCK_OVERHEAD + payload_length + extra) // self._symbol)
        header = BlockHeader(
            flags=flags,
            k=k,
            n=k + self._fec.repair_for(k),
            stream_id=self._stream_id,
            key_id=self._key.key_id,
            epoch=self._epoch,
            seq=self._seq,
            first_record=self._next_record,
            record_count=count,
            payload_length=payload_length,
            generation=self._generation,
        )
        packed = pack_block_header(header)
        if self._psk:
            parts = [
                aead.seal(
                    self._psk,
                    stream_id=self._stream_id,
                    epoch=self._epoch,
                    seq=self._seq,
                    plain=b"".join(parts),
                    aad=packed,
                )
            ]
        self._seq += 1
        self._next_record += count
        return _Sealed(header=header, signed=b"".join((packed, *parts)), records=count)

    def _sign(self, group: list[_Sealed]) -> list[EncodedBlock]:
        """Sign blocks and frame each: generation 3 signs the group once (each block then
        carries its manifest), older generations sign each block."""
        if self._generation < 3:
            return [
                self._framed(b, b"", self._key.sign(signed_message(self._generation, b.signed)))
                for b in group
            ]
        digests = [hashlib.sha256(b.signed).digest() for b in group]
        signature = self._key.sign(group_message(group[0].header, len(group), b"".join(digests)))
        return [self._framed(b, pack_manifest(i, digests), signature) for i, b in enumerate(group)]

    def _framed(self, sealed: _Sealed, manifest: bytes, signature: bytes) -> EncodedBlock:
        """A signed block, FEC-protected and framed into its n datagrams."""
        header = sealed.header
        k, n = header.k, header.n
        # Two copies of the block's bytes (the signed part, then with its manifest,
        # signature and the zero padding of the last symbol); the symbols are views of it.
        block_length = len(sealed.signed) + len(manifest) + len(signature)
        padding = k * self._symbol - block_length
        block = b"".join((sealed.signed, manifest, signature, bytes(padding)))
        symbols = fec.encode_block(block, k, n, self._symbol, code_of(self._generation))
        datagrams = tuple(
            pack_block_datagrams(
                DatagramHeader(
                    flags=header.flags,
                    stream_id=header.stream_id,
                    key_id=header.key_id,
                    epoch=header.epoch,
                    seq=header.seq,
                    index=0,
                    k=k,
                    n=n,
                    block_length=block_length,
                    records=sealed.records,
                    generation=datagram_generation(self._generation),
                ),
                symbols,
                self._gate,
            )
        )
        return EncodedBlock(seq=header.seq, records=sealed.records, datagrams=datagrams)


class SendQueue:
    """Framed units (blocks, groups) waiting for the pacer: bounded, interleaved, drops counted."""

    def __init__(
        self,
        *,
        capacity: int,
        interleave: int,
        limit: int | None = None,
        resume: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.limit = capacity if limit is None else min(limit, capacity)
        self.resume = self.limit if resume is None else min(resume, self.limit)
        self._interleave = interleave
        self._waiting: deque[EncodedBlock] = deque()
        self._active: deque[Iterator[bytes]] = deque()
        self._front: deque[bytes] = deque()
        self._queued = 0
        self.blocks_dropped = 0
        self.records_dropped = 0

    def __len__(self) -> int:
        """Datagrams queued."""
        return self._queued

    @property
    def full(self) -> bool:
        """At ``limit`` or past it: frame no more blocks until the pacer has sent some."""
        return self._queued >= self.limit

    @property
    def has_room(self) -> bool:
        """Under ``resume``: a framer held at ``limit`` may go on."""
        return self._queued < self.resume

    def push(self, block: EncodedBlock) -> int:
        """Queue a block or a group; returns how many blocks were dropped to make room (counted).

        When the queue is full, the oldest blocks not yet started go first: the
        newest values (and the heartbeat that reports the drops) are worth more
        than stale ones, and every queued block stays whole. The receiver sees
        each dropped block as a gap of exactly its records. A block that cannot
        fit even then is itself dropped.
        """
        need = len(block.datagrams)
        dropped = 0
        while self._queued + need > self.capacity and self._waiting:
            oldest = self._waiting.popleft()
            self._queued -= len(oldest.datagrams)
            self._count_drop(oldest)
            dropped += oldest.blocks
        if self._queued + need > self.capacity:
            self._count_drop(block)
            return dropped + block.blocks
        self._waiting.append(block)
        self._queued += need
        return dropped

    def _count_drop(self, block: EncodedBlock) -> None:
        self.blocks_dropped += block.blocks
        self.records_dropped += block.records

    def clear(self) -> int:
        """Forget everything queued (shutdown); returns how many datagrams that was."""
        dropped = self._queued
        self._waiting.clear()
        self._active.clear()
        self._front.clear()
        self._queued = 0
        return dropped

    def requeue(self, datagram: bytes) -> None:
        """Put back a datagram the socket could not take; it goes out next."""
        self._front.append(datagram)
        self._queued += 1

    def requeue_all(self, datagrams: list[bytes]) -> None:
        """Put back datagrams popped in this order; they go out next, in the same order."""
        self._front.extendleft(reversed(datagrams))
        self._queued += len(datagrams)

    def pop(self) -> bytes | None:
        """The next datagram to send, or None when the queue is empty."""
        if self._front:
            self._queued -= 1
            return self._front.popleft()
        while len(self._active) < self._interleave and self._waiting:
            self._active.append(iter(self._waiting.popleft().datagrams))
        while self._active:
            current = self._active.popleft()
            datagram = next(current, None)
            if datagram is None:
                if self._waiting:
                    self._active.append(iter(self._waiting.popleft().datagrams))
                continue
            self._active.append(current)
            self._queued -= 1
            return datagram
        return None
