"""What the receiver's journaled drain costs per datagram (``diode bench drain``).

The drain (receiver/link.py) peeks each datagram and takes it off the socket's
queue only once it is covered by committed positions: a second system call and
some bookkeeping per datagram. This measures, over datagrams already queued on
loopback, in CPU time of this process (``time.process_time``), median of
``repeats`` runs:

- ``plain`` and ``journal``: ``Drain.read`` + ``Drain.release``, journal off and on;
- ``feed``: the receiver's own path at line rate, ``Drain.feed`` over full blocks
  (k 32, n 56) sent interleaved 4 at a time, every datagram judged needed, the
  positions moved on and the journal released every 8 blocks (a grouped commit
  at ~1 400 blocks a second);
- ``kernel``: the same queue peeked and dropped by the batch reader alone, what
  the kernel costs of ``feed`` (the rest is the journal's Python).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from diode.replay import StreamState
from diode.wire import DatagramHeader, pack_datagram
from receiver.link import SO_PEEK_OFF, Drain, open_link_socket
from receiver.recvmmsg import BATCH, BatchReader

STREAM = 7


def _datagram(seq: int) -> bytes:
    header = DatagramHeader(flags=0, stream_id=STREAM, key_id=b"k" * 8, epoch=5, seq=seq,
                            index=0, k=2, n=3, block_length=100, records=1)  # fmt: skip
    return pack_datagram(header, b"s" * 1424)  # 1472 bytes, the default datagram size


def _interleaved(blocks: int, *, k: int = 32, n: int = 56, interleave: int = 4) -> list[bytes]:
    """Full blocks' datagrams in the order the send queue hands them out."""
    out = []
    for first in range(0, blocks, interleave):
        for index in range(n):
            for seq in range(first, first + interleave):
                header = DatagramHeader(flags=0, stream_id=STREAM, key_id=b"k" * 8, epoch=5,
                                        seq=seq, index=index, k=k, n=n, block_length=100,
                                        records=1)  # fmt: skip
                out.append(pack_datagram(header, b"s" * 1424))
    return out


def _queued(datagrams: list[bytes]) -> tuple[socket.socket, socket.socket]:
    sink = open_link_socket("127.0.0.1", 0, 64 * 1024 * 1024)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.connect(sink.getsockname())
    for d in datagrams:
        source.send(d)
    return sink, source


def _run(datagrams: list[bytes], *, journal: bool) -> float:
    sink, source = _queued(datagrams)
    try:
        drain = Drain(sink, {STREAM}, journal=journal, counters=Counter())
        covered = {STREAM: StreamState(epoch=5, next_seq=2**62, next_record=0)}
        started, read = time.process_time(), 0
        while read < len(datagrams):
            read += len(drain.read(1024, 0.0))
            drain.release(covered, 0.0)
        return (time.process_time() - started) / len(datagrams) * 1e6
    finally:
        sink.close()
        source.close()


def _feed(datagrams: list[bytes], *, blocks_a_commit: int = 8, per_block: int = 56) -> float:
    sink, source = _queued(datagrams)
    try:
        drain = Drain(sink, {STREAM}, journal=True, counters=Counter())
        started, read, covered = time.process_time(), 0, 0
        positions = {STREAM: StreamState(epoch=5, next_seq=0, next_record=0)}
        while read < len(datagrams):
            read += drain.feed(blocks_a_commit * per_block, 0.0, _all_needed, positions)
            covered += blocks_a_commit
            positions = {STREAM: StreamState(epoch=5, next_seq=covered, next_record=0)}
            drain.release(positions, 0.0)
        drain.release({STREAM: StreamState(epoch=5, next_seq=2**62, next_record=0)}, 0.0)
        return (time.process_time() - started) / len(datagrams) * 1e6
    finally:
        sink.close()
        source.close()


def _all_needed(datagrams: Sequence[bytes | memoryview]) -> list[bool]:
    return [True] * len(datagrams)


def _kernel(datagrams: list[bytes], *, run: int = 8 * 56) -> float:
    """The batch reader alone: peek a commit's worth, then drop it, until the queue is empty."""
    sink, source = _queued(datagrams)
    try:
        sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        reader = BatchReader(sink)
        started, read = time.process_time(), 0
        while read < len(datagrams):
            peeked = 0
            while peeked < run and (views := reader.views(BATCH, peek=True)):
                peeked += len(views)
            read += peeked
            while peeked:
                peeked -= reader.discard(peeked)
        return (time.process_time() - started) / len(datagrams) * 1e6
    finally:
        sink.close()
        source.close()


def drain_cost(*, datagrams: int = 20_000, repeats: int = 5) -> dict[str, Any]:
    data = [_datagram(i // 4) for i in range(datagrams)]
    blocks = _interleaved(max(datagrams // 56 // 4 * 4, 4))
    runs: dict[str, list[float]] = {"plain": [], "journal": [], "feed": [], "kernel": []}
    for _ in range(repeats):
        runs["plain"].append(_run(data, journal=False))
        runs["journal"].append(_run(data, journal=True))
        runs["feed"].append(_feed(blocks))
        runs["kernel"].append(_kernel(blocks))
    return {
        "settings": {
            "datagrams": datagrams,
            "repeats": repeats,
            "bytes": 1472,
            "load_average": os.getloadavg()[0],
        },
        "us_per_datagram": {k: round(statistics.median(v), 2) for k, v in runs.items()},
    }
