"""The SOC tests' plant (syslog listeners on the transmitter, a collector on the receiver),
its fixtures and the helpers that send and count."""

from __future__ import annotations

import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diode.loopback import free_port
from diode.syslog import octet_counted
from tests.e2e import Plant, Subscriber
from tests.support.mosquitto import Mosquitto
from tests.support.rsyslog import Rsyslog

EVENTS = "diode/test/$events"


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


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Rsyslog]:
    """A real rsyslog on a free port, its own config in the test's folder."""
    (tmp_path / "rsyslog").mkdir()
    rsyslog = Rsyslog(tmp_path / "rsyslog")
    rsyslog.start()
    try:
        yield rsyslog
    finally:
        rsyslog.stop()


@pytest.fixture
def events(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    """Every message on ``diode/test/$events``."""
    sub = Subscriber(mosquitto.port, EVENTS)
    yield sub
    sub.close()


@pytest.fixture
async def soc_plant(
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
