"""Freshness: epochs, the per-stream position the receiver persists, and its file format.

An epoch names one run of a transmitter: milliseconds since the Unix epoch
at its start, but never less than the last epoch it used plus one (the
transmitter persists it), so epochs only grow even when the wall clock steps
back. Epochs are compared only with other epochs of the same transmitter,
never with the receiver's clock, so clock skew between the two sides cannot
make the receiver reject live data or accept old data.

The receiver keeps, per stream, the epoch it follows, the next block it
expects and the next record index. Anything older is a replay. It persists
that position before it hands a block's records on, so a capture replayed
after a receiver restart is still rejected, and the first block after the
restart tells exactly how many records were missed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from diode.errors import FrameError

_MAGIC = b"DRS1"
_ENTRY = struct.Struct(">IQQQ")
_COUNT = struct.Struct(">I")


def next_epoch(last: int | None, now_ms: int) -> int:
    """The epoch for a transmitter starting now, given the last one it used."""
    return now_ms if last is None or now_ms > last else last + 1


@dataclass(slots=True, kw_only=True)
class StreamState:
    """Where the receiver is in one stream: everything before it has been resolved."""

    epoch: int
    next_seq: int
    next_record: int


def pack_states(states: dict[int, StreamState]) -> bytes:
    body = _COUNT.pack(len(states)) + b"".join(
        _ENTRY.pack(stream, s.epoch, s.next_seq, s.next_record)
        for stream, s in sorted(states.items())
    )
    return _MAGIC + body + zlib.crc32(body).to_bytes(4, "big")


def unpack_states(data: bytes) -> dict[int, StreamState]:
    """Parse a state file; a damaged one is a FrameError (the caller decides what to do)."""
    if len(data) < len(_MAGIC) + _COUNT.size + 4 or not data.startswith(_MAGIC):
        raise FrameError("not a receiver state file", reason="bad_state")
    body, crc = data[len(_MAGIC) : -4], data[-4:]
    if zlib.crc32(body).to_bytes(4, "big") != crc:
        raise FrameError("receiver state file is damaged", reason="bad_state")
    (count,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + count * _ENTRY.size:
        raise FrameError("receiver state file has a wrong length", reason="bad_state")
    states = {}
    for i in range(count):
        stream, epoch, seq, record = _ENTRY.unpack_from(body, _COUNT.size + i * _ENTRY.size)
        states[stream] = StreamState(epoch=epoch, next_seq=seq, next_record=record)
    return states
