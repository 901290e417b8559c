"""MqttOutput against a real mosquitto: payloads, outage and replay, spool, last will."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import receiver.mqtt
from diode.config.mqtt import MqttBroker, StreamOutput
from diode.loopback import free_port
from diode.records import Sample, TagInfo, ValueType
from receiver.mqtt import WRITE_BYTES, MqttOutput, _Pending, _write
from receiver.mqtt_packets import PUBLISH
from tests.support.mosquitto import Mosquitto

TAGS = [
    TagInfo(tag_id=i, name=f"t{i}", device="plc1", value_type=ValueType.INT32) for i in range(5)
]


def broker_config(port: int, tmp_path: Path, **kw: object) -> MqttBroker:
    data: dict[str, object] = {
        "port": port,
        "spool_path": tmp_path / "spool.sqlite3",
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
        "client_id": f"rx-{time.monotonic_ns()}",
    }
    data.update(kw)
    return MqttBroker.model_validate(data, strict=False)


async def until(condition: Callable[[], bool], within_s: float = 8.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class Received:
    messages: list[paho.MQTTMessage] = field(default_factory=list)

    def on(self, topic_prefix: str) -> list[paho.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic.startswith(topic_prefix)]

    def values(self, topic: str) -> list[int]:
        return [json.loads(m.payload)["value"] for m in list(self.messages) if m.topic == topic]


@contextlib.asynccontextmanager
async def subscriber(
    port: int, topic: str = "#", *, persistent: bool = False
) -> AsyncIterator[Received]:
    """A paho subscriber in its own thread, appending in on_message (no queue to lose from).

    With ``persistent``, its session outlives a broker restart and paho reconnects by itself.
    """
    received = Received()
    subscribed = threading.Event()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=f"sub-{time.monotonic_ns()}",
        protocol=paho.MQTTv5,
    )
    client.reconnect_delay_set(0.05, 0.2)
    props = Properties(PacketTypes.CONNECT)
    if persistent:
        props.SessionExpiryInterval = 300

    def on_connect(c: paho.Client, u: object, f: object, rc: object, p: object = None) -> None:
        c.subscribe(topic, qos=1)

    def on_subscribe(c: paho.Client, u: object, mid: int, rc: object, p: object = None) -> None:
        subscribed.set()

    def on_message(c: paho.Client, u: object, message: paho.MQTTMessage) -> None:
        received.messages.append(message)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
    client.loop_start()
    try:
        await asyncio.to_thread(subscribed.wait, 5)
        assert subscribed.is_set()
        yield received
    finally:
        client.disconnect()
        client.loop_stop()


def persist_sessions(broker: Mosquitto, folder: Path) -> None:
    """Restart ``broker`` persisting sessions, so a subscriber's outlives a broker restart."""
    text = broker.conf.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {folder}/"
    )
    broker.conf.write_text(text)
    broker.restart()


@contextlib.asynccontextmanager
async def running(output: MqttOutput) -> AsyncIterator[MqttOutput]:
    task = asyncio.create_task(output.run())
    try:
        yield output
    finally:
        await asyncio.wait_for(output.close(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def samples(
    tag: TagInfo, values: range, t0: int = 1_700_000_000_000_000_000
) -> list[tuple[TagInfo, Sample]]:
    return [(tag, Sample(tag_id=tag.tag_id, ts_ns=t0 + v, value=v)) for v in values]


@pytest.mark.parametrize("qos", [0, 1])
async def test_per_tag_values_with_properties(
    mosquitto: Mosquitto, tmp_path: Path, qos: int
) -> None:
    stream = StreamOutput(site="north", qos=qos, retain=True, message_expiry_s=600)
    async with (
        subscriber(mosquitto.port, "diode/north/#") as got,
        running(MqttOutput(broker_config(mosquitto.port, tmp_path))) as out,
    ):
        out.publish_samples(stream, samples(TAGS[0], range(3)) + samples(TAGS[1], range(2)))
        await until(lambda: len(got.on("diode/north/plc1/")) == 5)
        assert got.values("diode/north/plc1/t0") == [0, 1, 2]
        first = got.on("diode/north/plc1/t0")[0]
        assert json.loads(first.payload) == {
            "value": 0,
            "ts": "2023-11-14T22:13:20.000000Z",
            "quality": "good",
            "unit": "",
        }
        assert first.qos == qos
        assert first.properties is not None
        assert first.properties.ContentType == "application/json"
        assert 0 < first.properties.MessageExpiryInterval <= 600
    # Retained: a late subscriber gets the last value of each tag.
    async with subscriber(mosquitto.port, "diode/north/#") as late:
        await until(lambda: len(late.messages) == 2)
        assert late.values("diode/north/plc1/t0") == [2]
        assert all(m.retain for m in late.messages)


async def test_batched_inventory_status(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from diode.records import DeviceInfo

    stream = StreamOutput(payload="batched", qos=0, retain=False)
    async with (
        subscriber(mosquitto.port, "diode/#") as got,
        running(MqttOutput(broker_config(mosquitto.port, tmp_path))) as out,
    ):
        out.publish_samples(stream, samples(TAGS[0], range(2)) + samples(TAGS[1], range(1)))
        out.publish_inventory(stream, DeviceInfo(device="plc1", protocol="modbus", endpoint="x"))
        out.publish_status(stream, {"link": "up", "gaps": 0})
        await until(lambda: len(got.on("diode/site/")) == 3)
        batch, inventory, status = got.on("diode/site/")
        assert batch.topic == "diode/site/plc1"
        assert batch.qos == 0
        assert [(s["tag"], s["value"]) for s in json.loads(batch.payload)["samples"]] == [
            ("t0", 0),
            ("t0", 1),
            ("t1", 0),
        ]
        assert inventory.topic == "diode/site/plc1/$inventory"
        assert status.topic == "diode/site/$status"
        assert json.loads(status.payload) == {"link": "up", "gaps": 0}
        online = got.on("diode/$receiver/status")
        assert online
        assert json.loads(online[-1].payload)["online"] is True


async def test_outage_then_everything_arrives_in_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    persist_sessions(mosquitto, tmp_path)
    stream = StreamOutput(qos=1)
    out = MqttOutput(broker_config(mosquitto.port, tmp_path))
    async with subscriber(mosquitto.port, "diode/site/#", persistent=True) as got, running(out):
        await until(lambda: out.counters["connected"] == 1)
        for v in range(0, 300, 10):
            out.publish_samples(
                stream, samples(TAGS[0], range(v, v + 10)) + samples(TAGS[1], range(v, v + 10))
            )
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: out.counters["connected"] == 0)
        for v in range(300, 2000, 50):
            out.publish_samples(
                stream, samples(TAGS[0], range(v, v + 50)) + samples(TAGS[1], range(v, v + 50))
            )
        assert out.counters["spool_depth"] > 0
        await asyncio.to_thread(mosquitto.start)
        for v in range(2000, 2100, 10):
            out.publish_samples(
                stream, samples(TAGS[0], range(v, v + 10)) + samples(TAGS[1], range(v, v + 10))
            )
        for tag in ("t0", "t1"):
            topic = f"diode/site/plc1/{tag}"
            try:
                await until(lambda topic=topic: set(got.values(topic)) == set(range(2100)))  # type: ignore[misc]
            except AssertionError:
                missing = sorted(set(range(2100)) - set(got.values(topic)))
                raise AssertionError(
                    f"{topic}: {len(missing)} missing {missing[:5]}..{missing[-5:]}; {out.counters}"
                ) from None
            values = got.values(topic)
            # At least once: a message whose PUBACK died with the connection may come twice,
            # but never out of order relative to what came first.
            firsts = list(dict.fromkeys(values))
            assert firsts == sorted(firsts)
            assert values[-1] == 2099
        assert out.counters["reconnects"] == 1
        await until(lambda: out.counters["spool_depth"] == 0)


async def test_new_output_delivers_a_spool_left_behind(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    stream = StreamOutput(qos=1)
    await asyncio.to_thread(mosquitto.stop)
    first = MqttOutput(broker_config(mosquitto.port, tmp_path, spool_max_records=5000))
    async with running(first):
        for v in range(0, 5000, 100):
            first.publish_samples(stream, samples(TAGS[2], range(v, v + 100)))
        first.commit()
        assert first.counters["spool_depth"] == 5000
    await asyncio.to_thread(mosquitto.start)
    async with subscriber(mosquitto.port, "diode/site/#") as got:
        second = MqttOutput(broker_config(mosquitto.port, tmp_path, spool_max_records=5000))
        assert second.counters["spool_depth"] == 5000
        async with running(second):
            await until(lambda: len(got.values("diode/site/plc1/t2")) >= 5000)
            assert got.values("diode/site/plc1/t2") == list(range(5000))
            await until(lambda: second.counters["spool_depth"] == 0)


async def test_full_spool_drops_the_oldest_exactly(mosquitto: Mosquitto, tmp_path: Path) -> None:
    stream = StreamOutput(qos=1)
    await asyncio.to_thread(mosquitto.stop)
    out = MqttOutput(broker_config(mosquitto.port, tmp_path, spool_max_records=1000))
    async with running(out):
        for v in range(0, 1500, 100):
            out.publish_samples(stream, samples(TAGS[3], range(v, v + 100)))
            out.commit()
        assert out.counters["spool_dropped"] == 500
        assert out.counters["spool_depth"] == 1000
        await asyncio.to_thread(mosquitto.start)
        async with subscriber(mosquitto.port, "diode/site/#") as got:
            await until(lambda: out.counters["spool_depth"] == 0)
            await until(lambda: len(got.values("diode/site/plc1/t3")) >= 1)
        # The retained value is the newest; the subscriber came late, so check the spool's head.
    async with subscriber(mosquitto.port, "diode/site/#") as late:
        await until(lambda: late.values("diode/site/plc1/t3") == [1499])


ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import asyncio, sys
from pathlib import Path
from diode.config.mqtt import MqttBroker
import receiver.mqtt
from receiver.mqtt import WRITE_BYTES, MqttOutput, _Pending, _write
from receiver.mqtt_packets import PUBLISH
async def main():
    out = MqttOutput(MqttBroker(port=int(sys.argv[1]), spool_path=Path(sys.argv[2]),
                                keepalive_s=5, client_id="rx-child"))
    await out.run()
asyncio.run(main())
"""


async def test_last_will_marks_the_receiver_offline(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with subscriber(mosquitto.port, "diode/$receiver/status") as got:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(mosquitto.port),
            str(tmp_path / "child.sqlite3"),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            states = lambda: [json.loads(m.payload)["online"] for m in got.messages]  # noqa: E731
            await until(lambda: True in states(), within_s=9)
            child.send_signal(signal.SIGKILL)
            await until(lambda: states()[-1] is False, within_s=5)
            assert json.loads(got.messages[-1].payload)["client_id"] == "rx-child"
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


async def test_mqtt_3_1_1_for_older_brokers(mosquitto: Mosquitto, tmp_path: Path) -> None:
    stream = StreamOutput(site="old", qos=1, message_expiry_s=600)
    config = broker_config(mosquitto.port, tmp_path, protocol="3.1.1")
    async with (
        subscriber(mosquitto.port, "diode/old/#") as got,
        running(MqttOutput(config)) as out,
    ):
        out.publish_samples(stream, samples(TAGS[0], range(4)))
        await until(lambda: len(got.on("diode/old/plc1/")) == 4)
    assert got.values("diode/old/plc1/t0") == [0, 1, 2, 3]
    # A 3.1.1 publisher sends no properties: no content type, no expiry.
    assert all(getattr(m.properties, "ContentType", None) is None for m in got.messages)


async def test_messages_the_broker_refuses_are_counted_not_retried(tmp_path: Path) -> None:
    # mosquitto answers a QoS 1 PUBLISH its ACL denies with PUBACK reason 0x87 (MQTT 5).
    broker = Mosquitto(tmp_path)
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite diode/ok/#\ntopic readwrite diode/$receiver/#\n")
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    try:
        async with (
            subscriber(broker.port, "diode/ok/#") as got,
            running(MqttOutput(broker_config(broker.port, tmp_path))) as out,
        ):
            out.publish_samples(StreamOutput(site="denied", qos=1), samples(TAGS[0], range(3)))
            out.publish_samples(StreamOutput(site="ok", qos=1), samples(TAGS[1], range(2)))
            await until(lambda: len(got.on("diode/ok/")) == 2)
            await until(lambda: out.backlog == 0)
            assert out.counters["refused"] == 3
            assert out.counters["published"] == 2
            assert got.values("diode/ok/plc1/t1") == [0, 1]
    finally:
        broker.stop()


async def test_an_idle_output_waits_without_spinning(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # The pump is driven by commits, writes and acknowledgements: with nothing to
    # publish it must sleep, whatever state the connection left its cursor in.
    async with running(MqttOutput(broker_config(mosquitto.port, tmp_path))) as out:
        await until(lambda: out.counters["connected"] == 1)
        for phase in ("empty spool after connecting", "everything delivered"):
            cpu = time.process_time()
            await asyncio.sleep(1.0)
            assert time.process_time() - cpu < 0.25, phase
            out.publish_samples(StreamOutput(site="idle"), samples(TAGS[0], range(3)))
            await until(lambda: out.backlog == 0)


def sockets_to(port: int) -> list[socket.socket]:
    """This process's TCP sockets connected to ``port`` on loopback (duplicated fds)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(int(name)))
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[1:2] == (port,):
                found.append(sock)
                continue
            sock.close()
    return found


async def test_the_broker_connection_does_not_wait_for_nagle(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Each write is a whole spool read; with Nagle on, a write waits for the broker's
    # delayed ACK of the one before (p99 42 ms instead of 13 ms at 10 000 updates/s).
    async with running(MqttOutput(broker_config(mosquitto.port, tmp_path))) as out:
        await until(lambda: out.counters["connected"] == 1)
        (sock,) = sockets_to(mosquitto.port)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_messages_expired_in_the_spool_are_dropped_in_order_and_counted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    persist_sessions(mosquitto, tmp_path)
    short = StreamOutput(site="short", qos=1, message_expiry_s=1)
    long = StreamOutput(site="long", qos=1)
    out = MqttOutput(broker_config(mosquitto.port, tmp_path))
    async with subscriber(mosquitto.port, "diode/#", persistent=True) as got, running(out):
        await until(lambda: out.counters["connected"] == 1)
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: out.counters["connected"] == 0)
        out.publish_samples(short, samples(TAGS[0], range(3)))
        out.publish_samples(long, samples(TAGS[1], range(2)))
        out.publish_samples(short, samples(TAGS[0], range(3, 4)))
        await asyncio.sleep(2.2)  # the broker is away longer than the expiry
        out.publish_samples(long, samples(TAGS[1], range(2, 3)))
        await asyncio.to_thread(mosquitto.start)
        try:
            # At least once: a QoS 1 message may come twice across the session's resumption.
            await until(lambda: set(got.values("diode/long/plc1/t1")) == {0, 1, 2})
        except AssertionError:
            raise AssertionError(f"{got.values('diode/long/plc1/t1')}; {out.counters}") from None
        assert list(dict.fromkeys(got.values("diode/long/plc1/t1"))) == [0, 1, 2]
        await until(lambda: out.counters["spool_depth"] == 0)
        assert out.counters["spool_expired"] == 4
        assert out.counters["published"] == 3
        assert got.on("diode/short/") == []


async def test_acknowledgements_are_read_in_bulk(tmp_path: Path) -> None:
    # paho reads one packet per call from the event loop, a recv per field; the
    # output reads 64 KiB at a time and empties its buffer in the same call.
    out = MqttOutput(broker_config(free_port(), tmp_path))
    inner = out._client()._client
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    inner._sock = ours
    try:
        pending = {mid: _Pending(out._wake) for mid in (1, 2, 3)}
        out._acks.update(pending)
        pubacks = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in (1, 2, 3))
        broker.sendall(pubacks[:10])  # two PUBACKs and half of the third
        inner.loop_read()
        assert [p.done for p in pending.values()] == [True, True, False]
        broker.sendall(pubacks[10:])
        inner.loop_read()
        assert pending[3].done
        assert not out._acks
    finally:
        inner._sock = None
        ours.close()
        broker.close()
        out._spool.close()


async def test_a_write_goes_straight_to_the_socket_or_behind_paho_queue(tmp_path: Path) -> None:
    # One write of the pump: on the socket at once when paho has nothing queued;
    # behind a packet of paho's, and what a full socket did not take, queued in
    # paho, done only when paho has written its last byte, the bytes in order.
    out = MqttOutput(broker_config(free_port(), tmp_path))
    inner = out._client()._client
    inner.on_socket_register_write = lambda client, userdata, sock: None  # the loop's writer
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    inner._sock = ours
    try:
        direct = _Pending(out._wake)
        _write(inner, b"first", direct)
        assert direct.done
        assert not inner._out_packet
        assert broker.recv(100) == b"first"

        paho_first = _Pending(out._wake)
        inner._packet_queue(PUBLISH, b"paho's", 0, 0, paho_first)  # waits for the writer
        behind = _Pending(out._wake)
        _write(inner, b"ours", behind)
        assert not behind.done
        inner.loop_write()
        assert paho_first.done
        assert behind.done
        assert broker.recv(100) == b"paho'sours"

        big = os.urandom(4 << 20)  # more than the socket pair holds
        rest = _Pending(out._wake)
        _write(inner, big, rest)
        assert not rest.done
        assert len(inner._out_packet) == 1
        got = bytearray()
        broker.settimeout(1.0)
        while len(got) < len(big):
            with contextlib.suppress(BlockingIOError):
                inner.loop_write()
            got += broker.recv(1 << 20)
        assert bytes(got) == big
        inner.loop_write()
        assert rest.done
    finally:
        inner._sock = None
        ours.close()
        broker.close()
        out._spool.close()


async def test_the_pump_hands_a_heavy_backlog_over_in_writes_of_write_bytes(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overrun receiver commits hundreds of 45 KB batched messages at once: the pump
    read up to 1 000 messages a write, and built, joined and queued them whole (16 MB
    three times over). Now a write stops at WRITE_BYTES, and the next waits until the
    last is on the socket."""
    writes: list[tuple[int, int]] = []  # each write's bytes, and what paho held unwritten

    def spy(client: paho.Client, data: bytes, written: _Pending) -> None:
        unwritten = sum(len(p["packet"]) - p["pos"] for p in client._out_packet)
        writes.append((len(data), unwritten))
        _write(client, data, written)

    monkeypatch.setattr(receiver.mqtt, "_write", spy)
    out = MqttOutput(broker_config(mosquitto.port, tmp_path))
    pad = "x" * 45_000
    async with subscriber(mosquitto.port, "big/#") as got, running(out):
        await until(lambda: out.counters["connected"] == 1)
        for i in range(200):  # one commit: they are handed over in one turn of the loop
            out.publish_message(f"big/{i}", {"i": i, "pad": pad}, qos=0, retain=False)
        await until(lambda: len(got.on("big/")) == 200, within_s=20)
    assert [json.loads(m.payload)["i"] for m in got.on("big/")] == list(range(200))
    heavy = [size for size, _ in writes if size > 45_000]
    assert len(heavy) >= 200 * 45_000 // WRITE_BYTES
    assert max(heavy) <= WRITE_BYTES + 46_000  # the message that reached the bound, at most
    assert max(unwritten for _, unwritten in writes) < 4096  # none of ours: paho's status
