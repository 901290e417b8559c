"""Syslog from the OT side to a real rsyslog collector and to MQTT, through the diode.

Real parts: util-linux ``logger`` and a Python RFC 5424 sender on the OT side,
the transmitter and receiver daemons' classes, a fault relay on real UDP, a
real rsyslog started by the test as the collector, a real mosquitto.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diode.syslog import octet_counted
from tests.e2e import Plant, Subscriber, wait_until
from tests.support.mosquitto import Mosquitto
from tests.support.net import free_port
from tests.support.relay import Faults
from tests.support.rsyslog import Rsyslog

EVENTS = "diode/test/$events"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Rsyslog]:
    rsyslog = Rsyslog(tmp_path / "rsyslog")
    (tmp_path / "rsyslog").mkdir()
    rsyslog.start()
    try:
        yield rsyslog
    finally:
        rsyslog.stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto.port, EVENTS)
    yield sub
    sub.close()


def syslog_sections(udp: int, tcp: int, collector: int, **syslog: Any) -> dict[str, Any]:
    return {
        "tx": {
            "syslog": {
                "listeners": [
                    {"address": "127.0.0.1", "port": udp, "protocol": "udp"},
                    {"address": "127.0.0.1", "port": tcp, "protocol": "tcp"},
                ],
                "allow": ["127.0.0.1/32"],
                "rate_per_source": 50_000.0,
                "burst_per_source": 50_000.0,
                **syslog,
            }
        },
        "rx": {"soc": {"collector_host": "127.0.0.1", "collector_port": collector}},
    }


@dataclass
class SocPlant(Plant):
    udp_port: int = 0
    tcp_port: int = 0


@pytest.fixture
async def plant(
    tmp_path: Path, mosquitto: Mosquitto, collector: Rsyslog
) -> AsyncIterator[SocPlant]:
    plant = SocPlant(tmp_path, mosquitto.port)
    plant.udp_port, plant.tcp_port = free_port(socket.SOCK_DGRAM), free_port()
    sections = syslog_sections(plant.udp_port, plant.tcp_port, collector.port)
    plant.tx_sections, plant.rx_sections = sections["tx"], sections["rx"]
    await plant.start_plc()
    try:
        yield plant
    finally:
        await plant.close()


def logger(args: list[str], lines: list[str]) -> None:
    subprocess.run(["logger", *args], input="\n".join(lines) + "\n", text=True, check=True)


def python_5424_tcp(port: int, ids: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"".join(
                octet_counted(
                    b"<134>1 2026-12-06T12:00:00.000Z hmi-7 scada 42 AUDIT "
                    + f'[op@32473 user="eng"] {i}'.encode()
                )
                for i in ids
            )
        )


def python_udp(port: int, ids: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in ids:
            s.sendto(f"<11>Dec  6 12:00:00 fw01 kernel: DROP {i}".encode(), ("127.0.0.1", port))


def ids_at(collector: Rsyslog) -> Counter[str]:
    found: Counter[str] = Counter()
    for body, _sd in collector.messages():
        word = body.decode(errors="replace").rsplit(" ", 1)[-1]
        if word.startswith("id-"):
            found[word] += 1
    return found


def lost_reported(collector: Rsyslog) -> int:
    return sum(
        int(sd["diode@32473"]["lost"])
        for _body, sd in collector.messages()
        if "lost" in sd.get("diode@32473", {})
    )


async def test_syslog_reaches_the_collector_exactly_once_or_in_a_reported_gap(
    plant: SocPlant, collector: Rsyslog, subscriber: Subscriber
) -> None:
    plant.faults = Faults(loss=0.05, burst_every_s=0.5, burst_len=10, seed=7)
    await plant.start_relay()
    await plant.start_rx()
    tx = await plant.start_tx()
    udp, tcp = plant.udp_port, plant.tcp_port
    sent: list[str] = []

    def batch(name: str, n: int) -> list[str]:
        out = [f"id-{name}-{i}" for i in range(n)]
        sent.extend(out)
        return out

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None,
        logger,
        [
            "--server",
            "127.0.0.1",
            "--port",
            str(tcp),
            "--tcp",
            "--octet-count",
            "--rfc5424",
            "-t",
            "plc-eng",
        ],
        batch("logger5424tcp", 400),
    )
    await loop.run_in_executor(
        None,
        logger,
        ["--server", "127.0.0.1", "--port", str(tcp), "--tcp", "--rfc3164", "-t", "switch"],
        batch("logger3164tcp", 400),
    )
    await loop.run_in_executor(
        None,
        logger,
        ["--server", "127.0.0.1", "--port", str(udp), "--udp", "--rfc5424", "-t", "hmi"],
        batch("logger5424udp", 200),
    )
    await loop.run_in_executor(None, python_5424_tcp, tcp, batch("py5424", 1000))
    await loop.run_in_executor(None, python_udp, udp, batch("pyudp", 200))

    def accounted() -> bool:
        return sum(ids_at(collector).values()) + lost_reported(collector) >= len(sent)

    await wait_until(accounted, within=60)
    found = ids_at(collector)
    assert set(found) <= set(sent)
    assert max(found.values()) == 1, "a message reached the collector twice"
    assert len(found) + lost_reported(collector) == len(sent)
    counters = tx.counters()
    assert counters["syslog_received"] == len(sent)
    assert counters["syslog_denied"] == counters["syslog_rate_dropped"] == 0
    assert plant.relay is not None
    assert plant.relay.stats.dropped > 0, "the relay lost nothing: the test proves nothing"
    # The same messages as ECS documents on MQTT.
    await wait_until(
        lambda: (
            sum(
                1
                for m in subscriber.on(EVENTS)
                if m.get("event", {}).get("dataset") == "diode.syslog"
            )
            >= len(found)
        ),
        within=30,
    )
    docs = [m for m in subscriber.on(EVENTS) if m["event"]["dataset"] == "diode.syslog"]
    py = next(d for d in docs if d["message"].endswith("id-py5424-0"))
    assert py["log"]["syslog"]["hostname"] == "hmi-7"
    assert py["log"]["syslog"]["appname"] == "scada"
    assert py["log"]["syslog"]["msgid"] == "AUDIT"
    assert py["log"]["syslog"]["severity"]["name"] == "informational"
    assert py["log"]["syslog"]["structured_data"]["op@32473"] == {"user": "eng"}
    assert py["source"]["ip"] == "127.0.0.1"
    fw = next(d for d in docs if d["message"].endswith("id-pyudp-0"))
    assert fw["log"]["syslog"]["hostname"] == "fw01"
    assert fw["diode"]["format"] == "rfc3164"


async def test_a_lost_block_is_a_reported_gap_of_exactly_its_messages(
    plant: SocPlant, collector: Rsyslog
) -> None:
    """Loss beyond FEC (the relay drops everything for a while): counted, never silent."""
    await plant.start_relay()
    await plant.start_rx()
    await plant.start_tx()
    tcp = plant.tcp_port
    loop = asyncio.get_running_loop()
    before = [f"id-a-{i}" for i in range(50)]
    await loop.run_in_executor(None, python_5424_tcp, tcp, before)
    await wait_until(lambda: sum(ids_at(collector).values()) == 50, within=30)
    assert plant.relay is not None
    plant.relay.faults.loss = 1.0
    during = [f"id-b-{i}" for i in range(300)]
    await loop.run_in_executor(None, python_5424_tcp, tcp, during)
    await asyncio.sleep(1.0)
    plant.relay.faults.loss = 0.0
    after = [f"id-c-{i}" for i in range(50)]
    await loop.run_in_executor(None, python_5424_tcp, tcp, after)
    total = 400
    await wait_until(
        lambda: sum(ids_at(collector).values()) + lost_reported(collector) == total, within=30
    )
    found = ids_at(collector)
    assert max(found.values()) == 1
    assert not any(i.startswith("id-b-") for i in found)
    assert lost_reported(collector) == 300
