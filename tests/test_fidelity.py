"""Every value right: a PLC holding every type, read through both daemons into mosquitto.

A Modbus simulator holds every numeric type in every byte order, bits in
registers and in bit tables, 8-bit halves, and strings in three encodings and
both byte orders; an OPC UA server holds every built-in type a plant is likely
to have, arrays and a matrix included. The registers are written here from
the orders' definitions (struct and byte shuffles), not with the codec under
test. Each published value is compared with what the PLC holds, exactly:
float32 and float64 bit for bit, text character for character, bytes byte for
byte. And a ramp under a deadband arrives within one deadband of the truth at
every step (issue 14, items 1, 5 and 6).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import math
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from tests.e2e import Plant, Subscriber, wait_until
from tests.support.mosquitto import Mosquitto
from tests.support.opcua_server import PLANT_TYPES, OpcuaTestServer, node_id

ORDERS = ("ABCD", "DCBA", "BADC", "CDAB")
FORMATS = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


# Four values per type, one per byte order: a mixed-up order shows as a wrong value.
NUMBERS: dict[str, list[Any]] = {
    "int16": [-12345, -1, 32767, -32768],
    "uint16": [0, 1, 65535, 40000],
    "int32": [-123456789, 2**31 - 1, -(2**31), 7],
    "uint32": [0xDEADBEEF, 2**32 - 1, 0, 70000],
    "int64": [-1234567890123456789, 2**63 - 1, -(2**63), 1],
    "uint64": [2**64 - 1, 0xDEADBEEFCAFEBABE, 0, 1 << 40],
    "float32": [f32(12.47), f32(2.9194613), f32(-3.4028234663852886e38), f32(1e-45)],
    "float64": [0.1 + 0.2, -1.7976931348623157e308, 5e-324, math.pi],
}
STRINGS = {  # name: (text, encoding)
    "ascii": ("PUMP-7 run", "ascii"),
    "utf8": ("Grüße 温度", "utf-8"),
    "latin1": ("Café Ø", "latin-1"),
}


def wire(value_bytes: bytes, order: str) -> list[int]:
    """Big-endian value bytes laid out in ``order`` (module docstring of modbus_codec)."""
    data = value_bytes
    if order in ("BADC", "DCBA"):
        data = bytes(b for i in range(0, len(data), 2) for b in (data[i + 1], data[i]))
    if order in ("CDAB", "DCBA"):
        data = b"".join(reversed([data[i : i + 2] for i in range(0, len(data), 2)]))
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


class ModbusPlc:
    """The tags of plc1, the registers that hold them, and what each must publish."""

    def __init__(self) -> None:
        self.tags: list[dict[str, Any]] = []
        self.registers: dict[int, list[int]] = {}
        self.coils: dict[int, bool] = {}
        self.expected: dict[str, tuple[str, Any]] = {}  # tag -> (value type, value)
        self._next = 0

    def _at(self, width: int) -> int:
        at, self._next = self._next, self._next + width + 1  # a hole between tags
        return at

    def add(self, name: str, kind: str, registers: list[int], value: Any, **kw: Any) -> None:
        at = self._at(len(registers))
        self.registers[at] = registers
        self.tags.append(
            {"name": name, "table": "holding_register", "address": at, "type": kind, **kw}
        )
        self.expected[name] = (kind, value)

    def build(self) -> None:
        for kind, values in NUMBERS.items():
            for order, value in zip(ORDERS, values, strict=True):
                data = struct.pack(FORMATS[kind], value)
                self.add(f"{kind}_{order}", kind, wire(data, order), value, order=order)
        for order in ORDERS:  # non-finite float32s, in every order too
            for label, value in (("nan", math.nan), ("inf", math.inf), ("ninf", -math.inf)):
                data = struct.pack(">f", value)
                self.add(f"float32_{label}_{order}", "float32", wire(data, order), value,
                         order=order)  # fmt: skip
        # Bits of one register, and the 8-bit halves of others.
        self.add("bit0", "bool", [0x8001], True, bit=0)
        self.add("bit14", "bool", [0x8001], False, bit=14)
        self.add("bit15", "bool", [0x8001], True, bit=15)
        self.add("int8_high", "int8", [0x80FF], -128, byte="high")
        self.add("uint8_low", "uint8", [0x80FF], 255, byte="low")
        self.add("int8_low", "int8", [0x7FFF], -1, byte="low")
        self.add("uint8_high", "uint8", [0x7FFF], 127, byte="high")
        # Strings: each encoding in both byte orders; the rest after a NUL is not text.
        for name, (text, encoding) in STRINGS.items():
            raw = text.encode(encoding) + b"\x00garbage"
            length = (len(raw) + 1) // 2
            raw = raw.ljust(2 * length, b"\x00")
            for order in ("ABCD", "BADC"):
                self.add(f"str_{name}_{order}", "string", wire(raw, order), text,
                         length=length, encoding=encoding, order=order)  # fmt: skip
        # Coils and discrete inputs.
        for i, value in enumerate([True, False, True]):
            self.tags.append({"name": f"coil{i}", "table": "coil", "address": i, "type": "bool"})
            self.tags.append(
                {"name": f"input{i}", "table": "discrete_input", "address": i, "type": "bool"}
            )
            self.coils[i] = value
            self.expected[f"coil{i}"] = ("bool", value)
            self.expected[f"input{i}"] = ("bool", value)
        # The ramp, last: one float32 with a deadband.
        self.ramp_address = self._at(2)
        ramp = {"name": "ramp", "table": "holding_register", "type": "float32", "deadband": 0.5}
        self.tags.append({**ramp, "address": self.ramp_address})


def opcua_expected(name: str) -> tuple[str, Any]:
    """What a node of PLANT_TYPES must publish: (how to compare, the JSON value)."""
    value, vtype = PLANT_TYPES[name]
    floats = {ua.VariantType.Float: "float32", ua.VariantType.Double: "float64"}
    if vtype in floats:
        if isinstance(value, list):
            return f"{floats[vtype]}[]", [f32(v) if vtype is ua.VariantType.Float else v
                                          for v in value]  # fmt: skip
        return floats[vtype], f32(value) if vtype is ua.VariantType.Float else value
    return "json", jsonable(value)


def jsonable(value: Any) -> Any:
    """The JSON an OPC UA value must be published as (docs/CONFIG.md, value types)."""
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, ua.LocalizedText):
        return {"text": value.Text, "locale": value.Locale}
    if isinstance(value, ua.StatusCode):
        return {"code": value.value, "name": value.name}
    if isinstance(value, ua.NodeId | ua.QualifiedName):
        return value.to_string()
    if isinstance(value, bool | int | str):
        return value
    return str(value)  # Guid


def same(kind: str, published: Any, held: Any) -> bool:
    """Exactly the value held: floats bit for bit in their own width."""
    if kind.endswith("[]"):
        return (
            isinstance(published, list)
            and len(published) == len(held)
            and all(same(kind[:-2], p, h) for p, h in zip(published, held, strict=True))
        )
    if kind in ("float32", "float64"):
        if isinstance(held, float) and not math.isfinite(held):
            names = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
            return published == names[repr(held)]
        if type(published) not in (int, float):
            return False
        fmt = "<f" if kind == "float32" else "<d"
        return struct.pack(fmt, float(published)) == struct.pack(fmt, held)
    return type(published) is type(held) and published == held


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> AsyncIterator[Subscriber]:
    sub = Subscriber(mosquitto.port, "diode/test/#")
    yield sub
    sub.close()


async def test_every_value_published_is_exactly_what_the_plc_holds(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    modbus = ModbusPlc()
    modbus.build()
    server = OpcuaTestServer()
    await server.start()
    plant = Plant(
        tmp_path,
        mosquitto.port,
        tags=modbus.tags,
        tx_overrides={"integrity_period_s": 60.0},
        sources={
            "opcua": {
                "servers": [
                    {
                        "name": "ua1",
                        "endpoint": server.endpoint,
                        "nodes": [
                            {"name": name, "node_id": node_id(name), "mode": "poll",
                             "poll_interval_s": 0.2}
                            for name in PLANT_TYPES
                        ],
                    }
                ]
            }
        },
    )  # fmt: skip
    plc = await plant.start_plc()
    try:
        for at, registers in modbus.registers.items():
            plc.set_registers(1, "holding_register", at, registers)
        for table in ("coil", "discrete_input"):
            plc.set_bits(1, table, 0, [modbus.coils[i] for i in sorted(modbus.coils)])
        plc.set_registers(1, "holding_register", modbus.ramp_address, wire(b"\0\0\0\0", "ABCD"))
        await plant.start_relay()
        await plant.start_rx()
        await plant.start_tx()

        def last(device: str, tag: str) -> dict[str, Any] | None:
            messages = subscriber.on(f"diode/test/{device}/{tag}")
            return messages[-1] if messages else None

        wanted = [("plc1", tag) for tag in modbus.expected]
        wanted += [("ua1", name) for name in PLANT_TYPES]

        def arrived() -> bool:
            return all(last(d, t) is not None for d, t in wanted)

        await wait_until(arrived, within=30)
        wrong: dict[str, tuple[Any, Any]] = {}
        for tag, (kind, held) in modbus.expected.items():
            message = last("plc1", tag)
            assert message is not None
            if message["quality"] != "good" or not same(kind, message["value"], held):
                wrong[f"plc1/{tag}"] = (message.get("value"), held)
        for name in PLANT_TYPES:
            kind, held = opcua_expected(name)
            message = last("ua1", name)
            assert message is not None
            if message["quality"] != "good" or not same(kind, message["value"], held):
                wrong[f"ua1/{name}"] = (message.get("value"), held)
        assert not wrong, f"published != held: {wrong}"

        # The text too: a float32 is the shortest decimal that reads back to it.
        # Every message, the first included: the type learnt from the server goes out
        # before the first value (before, the catalogue's float64 until the next carousel).
        assert {m["value"] for m in subscriber.on("diode/test/ua1/Float")} == {12.47}
        assert {m["value"] for m in subscriber.on("diode/test/ua1/FloatTiny")} == {2.9194613}
        assert {m["value"] for m in subscriber.on("diode/test/plc1/float32_ABCD")} == {12.47}

        await ramp_under_a_deadband(plant, modbus.ramp_address, lambda: last("plc1", "ramp"))
    finally:
        await plant.close()
        await server.stop()


async def ramp_under_a_deadband(
    plant: Plant, address: int, last: Callable[[], dict[str, Any] | None]
) -> None:
    """0.0, 0.1 ... 4.9 under a deadband of 0.5: within 0.5 of the truth at every step.

    Before, the deadband compared with the last value polled: every step was
    under it, so only 0.0 went out until the integrity refresh (60 s here).
    """
    assert plant.plc is not None
    held: list[float] = []
    published: set[float] = set()
    for step in range(50):
        truth = f32(step / 10)
        held.append(truth)
        plant.plc.set_registers(
            1, "holding_register", address, wire(struct.pack(">f", truth), "ABCD")
        )

        def close_enough(truth: float = truth) -> bool:
            message = last()
            if message is None or message["quality"] != "good":
                return False
            published.add(message["value"])
            return abs(f32(message["value"]) - truth) <= 0.5

        await wait_until(close_enough, within=10, step=0.01)
        await asyncio.sleep(0.06)  # about one poll: the next step is a separate sample
    # Only values the PLC held were published, and far fewer than the 50 steps.
    assert all(f32(v) in held for v in published), published
    assert 5 <= len(published) < 25, sorted(published)
