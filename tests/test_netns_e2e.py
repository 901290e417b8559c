"""The whole diode between two network namespaces, with the way back closed.

OT namespace: a Modbus PLC simulator and diode-tx, the link interface
dropping everything arriving, a static neighbour entry for the receiver (no
ARP reply can come back). IT namespace: diode-rx pinned to the link interface
(``receiver.interface``), mosquitto and a subscriber, the link interface
dropping everything leaving and the link port taken from the link only. Values flow end to end, and
the interface counters prove nothing crossed the link the other way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diode.keys import write_keypair
from tests.support.mosquitto import MOSQUITTO
from tests.test_linkrules import RX_IP, Link, link  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINK_PORT = 5140
BROKER_PORT = 1883  # inside the IT namespace: its own loopback, no clash with the host's
PLC_PORT = 5020

PLC = textwrap.dedent(
    f"""
    import asyncio, sys
    sys.path.insert(0, {str(ROOT)!r})
    from tests.support.modbus_server import ModbusSimServer

    async def main():
        plc = ModbusSimServer(units=[1], port={PLC_PORT})
        await plc.start()
        print("plc up", flush=True)
        value = 0
        while True:
            value += 1
            plc.set_registers(1, "holding_register", 0, [value])
            await asyncio.sleep(0.2)

    asyncio.run(main())
    """
)


def tx_config(tmp: Path) -> Path:
    path = tmp / "tx.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [transmitter]
            stream_id = 1
            private_key = "keys/tx.key"
            state_dir = "tx-state"
            heartbeat_interval_s = 0.5

            [link]
            destination = "{RX_IP}"
            port = {LINK_PORT}
            rate_mbps = 50.0

            [[modbus.devices]]
            name = "plc1"
            host = "127.0.0.1"
            port = {PLC_PORT}
            poll_interval_s = 0.1

            [[modbus.devices.units]]
            id = 1

            [[modbus.devices.units.tags]]
            name = "count"
            table = "holding_register"
            address = 0
            type = "uint16"
            """
        )
    )
    return path


def rx_config(tmp: Path, interface: str) -> Path:
    path = tmp / "rx.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [receiver]
            listen = "{RX_IP}"
            interface = "{interface}"
            port = {LINK_PORT}
            state_dir = "rx-state"

            [mqtt]
            host = "127.0.0.1"
            port = {BROKER_PORT}
            spool_path = "rx-state/spool.sqlite3"

            [[streams]]
            id = 1
            public_keys = ["keys/tx.pub"]

            [streams.output]
            site = "netns"
            qos = 0
            """
        )
    )
    return path


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, *argv: str, cwd: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> dict[int, tuple[str, str]]:
        """Stop them all, newest first; each one's (stdout, stderr) by pid."""
        outputs = {}
        for proc in reversed(self.procs):
            if proc.returncode is not None:
                continue
            proc.terminate()
            try:
                outputs[proc.pid] = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs[proc.pid] = proc.communicate()
        return outputs


def statistic(net: Link, ns: str, iface: str, name: str) -> int:
    return int(net.run(ns, "cat", f"/sys/class/net/{iface}/statistics/{name}"))


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop()


@pytest.mark.netns
def test_values_flow_end_to_end_with_the_way_back_closed(
    link: Link,  # noqa: F811 - the fixture imported above
    processes: Processes,
    tmp_path: Path,
) -> None:
    if not shutil.which("mosquitto_sub"):
        pytest.fail("mosquitto_sub is missing: `make system-deps` installs mosquitto-clients")
    write_keypair(tmp_path / "keys", "tx")
    # One way, enforced on both hosts, and the only way to reach the receiver's
    # MAC is the static entry: the receiver cannot answer ARP through its rules.
    link.load(link.tx, "tx")
    link.load(link.rx, "rx")
    link.flush_neighbours()
    link.static_neighbour(link.tx, link.tx_if, RX_IP, link.mac(link.rx, link.rx_if))
    before = {
        "rx_sent": statistic(link, link.rx, link.rx_if, "tx_packets"),
        "tx_got": statistic(link, link.tx, link.tx_if, "rx_packets"),
    }
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {BROKER_PORT} 127.0.0.1\nallow_anonymous true\n")
    processes.start(link.rx, MOSQUITTO, "-c", str(conf), cwd=tmp_path)
    time.sleep(0.5)
    subscriber = processes.start(
        link.rx, "mosquitto_sub", "-p", str(BROKER_PORT), "-t", "diode/#", "-v", cwd=tmp_path
    )
    processes.start(
        link.rx,
        str(BIN / "diode-rx"),
        "--config",
        str(rx_config(tmp_path, link.rx_if)),
        cwd=tmp_path,
    )
    plc = processes.start(link.tx, sys.executable, "-c", PLC, cwd=tmp_path)
    assert plc.stdout is not None
    assert plc.stdout.readline().strip() == "plc up"
    processes.start(
        link.tx, str(BIN / "diode-tx"), "--config", str(tx_config(tmp_path)), cwd=tmp_path
    )

    time.sleep(6)
    outputs = processes.stop()
    lines = outputs[subscriber.pid][0].splitlines()
    errors = {pid: err for pid, (_, err) in outputs.items()}
    values = [
        json.loads(line.split(" ", 1)[1])["value"]
        for line in lines
        if line.startswith("diode/netns/plc1/count ")
    ]
    assert len(values) >= 10, (lines[:5], errors)
    assert values == sorted(values), "values arrive in order"
    assert statistic(link, link.rx, link.rx_if, "tx_packets") == before["rx_sent"], (
        "a packet left the receiver host on the link"
    )
    assert statistic(link, link.tx, link.tx_if, "rx_packets") == before["tx_got"], (
        "a packet reached the transmitter host from the link"
    )
    assert statistic(link, link.rx, link.rx_if, "rx_packets") > 0
    for pid, err in errors.items():
        assert "Traceback" not in err, (pid, err)
