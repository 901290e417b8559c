"""The receiver reaches a broker on its host through a Unix socket (``[mqtt] socket``).

A real mosquitto started by the test listens on a Unix socket in a short temporary
folder (a socket path holds at most 107 bytes, more than pytest's folders leave)
and on a loopback port, where the test's subscribers are: what they get went
through the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from diode.config.mqtt import MqttBroker, StreamOutput
from diode.config.rx import FailoverSection
from diode.errors import SettingError
from diode.startup import usable_broker_socket
from receiver.failover import Failover
from receiver.mqtt import MqttOutput
from tests.e2e import Plant, Subscriber, wait_until
from tests.support.mosquitto import Mosquitto
from tests.test_mqtt_output import TAGS, persist_sessions, running, samples, subscriber, until

COUNT = "diode/test/plc1/count"
NOBODY = 65534
PEER_STATUS = "diode/$receiver/peer"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dq", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path, socket_dir: Path) -> Iterator[Mosquitto]:
    """mosquitto on a free loopback port and on ``socket_dir/mqtt.sock``."""
    mosquitto = Mosquitto(tmp_path, unix_socket=socket_dir / "mqtt.sock")
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


def unix_config(broker: Mosquitto, tmp_path: Path) -> MqttBroker:
    return MqttBroker.model_validate(
        {
            "socket": broker.unix_socket,
            "spool_path": tmp_path / "spool.sqlite3",
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 0.5,
            "client_id": f"rx-{time.monotonic_ns()}",
        },
        strict=False,
    )


def connections_of_this_process() -> list[tuple[object, object]]:
    """(own address, peer address) of every connected stream socket this process holds."""
    peers: list[tuple[object, object]] = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
            with sock:
                if sock.type == socket.SOCK_STREAM:
                    peers.append((sock.getsockname(), sock.getpeername()))
    return peers


@pytest.fixture
async def plant(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[Plant]:
    plant = Plant(tmp_path, broker.port, broker_socket=broker.unix_socket)
    await plant.start_plc()
    try:
        yield plant
    finally:
        await plant.close()


async def test_values_travel_end_to_end_through_the_unix_socket(
    plant: Plant, broker: Mosquitto
) -> None:
    sub = Subscriber(broker.port)  # on the TCP listener: what it gets crossed the socket
    try:
        await plant.start_relay()
        await plant.start_rx()
        await plant.start_tx()
        assert plant.plc is not None
        for value in range(1, 41):
            plant.plc.set_registers(1, "holding_register", 10, [0, value])
            await asyncio.sleep(0.06)  # a little more than one poll interval
        await wait_until(lambda: any(m["value"] == 40 for m in sub.on(COUNT)))
        seen = [m["value"] for m in sub.on(COUNT) if m["quality"] == "good"]
        assert seen == sorted(set(seen))
        assert plant.rx is not None
        assert plant.rx.output.counters["connected"] == 1
        # The receiver's connection is the socket, not the broker's TCP port.
        # The receiver's connection is the socket; the only one to the TCP port is the
        # subscriber's.
        connections = connections_of_this_process()
        assert str(broker.unix_socket) in [peer for _, peer in connections]
        tcp = [
            own for own, peer in connections if isinstance(peer, tuple) and peer[1] == broker.port
        ]
        assert tcp == [sub.client.socket().getsockname()]
    finally:
        sub.close()


async def test_a_broker_restarted_on_the_same_socket_loses_nothing(
    broker: Mosquitto, tmp_path: Path
) -> None:
    persist_sessions(broker, tmp_path)
    stream = StreamOutput(qos=1)
    out = MqttOutput(unix_config(broker, tmp_path))
    async with subscriber(broker.port, "diode/site/#", persistent=True) as got, running(out):
        await until(lambda: out.counters["connected"] == 1)
        for v in range(0, 300, 10):
            out.publish_samples(stream, samples(TAGS[0], range(v, v + 10)))
        await asyncio.to_thread(broker.stop)
        await until(lambda: out.counters["connected"] == 0)
        for v in range(300, 2000, 50):
            out.publish_samples(stream, samples(TAGS[0], range(v, v + 50)))
        assert out.counters["spool_depth"] > 0
        await asyncio.to_thread(broker.start)
        for v in range(2000, 2100, 10):
            out.publish_samples(stream, samples(TAGS[0], range(v, v + 10)))
        topic = "diode/site/plc1/t0"
        await until(lambda: set(got.values(topic)) == set(range(2100)))
        firsts = list(dict.fromkeys(got.values(topic)))
        assert firsts == sorted(firsts)
        assert out.counters["reconnects"] == 1
        await until(lambda: out.counters["spool_depth"] == 0)


async def test_the_failover_watch_reaches_the_broker_through_the_socket(
    broker: Mosquitto, tmp_path: Path
) -> None:
    # The standby watches its peer's status on the same broker, by the same way in: what
    # the peer says on the test broker (its TCP port) reaches the watch through the socket.
    watch = Failover(
        unix_config(broker, tmp_path),
        FailoverSection(peer_status_topic=PEER_STATUS),
        was_active=False,
    )
    task = asyncio.create_task(watch.run())
    try:
        await until(lambda: watch.connected_at is not None)
        async with aiomqtt.Client("127.0.0.1", broker.port) as peer:
            await peer.publish(PEER_STATUS, b'{"online": false}', qos=1)
        await until(lambda: watch.peer_offline)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def check_as_another_user(path: Path) -> str:
    """usable_broker_socket(path) in a child running as ``nobody``: its error, or ""."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        message = b""
        try:
            os.setgid(NOBODY)
            os.setgroups([])
            os.setuid(NOBODY)
            usable_broker_socket(path, "mqtt.socket")
        except SettingError as exc:
            message = str(exc).encode()
        except BaseException as exc:
            message = f"unexpected: {exc!r}".encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


def test_startup_refuses_a_socket_path_it_could_never_connect_to(
    socket_dir: Path, tmp_path: Path
) -> None:
    usable_broker_socket(socket_dir / "absent.sock", "mqtt.socket")  # the broker starts later
    plain = tmp_path / "plain.file"
    plain.write_text("")
    with pytest.raises(SettingError, match="is not a socket"):
        usable_broker_socket(plain, "mqtt.socket")
    path = socket_dir / "broker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(path))
        usable_broker_socket(path, "mqtt.socket")  # no broker behind it yet: fine
        if os.geteuid() != 0:
            pytest.skip("the permission checks need root, to become another user")
        # As mosquitto makes it: srwxrwx--- for its own user and group only.
        path.chmod(0o770)
        socket_dir.chmod(0o700)
        assert "cannot reach" in check_as_another_user(path)
        socket_dir.chmod(0o755)
        assert "may not connect to it" in check_as_another_user(path)
        os.chown(path, 0, NOBODY)  # nobody in the socket's group: allowed
        assert check_as_another_user(path) == ""
