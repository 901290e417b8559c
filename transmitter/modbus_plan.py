"""Read planning: which Modbus requests read a unit's tags, as few as possible.

Pure: tags in, requests out. A PLC serves one request at a time on most
stacks, so every request saved is latency saved for every tag. Tags of one unit
and one table are sorted by address and joined greedily while the request
stays within the protocol's limits (125 registers, 2000 bits: Modbus
Application Protocol v1.1b3, 6.1-6.4) and the hole between two tags is at most
``max_gap`` addresses (reading a few unused registers is cheaper than another
round trip, but some devices answer "illegal data address" for holes, hence
the knob, and ``coalesce = false`` to read each tag on its own).

A device that refuses a read spanning a hole need not be configured by hand:
:func:`split` gives the smaller reads the poller falls back to (and keeps)
when a read is answered exception 2 or 3.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from diode.config.modbus import DEFAULT_MAX_GAP, ModbusDevice, ModbusTag, Table
from diode.records import ValueType

MAX_REGISTERS = 125
MAX_BITS = 2000


def limit_of(table: Table) -> int:
    """Most addresses one read of this table may span."""
    return MAX_BITS if table.is_bits else MAX_REGISTERS


@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """One tag served by a request, ``offset`` addresses after the request's start."""

    tag: ModbusTag
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest:
    """One read: ``count`` registers (or bits) of ``table`` from ``start`` (0-based)."""

    unit: int
    table: Table
    start: int
    count: int
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.count <= limit_of(self.table):
            raise ValueError(f"count {self.count} outside 1..{limit_of(self.table)}")
        if not 0 <= self.start <= self.start + self.count - 1 <= 0xFFFF:
            raise ValueError(f"addresses {self.start}+{self.count} outside the table")


def plan_unit(
    unit: int,
    tags: Iterable[ModbusTag],
    *,
    address_base: int = 0,
    max_gap: int = DEFAULT_MAX_GAP,
    coalesce: bool = True,
) -> list[ReadRequest]:
    """The requests that read ``tags`` of one unit, in table then address order."""
    requests: list[ReadRequest] = []
    by_table: dict[Table, list[tuple[int, ModbusTag]]] = {}
    for tag in tags:
        by_table.setdefault(tag.table, []).append((tag.address - address_base, tag))
    for table in Table:  # a fixed order of tables makes the plan deterministic
        entries = sorted(by_table.get(table, []), key=lambda e: (e[0], -e[1].width))
        limit = limit_of(table)
        group: list[tuple[int, ModbusTag]] = []
        start = end = 0  # the current group spans [start, end)
        for address, tag in entries:
            stop = address + tag.width
            joinable = (
                coalesce and group and address - end <= max_gap and max(end, stop) - start <= limit
            )
            if group and not joinable:
                requests.append(_request(unit, table, start, end, group))
                group = []
            if not group:
                start, end = address, stop
            group.append((address, tag))
            end = max(end, stop)
        if group:
            requests.append(_request(unit, table, start, end, group))
    return requests


def _request(
    unit: int, table: Table, start: int, end: int, group: Sequence[tuple[int, ModbusTag]]
) -> ReadRequest:
    slots = tuple(Slot(tag=tag, offset=address - start) for address, tag in group)
    return ReadRequest(unit=unit, table=table, start=start, count=end - start, slots=slots)


def split(request: ReadRequest) -> list[ReadRequest]:
    """Smaller reads covering the tags of ``request``; ``[]`` when none is smaller.

    First the configured addresses only (tags that touch or overlap are still
    read together, as with ``max_gap = 0``); when ``request`` already spans no
    unused address, one read per tag (tags that overlap, such as bits of one
    register, share theirs). A device that refused the first answers the
    second; a device that refuses one tag's own addresses has a configuration
    error, which no split mends.
    """
    for touching in (True, False):
        parts = [_part(request, group) for group in _groups(request.slots, touching=touching)]
        if len(parts) > 1 or parts[0].count < request.count:
            return parts
    return []


def _groups(slots: Iterable[Slot], *, touching: bool) -> list[list[Slot]]:
    groups: list[list[Slot]] = []
    end = 0
    for slot in sorted(slots, key=lambda s: (s.offset, -s.tag.width)):
        stop = slot.offset + slot.tag.width
        joins = groups and (slot.offset <= end if touching else slot.offset < end)
        if joins:
            groups[-1].append(slot)
            end = max(end, stop)
        else:
            groups.append([slot])
            end = stop
    return groups


def _part(request: ReadRequest, group: Sequence[Slot]) -> ReadRequest:
    first = min(slot.offset for slot in group)
    stop = max(slot.offset + slot.tag.width for slot in group)
    return ReadRequest(
        unit=request.unit,
        table=request.table,
        start=request.start + first,
        count=stop - first,
        slots=tuple(Slot(tag=slot.tag, offset=slot.offset - first) for slot in group),
    )


def plan_device(device: ModbusDevice) -> list[ReadRequest]:
    """Every request of one poll cycle of ``device``, unit by unit."""
    return [
        request
        for unit in device.units
        for request in plan_unit(
            unit.id,
            unit.tags,
            address_base=device.address_base,
            max_gap=device.max_gap,
            coalesce=device.coalesce,
        )
    ]


_MIXED = [
    (ValueType.UINT16, None),
    (ValueType.INT16, None),
    (ValueType.FLOAT32, None),
    (ValueType.INT32, None),
    (ValueType.FLOAT64, None),
    (ValueType.STRING, 8),
]


def scattered_tags(count: int, registers: int, *, seed: int = 1) -> list[ModbusTag]:
    """``count`` holding-register tags of mixed sizes at random, non-overlapping addresses."""
    rng = random.Random(seed)
    taken: set[int] = set()
    tags: list[ModbusTag] = []
    while len(tags) < count:
        kind, length = rng.choice(_MIXED)
        tag = ModbusTag(
            name=f"t{len(tags)}",
            table=Table.HOLDING_REGISTER,
            address=rng.randrange(registers),
            type=kind,
            length=length,
        )
        span = set(range(tag.address, tag.address + tag.width))
        if span & taken or tag.address + tag.width > registers:
            continue
        taken |= span
        tags.append(tag)
    return tags


def plan_stats(
    count: int = 200, registers: int = 1000, *, max_gap: int = DEFAULT_MAX_GAP, seed: int = 1
) -> dict[str, int]:
    """Requests per poll cycle for scattered tags: coalesced and one per tag."""
    tags = scattered_tags(count, registers, seed=seed)
    coalesced = plan_unit(1, tags, max_gap=max_gap)
    alone = plan_unit(1, tags, coalesce=False)
    return {
        "tags": count,
        "registers": registers,
        "max_gap": max_gap,
        "coalesced": len(coalesced),
        "one_per_tag": len(alone),
        "registers_read_coalesced": sum(r.count for r in coalesced),
        "registers_read_one_per_tag": sum(r.count for r in alone),
    }
