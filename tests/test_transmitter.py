"""The transmitter end to end on loopback: a real pymodbus server, real UDP, real keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from diode.config import validate
from diode.config.link import LinkSettings
from diode.config.synthetic import SyntheticSource
from diode.config.tx import TxConfig
from diode.decoder import Decoder, Delivered
from diode.encoder import Encoder
from diode.keys import Keyring, SigningKey, TrustedKey
from diode.loopback import free_port
from diode.records import Heartbeat, LogFormat, LogRecord, Quality, Record, Sample, TagInfo
from tests.support.modbus_server import ModbusSimServer
from transmitter.app import Transmitter, take_epoch
from transmitter.synthetic import SyntheticPoller
from transmitter.syslog_in import RECORD_OVERHEAD, LogLane, lane_bytes_per_s


class Link:
    """The test's end of the one-way link: a UDP socket decoded by the core."""

    def __init__(self, key: SigningKey, stream_id: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.decoder = Decoder(
            Keyring([TrustedKey(stream_id=stream_id, public=key.private.public_key())])
        )
        self.records: list[Record] = []

    def drain(self) -> None:
        loop_now = asyncio.get_running_loop().time()
        while True:
            try:
                datagram = self.sock.recv(65535)
            except BlockingIOError:
                break
            self.decoder.receive(datagram, loop_now)
        self.decoder.poll(loop_now)
        for event in self.decoder.events():
            if isinstance(event, Delivered):
                self.records.extend(event.records)

    def samples(self, tag_id: int) -> list[Sample]:
        return [r for r in self.records if isinstance(r, Sample) and r.tag_id == tag_id]

    async def wait_for(self, predicate: object, within: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            self.drain()
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not met in time")


def config(
    tmp_path: Path,
    link_port: int,
    *,
    link: dict[str, object] | None = None,
    transmitter: dict[str, object] | None = None,
    **sections: object,
) -> TxConfig:
    """A transmitter config sending to ``link_port``, with the given source sections."""
    data = {
        "transmitter": {
            "stream_id": 3,
            "private_key": str(tmp_path / "tx.key"),
            "state_dir": str(tmp_path / "state"),
            **(transmitter or {}),
        },
        "link": {"destination": "127.0.0.1", "port": link_port, "rate_mbps": 50.0, **(link or {})},
        **sections,
    }
    return validate(TxConfig, data, "test.toml")


def tx_config(tmp_path: Path, link_port: int, plc_port: int, **transmitter: object) -> TxConfig:
    """One Modbus PLC with a float and a counter, fast carousel and heartbeats."""
    modbus = {
        "devices": [
            {
                "name": "plc1",
                "host": "127.0.0.1",
                "port": plc_port,
                "poll_interval_s": 0.05,
                "timeout_s": 0.5,
                "units": [
                    {
                        "id": 1,
                        "tags": [
                            {
                                "name": "level",
                                "table": "holding_register",
                                "address": 10,
                                "type": "float32",
                                "unit": "m",
                            },
                            {
                                "name": "count",
                                "table": "holding_register",
                                "address": 20,
                                "type": "uint16",
                                "deadband": 5.0,
                            },
                        ],
                    }
                ],
            }
        ]
    }
    periods = {"catalogue_period_s": 0.5, "heartbeat_interval_s": 0.2, **transmitter}
    return config(tmp_path, link_port, transmitter=periods, modbus=modbus)


@pytest.fixture
async def plc() -> AsyncIterator[ModbusSimServer]:
    server = ModbusSimServer(units=[1])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def run_tx(tx: Transmitter) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(tx.run(stop))
    await asyncio.wait_for(tx.ready.wait(), 5)
    return stop, task


async def test_values_flow_with_catalogue_first_and_deadband(
    tmp_path: Path, plc: ModbusSimServer
) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    tx = Transmitter(tx_config(tmp_path, link.port, plc.port), key=key)
    plc.set_registers(1, "holding_register", 10, list(struct.unpack(">HH", struct.pack(">f", 1.5))))
    plc.set_registers(1, "holding_register", 20, [100])
    stop, task = await run_tx(tx)
    try:
        await link.wait_for(lambda: link.samples(1) and link.samples(2))
        first_sample = next(i for i, r in enumerate(link.records) if isinstance(r, Sample))
        names = {r.name for r in link.records[:first_sample] if isinstance(r, TagInfo)}
        assert names == {"level", "count"}, "the catalogue goes before the first sample"
        assert link.samples(1)[0].value == 1.5
        assert link.samples(1)[0].quality is Quality.GOOD
        plc.set_registers(1, "holding_register", 20, [103])  # within the deadband of 5
        await asyncio.sleep(0.3)
        plc.set_registers(1, "holding_register", 20, [110])
        await link.wait_for(lambda: any(s.value == 110 for s in link.samples(2)))
        assert [s.value for s in link.samples(2)] == [100, 110]
        assert any(isinstance(r, Heartbeat) for r in link.records)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_split_read_reaches_the_heartbeat(tmp_path: Path) -> None:
    """A PLC refusing the read that spans its hole (registers 14-17): values arrive
    all the same, and the heartbeat says the read was split."""
    key = SigningKey.generate()
    link = Link(key, 3)
    async with ModbusSimServer(units=[1], holes={(1, "holding_register"): [range(14, 18)]}) as plc:
        plc.set_registers(1, "holding_register", 20, [9])
        tx = Transmitter(tx_config(tmp_path, link.port, plc.port), key=key)
        stop, task = await run_tx(tx)
        try:
            await link.wait_for(
                lambda: any(
                    isinstance(r, Heartbeat) and r.counters.get("poll_splits") == 1
                    for r in link.records
                )
            )
            assert [s.value for s in link.samples(2)] == [9]
            assert all(s.quality is Quality.GOOD for s in link.samples(1) + link.samples(2))
            assert tx.counters()["poll_errors"] == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_plc_outage_gives_bad_samples_then_values_again(
    tmp_path: Path, plc: ModbusSimServer
) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    tx = Transmitter(tx_config(tmp_path, link.port, plc.port), key=key)
    plc.set_registers(1, "holding_register", 20, [7])
    stop, task = await run_tx(tx)
    try:
        await link.wait_for(lambda: link.samples(2))
        await plc.stop()
        await link.wait_for(lambda: any(s.quality is Quality.BAD for s in link.samples(2)))
        bad = next(s for s in link.samples(2) if s.quality is Quality.BAD)
        assert bad.reason
        plc.set_registers(1, "holding_register", 20, [8])
        await plc.start()
        await link.wait_for(lambda: link.samples(2)[-1].value == 8, within=20)
        assert link.samples(2)[-1].quality is Quality.GOOD
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _udp_queue_of(sock: socket.socket) -> tuple[int, int]:
    """(rx_queue bytes, drops) of a socket, from /proc/net/udp."""
    port = sock.getsockname()[1]
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16), int(fields[12])
    raise AssertionError("socket not in /proc/net/udp")


def _listening_tcp_ports() -> set[int]:
    """The TCP ports this process listens on (others' sockets on a shared host do not count)."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                ours.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in ours:  # LISTEN, and its inode is one of ours
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


async def test_the_sender_is_deaf_and_opens_no_listening_port(
    tmp_path: Path, plc: ModbusSimServer
) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    before = _listening_tcp_ports()
    tx = Transmitter(tx_config(tmp_path, link.port, plc.port), key=key)
    stop, task = await run_tx(tx)
    try:
        await link.wait_for(lambda: link.samples(1))
        assert _listening_tcp_ports() == before, "the transmitter opened a listening TCP port"
        # Throw datagrams at the sender's own port: the socket filter drops them all.
        sender_port = tx.sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for _ in range(50):
                attacker.sendto(b"x" * 500, ("127.0.0.1", sender_port))
        await asyncio.sleep(0.1)
        queued, _drops = _udp_queue_of(tx.sock)
        assert queued == 0, "nothing may ever wait to be read on the transmitter's socket"
        try:
            leaked = tx.sock.recv(2048, socket.MSG_DONTWAIT)
        except BlockingIOError:
            leaked = b""
        assert leaked == b"", "the transmitter's socket must never yield a byte"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_sigterm_flushes_the_open_block(tmp_path: Path, plc: ModbusSimServer) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    config = tx_config(tmp_path, link.port, plc.port)
    config = config.model_copy(
        update={"link": config.link.model_copy(update={"linger_ms": 1000.0})}
    )
    tx = Transmitter(config, key=key)
    stop, task = await run_tx(tx)
    await asyncio.sleep(0.3)
    link.drain()
    assert not link.samples(1), "with a 1 s linger nothing has left yet"
    stop.set()
    await asyncio.wait_for(task, 10)
    await link.wait_for(lambda: link.samples(1), within=3)


def test_epochs_only_grow_even_when_the_clock_steps_back(tmp_path: Path) -> None:
    first = take_epoch(tmp_path, 5_000)
    second = take_epoch(tmp_path, 4_000)
    third = take_epoch(tmp_path, 9_000)
    assert (first, second, third) == (5_000, 5_001, 9_000)


async def test_a_synthetic_source_sends_every_update_in_order(tmp_path: Path) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    synthetic = {"sources": [{"name": "gen", "tags": 10, "rate_hz": 5000.0}]}
    tx = Transmitter(
        config(tmp_path, link.port, link={"rate_mbps": 200.0}, synthetic=synthetic), key=key
    )
    stop, task = await run_tx(tx)
    for _ in range(50):
        await asyncio.sleep(0.02)
        link.drain()
    stop.set()
    await asyncio.wait_for(task, 10)
    await asyncio.sleep(0.3)
    link.drain()
    generated = tx.pollers[0].counters["generated"]
    assert generated > 2000
    for tag_id in range(1, 11):
        values = [s.value for s in link.samples(tag_id)]
        assert values == list(range(1, len(values) + 1)), f"tag {tag_id} out of order or gapped"
    assert sum(len(link.samples(t)) for t in range(1, 11)) == generated


async def test_opc_ua_values_and_inventory_flow_through_the_transmitter(tmp_path: Path) -> None:
    from diode.records import DeviceInfo
    from tests.support.opcua_server import OpcuaTestServer, node_id

    server = OpcuaTestServer()
    await server.start()
    key = SigningKey.generate()
    link = Link(key, 3)
    opcua = {
        "servers": [
            {
                "name": "line1",
                "endpoint": server.endpoint,
                "nodes": [
                    {"name": "level", "node_id": node_id("Level"), "unit": "m"},
                    {"name": "count", "node_id": node_id("Count"), "mode": "poll",
                     "poll_interval_s": 0.1},
                ],
            }
        ]
    }  # fmt: skip
    tx = Transmitter(config(tmp_path, link.port, opcua=opcua), key=key)
    stop, task = await run_tx(tx)
    try:
        await link.wait_for(lambda: link.samples(1) and link.samples(2))
        await server.set("Level", 3.25)
        await server.set("Count", 41)
        await link.wait_for(lambda: any(s.value == 3.25 for s in link.samples(1)))
        await link.wait_for(lambda: any(s.value == 41 for s in link.samples(2)))
        inventory = [r for r in link.records if isinstance(r, DeviceInfo)]
        assert inventory, "the server's BuildInfo goes out as the device's inventory"
        assert inventory[-1].identity.get("product_name") == "Test PLC"
        named = {r.name: r for r in link.records if isinstance(r, TagInfo)}
        assert named["level"].unit == "m"
        assert named["level"].source.startswith("opcua://")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await server.stop()


def overloaded(
    tmp_path: Path, link_port: int, *, queue_records: int, **sections: object
) -> TxConfig:
    """A 2 Mb/s link, far below what its synthetic source produces (20 000 updates/s)."""
    return config(
        tmp_path,
        link_port,
        link={"rate_mbps": 2.0},
        transmitter={"heartbeat_interval_s": 0.2, "queue_records": queue_records},
        synthetic={"sources": [{"name": "gen", "tags": 50, "rate_hz": 20000.0}]},
        **sections,
    )


async def test_a_link_too_slow_holds_the_framer_drops_at_the_outbox_and_counts(
    tmp_path: Path,
) -> None:
    """Backpressure: the send queue stays at its limit, the outbox drops and counts, no gap.

    Nothing framed is dropped, so the receiver sees every block; what the link
    could not carry was dropped unnumbered at the outbox, counted in
    ``records_dropped``, which the heartbeat carries. The poller never waits.
    """
    key = SigningKey.generate()
    link = Link(key, 3)
    tx = Transmitter(overloaded(tmp_path, link.port, queue_records=1000), key=key)
    limit = tx.config.link.queue_limit()
    block = 56  # a full block's datagrams at the default FEC
    stop, task = await run_tx(tx)
    started = asyncio.get_running_loop().time()
    deepest = 0

    def reported() -> bool:
        return any(
            isinstance(r, Heartbeat) and r.counters.get("records_dropped", 0) > 0
            for r in link.records
        )

    # At least 1.5 s; then until a heartbeat that reports the drops gets through.
    for i in range(500):
        await asyncio.sleep(0.02)
        deepest = max(deepest, len(tx.queue))
        link.drain()
        if i >= 75 and reported():
            break
    elapsed = asyncio.get_running_loop().time() - started
    generated = tx.pollers[0].counters["generated"]
    counters = tx.counters()
    stop.set()
    await asyncio.wait_for(task, 10)
    # The poller kept its pace: the link's backlog never slowed it down.
    assert generated >= 20000 * elapsed * 0.8
    assert reported(), "the heartbeat reports the drops"
    assert counters["records_dropped"] > 0
    assert counters["queue_full_ms"] > 0
    # The framer waited at the limit: the send queue dropped nothing and stayed
    # within what goes in past it (the block being framed, the open one).
    assert counters["blocks_dropped"] == counters["records_dropped_link"] == 0
    assert limit <= deepest <= limit + 2 * block
    # Every block framed reached the receiver whole: no gap.
    assert link.decoder.counters["records_lost"] == 0


async def test_logs_get_their_share_while_telemetry_exceeds_the_link(tmp_path: Path) -> None:
    """Issue 19: the log lane frames within ``link_share`` while telemetry is held back.

    Telemetry is offered far above a 2 Mb/s link, so the send queue sits at its
    limit and the outbox, which holds several blocks, never empties; syslog comes
    in over real UDP at about half the lane's share (``queue_messages`` at its
    minimum, 100, a third of what is sent). Every message reaches the receiver,
    none is dropped at the lane, and telemetry still flows with the rest of the
    link. Before, the lane was framed only when the outbox was empty, never under
    this load: its queue filled and dropped.
    """
    key = SigningKey.generate()
    link = Link(key, 3)
    syslog_port = free_port(socket.SOCK_DGRAM)
    syslog = {
        "listeners": [{"address": "127.0.0.1", "port": syslog_port}],
        "allow": ["127.0.0.1"],
        "queue_messages": 100,
    }
    tx = Transmitter(overloaded(tmp_path, link.port, queue_records=20_000, syslog=syslog), key=key)
    share = lane_bytes_per_s(tx.config.link, 2.0, tx.config.syslog.link_share)
    stop, task = await run_tx(tx)
    messages, per_tick, tick_s = 300, 10, 0.1
    body = b"<134>1 2026-12-07T03:00:00Z plc1 app - - - " + b"x" * 60
    # About half the lane's share (RECORD_OVERHEAD and the source are paid too).
    assert per_tick * (len(body) + 80) / tick_s < share / 2
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def logs() -> list[LogRecord]:
        return [r for r in link.records if isinstance(r, LogRecord) and r.source == "127.0.0.1"]

    try:
        for first in range(0, messages, per_tick):
            for i in range(first, first + per_tick):
                sender.sendto(body + b" %d" % i, ("127.0.0.1", syslog_port))
            await asyncio.sleep(tick_s)
            link.drain()
        await link.wait_for(lambda: len(logs()) >= messages, within=30.0)
        counters = tx.counters()
    finally:
        sender.close()
        stop.set()
        await asyncio.wait_for(task, 10)
    # Telemetry exceeded the link, and still had the rest of it.
    assert counters["records_dropped"] > 0
    assert counters["queue_full_ms"] > 0
    assert link.samples(1)
    # The logs had their share: all of them, in order, none dropped at the lane.
    assert counters["syslog_received"] == messages
    assert counters["log_dropped_full"] == 0
    assert [r.msg.rsplit(b" ", 1)[1] for r in logs()] == [b"%d" % i for i in range(messages)]
    assert link.decoder.counters["records_lost"] == 0


def test_the_lane_is_owed_its_share_of_a_wait_at_the_queue_limit() -> None:
    """While the framer waits at the send queue's limit the lane earns its share.

    Its bucket holds ``burst_s`` (the queue's time, ``TxLink.queue_s``) of it:
    when the framer goes on after a wait that long, the lane frames all it was
    owed. The bucket of 50 ms (or 64 KiB) it had gave it 65 records of the 992 it
    was owed after a 1 s wait (a ``queue_ms`` of a second or two).
    """
    rate, wait_s = 1_000_000.0, 1.0
    lane = LogLane(limit=100_000, bytes_per_s=rate, now=0.0, burst_s=2 * wait_s)
    msg = b"x" * 952
    size = RECORD_OVERHEAD + len(msg) + len("10.0.0.1")
    for _ in range(4000):
        lane.put(
            lambda seq: LogRecord(
                seq=seq, ts_ns=0, source="10.0.0.1", format=LogFormat.RAW, msg=msg
            )
        )
    encoder = Encoder(link=LinkSettings(), key=SigningKey.generate(), stream_id=3, epoch=1)

    def framed_at(now: float) -> int:
        before = lane.counters["log_framed"]
        while lane.ready(now):
            lane.frame(encoder, now)
            encoder.take()
        return lane.counters["log_framed"] - before

    framed_at(0.0)  # the bucket starts full
    assert framed_at(wait_s) == int(rate * wait_s / size)
    assert lane.counters["log_dropped_full"] == 0


async def test_a_value_that_cannot_travel_costs_only_itself(tmp_path: Path) -> None:
    """Issue 14, item 2: OPC UA timestamps past 2262 and 2554, and a value over a block.

    Before, a SourceTimestamp in 2600 made msgpack raise OverflowError outside
    the DiodeError handling (the task group died, and the restarted daemon met
    the same value), and one in 2300 made the whole signed block fail record
    decoding at the receiver, losing every other record in it.
    """
    import datetime as dt

    from tests.support.opcua_server import OpcuaTestServer, node_id

    server = OpcuaTestServer()
    await server.start()
    key = SigningKey.generate()
    link = Link(key, 3)
    nodes = [
        {"name": name, "node_id": node_id(name), "mode": "poll", "poll_interval_s": 0.1}
        for name in ("Level", "Count", "Label", "Temp", "Text")
    ]
    opcua = {"servers": [{"name": "line1", "endpoint": server.endpoint, "nodes": nodes}]}
    tx = Transmitter(config(tmp_path, link.port, opcua=opcua), key=key)
    stop, task = await run_tx(tx)
    try:
        await link.wait_for(lambda: all(link.samples(i) for i in (1, 2, 3, 4)))
        await server.set("Level", 7.5, source_ts=dt.datetime(2600, 1, 1, tzinfo=dt.UTC))
        await server.set("Count", 9, source_ts=dt.datetime(2300, 1, 1, tzinfo=dt.UTC))
        await server.set("Label", "x" * 200_000)  # larger than any block
        # Bytes that are not UTF-8: asyncua hands them over as lone surrogates, which
        # msgpack refused with UnicodeEncodeError, outside the DiodeError handling.
        await server.set("Text", "bad \udcff text")
        await server.set("Temp", 21.5)
        await link.wait_for(lambda: any(s.value == 21.5 for s in link.samples(4)))

        def bad(tag_id: int, words: str) -> bool:
            return any(s.quality is Quality.BAD and words in s.reason for s in link.samples(tag_id))

        await link.wait_for(lambda: bad(1, "timestamp out of range"))
        await link.wait_for(lambda: bad(2, "timestamp out of range"))
        await link.wait_for(lambda: bad(3, "record_too_large"))
        await link.wait_for(lambda: bad(5, "text is not valid Unicode"))
        assert not task.done(), "the transmitter is still running"
        assert link.decoder.counters["rejected_bad_record"] == 0  # no block was lost for it
        assert link.decoder.counters["records_lost"] == 0
        # Back to a sane timestamp: the value is good again.
        await server.set("Level", 8.5)
        await link.wait_for(
            lambda: any(s.value == 8.5 and s.quality is Quality.GOOD for s in link.samples(1))
        )
        assert tx.counters()["samples_unrepresentable"] >= 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await server.stop()


# --- time diversity: [link] repeat_after_s ---------------------------------------------------

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; not exported by Python 3.11


async def test_every_datagram_is_sent_again_repeat_after_s_later(tmp_path: Path) -> None:
    key = SigningKey.generate()
    link = Link(key, 3)
    after = 0.4
    synthetic = {"sources": [{"name": "gen", "tags": 10, "rate_hz": 2000.0}]}
    tx = Transmitter(
        config(tmp_path, link.port, link={"repeat_after_s": after}, synthetic=synthetic), key=key
    )
    arrivals: dict[bytes, list[float]] = {}
    # The kernel's arrival time of each datagram, not when this loop got to read it.
    link.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def take() -> None:
        while True:
            try:
                datagram, ancdata, _, _ = link.sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return
            ((_, _, stamp),) = ancdata
            sec, nsec = struct.unpack("qq", stamp[:16])
            arrivals.setdefault(datagram, []).append(sec + nsec / 1e9)

    stop, task = await run_tx(tx)
    for _ in range(50):
        await asyncio.sleep(0.02)
        take()
    stop.set()
    await asyncio.wait_for(task, 10)
    take()
    counters = tx.counters()
    # Stopped 1 s in: what was sent in the last 0.4 s had no time for its second copy.
    twice = [times for times in arrivals.values() if len(times) == 2]
    once = [times for times in arrivals.values() if len(times) == 1]
    assert not [t for t in arrivals.values() if len(t) > 2]
    assert len(twice) == counters["repeats_sent"] > 0
    assert counters["datagrams_sent"] == len(twice) * 2 + len(once)
    assert counters["repeats_dropped"] == 0
    gaps = sorted(second - first for first, second in twice)
    assert gaps[0] >= after - 0.002, gaps[:5]  # never early (the pacer's clock vs the kernel's)
    # Late, not much later: paced with the rest on an idle link.
    assert gaps[len(gaps) // 2] < after + 0.2, gaps[len(gaps) // 2]
    # The receiver takes the copies as duplicates: every record once, in order.
    for datagram in sorted(arrivals, key=lambda d: arrivals[d][0]):
        for _ in arrivals[datagram]:
            link.decoder.receive(datagram, 0.0)
    link.decoder.poll(1e9)
    delivered = [e for e in link.decoder.events() if isinstance(e, Delivered)]
    assert [e.seq for e in delivered] == sorted({e.seq for e in delivered})
    assert link.decoder.counters["rejected_late"] >= len(twice) - len(delivered) * 2


async def test_repeats_never_delay_new_datagrams_and_their_overflow_is_counted(
    tmp_path: Path,
) -> None:
    """A link with room for the traffic once but not twice: new data first, repeats dropped."""
    key = SigningKey.generate()
    link = Link(key, 3)
    synthetic = {"sources": [{"name": "gen", "tags": 50, "rate_hz": 20000.0}]}
    tx = Transmitter(
        config(
            tmp_path,
            link.port,
            link={"rate_mbps": 5.0, "repeat_after_s": 0.2},
            synthetic=synthetic,
        ),
        key=key,
    )
    stop, task = await run_tx(tx)
    for _ in range(75):
        await asyncio.sleep(0.02)
        link.drain()
    bound = tx.sender.repeats.max_bytes if tx.sender.repeats else 0
    held = tx.sender.repeats.bytes if tx.sender.repeats else 0
    stop.set()
    await asyncio.wait_for(task, 10)
    counters = tx.counters()
    assert bound == int(5e6 / 8 * 0.2)  # what the link carries in repeat_after_s
    assert held <= bound
    assert counters["repeats_dropped"] > 0
    # The first copies went out at the link's rate, as without repeats: no block dropped
    # for the repeats' sake beyond what the rate alone costs (the link is the limit).
    assert counters["datagrams_sent"] - counters["repeats_sent"] > counters["repeats_sent"]


class _Batches:
    """A sink that keeps each batch it is handed, or raises on the ``fail_at``-th."""

    def __init__(self, fail_at: int = 0) -> None:
        self.batches: list[list[Sample]] = []
        self.fail_at = fail_at
        self.three = asyncio.Event()

    def samples(self, batch: list[Sample]) -> None:
        self.batches.append(list(batch))
        if len(self.batches) >= 3:
            self.three.set()
        if len(self.batches) == self.fail_at:
            raise RuntimeError("sink broke")

    def sample(self, sample: Sample) -> None:
        self.samples([sample])

    def device(self, info: object) -> None: ...

    def tag(self, info: object) -> None: ...


async def test_a_synthetic_source_stops_when_cancelled_and_fails_with_its_batch() -> None:
    """The source's batches are timer callbacks: a cancel ends them, an error ends ``run``."""
    source = SyntheticSource(name="gen", tags=3, rate_hz=2000.0, batch_ms=2.0)
    sink = _Batches()
    poller = SyntheticPoller(source, tag_id=lambda _d, tag: int(tag[1:]), sink=sink)  # type: ignore[arg-type]
    task = asyncio.create_task(poller.run())
    await asyncio.wait_for(sink.three.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    made = len(sink.batches)
    await asyncio.sleep(0.05)
    assert len(sink.batches) == made  # no batch after the cancel
    values = [s.value for batch in sink.batches for s in batch]
    assert values[:6] == [1, 1, 1, 2, 2, 2]  # round robin over the tags, counting up

    failing = SyntheticPoller(
        source,
        tag_id=lambda _d, tag: int(tag[1:]),
        sink=_Batches(fail_at=2),  # type: ignore[arg-type]
    )
    with pytest.raises(RuntimeError, match="sink broke"):
        await asyncio.wait_for(failing.run(), timeout=10)
