"""The receiver's half of the protocol, sans I/O: datagrams in, authentic records out.

``Decoder.receive(datagram, now)`` never raises: every datagram either joins
a block being rebuilt or bumps exactly one ``rejected_<reason>`` counter.
The path of a datagram, one piece per job::

    Gate.judge            length, magic, stream, size | CRC (no secret); then
      StreamSequencer.screen  already delivered, or an epoch older than followed?
      and the link tag (a secret): one call per datagram
    Gate.admit            framing, link profile, key id
    AssemblyTable.add     k symbols yet? (memory bounded: passed blocks, then oldest, evicted;
                          passed blocks dropped at each poll too)
    StreamSequencer.turn  the next block: verify now; ahead in the window: WaitingRoom
                          until its turn (at most served_per_call handed on per call);
                          outside the window: VerifyBudget.take
    BlockAuthenticator    rebuild, signed header, Ed25519, decrypt, records
    StreamSequencer.accept  epochs, freshness, order, gaps -> events

Counters come in two families. *Intake* counters (``datagrams``,
``symbols``, ``assemblies_*``, ``rejected_*``) count what arrived, so a
forger moves them by definition; they are how an attack is seen. *Stream*
counters (``blocks_*``, ``records_*``) are moved by authentic blocks only:
no field of an unauthenticated datagram reaches them.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diode.errors import FrameError
from diode.keys import Keyring
from diode.protocol.assembly import AssemblyTable, assembly_key, block_id
from diode.protocol.authenticator import BlockAuthenticator
from diode.protocol.budget import VerifyBudget
from diode.protocol.events import Delivered, EpochStarted, Event, Gap
from diode.protocol.gate import Gate, LinkProfile
from diode.protocol.sequencer import SequencerSettings, StreamSequencer
from diode.protocol.waiting import Candidate, WaitingRoom
from diode.replay import StreamState
from diode.wire import INDEX_OFFSET, K_OFFSET

__all__ = [
    "Decoder",
    "DecoderSettings",
    "Delivered",
    "EpochStarted",
    "Event",
    "Gap",
    "LinkProfile",
]

# The block a datagram names: stream id at 4, epoch at 16, sequence at 24 (diode/wire.py).
_BLOCK = struct.Struct(">4xI8xQQ")

# Blocks this far behind a stream's position are "late"; further back, replays.
RECENT_BLOCKS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderSettings:
    reorder_timeout_s: float = 0.2
    assembly_timeout_s: float = 5.0
    max_assembly_bytes: int = 32 * 1024 * 1024
    max_held_blocks: int = 4096
    window_blocks: int = RECENT_BLOCKS
    verify_budget_per_s: float = 200.0
    remembered_failures: int = 32768
    max_start_age_s: float = 10.0
    clock_skew_s: float = 5.0
    # Blocks the waiting room hands on per receive_all or poll call, at most. When a lost
    # block is declared lost (or a late one comes), every block waiting behind it has its
    # turn at once: 350 at the 1000 Mb/s cap, their records and then their messages in
    # memory together (31 MB at the peak of an overrun receiver). The rest is served by
    # the next call; deadline() says it is due.
    served_per_call: int = 64


class Decoder:
    """Rebuilds, authenticates and orders the blocks of every stream in the keyring.

    ``profiles`` (stream id -> :class:`LinkProfile`) turns on the shape check.
    ``wall_offset_s``, when set by the shell, makes ``now + wall_offset_s`` the
    wall clock (Unix seconds) that freshness on a fresh start is judged by.
    """

    def __init__(
        self,
        keyring: Keyring,
        settings: DecoderSettings | None = None,
        state: dict[int, StreamState] | None = None,
        profiles: Mapping[int, LinkProfile] | None = None,
    ) -> None:
        self.settings = settings = settings or DecoderSettings()
        self.counters: Counter[str] = Counter()
        self._events: list[Event] = []
        self.wall_offset_s: float | None = None
        self._serve_left = settings.served_per_call  # what this call may still serve
        self._quiet_until: dict[int, float] = {}  # no overdue round before (per stream)
        self._stuck_at: dict[int, int] = {}  # next seq when an overdue round found nothing
        self._gate = Gate(keyring, profiles)
        # The memory bound covers both: 3/4 for assemblies, 1/4 for blocks waiting their turn.
        self._table = AssemblyTable(
            self.counters,
            max_bytes=settings.max_assembly_bytes * 3 // 4,
            timeout_s=settings.assembly_timeout_s,
            passed=self._passed,
        )
        self._room = WaitingRoom(self.counters, max_bytes=settings.max_assembly_bytes // 4)
        self._budget = VerifyBudget(settings.verify_budget_per_s)
        self._authenticator = BlockAuthenticator(
            self.counters, remember=settings.remembered_failures
        )
        self._sequencer = StreamSequencer(
            SequencerSettings(
                reorder_timeout_s=settings.reorder_timeout_s,
                max_held_blocks=settings.max_held_blocks,
                window_blocks=settings.window_blocks,
                max_start_age_s=settings.max_start_age_s,
                clock_skew_s=settings.clock_skew_s,
            ),
            self.counters,
            self._events,
            state,
        )

    # -- the public surface ---------------------------------------------------

    def receive(self, datagram: bytes, now: float) -> bool:
        """Take one datagram; False if it was rejected. Never raises: a bad one bumps
        one counter and is dropped (and what holds raw datagrams may let it go)."""
        return self.receive_all((datagram,), now)[0]

    def receive_all(self, datagrams: Sequence[bytes | memoryview], now: float) -> list[bool]:
        """:meth:`receive` for each datagram of a batch, in order: whether each was taken.

        One loop for the batch a read hands over: a flood's datagrams are rejected here
        by the cheap checks without a call or a lookup more than those checks need. The
        datagrams may be views of a reader's buffer, good only during this call: what
        passes the gate is copied before anything keeps it, what fails it never is.
        """
        counters = self.counters
        counters["datagrams"] += len(datagrams)
        self._serve_left = self.settings.served_per_call
        judge, sequencer = self._gate.judge, self._sequencer
        position, block = sequencer.screen, _BLOCK.unpack_from
        taken: list[bool] = []
        took = taken.append
        for datagram in datagrams:
            # The cheap checks first, in one call, without exceptions: what a flood pays.
            reason = judge(datagram, position)
            if reason is None:
                stream_id, epoch, seq = block(datagram)
                if sequencer.turn(stream_id, epoch, seq) == "budget" and not self._budget.available(
                    now
                ):
                    reason = "rejected_verify_budget"  # outside the window, no verify left
            if reason is not None:
                counters[reason] += 1
                took(False)
                continue
            try:
                took(self._receive(datagram, now))
            except FrameError as exc:
                counters["rejected_" + exc.reason] += 1
                took(False)
        return taken

    def _receive(self, datagram: bytes | memoryview, now: float) -> bool:
        key = assembly_key(datagram)
        k = datagram[K_OFFSET]
        if 0 < self._table.held(key) < k - 1:
            # Neither the block's first symbol nor its last: the key holds every header
            # field the gate admitted with the first, so the index and CRC are left.
            symbol = self._gate.admit_symbol(datagram)
            self._table.add(key, datagram[INDEX_OFFSET], k, symbol, now)
            self.counters["symbols"] += 1
            return True
        # The first symbol is admitted in full, and so is the last: its header and its
        # trusted key (looked up anew) go with the block to its verify.
        header, symbol, trusted = self._gate.admit(datagram)
        assembly = self._table.add(key, header.index, header.k, symbol, now)
        self.counters["symbols"] += 1
        if assembly is None:
            return True
        stream_id = header.stream_id
        candidate = Candidate(
            key=key,
            header=header,
            symbols=assembly.symbols,
            trusted=trusted,
            at=now,
            cost=assembly.cost,
        )
        turn = self._sequencer.turn(stream_id, header.epoch, header.seq)
        if turn == "wait" and not (self._stuck(stream_id) and self._budget.take(now)):
            self._room.put(stream_id, header.epoch, candidate)
            return True
        if turn == "budget" and not self._budget.take(now):
            raise FrameError("out of the window and over budget", reason="verify_budget")
        try:
            self._verify(candidate, now)
        finally:
            self._serve(stream_id, now)
        return True

    def _verify(self, candidate: Candidate, now: float, arrived: float | None = None) -> None:
        header = candidate.header
        block = self._authenticator.open(
            candidate.key, header, candidate.symbols, candidate.trusted
        )
        wall = None if self.wall_offset_s is None else now + self.wall_offset_s
        self._sequencer.accept(
            header.stream_id, block, now, wall_s=wall, tail=self._table.take_epoch, arrived=arrived
        )
        # The symbols that came after the k-th while the block waited its turn gathered in
        # an assembly of their own, which would otherwise sit out its timeout: under load
        # (many blocks waiting) such leftovers filled the table, and a full table evicts
        # every new block's first symbol (docs/BENCHMARKS.md, "The assembly table").
        self._table.discard(candidate.key)

    def _serve(self, stream_id: int, now: float) -> None:
        """Verify the blocks whose turn came, newest candidate first, until one is authentic."""
        room = self._room
        while self._serve_left > 0:
            following = self._sequencer.next_block(stream_id)
            if following is None:
                return
            epoch, next_seq = following
            room.discard_below(stream_id, next_seq)
            candidates = room.take(stream_id, next_seq)
            if not candidates:
                return
            self._serve_left -= 1
            self._first_authentic(candidates, epoch, now)

    def _first_authentic(self, candidates: list[Candidate], epoch: int, now: float) -> bool:
        for i, candidate in enumerate(candidates):
            if candidate.header.epoch != epoch:
                self.counters["rejected_late"] += 1
                continue
            try:
                self._verify(candidate, now, arrived=candidate.at)
            except FrameError as exc:
                self.counters["rejected_" + exc.reason] += 1
                continue
            self.counters["rejected_late"] += len(candidates) - i - 1
            return True
        return False

    def poll(self, now: float) -> None:
        """Run the timers: expire stale assemblies, declare overdue blocks lost, and hand
        on the waiting blocks whose turn came (at most ``served_per_call``)."""
        self._serve_left = self.settings.served_per_call
        self._table.expire(now)
        self._sequencer.advance_all(now)
        for stream_id in self._room.streams():
            self._serve(stream_id, now)
            self._overdue(stream_id, now)
        # What a reorder timeout just declared lost can never complete: its assemblies go
        # now, not at their timeout (an overrun receiver made hundreds of them a second).
        self._table.drop_passed()

    def _overdue(self, stream_id: int, now: float) -> None:
        """The next block is overdue: try the lowest waiting one, so that a lost block is
        declared as it would be without the waiting room. Goes on while that finds
        authentic blocks; a sequence number with only forgeries ends this round, and
        the next round waits a reorder timeout (a forged spray keeps the lowest waiting
        seq always "overdue": this caps what it costs at 2 verifies per timeout)."""
        if now < self._quiet_until.get(stream_id, 0.0):
            return
        while self._serve_left > 0:
            lowest = self._room.lowest(stream_id)
            following = self._sequencer.next_block(stream_id)
            if lowest is None or following is None:
                return
            if now - lowest[1] < self.settings.reorder_timeout_s:
                return
            self._serve_left -= 1
            found = self._first_authentic(self._room.take(stream_id, lowest[0]), following[0], now)
            self._sequencer.advance_all(now)
            self._serve(stream_id, now)
            if not found:
                self._quiet_until[stream_id] = now + self.settings.reorder_timeout_s
                self._stuck_at[stream_id] = following[1]
                return

    def _passed(self, key: bytes) -> bool:
        """Has the stream's position passed the block an assembly names (delivered, rebuilt
        and held for order, or declared lost)? Moved by authentic blocks only: a forger
        cannot make a live assembly look passed."""
        claimed = block_id(key)
        return self._sequencer.screen(claimed.stream_id, claimed.epoch, claimed.seq) is not None

    def _stuck(self, stream_id: int) -> bool:
        """Is the stream's next block overdue with only forgeries waiting in its place?

        Then the real blocks after it may have been pushed out of the waiting room
        (a spray of forged candidates, 2 per seq), and waiting for their turn could
        wait forever. Until the position moves, complete blocks ahead are verified as
        they come, within the verify budget: the first authentic one lets the
        sequencer declare the gap and the stream flows again.
        """
        stuck_at = self._stuck_at.get(stream_id)
        if stuck_at is None:
            return False
        following = self._sequencer.next_block(stream_id)
        if following is None or following[1] != stuck_at:
            del self._stuck_at[stream_id]
            return False
        return True

    def deadline(self) -> float | None:
        """When :meth:`poll` must run next, or None if nothing is waiting."""
        times = [t for t in (self._sequencer.deadline(), self._table.deadline()) if t is not None]
        for stream_id in self._room.streams():
            lowest = self._room.lowest(stream_id)
            if lowest is None:
                continue
            following = self._sequencer.next_block(stream_id)
            if following is not None and lowest[0] == following[1]:
                times.append(lowest[1])  # its turn came, past what the last call could serve
                continue
            due = lowest[1] + self.settings.reorder_timeout_s
            times.append(max(due, self._quiet_until.get(stream_id, 0.0)))
        return min(times, default=None)

    def events(self) -> list[Event]:
        """The events since the last call, in order."""
        events = self._events[:]
        self._events.clear()  # the sequencer keeps appending to this same list
        return events

    @property
    def state_changed(self) -> bool:
        """Whether positions moved since :meth:`positions` was last called."""
        return self._sequencer.state_changed

    def positions(self) -> dict[int, StreamState]:
        """Each stream's position, to persist before delivered records are handed on."""
        return self._sequencer.positions()

    @property
    def assembly_bytes(self) -> int:
        """What blocks being rebuilt or waiting their turn cost, as counted against the bound."""
        return self._table.bytes + self._room.bytes
