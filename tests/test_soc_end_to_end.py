"""Syslog from the OT side to a real rsyslog collector and to MQTT, through the diode.

Real parts: util-linux ``logger`` and a Python RFC 5424 sender on the OT side,
the transmitter and receiver daemons' classes, a fault relay on real UDP, a
real rsyslog started by the test as the collector, a real mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import urllib.request
from pathlib import Path

from diode.loopback import free_port
from tests.e2e import STREAM, Subscriber, sockets_die_with, wait_until
from tests.support.relay import Faults
from tests.support.rsyslog import Rsyslog
from tests.support.soc import (
    EVENTS,
    SocPlant,
    ids_at,
    logger,
    lost_reported,
    python_5424_tcp,
    python_udp,
)


async def test_syslog_reaches_the_collector_exactly_once_or_in_a_reported_gap(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    soc_plant.faults = Faults(loss=0.05, burst_every_s=0.5, burst_len=10, seed=7)
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    udp, tcp = soc_plant.udp_port, soc_plant.tcp_port
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
    assert soc_plant.relay is not None
    assert soc_plant.relay.stats.dropped > 0, "the relay lost nothing: the test proves nothing"
    # The same messages as ECS documents on MQTT.
    await wait_until(
        lambda: (
            sum(1 for m in events.on(EVENTS) if m.get("event", {}).get("dataset") == "diode.syslog")
            >= len(found)
        ),
        within=30,
    )
    docs = [m for m in events.on(EVENTS) if m["event"]["dataset"] == "diode.syslog"]
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
    soc_plant: SocPlant, collector: Rsyslog
) -> None:
    """Loss beyond FEC (the relay drops everything for a while): counted, never silent."""
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    tcp = soc_plant.tcp_port
    loop = asyncio.get_running_loop()
    before = [f"id-a-{i}" for i in range(50)]
    await loop.run_in_executor(None, python_5424_tcp, tcp, before)
    await wait_until(lambda: sum(ids_at(collector).values()) == 50, within=30)
    assert soc_plant.relay is not None
    soc_plant.relay.faults.loss = 1.0
    during = [f"id-b-{i}" for i in range(300)]
    await loop.run_in_executor(None, python_5424_tcp, tcp, during)
    await asyncio.sleep(1.0)
    soc_plant.relay.faults.loss = 0.0
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


async def test_allow_list_and_rate_limit_drop_and_count(
    soc_plant: SocPlant, collector: Rsyslog
) -> None:
    """A source off the list is refused; a chatty one is cut to its rate; both counted."""
    soc_plant.tx_sections["syslog"].update(rate_per_source=20.0, burst_per_source=50.0)
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    # 127.0.0.2 is a loopback address too, but not on the allow-list.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        for i in range(30):
            s.sendto(f"<13>1 - - - - - - id-denied-{i}".encode(), ("127.0.0.1", soc_plant.udp_port))
    with socket.create_connection(
        ("127.0.0.1", soc_plant.tcp_port), source_address=("127.0.0.2", 0)
    ):
        pass
    chatty = [f"id-chatty-{i}" for i in range(1000)]
    await asyncio.get_running_loop().run_in_executor(
        None, python_5424_tcp, soc_plant.tcp_port, chatty
    )
    counters = tx.syslog.counters
    await wait_until(lambda: counters["syslog_denied"] == 30, within=10)
    await wait_until(
        lambda: counters["syslog_received"] + counters["syslog_rate_dropped"] == 1000, within=10
    )
    assert counters["syslog_connections_refused"] == 1
    # The burst and about a second of the rate got through; the rest was cut.
    assert 50 <= counters["syslog_received"] < 200
    await wait_until(lambda: len(ids_at(collector)) == counters["syslog_received"], within=20)
    assert not any(i.startswith("id-denied") for i in ids_at(collector))
    # The counts ride on the heartbeat to the IT side.
    view = rx.router.streams[11]
    await wait_until(
        lambda: (
            view.heartbeat is not None
            and view.heartbeat.counters.get("syslog_rate_dropped")
            == counters["syslog_rate_dropped"]
        ),
        within=10,
    )


def _our_sockets(table: str, state: str | None) -> set[tuple[str, int]]:
    """(address, port) of this process's sockets in /proc/net/``table`` (IPv4)."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                ours.add(target[len("socket:[") : -1])
    found = set()
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in ours and (state is None or fields[3] == state):
            address, port = fields[1].split(":")
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
            found.add((ip, int(port, 16)))
    return found


async def test_syslog_listens_only_on_the_ot_addresses_given(soc_plant: SocPlant) -> None:
    """Property 1 with syslog on: the only new sockets are the configured OT ones."""
    ot = "127.0.0.2"  # the OT address; the link leaves from 127.0.0.1
    soc_plant.link_overrides["source"] = "127.0.0.1"
    for listener in soc_plant.tx_sections["syslog"]["listeners"]:
        listener["address"] = ot
    soc_plant.tx_sections["syslog"]["allow"] = ["127.0.0.0/8"]
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    tcp_before, udp_before = _our_sockets("tcp", "0A"), _our_sockets("udp", None)
    tx = await soc_plant.start_tx()
    tcp = _our_sockets("tcp", "0A") - tcp_before
    udp = _our_sockets("udp", None) - udp_before
    assert tcp == {(ot, soc_plant.tcp_port)}
    link = tx.sock.getsockname()
    assert udp == {(ot, soc_plant.udp_port), (link[0], link[1])}
    assert link[0] == "127.0.0.1"


async def test_kernel_drops_on_the_udp_listener_are_counted_up_to_the_it_side(
    soc_plant: SocPlant, collector: Rsyslog
) -> None:
    """A real overflow: a tiny receive buffer, a burst, and the listener not reading.

    Every datagram sent is either taken by the transmitter (and reaches the
    collector) or counted by the kernel as dropped; the count reaches the IT
    side on the heartbeat: ``$status`` and the receiver's metrics.
    """
    metrics = free_port()
    soc_plant.rx_overrides["metrics_port"] = metrics
    status = Subscriber(soc_plant.broker_port, "diode/test/$status")
    try:
        await soc_plant.start_relay()
        rx = await soc_plant.start_rx()
        tx = await soc_plant.start_tx()
        (listener,) = tx.syslog.udp_sockets
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        burst = [f"id-k-{i}" for i in range(3000)]
        # Sent from the event loop's own thread: the transmitter cannot read meanwhile.
        python_udp(soc_plant.udp_port, burst)
        counters = tx.syslog.counters
        await wait_until(
            lambda: (
                tx.syslog.counters_all()["syslog_kernel_drops"] + counters["syslog_received"]
                == len(burst)
            ),
            within=20,
        )
        dropped = counters["syslog_kernel_drops"]
        assert 0 < dropped < len(burst)
        await wait_until(lambda: len(ids_at(collector)) == counters["syslog_received"], within=30)

        def reported() -> int | None:
            view = rx.router.streams.get(STREAM)
            beat = view.heartbeat if view is not None else None
            return None if beat is None else beat.counters.get("syslog_kernel_drops")

        await wait_until(lambda: reported() == dropped, within=20)
        await wait_until(
            lambda: any(
                m.get("transmitter", {}).get("syslog_kernel_drops") == dropped
                for m in status.on("diode/test/$status")
            ),
            within=30,
        )

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                return str(r.read().decode())

        text = await asyncio.get_running_loop().run_in_executor(None, scrape)
        assert f'diode_tx_syslog_kernel_drops_total{{stream="{STREAM}"}} {float(dropped)}' in text
    finally:
        status.close()


async def test_messages_lost_while_the_receiver_was_killed_reach_the_soc(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    """The receiver dies without a shutdown (its socket and queue with it) and starts again.

    What the transmitter sent meanwhile is lost; the restarted receiver knows
    where the log lane stood at its last commit and reports the exact count,
    with the times between which they were lost, to the collector and on MQTT.
    """
    await soc_plant.start_relay()
    old = await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    tcp = soc_plant.tcp_port
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, python_5424_tcp, tcp, [f"id-r1-{i}" for i in range(50)])
    await wait_until(lambda: sum(ids_at(collector).values()) == 50, within=30)
    soc_plant.kill("rx")  # no shutdown path: what it committed is on disk, nothing more
    await asyncio.sleep(0.2)
    sockets_die_with(old)
    lane = tx.syslog.lane.counters
    queued = lane["log_queued"]
    await loop.run_in_executor(None, python_5424_tcp, tcp, [f"id-r2-{i}" for i in range(200)])
    await wait_until(lambda: lane["log_seq_framed"] >= queued + 200, within=20)
    await asyncio.sleep(1.0)  # sent (the link is fast) into the void
    await soc_plant.start_rx()
    await loop.run_in_executor(None, python_5424_tcp, tcp, [f"id-r3-{i}" for i in range(50)])
    await wait_until(lambda: sum(ids_at(collector).values()) == 100, within=30)
    await wait_until(lambda: lost_reported(collector) >= 200, within=30)
    found = ids_at(collector)
    assert max(found.values()) == 1
    assert not any(i.startswith("id-r2-") for i in found)
    assert lost_reported(collector) == 200
    lines = [line for line in collector.lines() if b"log-messages-lost" in line]
    assert any(b"syslog messages lost between " in line for line in lines)

    def on_mqtt() -> list[dict[str, object]]:
        return [
            m for m in events.on(EVENTS) if m.get("event", {}).get("action") == "log-messages-lost"
        ]

    await wait_until(on_mqtt, within=20)
    labels = on_mqtt()[0]["labels"]
    assert isinstance(labels, dict)
    assert int(labels["lost"]) >= 200
    assert labels["after"] < labels["before"]
