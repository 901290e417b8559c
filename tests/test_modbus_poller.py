"""The Modbus poller against a real pymodbus server in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import structlog.testing

from diode.config.modbus import ByteOrder, ModbusDevice
from diode.records import DeviceInfo, Quality, Sample, TagInfo, ValueType
from tests.support.modbus_server import ModbusSimServer
from transmitter.modbus import ModbusPoller, phase_of
from transmitter.modbus_codec import encode


class ListSink:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.devices: list[DeviceInfo] = []

    def sample(self, sample: Sample) -> None:
        self.samples.append(sample)

    def tag(self, info: TagInfo) -> None:
        raise AssertionError("a Modbus tag's type is never learnt: it is configured")

    def device(self, info: DeviceInfo) -> None:
        self.devices.append(info)


class Ids:
    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}

    def __call__(self, device: str, tag: str) -> int:
        return self.by_name.setdefault(tag, len(self.by_name) + 1)


def make_device(port: int, units: list[dict[str, Any]], **over: Any) -> ModbusDevice:
    data: dict[str, Any] = {
        "name": "plc",
        "host": "127.0.0.1",
        "port": port,
        "units": units,
        "poll_interval_s": 0.05,
        "timeout_s": 0.3,
        "retries": 0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "read_identity": False,
    }
    data.update(over)
    return ModbusDevice.model_validate(data)


def hr(name: str, address: int, kind: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "table": "holding_register", "address": address, "type": kind, **kw}


class Harness:
    def __init__(self, device: ModbusDevice) -> None:
        self.sink = ListSink()
        self.ids = Ids()
        self.poller = ModbusPoller(device, tag_id=self.ids, sink=self.sink)

    def latest(self, name: str) -> Sample:
        ident = self.ids.by_name[name]
        return next(s for s in reversed(self.sink.samples) if s.tag_id == ident)

    def value(self, name: str) -> Any:
        sample = self.latest(name)
        assert sample.quality is Quality.GOOD, sample
        return sample.value

    async def until(self, condition: Callable[[], bool], within_s: float = 4.0) -> None:
        deadline = time.monotonic() + within_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met in {within_s}s; last: {self.sink.samples[-3:]}"
                )
            await asyncio.sleep(0.01)

    def has(self, name: str, check: Callable[[Sample], bool]) -> bool:
        ident = self.ids.by_name[name]
        return any(s.tag_id == ident and check(s) for s in self.sink.samples)


@asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[None]:
    task = asyncio.create_task(harness.poller.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def server() -> AsyncIterator[ModbusSimServer]:
    sim = ModbusSimServer(units=[1, 2])
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


NUMBERS: list[tuple[str, int | float]] = [
    ("int16", -1234),
    ("uint16", 54321),
    ("int32", -123456789),
    ("uint32", 0xDEADBEEF),
    ("float32", 0.5),
    ("int64", -1234567890123456789),
    ("uint64", 0xFEDCBA9876543210),
    ("float64", 123.456),
]


async def test_every_type_and_order_through_a_real_server(server: ModbusSimServer) -> None:
    tags: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for kind, value in NUMBERS:
        for order in ByteOrder:
            name = f"{kind}_{order}"
            tags.append(hr(name, address, kind, order=str(order)))
            regs = encode(value, ValueType(kind), order)
            server.set_registers(1, "holding_register", address, regs)
            expected[name] = value
            address += len(regs)
    for order in ByteOrder:
        name = f"string_{order}"
        tags.append(hr(name, address, "string", order=str(order), length=4))
        server.set_registers(
            1, "holding_register", address, encode("PUMP-7", ValueType.STRING, order, length=4)
        )
        expected[name] = "PUMP-7"
        address += 4
    tags.append(hr("flag", address, "bool", bit=9))
    server.set_registers(1, "holding_register", address, [1 << 9])
    expected["flag"] = True
    tags += [
        {"name": "coil3", "table": "coil", "address": 3, "type": "bool"},
        {"name": "coil4", "table": "coil", "address": 4, "type": "bool"},
        {"name": "di17", "table": "discrete_input", "address": 17, "type": "bool"},
        {
            "name": "temp",
            "table": "input_register",
            "address": 7,
            "type": "int16",
            "scale": 0.1,
            "offset": -10.0,
        },
    ]
    server.set_bits(1, "coil", 3, [True, False])
    server.set_bits(1, "discrete_input", 17, [True])
    server.set_registers(1, "input_register", 7, [250])
    expected |= {"coil3": True, "coil4": False, "di17": True, "temp": 15.0}

    h = Harness(make_device(server.port, [{"id": 1, "tags": tags}]))
    await h.poller.poll_once()
    for name, value in expected.items():
        got = h.value(name)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, name
        assert type(got) is type(value), name
    # 97 holding registers in a row: one request; one for each other table.
    assert server.functions() == {3: 1, 1: 1, 2: 1, 4: 1}
    assert h.poller.counters["requests"] == 4


async def test_coalescing_counted_by_the_server(server: ModbusSimServer) -> None:
    tags = [hr(f"t{i}", 10 + 3 * i, "uint16") for i in range(20)]  # gaps of 2
    coalesced = Harness(make_device(server.port, [{"id": 1, "tags": tags}]))
    await coalesced.poller.poll_once()
    assert server.requests(1, 3) == 1
    alone = Harness(make_device(server.port, [{"id": 1, "tags": tags}], coalesce=False))
    await alone.poller.poll_once()
    assert server.requests(1, 3) == 1 + 20
    tight = Harness(make_device(server.port, [{"id": 1, "tags": tags}], max_gap=1))
    await tight.poller.poll_once()
    assert server.requests(1, 3) == 1 + 20 + 20


async def test_a_dead_unit_does_not_stall_the_others(server: ModbusSimServer) -> None:
    server.dead.add(2)
    server.set_registers(1, "holding_register", 0, [42])
    units = [
        {
            "id": 2,
            "tags": [
                hr("d1", 0, "uint16"),
                {"name": "d2", "table": "input_register", "address": 0, "type": "uint16"},
            ],
        },
        {"id": 1, "tags": [hr("alive", 0, "uint16")]},
    ]
    h = Harness(make_device(server.port, units, timeout_s=0.5))
    for _ in range(3):
        started = time.monotonic()
        await h.poller.poll_once()
        # One timeout per cycle for the dead unit, not one per request.
        assert time.monotonic() - started < 0.9
    assert h.value("alive") == 42
    for name in ("d1", "d2"):
        sample = h.latest(name)
        assert (sample.quality, sample.reason, sample.value) == (Quality.BAD, "timeout", None)
    assert server.requests(2) == 3  # the second request of the dead unit is not sent
    assert server.requests(1) == 3
    assert h.poller.counters["timeouts"] == 3

    server.dead.clear()
    server.set_registers(2, "holding_register", 0, [7])
    await h.poller.poll_once()
    assert h.value("d1") == 7


async def test_an_exception_answering_unit(server: ModbusSimServer) -> None:
    server.exception[2] = 2
    server.set_registers(1, "holding_register", 5, [5])
    units = [{"id": 2, "tags": [hr("x", 0, "uint16")]}, {"id": 1, "tags": [hr("ok", 5, "uint16")]}]
    h = Harness(make_device(server.port, units))
    await h.poller.poll_once()
    sample = h.latest("x")
    assert sample.quality is Quality.BAD
    assert sample.reason == "exception 2 (illegal data address)"
    assert h.value("ok") == 5
    assert h.poller.counters["errors"] == 1


async def test_values_change_under_a_running_poller(server: ModbusSimServer) -> None:
    h = Harness(
        make_device(server.port, [{"id": 1, "tags": [hr("level", 100, "float32", order="CDAB")]}])
    )
    async with running(h):
        for value in (1.5, -2.25, 1000.0):
            server.set_registers(
                1, "holding_register", 100, encode(value, ValueType.FLOAT32, ByteOrder.CDAB)
            )
            await h.until(lambda v=value: h.has("level", lambda s: s.value == v))  # type: ignore[misc]
    assert h.poller.counters["cycles"] >= 3


async def test_server_goes_away_and_comes_back(server: ModbusSimServer) -> None:
    server.set_registers(1, "holding_register", 0, [11])
    h = Harness(make_device(server.port, [{"id": 1, "tags": [hr("v", 0, "uint16")]}]))
    async with running(h):
        await h.until(lambda: h.has("v", lambda s: s.value == 11))
        await server.stop()
        await h.until(lambda: h.latest("v").reason == "disconnected")
        mark = len(h.sink.samples)
        await h.until(lambda: len(h.sink.samples) > mark + 3)  # one BAD per cycle while down
        assert all(
            s.quality is Quality.BAD and s.reason == "disconnected" for s in h.sink.samples[mark:]
        )
        server.set_registers(1, "holding_register", 0, [22])
        await server.start()
        await h.until(lambda: h.has("v", lambda s: s.value == 22))
    assert h.poller.counters["reconnects"] >= 1


async def test_schedule_does_not_catch_up_after_an_overrun(server: ModbusSimServer) -> None:
    server.dead.add(2)  # every cycle waits one 0.3 s timeout: longer than the 0.05 s interval
    h = Harness(make_device(server.port, [{"id": 2, "tags": [hr("slow", 0, "uint16")]}]))
    async with running(h):
        await h.until(lambda: h.poller.counters["cycles"] >= 3)
    assert h.poller.counters["overruns"] >= 6
    assert h.poller.counters["cycles"] <= 5


async def test_identity_is_read_once_per_connection() -> None:
    identity = {0: "ACME", 1: "PLC-9", 2: "v2.1"}
    async with ModbusSimServer(units=[1], identity=identity) as sim:
        h = Harness(
            make_device(sim.port, [{"id": 1, "tags": [hr("v", 0, "uint16")]}], read_identity=True)
        )
        await h.poller.poll_once()
        await h.poller.poll_once()
        assert h.sink.devices == [
            DeviceInfo(
                device="plc",
                protocol="modbus",
                endpoint=f"127.0.0.1:{sim.port}",
                identity={"vendor_name": "ACME", "product_code": "PLC-9", "revision": "v2.1"},
            )
        ]
        assert sim.requests(function_code=0x2B) == 1


async def test_a_device_without_identity_gives_an_empty_one() -> None:
    async with ModbusSimServer(units=[1], identity=None) as sim:
        h = Harness(
            make_device(sim.port, [{"id": 1, "tags": [hr("v", 0, "uint16")]}], read_identity=True)
        )
        await h.poller.poll_once()
        assert [d.identity for d in h.sink.devices] == [{}]
        assert h.latest("v").quality is Quality.GOOD


def test_catalogue_and_deadbands() -> None:
    device = make_device(
        502,
        [
            {
                "id": 3,
                "tags": [
                    hr("p", 40001, "float32", unit="bar", deadband=0.5, description="pressure"),
                    hr("b", 40003, "bool", bit=4),
                ],
            }
        ],
        address_base=1,
    )
    h = Harness(device)
    p, b = h.poller.catalogue
    assert (p.name, p.device, p.value_type, p.unit, p.description) == (
        "p",
        "plc",
        ValueType.FLOAT32,
        "bar",
        "pressure",
    )
    assert p.source == "modbus://127.0.0.1:502/3/holding_register/40001"
    assert b.source == "modbus://127.0.0.1:502/3/holding_register/40003.4"
    assert h.poller.deadbands == {p.tag_id: 0.5, b.tag_id: 0.0}


@dataclass
class SilentPlc:
    port: int = 0
    connections: int = 0


@asynccontextmanager
async def silent_plc() -> AsyncIterator[SilentPlc]:
    """A PLC that accepts TCP and never answers; it counts the connections made to it."""
    plc = SilentPlc()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plc.connections += 1
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    plc.port = server.sockets[0].getsockname()[1]
    try:
        yield plc
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_half_open_connection_is_replaced() -> None:
    """A PLC that accepts TCP but never answers (as after a reboot behind a NAT or a
    half-open connection): every tag gets BAD "timeout" and the poller reconnects."""
    async with silent_plc() as plc:
        harness = Harness(make_device(plc.port, [{"id": 1, "tags": [hr("a", 0, "uint16")]}]))
        async with running(harness):
            await harness.until(lambda: plc.connections >= 3)
        assert harness.has("a", lambda s: s.quality is Quality.BAD and s.reason == "timeout")
        assert harness.poller.counters["silent_reconnects"] >= 2


async def test_a_read_refused_for_spanning_a_hole_is_split_and_remembered() -> None:
    """A device without registers 14-17 and 30-35 answers exception 2 to a read
    spanning them: the read is split at once, every tag still arrives GOOD in that
    cycle, the split is kept, counted, and logged once for the device."""
    holes = {
        (1, "holding_register"): [range(14, 18), range(30, 36)],
        (1, "input_register"): [range(2, 4)],
    }
    tags = [
        hr("a", 10, "uint16"),
        hr("b", 11, "float32"),
        hr("c", 20, "uint16"),
        hr("d", 40, "uint16"),
        {"name": "i0", "table": "input_register", "address": 0, "type": "uint16"},
        {"name": "i5", "table": "input_register", "address": 5, "type": "uint16"},
    ]
    async with ModbusSimServer(units=[1], holes=holes) as sim:
        sim.set_registers(1, "holding_register", 10, [7, *encode(2.5, ValueType.FLOAT32)])
        sim.set_registers(1, "holding_register", 20, [20])
        sim.set_registers(1, "holding_register", 40, [40])
        sim.set_registers(1, "input_register", 0, [100])
        sim.set_registers(1, "input_register", 5, [105])
        h = Harness(make_device(sim.port, [{"id": 1, "tags": tags}]))  # default max_gap
        assert [(r.start, r.count) for r in h.poller.plan] == [(10, 31), (0, 6)]
        with structlog.testing.capture_logs() as logs:
            await h.poller.poll_once()
            first = [(r.function_code, r.address, r.count) for r in sim.seen]
            assert first == [
                (3, 10, 31),  # refused
                (3, 10, 3),
                (3, 20, 1),
                (3, 40, 1),
                (4, 0, 6),  # refused
                (4, 0, 1),
                (4, 5, 1),
            ]
            expected = {"a": 7, "b": 2.5, "c": 20, "d": 40, "i0": 100, "i5": 105}
            assert {name: h.value(name) for name in expected} == expected
            assert all(s.quality is Quality.GOOD for s in h.sink.samples)
            assert len(h.sink.samples) == len(expected)  # one sample per tag, none BAD

            sim.seen.clear()
            await h.poller.poll_once()
        assert [(r.function_code, r.address, r.count) for r in sim.seen] == [
            (3, 10, 3),
            (3, 20, 1),
            (3, 40, 1),
            (4, 0, 1),
            (4, 5, 1),
        ]
        assert (h.poller.counters["splits"], h.poller.counters["errors"]) == (2, 0)
        assert [entry["event"] for entry in logs] == ["modbus.read_split"]
        assert logs[0]["device"] == "plc"


async def test_a_tag_in_a_hole_is_bad_and_its_neighbours_are_not() -> None:
    """A tag configured at an address the device lacks: its own read is refused
    (a configuration error, reported BAD), the tags read with it are not lost."""
    holes = {(1, "holding_register"): [range(14, 18)]}
    async with ModbusSimServer(units=[1], holes=holes) as sim:
        sim.set_registers(1, "holding_register", 10, [10])
        sim.set_registers(1, "holding_register", 20, [20])
        tags = [hr("a", 10, "uint16"), hr("ghost", 15, "uint16"), hr("c", 20, "uint16")]
        h = Harness(make_device(sim.port, [{"id": 1, "tags": tags}]))
        await h.poller.poll_once()
        assert (h.value("a"), h.value("c")) == (10, 20)
        ghost = h.latest("ghost")
        assert (ghost.quality, ghost.reason) == (Quality.BAD, "exception 2 (illegal data address)")
        assert len(h.sink.samples) == 3
        assert (h.poller.counters["splits"], h.poller.counters["errors"]) == (1, 1)
        sim.seen.clear()
        await h.poller.poll_once()
        assert [(r.address, r.count) for r in sim.seen] == [(10, 1), (15, 1), (20, 1)]


async def test_the_watchdog_cuts_a_request_pymodbus_never_ends() -> None:
    """pymodbus times requests out by itself; should it not (here its timeout is
    raised to a minute behind our back, against a PLC that never answers), the
    cycle's watchdog cuts the request after about twice ``timeout_s`` and it counts
    as a timeout: the poller is never stuck."""
    async with silent_plc() as plc:
        device = make_device(plc.port, [{"id": 1, "tags": [hr("a", 0, "uint16")]}], timeout_s=0.2)
        h = Harness(device)
        try:
            link = h.poller._links[0]
            assert await link.ensure()
            assert link.client is not None
            link.client.ctx.comm_params.timeout_connect = 60.0
            started = time.monotonic()
            await asyncio.wait_for(h.poller.poll_once(), 5)
            # The limit is 0.2 * 2 + 1 s, checked every 0.7 s: not before 1.4 s.
            assert 1.4 < time.monotonic() - started < 4.5
            sample = h.latest("a")
            assert (sample.quality, sample.reason) == (Quality.BAD, "timeout")
            assert h.poller.counters["timeouts"] == 1
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        finally:
            for link in h.poller._links:
                link.close()


async def test_first_poll_at_once_then_on_the_devices_own_phase(server: ModbusSimServer) -> None:
    interval = 0.4
    units = [{"id": 1, "tags": [hr("v", 0, "uint16")]}]
    h = Harness(make_device(server.port, units, name="plc2", poll_interval_s=interval))
    started = time.time_ns()
    async with running(h):
        await h.until(lambda: h.poller.counters["cycles"] >= 4, within_s=4.0)
    polls = [(s.ts_ns - started) / 1e9 for s in h.sink.samples]
    assert polls[0] < 0.15  # at once
    phase = phase_of("plc2") * interval  # 0.55 of it
    for at in polls[1:4]:
        # Each later poll a few ms after a tick on the device's phase.
        assert 0 <= (at - phase) % interval < 0.1, (polls, phase)
    assert interval / 2 <= polls[1] - polls[0] < 1.5 * interval + 0.1


def test_phases_are_stable_and_spread() -> None:
    phases = [phase_of(f"plc{i}") for i in range(200)]
    assert phases == [phase_of(f"plc{i}") for i in range(200)]
    assert all(0 <= p < 1 for p in phases)
    tenths = [sum(1 for p in phases if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    assert max(tenths) < 40, tenths  # 20 each if even


# -- issue 14, item 11: device state changes are logged, rate-limited ------------------


def _states(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (e["event"], e.get("cause", ""))
        for e in logs
        if e["event"] in ("modbus.device_down", "modbus.device_up")
    ]


async def test_timeouts_disconnects_and_recoveries_are_logged_once_each(
    server: ModbusSimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("transmitter.modbus.STATE_LOG_INTERVAL_S", 0.0)
    h = Harness(make_device(server.port, [{"id": 1, "tags": [hr("a", 0, "uint16")]},
                                          {"id": 2, "tags": [hr("b", 0, "uint16")]}]))  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await h.poller.poll_once()
        assert _states(logs) == []  # a healthy device logs nothing per cycle
        server.dead.add(2)
        for _ in range(3):
            await h.poller.poll_once()
        server.dead.clear()
        await h.poller.poll_once()
        await server.stop()
        for _ in range(3):
            await h.poller.poll_once()
            await asyncio.sleep(0.25)  # past the reconnect backoff
        await server.start()
        await h.until(lambda: h.has("a", lambda s: s.quality is Quality.GOOD and s.ts_ns > 0))
        for _ in range(20):
            await h.poller.poll_once()
            if _states(logs)[-1:] == [("modbus.device_up", "")] and len(_states(logs)) == 4:
                break
            await asyncio.sleep(0.1)
    assert _states(logs) == [
        ("modbus.device_down", "timeout"),
        ("modbus.device_up", ""),
        ("modbus.device_down", "disconnected"),
        ("modbus.device_up", ""),
    ]
    down = next(e for e in logs if e["event"] == "modbus.device_down")
    assert (down["units"], down["device"]) == ([2], "plc")


async def test_a_flapping_device_is_logged_at_most_once_per_interval(
    server: ModbusSimServer,
) -> None:
    h = Harness(make_device(server.port, [{"id": 1, "tags": [hr("a", 0, "uint16")]},
                                          {"id": 2, "tags": [hr("b", 0, "uint16")]}]))  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):  # down, up, down, up... within one interval
            server.dead.add(2)
            await h.poller.poll_once()
            server.dead.clear()
            await h.poller.poll_once()
    assert _states(logs) == [("modbus.device_down", "timeout")]
    # The interval over, the state it settled in is logged, with the changes not logged.
    h.poller._state_logged_at -= 60.0
    with structlog.testing.capture_logs() as logs:
        await h.poller.poll_once()
    assert _states(logs) == [("modbus.device_up", "")]
    assert logs[0]["changes_unlogged"] == 6  # down and up three times in between
