"""What the receiver's journaled drain costs per datagram (``diode bench drain``).

The drain (receiver/link.py) peeks each datagram and takes it off the socket's
queue only once it is covered by committed positions: a second system call and
some bookkeeping per datagram. This measures ``Drain.read`` + ``Drain.release``
over datagrams already queued on loopback, journal on and off, in CPU time of
this process (``time.process_time``), median of ``repeats`` runs.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections import Counter
from typing import Any

from diode.replay import StreamState
from diode.wire import DatagramHeader, pack_datagram
from receiver.link import Drain, open_link_socket

STREAM = 7


def _datagram(seq: int) -> bytes:
    header = DatagramHeader(flags=0, stream_id=STREAM, key_id=b"k" * 8, epoch=5, seq=seq,
                            index=0, k=2, n=3, block_length=100, records=1)  # fmt: skip
    return pack_datagram(header, b"s" * 1424)  # 1472 bytes, the default datagram size


def _run(datagrams: list[bytes], *, journal: bool) -> float:
    sink = open_link_socket("127.0.0.1", 0, 64 * 1024 * 1024)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        source.connect(sink.getsockname())
        for d in datagrams:
            source.send(d)
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


def drain_cost(*, datagrams: int = 20_000, repeats: int = 5) -> dict[str, Any]:
    data = [_datagram(i // 4) for i in range(datagrams)]
    runs: dict[str, list[float]] = {"plain": [], "journal": []}
    for _ in range(repeats):
        runs["plain"].append(_run(data, journal=False))
        runs["journal"].append(_run(data, journal=True))
    return {
        "settings": {
            "datagrams": datagrams,
            "repeats": repeats,
            "bytes": 1472,
            "load_average": os.getloadavg()[0],
        },
        "us_per_datagram": {k: round(statistics.median(v), 2) for k, v in runs.items()},
    }
