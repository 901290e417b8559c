"""The read planner (pure) and the Modbus config checks it relies on."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diode.config import validate
from diode.config.modbus import Encoding, Half, ModbusDevice, ModbusSection, ModbusTag, Table
from diode.errors import ConfigError
from diode.records import ValueType
from transmitter.modbus_plan import (
    MAX_BITS,
    MAX_REGISTERS,
    ReadRequest,
    limit_of,
    plan_device,
    plan_stats,
    plan_unit,
    split,
)


def tag(
    name: str, address: int, kind: str = "uint16", table: str = "holding_register", **kw: Any
) -> ModbusTag:
    return ModbusTag.model_validate(
        {"name": name, "table": table, "address": address, "type": kind, **kw}
    )


def test_adjacent_and_near_tags_share_one_request() -> None:
    tags = [tag("a", 10), tag("b", 11, "float32"), tag("c", 20), tag("d", 40)]
    plan = plan_unit(1, tags, max_gap=8)
    assert [(r.start, r.count) for r in plan] == [(10, 11), (40, 1)]
    assert [(s.tag.name, s.offset) for s in plan[0].slots] == [("a", 0), ("b", 1), ("c", 10)]


def test_tables_never_mix_and_bits_use_bit_limits() -> None:
    tags = [
        tag("c0", 0, "bool", "coil"),
        tag("c1", 1999, "bool", "coil"),
        tag("d0", 0, "bool", "discrete_input"),
        tag("h0", 0),
        tag("i0", 0, "int32", "input_register"),
    ]
    plan = plan_unit(3, tags, max_gap=2000)
    assert [(r.table, r.start, r.count) for r in plan] == [
        (Table.COIL, 0, 2000),
        (Table.DISCRETE_INPUT, 0, 1),
        (Table.HOLDING_REGISTER, 0, 1),
        (Table.INPUT_REGISTER, 0, 2),
    ]
    assert all(r.unit == 3 for r in plan)


def test_register_limit_splits() -> None:
    plan = plan_unit(1, [tag("a", 0), tag("b", 124), tag("c", 125)], max_gap=200)
    assert [(r.start, r.count) for r in plan] == [(0, 125), (125, 1)]


def test_one_per_tag_and_bits_in_one_register() -> None:
    tags = [tag("b0", 5, "bool", bit=0), tag("b1", 5, "bool", bit=1), tag("w", 6)]
    assert len(plan_unit(1, tags, coalesce=False)) == 3
    (request,) = plan_unit(1, tags)
    assert (request.start, request.count) == (5, 2)
    assert [s.offset for s in request.slots] == [0, 0, 1]


def test_address_base_one_shifts_to_protocol_addresses() -> None:
    device = ModbusDevice.model_validate(
        {
            "name": "d",
            "host": "h",
            "address_base": 1,
            "units": [
                {
                    "id": 1,
                    "tags": [
                        {"name": "x", "table": "holding_register", "address": 1, "type": "int16"}
                    ],
                }
            ],
        }
    )
    (request,) = plan_device(device)
    assert request.start == 0


KINDS = [("uint16", None), ("float32", None), ("float64", None), ("string", 10), ("bool", None)]


@st.composite
def unit_tags(draw: st.DrawFn) -> list[ModbusTag]:
    count = draw(st.integers(1, 60))
    tags = []
    for i in range(count):
        table = draw(st.sampled_from(list(Table)))
        if table.is_bits:
            tags.append(tag(f"t{i}", draw(st.integers(0, 65535)), "bool", table.value))
            continue
        kind, length = draw(st.sampled_from(KINDS))
        extra: dict[str, Any] = {"length": length} if length else {}
        if kind == "bool":
            extra["bit"] = draw(st.integers(0, 15))
        tags.append(tag(f"t{i}", draw(st.integers(0, 65535 - 10)), kind, table.value, **extra))
    return tags


@settings(max_examples=200, deadline=None)
@given(unit_tags(), st.integers(0, 124), st.booleans())
def test_every_tag_covered_exactly_once_within_limits(
    tags: list[ModbusTag], max_gap: int, coalesce: bool
) -> None:
    plan = plan_unit(7, tags, max_gap=max_gap, coalesce=coalesce)
    served = [s.tag.name for r in plan for s in r.slots]
    assert sorted(served) == sorted(t.name for t in tags)
    for request in plan:
        assert isinstance(request, ReadRequest)
        assert 1 <= request.count <= limit_of(request.table)
        assert request.count <= (MAX_BITS if request.table.is_bits else MAX_REGISTERS)
        for slot in request.slots:
            assert slot.tag.table is request.table
            assert slot.offset >= 0
            assert slot.offset + slot.tag.width <= request.count
    if not coalesce:
        assert len(plan) == len(tags)


def test_split_reads_only_configured_addresses_then_one_tag_at_a_time() -> None:
    # a 10, b 11-12 touch; a hole 13-19; c 20; a hole 21-39; d 40
    tags = [tag("a", 10), tag("b", 11, "float32"), tag("c", 20), tag("d", 40)]
    (request,) = plan_unit(1, tags, max_gap=32)
    parts = split(request)
    assert [(r.start, r.count) for r in parts] == [(10, 3), (20, 1), (40, 1)]
    assert [[(s.tag.name, s.offset) for s in r.slots] for r in parts] == [
        [("a", 0), ("b", 1)],
        [("c", 0)],
        [("d", 0)],
    ]
    # Refused again although it spans no hole: one read per tag.
    assert [(r.start, r.count) for r in split(parts[0])] == [(10, 1), (11, 2)]
    assert split(parts[1]) == []  # one tag's own addresses: nothing smaller to read


def test_split_keeps_overlapping_tags_together() -> None:
    tags = [tag("b0", 5, "bool", bit=0), tag("b1", 5, "bool", bit=1), tag("w", 6), tag("x", 9)]
    (request,) = plan_unit(2, tags, max_gap=8)
    parts = split(request)
    assert [(r.unit, r.start, r.count) for r in parts] == [(2, 5, 2), (2, 9, 1)]
    per_tag = split(parts[0])
    assert [(r.start, r.count, [s.tag.name for s in r.slots]) for r in per_tag] == [
        (5, 1, ["b0", "b1"]),
        (6, 1, ["w"]),
    ]
    assert split(per_tag[0]) == []


def _check_split(request: ReadRequest, parts: list[ReadRequest]) -> None:
    """Smaller, disjoint reads of the same tags at the same addresses."""
    assert sorted(s.tag.name for r in parts for s in r.slots) == sorted(
        s.tag.name for s in request.slots
    )
    assert len(parts) > 1 or parts[0].count < request.count
    assert sum(r.count for r in parts) <= request.count
    where = {s.tag.name: request.start + s.offset for s in request.slots}
    for part in parts:
        assert (part.unit, part.table) == (request.unit, request.table)
        assert request.start <= part.start
        assert part.start + part.count <= request.start + request.count
        for slot in part.slots:
            assert part.start + slot.offset == where[slot.tag.name]
            assert slot.offset + slot.tag.width <= part.count


@settings(max_examples=200, deadline=None)
@given(unit_tags(), st.integers(0, 124))
def test_split_parts_read_the_same_tags_at_the_same_addresses(
    tags: list[ModbusTag], max_gap: int
) -> None:
    for request in plan_unit(7, tags, max_gap=max_gap):
        parts = split(request)
        if not parts:
            # Nothing smaller: the tags' addresses are the whole read, no hole in it.
            covered = {s.offset + i for s in request.slots for i in range(s.tag.width)}
            assert covered == set(range(request.count))
            continue
        _check_split(request, parts)
        for part in parts:
            again = split(part)
            if again:
                _check_split(part, again)


def test_scattered_device_figure(capsys: pytest.CaptureFixture[str]) -> None:
    stats = plan_stats(200, 1000, max_gap=8)
    with capsys.disabled():
        print(f"\nmodbus plan, 200 scattered tags over 1000 registers: {stats}")
    assert stats["one_per_tag"] == 200
    assert stats["coalesced"] < 30


# --- config checks -------------------------------------------------------------------


def device(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "plc1",
        "host": "127.0.0.1",
        "units": [
            {
                "id": 1,
                "tags": [{"name": "t", "table": "holding_register", "address": 0, "type": "int16"}],
            }
        ],
    }
    base.update(over)
    return base


def one_tag(**fields: Any) -> dict[str, Any]:
    return device(units=[{"id": 1, "tags": [{"name": "t", **fields}]}])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (one_tag(table="coil", address=0, type="int16"), "type must be bool"),
        (one_tag(table="holding_register", address=0, type="bool"), "needs bit"),
        (one_tag(table="holding_register", address=0, type="string"), "needs length"),
        (one_tag(table="holding_register", address=65535, type="float32"), "outside the table"),
        (one_tag(table="input_register", address=0, type="int16", bit=3), "only for bool"),
        (one_tag(table="coil", address=0, type="bool", scale=2.0), "scale and offset"),
        (one_tag(table="coil", address=0, type="nope"), "Input should be"),
        (one_tag(table="holding_register", address=0, type="int8"), 'byte = "high" or "low"'),
        (one_tag(table="holding_register", address=0, type="int16", byte="low"), "only for int8"),
        (
            one_tag(table="holding_register", address=0, type="uint8", byte="high", order="BADC"),
            "order does not apply",
        ),
        (one_tag(table="holding_register", address=0, type="uint8", byte="middle"), "byte"),
        (
            one_tag(table="holding_register", address=0, type="int16", encoding="utf-8"),
            "encoding is only for string",
        ),
        (
            one_tag(table="holding_register", address=0, type="string", length=2, encoding="utf8"),
            "encoding",
        ),
        (one_tag(table="holding_register", address=0, type="bytestring"), "not a Modbus value"),
        (device(name="bad name"), "should match pattern"),
        (device(port="502"), "valid integer"),
        (device(backoff_initial_s=60.0), "exceeds backoff_max_s"),
        (device(unknown=1), "unknown key"),
        (
            device(
                units=[
                    {
                        "id": 1,
                        "tags": [{"name": "t", "table": "coil", "address": 0, "type": "bool"}] * 2,
                    }
                ]
            ),
            "used twice",
        ),
        (
            device(
                address_base=1,
                units=[
                    {
                        "id": 1,
                        "tags": [{"name": "t", "table": "coil", "address": 0, "type": "bool"}],
                    }
                ],
            ),
            "outside the table",
        ),
    ],
)
def test_config_errors_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(ModbusSection, {"devices": [data]}, "tx.toml")


def test_config_defaults_and_enums_from_strings() -> None:
    section = validate(
        ModbusSection,
        {"devices": [one_tag(table="input_register", address=3, type="float32", order="CDAB")]},
        "x",
    )
    (dev,) = section.devices
    assert (dev.port, dev.poll_interval_s, dev.max_gap, dev.coalesce) == (502, 1.0, 32, True)
    t = dev.units[0].tags[0]
    assert t.table is Table.INPUT_REGISTER
    assert t.type is ValueType.FLOAT32
    assert t.order == "CDAB"
    assert t.width == 2


def test_8_bit_halves_and_string_encodings_are_accepted() -> None:
    tags = [
        {"name": "hi", "table": "holding_register", "address": 0, "type": "int8", "byte": "high"},
        {"name": "lo", "table": "holding_register", "address": 0, "type": "uint8", "byte": "low"},
        {"name": "s", "table": "input_register", "address": 1, "type": "string", "length": 4},
        {
            "name": "u",
            "table": "input_register",
            "address": 5,
            "type": "string",
            "length": 4,
            "encoding": "utf-8",
            "order": "BADC",
        },
    ]
    section = validate(ModbusSection, {"devices": [device(units=[{"id": 1, "tags": tags}])]}, "x")
    hi, lo, s, u = section.devices[0].units[0].tags
    assert (hi.byte, lo.byte, hi.width) == (Half.HIGH, Half.LOW, 1)
    assert (s.encoding, u.encoding) == (Encoding.LATIN1, Encoding.UTF8)


def test_duplicate_device_names() -> None:
    with pytest.raises(ConfigError, match="unique"):
        validate(ModbusSection, {"devices": [device(), device()]}, "x")
