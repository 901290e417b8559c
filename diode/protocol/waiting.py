"""The waiting room: complete blocks ahead of their turn, not verified until it comes.

Blocks are delivered in sequence order, so verifying block X before block
X-1 is delivered gains nothing. A complete block in the stream's window but
ahead of the next expected one waits here; when its turn comes, the
candidates for that sequence number are verified newest first and the first
authentic one ends the search: the others, and any that arrive later, are
discarded as late without a verify. A forger spraying the window with valid-
looking blocks therefore costs at most ``per_seq`` (2) verifies per real
block, not one per forged block. (A real block usually comes after its turn:
blocks arrive in order; one that completes early waits a few milliseconds,
so keeping the 2 newest candidates per sequence number keeps it.)

If the next block does not come (lost beyond repair), the lowest waiting
sequence number is verified once its first candidate has waited the reorder
timeout, so loss is declared as before; a round that finds only forgeries
delays the next by a reorder timeout (``Decoder._overdue``).

Bounded: at most ``per_seq`` candidates per sequence number (the newest are
kept: the real block arrives about when its turn comes) and at most
``max_bytes`` in all, counted as the assembly table counts; when full, the
candidates furthest ahead go first (``rejected_waiting_full``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

from diode.keys import TrustedKey
from diode.wire import DatagramHeader


@dataclass(slots=True, kw_only=True)
class Candidate:
    """A complete block, not verified yet."""

    key: bytes
    header: DatagramHeader
    symbols: dict[int, bytes]
    trusted: TrustedKey
    at: float
    cost: int  # as the assembly table counted it


class WaitingRoom:
    def __init__(self, counters: Counter[str], *, max_bytes: int, per_seq: int = 2) -> None:
        self._counters = counters
        self.max_bytes = max_bytes
        self.per_seq = per_seq
        # stream -> epoch it waits for -> seq -> candidates, oldest first
        self._streams: dict[int, dict[int, list[Candidate]]] = {}
        self._epochs: dict[int, int] = {}
        # Per stream, a max-heap (negated) and a min-heap of waiting seqs, stale entries
        # skipped lazily and the heaps rebuilt when mostly stale. The receiver asks for the
        # lowest after every read (its next deadline): a scan of a window sprayed with
        # forged blocks was a fifth of its CPU under a flood of 20 000 a second.
        self._ahead: dict[int, list[int]] = {}
        self._low: dict[int, list[int]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return sum(len(c) for s in self._streams.values() for c in s.values())

    def put(self, stream_id: int, epoch: int, candidate: Candidate) -> None:
        if self._epochs.get(stream_id) != epoch:
            self.clear(stream_id)
            self._epochs[stream_id] = epoch
        seqs = self._streams.setdefault(stream_id, {})
        seq = candidate.header.seq
        waiting = seqs.get(seq)
        if waiting is None:
            waiting = seqs[seq] = []
            self._index(stream_id, seqs, seq)
        elif any(c.key == candidate.key for c in waiting):
            # Another k symbols of a block already waiting (the same header): the
            # surplus of a healthy block, like a late symbol. Not kept, not an attack.
            self._counters["rejected_duplicate"] += 1
            return
        waiting.append(candidate)
        self.bytes += candidate.cost
        if len(waiting) > self.per_seq:
            self._drop(waiting.pop(0))
        ahead = self._ahead[stream_id]
        while self.bytes > self.max_bytes and ahead:
            furthest = -ahead[0]
            if furthest not in seqs:
                heapq.heappop(ahead)  # taken or discarded already
                continue
            self._drop(seqs[furthest].pop(0))
            if not seqs[furthest]:
                del seqs[furthest]
                heapq.heappop(ahead)

    def _index(self, stream_id: int, seqs: dict[int, list[Candidate]], seq: int) -> None:
        ahead = self._ahead.setdefault(stream_id, [])
        low = self._low.setdefault(stream_id, [])
        if len(low) > 2 * len(seqs) + 64:  # mostly stale: rebuild both from what waits
            ahead[:] = [-s for s in seqs]
            low[:] = list(seqs)
            heapq.heapify(ahead)
            heapq.heapify(low)
            return
        heapq.heappush(ahead, -seq)
        heapq.heappush(low, seq)

    def _drop(self, candidate: Candidate) -> None:
        self.bytes -= candidate.cost
        self._counters["rejected_waiting_full"] += 1

    def take(self, stream_id: int, seq: int) -> list[Candidate]:
        """The candidates for one sequence number, newest first (out of the room)."""
        seqs = self._streams.get(stream_id)
        if not seqs or seq not in seqs:
            return []
        taken = seqs.pop(seq)
        self.bytes -= sum(c.cost for c in taken)
        taken.reverse()
        return taken

    def lowest(self, stream_id: int) -> tuple[int, float] | None:
        """The lowest waiting sequence number and when its first candidate arrived."""
        seqs = self._streams.get(stream_id)
        if not seqs:
            return None
        low = self._low[stream_id]
        while low[0] not in seqs:  # every waiting seq is in the heap: this ends
            heapq.heappop(low)
        seq = low[0]
        return seq, seqs[seq][0].at

    def discard_below(self, stream_id: int, seq: int) -> None:
        """Candidates whose turn passed (their block was delivered or declared lost)."""
        seqs = self._streams.get(stream_id)
        if not seqs:
            return
        low = self._low[stream_id]
        while low and low[0] < seq:
            gone = seqs.pop(heapq.heappop(low), None)
            if gone:  # None: a stale entry, or one seq pushed twice
                self.bytes -= sum(c.cost for c in gone)
                self._counters["rejected_late"] += len(gone)

    def clear(self, stream_id: int) -> None:
        self._ahead.pop(stream_id, None)
        self._low.pop(stream_id, None)
        for candidates in self._streams.pop(stream_id, {}).values():
            self.bytes -= sum(c.cost for c in candidates)
            self._counters["rejected_late"] += len(candidates)

    def streams(self) -> list[int]:
        return [s for s, seqs in self._streams.items() if seqs]
