"""The assembly table: the symbols of blocks being rebuilt, with a memory bound that holds.

An assembly gathers the symbols of one block until k of them are there. Its
key is the datagram header without the symbol index and the CRC, so symbols
join only an assembly whose every header field agrees.

The bound counts what an assembly really costs in the Python heap, not just
its symbol bytes: the assembly object, its symbol dict, its key, the table's
entry, and each symbol's ``bytes`` object (constants measured with
tracemalloc, checked by tests/test_assembly.py). When the count passes
``max_bytes``, the oldest assemblies of blocks the stream's position has passed
(delivered, or declared lost: nothing can need them) go first, counted as
``assemblies_passed``; then the oldest: those holding a single symbol (what a
flood of unique forged datagrams creates) before those with two or more, each
group oldest first. Every eviction and expiry is counted.

Assemblies of passed blocks are also dropped as soon as the position passes
them (:meth:`AssemblyTable.drop_passed`, from ``Decoder.poll``, where a
reorder timeout declares blocks lost), counted as ``assemblies_passed`` too:
waiting out the timeout (5 s) they were dead weight, a third of what the
table held in an overrun receiver at the 1000 Mb/s cap with 1 % loss (350
assemblies, 8 MB; docs/BENCHMARKS.md, the receiver's memory under overrun).

Passed assemblies first because an overrun receiver makes them by the
thousand: the kernel drops a burst, blocks lose more symbols than their repair
covers, and their assemblies wait out the timeout. Evicted oldest first behind
the single-symbol ones, they kept the table full, and a full table evicted
every new block's first symbol: at the 1000 Mb/s cap with 1 % loss the
receiver lost 6 blocks in 10 for that (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from diode.errors import FrameError

# What one assembly costs beyond its symbols' payload bytes: the object, its
# symbol dict, its key (a 45-byte ``bytes``), and its OrderedDict entry.
ASSEMBLY_OVERHEAD = 560
# What one symbol costs beyond its payload bytes: the ``bytes`` object and its dict slot.
SYMBOL_OVERHEAD = 64

# The key: datagram bytes 0..32 and 33..44 (all but the index and the CRC), and the
# datagram's length (with the version in the key, it fixes the symbol's).
_KEY = struct.Struct(">HBBI8sQQBBBIIH")


def assembly_key(datagram: bytes | memoryview) -> bytes:
    view = memoryview(datagram)
    return b"".join((view[:32], view[33:44], len(view).to_bytes(2, "big")))


@dataclass(frozen=True, slots=True)
class BlockId:
    """Where an assembly's block claims to sit (unauthenticated), and its record hint."""

    stream_id: int
    epoch: int
    seq: int
    records: int


def block_id(key: bytes) -> BlockId:
    fields = _KEY.unpack(key)
    return BlockId(stream_id=fields[3], epoch=fields[5], seq=fields[6], records=fields[11])


@dataclass(slots=True)
class Assembly:
    key: bytes
    created: float
    symbols: dict[int, bytes] = field(default_factory=dict)
    cost: int = ASSEMBLY_OVERHEAD


class AssemblyTable:
    """Blocks being rebuilt; ``add`` hands back an assembly once it holds k symbols."""

    def __init__(
        self,
        counters: Counter[str],
        *,
        max_bytes: int,
        timeout_s: float,
        passed: Callable[[bytes], bool] | None = None,
    ) -> None:
        self._counters = counters
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        # Has the stream's position passed the block this key names? (None: never asked.)
        self._passed = passed
        # Two FIFOs: probation (one symbol so far) and established (two or more).
        self._probation: OrderedDict[bytes, Assembly] = OrderedDict()
        self._established: OrderedDict[bytes, Assembly] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._probation) + len(self._established)

    def held(self, key: bytes) -> int:
        """How many symbols the assembly ``key`` holds (0 when there is none)."""
        assembly = self._established.get(key) or self._probation.get(key)
        return 0 if assembly is None else len(assembly.symbols)

    def add(self, key: bytes, index: int, k: int, symbol: bytes, now: float) -> Assembly | None:
        """Add one symbol; returns the complete assembly (out of the table) at the k-th."""
        assembly = self._established.get(key)
        if assembly is None:
            assembly = self._probation.get(key)
            if assembly is None:
                if k == 1:  # complete at once: never enters the table
                    cost = ASSEMBLY_OVERHEAD + len(symbol) + SYMBOL_OVERHEAD
                    return Assembly(key, now, {index: symbol}, cost)
                assembly = Assembly(key, now)
                self._probation[key] = assembly
                self.bytes += ASSEMBLY_OVERHEAD
            elif index not in assembly.symbols:
                del self._probation[key]  # a second symbol: promoted
                self._established[key] = assembly
        if index in assembly.symbols:
            raise FrameError("symbol already received", reason="duplicate")
        assembly.symbols[index] = symbol
        cost = len(symbol) + SYMBOL_OVERHEAD
        assembly.cost += cost
        self.bytes += cost
        if len(assembly.symbols) >= k:
            self._remove(assembly)
            return assembly
        self._evict()
        return None

    def discard(self, key: bytes) -> None:
        """Drop the assembly ``key`` if there is one: the block it names was authenticated,
        so what it holds is surplus (symbols that came after the k-th, while the block
        waited its turn) and can never be needed."""
        assembly = self._established.pop(key, None) or self._probation.pop(key, None)
        if assembly is not None:
            self.bytes -= assembly.cost

    def _remove(self, assembly: Assembly) -> None:
        if self._established.pop(assembly.key, None) is None:
            self._probation.pop(assembly.key, None)
        self.bytes -= assembly.cost

    def _evict(self) -> None:
        if self.bytes > self.max_bytes and self._passed is not None:
            self._evict_passed(self._passed)
        while self.bytes > self.max_bytes:
            fifo = self._probation or self._established
            if not fifo:
                return
            _, victim = fifo.popitem(last=False)
            self.bytes -= victim.cost
            self._counters["assemblies_evicted"] += 1

    def _evict_passed(self, passed: Callable[[bytes], bool]) -> None:
        """Drop the oldest assemblies of two symbols or more while their block is passed and
        the bound does not hold. One look when the oldest is live: a scan further down would
        be paid by every symbol a flood adds to a full table (256 looks made a forged tiny
        datagram cost 265 us instead of 7). Blocks come in order, so the oldest pass first;
        single-symbol assemblies are the first evicted anyway."""
        established, counters = self._established, self._counters
        while self.bytes > self.max_bytes and established:
            key = next(iter(established))
            if not passed(key):
                return
            self.bytes -= established.pop(key).cost
            counters["assemblies_passed"] += 1

    def drop_passed(self) -> None:
        """Drop the oldest assemblies, of both FIFOs, while the stream's position has passed
        their block (declared lost, or delivered): nothing can ever need them. Stops at the
        first live one of each: blocks come in order, so the passed ones are the oldest,
        and a look costs no more than one when none has passed."""
        passed, counters = self._passed, self._counters
        if passed is None:
            return
        for fifo in (self._established, self._probation):
            while fifo:
                key = next(iter(fifo))
                if not passed(key):
                    break
                self.bytes -= fifo.pop(key).cost
                counters["assemblies_passed"] += 1

    def expire(self, now: float) -> None:
        """Drop assemblies older than ``timeout_s`` (their block's loss is declared later)."""
        limit = now - self.timeout_s
        for fifo in (self._probation, self._established):
            while fifo and next(iter(fifo.values())).created <= limit:
                _, old = fifo.popitem(last=False)
                self.bytes -= old.cost
                self._counters["assemblies_expired"] += 1

    def deadline(self) -> float | None:
        times = [next(iter(f.values())).created for f in (self._probation, self._established) if f]
        return min(times) + self.timeout_s if times else None

    def take_epoch(self, stream_id: int, epoch: int) -> list[BlockId]:
        """Remove every assembly of one stream's epoch; what they claimed to be."""
        taken = []
        for fifo in (self._probation, self._established):
            for key in list(fifo):
                claimed = block_id(key)
                if claimed.stream_id == stream_id and claimed.epoch == epoch:
                    self.bytes -= fifo.pop(key).cost
                    taken.append(claimed)
        return taken
