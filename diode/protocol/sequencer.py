"""The stream sequencer: each stream's epoch, position, freshness, order and gaps.

Only authentic blocks change its state; the checks it makes on unauthenticated
headers (``check``, ``in_window``) only read it. Per stream it follows one
epoch, holds authentic blocks until every earlier one is delivered or
declared lost, and reports gaps as (epoch, first block, last block, records
lost), the count taken from the signed record numbers on both sides.

**Epochs.** A newer authentic epoch means the transmitter restarted: what is
held of the old one is delivered, its holes declared lost, and its tail (the
blocks after the last one delivered, which no later block of that epoch will
ever count) is reported as an *estimate* (``Gap.exact`` False): at most
``window`` blocks, each at most as full as the fullest authentic block seen
in that epoch. Estimates never reach the exact ``records_lost`` counter.

**Freshness on a fresh start.** With no saved position, a receiver cannot
tell a live stream from an old capture by sequence numbers. An epoch is the
transmitter's wall-clock start time (ms), so when the shell gives the wall
clock, a block is taken on a fresh start only if its epoch is at most
``max_start_age_s + clock_skew_s`` old, or it carries a heartbeat whose
timestamp is (a long-running transmitter: one heartbeat a second proves it
is live). Older blocks are dropped and counted (``rejected_stale``) until
such a proof; the position then starts at the proving block, so nothing
older of that epoch can follow it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from diode.errors import FrameError
from diode.protocol.assembly import BlockId
from diode.protocol.authenticator import AuthenticBlock
from diode.protocol.events import Delivered, EpochStarted, Event, Gap
from diode.records import Heartbeat
from diode.replay import StreamState


@dataclass(frozen=True, slots=True, kw_only=True)
class SequencerSettings:
    reorder_timeout_s: float = 0.2
    max_held_blocks: int = 4096
    # Blocks this far behind a stream's position are "late" (surplus repair symbols,
    # duplicates); further back they are counted as replays. Also the width of the
    # window ahead of the position that is verified without a budget.
    window_blocks: int = 4096
    max_start_age_s: float = 10.0
    clock_skew_s: float = 5.0


@dataclass(slots=True, kw_only=True)
class _Held:
    block: AuthenticBlock
    at: float


@dataclass(slots=True)
class _Stream:
    position: StreamState | None
    epoch: int | None = None  # the epoch being followed (also before position is known)
    held: dict[int, _Held] = field(default_factory=dict)
    # After an epoch change the receiver was following the stream: a new epoch
    # starts at block 0, record 0, so anything before the first block held is a gap.
    from_zero: bool = False
    # The largest record count of an authentic block in the followed epoch.
    fullest: int = 0


TailOf = Callable[[int, int], list[BlockId]]


class StreamSequencer:
    def __init__(
        self,
        settings: SequencerSettings,
        counters: Counter[str],
        events: list[Event],
        state: dict[int, StreamState] | None = None,
    ) -> None:
        self.settings = settings
        self._counters = counters
        self._events = events
        self._streams: dict[int, _Stream] = {
            stream: _Stream(position, position.epoch) for stream, position in (state or {}).items()
        }
        self.state_changed = False

    # -- checks on unauthenticated headers (read only) -----------------------------------

    def screen(self, stream_id: int, epoch: int, seq: int) -> str | None:  # noqa: PLR0911 - one exit per rule
        """What the stream's position already rules out (the counter to bump), or None."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        followed = stream.epoch
        if followed is not None and epoch < followed:
            return "rejected_replay"  # an epoch older than the one followed
        if epoch != followed:
            return None
        if seq in stream.held:
            return "rejected_late"  # rebuilt already
        position = stream.position
        if position is not None and seq < position.next_seq:
            if position.next_seq - seq <= self.settings.window_blocks:
                return "rejected_late"  # delivered or given up already
            return "rejected_replay"  # far older than the stream's position
        return None

    def check(self, stream_id: int, epoch: int, seq: int) -> None:
        """:meth:`screen` as a FrameError."""
        reason = self.screen(stream_id, epoch, seq)
        if reason is not None:
            raise FrameError("ruled out by the stream's position", reason=reason[9:])

    def turn(self, stream_id: int, epoch: int, seq: int) -> str:
        """When a complete block may be verified (only authentic blocks move the window).

        ``"now"``: it is the next block the stream needs (or the stream waits
        for its first position). ``"wait"``: in the window, ahead of its turn.
        ``"budget"``: outside the window (another epoch, a stream not followed
        yet, far ahead): only within the verify budget.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.epoch is None or epoch != stream.epoch:
            return "budget"
        position = stream.position
        if position is None or seq == position.next_seq:
            return "now"
        if seq < position.next_seq + self.settings.window_blocks:
            return "wait"
        return "budget"

    def next_block(self, stream_id: int) -> tuple[int, int] | None:
        """(epoch, next sequence number) of a stream with a position."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.position is None:
            return None
        return stream.position.epoch, stream.position.next_seq

    # -- authentic blocks ----------------------------------------------------------------------

    def accept(
        self,
        stream_id: int,
        block: AuthenticBlock,
        now: float,
        *,
        wall_s: float | None,
        tail: TailOf,
        arrived: float | None = None,
    ) -> None:
        """Take an authentic block (``arrived``: when it was complete, if it waited)."""
        header = block.header
        stream = self._streams.setdefault(stream_id, _Stream(None))
        self.check(stream_id, header.epoch, header.seq)
        proved = False
        if (
            wall_s is not None
            and stream.position is None
            and not stream.from_zero
            and header.epoch != stream.epoch
        ):
            # A fresh receiver meets this epoch: live, or an old capture?
            proved = self._judge_fresh(block, wall_s)
        previous = stream.epoch
        if previous is not None and header.epoch > previous:
            self._end_epoch(stream_id, stream, now, tail(stream_id, previous))
        if stream.epoch is None:
            stream.epoch = header.epoch
            stream.fullest = 0
            self._events.append(
                EpochStarted(stream_id=stream_id, epoch=header.epoch, previous=previous)
            )
        stream.fullest = max(stream.fullest, header.record_count)
        self._counters["blocks_rebuilt" if block.rebuilt else "blocks_whole"] += 1
        stream.held[header.seq] = _Held(block=block, at=now if arrived is None else arrived)
        if stream.position is None and (header.seq == 0 or proved):
            # A transmitter's first block, or the block that proved an old epoch live:
            # nothing before it will be taken.
            stream.position = StreamState(
                epoch=header.epoch, next_seq=header.seq, next_record=header.first_record
            )
            stream.from_zero = False
        self._advance(stream_id, stream, now)

    def _age_limit(self) -> float:
        return self.settings.max_start_age_s + self.settings.clock_skew_s

    def _judge_fresh(self, block: AuthenticBlock, wall_s: float) -> bool:
        """True if a heartbeat proved an old epoch live; raises if nothing shows it fresh."""
        oldest = wall_s - self._age_limit()
        if block.header.epoch / 1000 >= oldest:
            return False  # a young epoch: any capture of it is young too
        if any(isinstance(r, Heartbeat) and r.ts_ns / 1e9 >= oldest for r in block.records):
            return True
        raise FrameError("an old epoch and no fresh heartbeat", reason="stale")

    def _end_epoch(self, stream_id: int, stream: _Stream, now: float, tail: list[BlockId]) -> None:
        """A newer epoch is authentic: finish the old one and follow the new one."""
        position = stream.position
        if position is not None:
            # Deliver what is held, declaring every hole lost, then estimate the tail
            # the old transmitter did not live to complete.
            self._advance(stream_id, stream, now, force=True)
            window = range(position.next_seq, position.next_seq + self.settings.window_blocks)
            claimed = {b.seq: min(b.records, stream.fullest) for b in tail if b.seq in window}
            if claimed:
                estimate = sum(claimed.values())
                self._events.append(
                    Gap(
                        stream_id=stream_id,
                        epoch=position.epoch,
                        first_seq=position.next_seq,
                        last_seq=max(claimed),
                        records_lost=estimate,
                        exact=False,
                    )
                )
                self._counters["blocks_lost_estimated"] += max(claimed) - position.next_seq + 1
                self._counters["records_lost_estimated"] += estimate
        stream.held.clear()
        stream.position = None
        stream.epoch = None
        stream.from_zero = True

    # -- order and gaps ------------------------------------------------------------------------

    def advance_all(self, now: float) -> None:
        for stream_id, stream in self._streams.items():
            self._advance(stream_id, stream, now)

    def deadline(self) -> float | None:
        times = [
            min(h.at for h in s.held.values()) + self.settings.reorder_timeout_s
            for s in self._streams.values()
            if s.held
        ]
        return min(times, default=None)

    def positions(self) -> dict[int, StreamState]:
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
            header = held[first].block.header
            if stream.from_zero:
                stream.position = StreamState(epoch=header.epoch, next_seq=0, next_record=0)
            else:
                stream.position = StreamState(
                    epoch=header.epoch, next_seq=first, next_record=header.first_record
                )
            stream.from_zero = False
        position = stream.position
        while held:
            entry = held.pop(position.next_seq, None)
            if entry is not None:
                self._deliver(stream_id, position, entry.block)
                continue
            lowest = min(held)
            waited = now - held[lowest].at >= self.settings.reorder_timeout_s
            if not (force or waited or len(held) > self.settings.max_held_blocks):
                break
            first_record = held[lowest].block.header.first_record
            lost = max(first_record - position.next_record, 0)
            self._events.append(
                Gap(
                    stream_id=stream_id,
                    epoch=position.epoch,
                    first_seq=position.next_seq,
                    last_seq=lowest - 1,
                    records_lost=lost,
                )
            )
            self._counters["blocks_lost"] += lowest - position.next_seq
            self._counters["records_lost"] += lost
            position.next_seq = lowest
            position.next_record = first_record
            self.state_changed = True

    def _deliver(self, stream_id: int, position: StreamState, block: AuthenticBlock) -> None:
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
            self._counters["records_lost"] += lost
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
        self._counters["blocks_delivered"] += 1
        self._counters["records_delivered"] += header.record_count
        position.next_seq = header.seq + 1
        position.next_record = header.first_record + header.record_count
        self.state_changed = True
