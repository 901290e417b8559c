"""The transmitter's half of the protocol, sans I/O: records in, datagrams out.

``Encoder`` batches records into blocks. A block closes when the next record
would not fit in ``k`` symbols (a flood fills whole blocks) or when its first
record has waited ``linger_ms`` (a trickle still leaves within milliseconds);
the shell calls :meth:`Encoder.poll` at :meth:`Encoder.deadline`. A closed
block is signed once, split into k' source symbols, given FEC repair and
framed into n' equal datagrams (each ending with a link tag when the stream
has a link secret).

``SendQueue`` holds framed blocks for the paced sender and hands datagrams
out round-robin across up to ``interleave`` blocks, so a burst of lost
datagrams is spread over several blocks whenever the link is busy enough to
queue them. It never waits to interleave: an idle link sends a lone block at
once, and the per-block burst repair covers it. It has two bounds: at
``limit`` it is :attr:`SendQueue.full` and the shell frames no more (the
records wait unframed, where a bound in bytes drops the newest) until it
holds fewer than ``resume`` (:attr:`SendQueue.has_room`); past ``capacity``
it drops the oldest blocks not yet started, counted.
"""

from __future__ import annotations

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
    BlockHeader,
    DatagramHeader,
    code_of,
    gate_key,
    pack_block_datagrams,
    pack_block_header,
    signed_message,
    symbol_size,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedBlock:
    """One signed block, framed into its n datagrams."""

    seq: int
    records: int
    datagrams: tuple[bytes, ...]


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
        self._link = link
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
        self.capacity = link.fec.k * self._symbol - BLOCK_OVERHEAD - (AEAD_TAG_SIZE if psk else 0)
        self._parts: list[bytes] = []
        self._size = 0
        self._opened_at = 0.0
        self._seq = 0
        self._next_record = 0
        self._closed: list[EncodedBlock] = []

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def pending_records(self) -> int:
        return len(self._parts)

    @property
    def room(self) -> int:
        """Bytes of records the open block can still take (``capacity`` when none is open)."""
        return self.capacity - self._size

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
        if self._size + len(data) > self.capacity:
            self._close()
        if not self._parts:
            self._opened_at = now
        self._parts.append(data)
        self._size += len(data)

    def deadline(self) -> float | None:
        """When :meth:`poll` must run next, or None while no block is open."""
        return self._opened_at + self._linger_s if self._parts else None

    def poll(self, now: float) -> None:
        """Close the open block if its first record has waited the linger."""
        if self._parts and now - self._opened_at >= self._linger_s:
            self._close()

    def flush(self) -> None:
        """Close the open block now (shutdown, heartbeats that must not wait)."""
        if self._parts:
            self._close()

    def take(self) -> list[EncodedBlock]:
        """The blocks closed since the last call, oldest first."""
        closed, self._closed = self._closed, []
        return closed

    def _close(self) -> None:
        parts = self._parts
        count = len(parts)
        self._parts = []
        flags = FLAG_ENCRYPTED if self._psk else 0
        payload_length = self._size + (AEAD_TAG_SIZE if self._psk else 0)
        self._size = 0
        block_length = BLOCK_OVERHEAD + payload_length
        k = -(-block_length // self._symbol)
        n = k + self._link.fec.repair_for(k)
        header = pack_block_header(
            BlockHeader(
                flags=flags,
                k=k,
                n=n,
                stream_id=self._stream_id,
                key_id=self._key.key_id,
                epoch=self._epoch,
                seq=self._seq,
                first_record=self._next_record,
                record_count=count,
                payload_length=payload_length,
                generation=self._generation,
            )
        )
        if self._psk:
            parts = [
                aead.seal(
                    self._psk,
                    stream_id=self._stream_id,
                    epoch=self._epoch,
                    seq=self._seq,
                    plain=b"".join(parts),
                    aad=header,
                )
            ]
        # Two copies of the block's bytes (the signed part, then with its signature
        # and the zero padding of the last symbol); the symbols are views of it.
        signed = b"".join((header, *parts))
        signature = self._key.sign(signed_message(self._generation, signed))
        padding = k * self._symbol - len(signed) - len(signature)
        block = b"".join((signed, signature, bytes(padding)))
        symbols = fec.encode_block(block, k, n, self._symbol, code_of(self._generation))
        datagrams = tuple(
            pack_block_datagrams(
                DatagramHeader(
                    flags=flags,
                    stream_id=self._stream_id,
                    key_id=self._key.key_id,
                    epoch=self._epoch,
                    seq=self._seq,
                    index=0,
                    k=k,
                    n=n,
                    block_length=block_length,
                    records=count,
                    generation=self._generation,
                ),
                symbols,
                self._gate,
            )
        )
        self._closed.append(EncodedBlock(seq=self._seq, records=count, datagrams=datagrams))
        self._seq += 1
        self._next_record += count


class SendQueue:
    """Framed blocks waiting for the pacer: bounded, interleaved, drops counted."""

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
        """Queue a block; returns how many blocks were dropped to make room (counted).

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
            dropped += 1
        if self._queued + need > self.capacity:
            self._count_drop(block)
            return dropped + 1
        self._waiting.append(block)
        self._queued += need
        return dropped

    def _count_drop(self, block: EncodedBlock) -> None:
        self.blocks_dropped += 1
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
