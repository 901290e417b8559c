"""What the decoder tells its shell: authentic blocks, gaps, epoch changes."""

from __future__ import annotations

from dataclasses import dataclass

from diode.records import Record


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

    ``exact`` is False only for the tail of an epoch that ended, where no later
    authentic block of that epoch gives the count: ``records_lost`` is then an
    estimate, bounded by what authentic blocks make possible (at most
    ``window`` blocks, each at most as full as the fullest authentic block of
    that epoch). Shells keep estimates apart from exact counts.
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
