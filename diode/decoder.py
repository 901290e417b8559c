"""The receiver's half of the protocol, sans I/O: datagrams in, authentic records out.

``Decoder.receive(datagram, now)`` never raises: every datagram either joins
a block being rebuilt or bumps exactly one rejection counter. The path of a
datagram::

    parse + CRC --> key id known? --> stream position (replay, late)
        --> assembly (stream, key, epoch, seq, shape) --> k symbols?
        --> Reed-Solomon rebuild --> signed header matches? --> Ed25519 verify
        --> position again (now authenticated) --> decrypt --> records
        --> held until every earlier block is delivered or declared lost

No byte of a record leaves before the signature covering it verified. One
verification per block keeps the cost near 180 us / k per datagram.
Blocks are handed out in sequence order; a block that cannot be rebuilt is
declared lost once a later authentic block has waited ``reorder_timeout_s``,
and the gap is reported as (epoch, first block, last block, records lost),
the count taken from the authenticated record numbers on both sides of it.

Memory is bounded: blocks being rebuilt cost at most ``max_assembly_bytes``.
Assemblies with a single symbol (what a flood of forged datagrams creates)
sit on probation and are evicted first, so a flood costs the real stream
little; every eviction is counted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from diode import aead, fec
from diode.errors import FrameError
from diode.keys import Keyring
from diode.records import Record, decode_records
from diode.replay import StreamState
from diode.wire import (
    BLOCK_HEADER_SIZE,
    FLAG_ENCRYPTED,
    BlockHeader,
    DatagramHeader,
    matches,
    parse_block,
    parse_datagram,
)

# Blocks this far behind a stream's position are "late" (surplus repair symbols,
# duplicates); further back they are counted as replays.
RECENT_BLOCKS = 4096

AssemblyKey = tuple[int, bytes, int, int, int, int, int, int, int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderSettings:
    reorder_timeout_s: float = 0.2
    assembly_timeout_s: float = 5.0
    max_assembly_bytes: int = 32 * 1024 * 1024
    max_held_blocks: int = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """An authentic block's records, in sequence order within its stream."""

    stream_id: int
    epoch: int
    seq: int
    first_record: int
    records: list[Record]
    rebuilt: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Gap:
    """Blocks that could not be rebuilt, and how many records they held.

    ``exact`` is False only when the count could not be taken from signed
    record numbers (the tail of an epoch that ended): then it is the sum of
    the unauthenticated hints in the datagrams that did arrive.
    """

    stream_id: int
    epoch: int
    first_seq: int
    last_seq: int
    records_lost: int
    exact: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochStarted:
    """A stream's transmitter restarted (or was first seen)."""

    stream_id: int
    epoch: int
    previous: int | None


Event = Delivered | Gap | EpochStarted


@dataclass(slots=True)
class _Assembly:
    header: DatagramHeader
    created: float
    symbols: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


@dataclass(slots=True, kw_only=True)
class _Held:
    header: BlockHeader
    records: list[Record]
    rebuilt: bool
    at: float


@dataclass(slots=True)
class _Stream:
    position: StreamState | None
    epoch: int | None = None  # the epoch being followed (also before position is known)
    held: dict[int, _Held] = field(default_factory=dict)
    # After an epoch change the receiver was following the stream: a new epoch
    # starts at block 0, record 0, so anything before the first block held is a gap.
    from_zero: bool = False


class Decoder:
    """Rebuilds, authenticates and orders the blocks of every stream in the keyring."""

    def __init__(
        self,
        keyring: Keyring,
        settings: DecoderSettings | None = None,
        state: dict[int, StreamState] | None = None,
    ) -> None:
        self._keyring = keyring
        self.settings = settings or DecoderSettings()
        self._streams: dict[int, _Stream] = {
            stream: _Stream(position, position.epoch) for stream, position in (state or {}).items()
        }
        # Two FIFOs of assemblies: probation (one symbol so far) and established.
        self._probation: OrderedDict[AssemblyKey, _Assembly] = OrderedDict()
        self._established: OrderedDict[AssemblyKey, _Assembly] = OrderedDict()
        self._assembly_bytes = 0
        self._events: list[Event] = []
        self.counters: Counter[str] = Counter()
        self.state_changed = False

    # -- the public surface ---------------------------------------------------

    def receive(self, datagram: bytes, now: float) -> None:
        """Take one datagram. Never raises: a bad one bumps one counter and is dropped."""
        self.counters["datagrams"] += 1
        try:
            self._receive(datagram, now)
        except FrameError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1

    def poll(self, now: float) -> None:
        """Run the timers: expire stale assemblies, declare overdue blocks lost."""
        self._expire(now)
        for stream_id, stream in self._streams.items():
            self._advance(stream_id, stream, now)

    def deadline(self) -> float | None:
        """When :meth:`poll` must run next, or None if nothing is waiting."""
        times = [
            min(h.at for h in s.held.values()) + self.settings.reorder_timeout_s
            for s in self._streams.values()
            if s.held
        ]
        for fifo in (self._probation, self._established):
            if fifo:
                times.append(next(iter(fifo.values())).created + self.settings.assembly_timeout_s)
        return min(times, default=None)

    def events(self) -> list[Event]:
        """The events since the last call, in order."""
        events, self._events = self._events, []
        return events

    def positions(self) -> dict[int, StreamState]:
        """Each stream's position, to persist before delivered records are handed on."""
        self.state_changed = False
        return {
            stream_id: StreamState(
                epoch=s.position.epoch,
                next_seq=s.position.next_seq,
                next_record=s.position.next_record,
            )
            for stream_id, s in self._streams.items()
            if s.position is not None
        }

    @property
    def assembly_bytes(self) -> int:
        return self._assembly_bytes

    # -- receiving --------------------------------------------------------------

    def _receive(self, datagram: bytes, now: float) -> None:
        header, symbol = parse_datagram(datagram)
        trusted = self._keyring.get(header.key_id)
        if trusted is None:
            raise FrameError("unknown key id", reason="unknown_key")
        if trusted.stream_id != header.stream_id:
            raise FrameError("key id of another stream", reason="wrong_stream")
        stream = self._streams.get(header.stream_id)
        if stream is not None:
            self._check_position(stream, header.epoch, header.seq)
        key: AssemblyKey = (
            header.stream_id,
            header.key_id,
            header.epoch,
            header.seq,
            header.flags,
            header.k,
            header.n,
            header.block_length,
            header.records,
            len(symbol),
        )
        assembly = self._assembly(key, header, now)
        if header.index in assembly.symbols:
            raise FrameError("symbol already received", reason="duplicate")
        assembly.symbols[header.index] = symbol
        assembly.size += len(symbol)
        self._assembly_bytes += len(symbol)
        self.counters["symbols"] += 1
        if len(assembly.symbols) < header.k:
            self._evict()
            return
        self._drop_assembly(key)
        self._complete(assembly, now)

    def _check_position(self, stream: _Stream, epoch: int, seq: int) -> None:
        """Reject what the stream's position already rules out, authenticated or not."""
        if stream.epoch is not None and epoch < stream.epoch:
            raise FrameError("epoch older than the one followed", reason="replay")
        if epoch != stream.epoch:
            return
        if seq in stream.held:
            raise FrameError("block already rebuilt", reason="late")
        position = stream.position
        if position is not None and seq < position.next_seq:
            if position.next_seq - seq <= RECENT_BLOCKS:
                raise FrameError("block already delivered or given up", reason="late")
            raise FrameError("block far older than the stream's position", reason="replay")

    def _assembly(self, key: AssemblyKey, header: DatagramHeader, now: float) -> _Assembly:
        assembly = self._established.get(key)
        if assembly is not None:
            return assembly
        assembly = self._probation.pop(key, None)
        if assembly is not None:
            self._established[key] = assembly  # a second symbol: promoted
            return assembly
        assembly = _Assembly(header, now)
        self._probation[key] = assembly
        return assembly

    def _drop_assembly(self, key: AssemblyKey) -> None:
        assembly = self._established.pop(key, None) or self._probation.pop(key, None)
        if assembly is not None:
            self._assembly_bytes -= assembly.size

    def _evict(self) -> None:
        while self._assembly_bytes > self.settings.max_assembly_bytes:
            fifo = self._probation or self._established
            _, victim = fifo.popitem(last=False)
            self._assembly_bytes -= victim.size
            self.counters["assemblies_evicted"] += 1

    def _expire(self, now: float) -> None:
        limit = now - self.settings.assembly_timeout_s
        for fifo in (self._probation, self._established):
            while fifo and next(iter(fifo.values())).created <= limit:
                _, old = fifo.popitem(last=False)
                self._assembly_bytes -= old.size
                self.counters["assemblies_expired"] += 1

    # -- a block is complete -----------------------------------------------------

    def _complete(self, assembly: _Assembly, now: float) -> None:
        header = assembly.header
        padded = fec.decode(assembly.symbols, header.k, header.n)
        rebuilt = any(i >= header.k for i in assembly.symbols)
        block_header, signed, payload, signature = parse_block(padded[: header.block_length])
        if not matches(block_header, header):
            raise FrameError("signed header differs from the datagrams", reason="bad_block")
        trusted = self._keyring.get(header.key_id)
        if trusted is None or not trusted.verify(signature, signed):
            raise FrameError("signature does not verify", reason="bad_signature")
        # From here on the block is authentic.
        stream = self._streams.setdefault(header.stream_id, _Stream(None))
        previous = stream.epoch
        if previous is not None and header.epoch > previous:
            self._end_epoch(header.stream_id, stream, now)
        if stream.epoch is None:
            stream.epoch = header.epoch
            self._events.append(
                EpochStarted(stream_id=header.stream_id, epoch=header.epoch, previous=previous)
            )
        self._check_position(stream, header.epoch, header.seq)
        body = bytes(payload)
        if trusted.psk is not None:
            if not block_header.flags & FLAG_ENCRYPTED:
                raise FrameError("plaintext block on an encrypted stream", reason="not_encrypted")
            body = aead.open_(
                trusted.psk,
                stream_id=header.stream_id,
                epoch=header.epoch,
                seq=header.seq,
                sealed=body,
                aad=bytes(signed[:BLOCK_HEADER_SIZE]),
            )
        elif block_header.flags & FLAG_ENCRYPTED:
            raise FrameError("encrypted block and no link secret", reason="no_secret")
        records = decode_records(body, block_header.record_count)
        self.counters["blocks_rebuilt" if rebuilt else "blocks_whole"] += 1
        stream.held[header.seq] = _Held(
            header=block_header, records=records, rebuilt=rebuilt, at=now
        )
        if stream.position is None and header.seq == 0:
            # A transmitter's first block: nothing can come before it.
            stream.position = StreamState(epoch=header.epoch, next_seq=0, next_record=0)
            stream.from_zero = False
        self._advance(header.stream_id, stream, now)

    def _end_epoch(self, stream_id: int, stream: _Stream, now: float) -> None:
        """A newer epoch is authentic: finish the old one and follow the new one."""
        old = stream.epoch
        position = stream.position
        if position is not None:
            # Deliver what is held, declaring every hole lost, then count the tail
            # the old transmitter did not live to complete.
            self._advance(stream_id, stream, now, force=True)
            tail = [
                a
                for fifo in (self._probation, self._established)
                for k, a in list(fifo.items())
                if k[0] == stream_id and k[2] == old and a.header.seq >= position.next_seq
            ]
            if tail:
                seqs = {a.header.seq: a.header.records for a in tail}
                self._events.append(
                    Gap(
                        stream_id=stream_id,
                        epoch=position.epoch,
                        first_seq=position.next_seq,
                        last_seq=max(seqs),
                        records_lost=sum(seqs.values()),
                        exact=False,
                    )
                )
                self.counters["blocks_lost"] += max(seqs) - position.next_seq + 1
                self.counters["records_lost"] += sum(seqs.values())
        for fifo in (self._probation, self._established):
            for key in [k for k in fifo if k[0] == stream_id and k[2] == old]:
                self._drop_assembly(key)
        stream.held.clear()
        stream.position = None
        stream.epoch = None
        stream.from_zero = True

    def _advance(self, stream_id: int, stream: _Stream, now: float, force: bool = False) -> None:
        """Deliver held blocks in order; declare holes lost when a later block waited enough."""
        held = stream.held
        if not held:
            return
        if stream.position is None:
            # No position yet: wait for stragglers, then start at the lowest block held.
            # A first start reports nothing before it (those records were never owed to
            # this receiver); after an epoch change, the records before it were lost.
            first = min(held)
            if not force and now - held[first].at < self.settings.reorder_timeout_s:
                return
            epoch = held[first].header.epoch
            if stream.from_zero:
                stream.position = StreamState(epoch=epoch, next_seq=0, next_record=0)
            else:
                stream.position = StreamState(
                    epoch=epoch, next_seq=first, next_record=held[first].header.first_record
                )
            stream.from_zero = False
        position = stream.position
        while held:
            block = held.pop(position.next_seq, None)
            if block is not None:
                self._deliver(stream_id, position, block)
                continue
            lowest = min(held)
            waited = now - held[lowest].at >= self.settings.reorder_timeout_s
            if not (force or waited or len(held) > self.settings.max_held_blocks):
                break
            lost = held[lowest].header.first_record - position.next_record
            self._events.append(
                Gap(
                    stream_id=stream_id,
                    epoch=position.epoch,
                    first_seq=position.next_seq,
                    last_seq=lowest - 1,
                    records_lost=max(lost, 0),
                )
            )
            self.counters["blocks_lost"] += lowest - position.next_seq
            self.counters["records_lost"] += max(lost, 0)
            position.next_seq = lowest
            position.next_record = held[lowest].header.first_record
            self.state_changed = True

    def _deliver(self, stream_id: int, position: StreamState, block: _Held) -> None:
        header = block.header
        if header.first_record > position.next_record:
            lost = header.first_record - position.next_record
            self._events.append(
                Gap(
                    stream_id=stream_id,
                    epoch=position.epoch,
                    first_seq=header.seq,
                    last_seq=header.seq - 1,
                    records_lost=lost,
                )
            )
            self.counters["records_lost"] += lost
        self._events.append(
            Delivered(
                stream_id=stream_id,
                epoch=header.epoch,
                seq=header.seq,
                first_record=header.first_record,
                records=block.records,
                rebuilt=block.rebuilt,
            )
        )
        self.counters["blocks_delivered"] += 1
        self.counters["records_delivered"] += header.record_count
        position.next_seq = header.seq + 1
        position.next_record = header.first_record + header.record_count
        self.state_changed = True
