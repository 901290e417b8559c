"""Security events of diode's own, driven by the real simulators, read at the collector and on MQTT.

Each test provokes the thing itself (a PLC swapped for another, a flood of
forged datagrams, a replay of an old epoch, a PLC answering every read with an
exception, a collector that stops reading) and reads the event where a SOC
would: the rsyslog collector the test started, and ``{prefix}/{site}/$events``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from diode.benchmarks.harness import to_toml
from diode.config.link import LinkSettings
from diode.encoder import Encoder
from diode.keys import SigningKey, write_keypair
from diode.loopback import free_port
from diode.records import Heartbeat
from receiver.soc import MALFORMED
from tests.e2e import STREAM, Subscriber, wait_until
from tests.support import sparkplug_host as spb
from tests.support.modbus_server import ModbusSimServer
from tests.support.mosquitto import Mosquitto
from tests.support.opcua_server import OpcuaTestServer, node_id
from tests.support.rsyslog import Rsyslog
from tests.support.soc import (
    EVENTS,
    SocPlant,
    ids_at,
    lost_reported,
    python_5424_tcp,
)
from tests.test_mqtt_tls import make_pki
from tests.test_sparkplug_e2e import DCMD, NCMD, sparkplug_output

SD = "diode@32473"


def events_at(collector: Rsyslog, action: str) -> list[dict[str, str]]:
    """The SD parameters of every event ``action`` the collector received."""
    out = []
    for line in collector.lines():
        parts = line.split(b" ", 6)
        if len(parts) > 5 and parts[5] == action.encode():
            from diode.syslog import parse_sd, parse_syslog

            out.append(parse_sd(parse_syslog(line).sd).get(SD, {}))
    return out


def mqtt_events(events: Subscriber, action: str) -> list[dict[str, Any]]:
    return [m for m in events.on(EVENTS) if m.get("event", {}).get("action") == action]


async def on_mqtt_too(events: Subscriber, *actions: str) -> None:
    """Each of ``actions`` (already read at the collector) also on ``$events``."""
    for action in actions:
        await wait_until(lambda a=action: mqtt_events(events, a), within=20)
        doc = mqtt_events(events, action)[0]
        assert doc["event"]["dataset"] == "diode.security"
        assert doc["observer"]["type"] == "data-diode"


async def test_a_swapped_plc_is_a_critical_event(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    assert soc_plant.plc is not None
    await soc_plant.plc.stop()
    port = soc_plant.plc.port
    soc_plant.plc = ModbusSimServer(port=port, identity={0: "Acme", 1: "PLC-100", 2: "2.1.0"})
    await soc_plant.plc.start()
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "device-identity-recorded"), within=20)
    assert not events_at(collector, "device-identity-changed")
    # The PLC goes away and another answers on its address: reflashed firmware.
    await soc_plant.plc.stop()
    await wait_until(lambda: events_at(collector, "device-disappeared"), within=20)
    soc_plant.plc = ModbusSimServer(port=port, identity={0: "Acme", 1: "PLC-100", 2: "6.6.6"})
    await soc_plant.plc.start()
    await wait_until(lambda: events_at(collector, "device-identity-changed"), within=30)
    (changed,) = events_at(collector, "device-identity-changed")
    assert changed["device"] == "plc1"
    assert changed["changed"] == "revision"
    assert "revision=2.1.0" in changed["old"]
    assert "revision=6.6.6" in changed["new"]
    await wait_until(lambda: events_at(collector, "device-appeared"), within=20)
    await wait_until(lambda: mqtt_events(events, "device-identity-changed"), within=20)
    (doc,) = mqtt_events(events, "device-identity-changed")
    assert doc["event"]["kind"] == "alert"
    assert doc["log"]["syslog"]["severity"]["name"] == "critical"
    assert doc["labels"]["device"] == "plc1"
    await on_mqtt_too(events, "device-identity-recorded", "device-disappeared", "device-appeared")


async def test_the_identity_is_remembered_across_a_restart(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    assert soc_plant.plc is not None
    await soc_plant.plc.stop()
    port = soc_plant.plc.port
    soc_plant.plc = ModbusSimServer(port=port, identity={0: "Acme", 1: "PLC-100", 2: "2.1.0"})
    await soc_plant.plc.start()
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "device-identity-recorded"), within=20)
    await soc_plant.stop("tx")
    await soc_plant.plc.stop()
    soc_plant.plc = ModbusSimServer(port=port, identity={0: "Other", 1: "PLC-100", 2: "2.1.0"})
    await soc_plant.plc.start()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "device-identity-changed"), within=30)
    assert events_at(collector, "device-identity-changed")[0]["changed"] == "vendor_name"
    await wait_until(lambda: events_at(collector, "epoch-changed"), within=20)
    assert events_at(collector, "daemon-stop")
    assert len(events_at(collector, "daemon-start")) == 2
    await on_mqtt_too(events, "daemon-start", "daemon-stop", "epoch-changed")


async def test_modbus_exception_burst(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    soc_plant.tx_sections["syslog"]["exception_burst"] = 5
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    assert soc_plant.plc is not None
    soc_plant.plc.exception[1] = 4  # every read: server device failure
    await wait_until(lambda: events_at(collector, "modbus-exception-burst"), within=30)
    event = events_at(collector, "modbus-exception-burst")[0]
    assert event["device"] == "plc1"
    assert int(event["exceptions"]) >= 5
    await on_mqtt_too(events, "modbus-exception-burst")


def forged_datagrams(blocks: int) -> list[bytes]:
    """Well-formed, signed by a key the receiver does not trust, claiming its stream."""
    # A current epoch: an old one would be turned away as a replay before its key is read.
    epoch = time.time_ns() // 1_000_000
    encoder = Encoder(
        link=LinkSettings(), key=SigningKey.generate(), stream_id=STREAM, epoch=epoch, psk=None
    )
    for i in range(blocks):
        encoder.add(Heartbeat(ts_ns=i, counters={}), 0.0)
        encoder.flush()
    return [d for block in encoder.take() for d in block.datagrams]


async def test_forged_and_replayed_datagrams_are_reported_as_rates(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    soc_plant.rx_sections["soc"]["rejected_report_s"] = 1.0
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "link-up"), within=20)
    forged = forged_datagrams(50)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in forged:
            s.sendto(datagram, ("127.0.0.1", soc_plant.rx_port))
            await asyncio.sleep(0)
    await wait_until(lambda: events_at(collector, "datagrams-forged"), within=20)
    total = sum(int(e["count"]) for e in events_at(collector, "datagrams-forged"))
    await wait_until(
        lambda: (
            sum(int(e["count"]) for e in events_at(collector, "datagrams-forged"))
            == rx.decoder.counters["rejected_unknown_key"]
        ),
        within=10,
    )
    total = sum(int(e["count"]) for e in events_at(collector, "datagrams-forged"))
    assert total == len(forged)
    assert float(events_at(collector, "datagrams-forged")[0]["rate_per_s"]) > 0
    # A capture of the first run, replayed after the transmitter restarted.
    assert soc_plant.relay is not None
    captured = list(soc_plant.relay.capture)
    await soc_plant.stop("tx")
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "epoch-changed"), within=20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in captured[:200]:
            s.sendto(datagram, ("127.0.0.1", soc_plant.rx_port))
            await asyncio.sleep(0)
    await wait_until(lambda: events_at(collector, "datagrams-replayed"), within=20)

    # The kernel steers them to the replays' quarantine (receiver/steer.py), among the
    # stream's own late copies in the other one; without steering the decoder counts them.
    # Each is reported, whichever counted it.
    def reported() -> int:
        return sum(int(e["count"]) for e in events_at(collector, "datagrams-replayed"))

    def counted() -> int:
        counters = rx.counters()
        return int(counters.get("rejected_steered_replay", 0) + counters.get("rejected_replay", 0))

    await wait_until(lambda: reported() == counted(), within=10)
    assert reported() > 0
    await on_mqtt_too(events, "datagrams-forged", "datagrams-replayed", "epoch-changed")


async def test_malformed_datagrams_are_reported_as_a_rate(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    """Garbage on the link port (too short, wrong magic): one event per period, counted."""
    soc_plant.rx_sections["soc"]["rejected_report_s"] = 1.0
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "link-up"), within=20)
    garbage = [b"\x00" * 3, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 200] * 30
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in garbage:
            s.sendto(datagram, ("127.0.0.1", soc_plant.rx_port))
    counters = rx.decoder.counters

    def reported() -> int:
        return sum(int(e["count"]) for e in events_at(collector, "datagrams-malformed"))

    await wait_until(lambda: reported() == len(garbage), within=20)
    assert sum(counters.get(f"rejected_{r}", 0) for r in MALFORMED) == len(garbage)
    assert len(events_at(collector, "datagrams-malformed")) < len(garbage), "a rate, not each"
    await on_mqtt_too(events, "datagrams-malformed")


async def test_link_down_and_up(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    soc_plant.output_overrides["link_timeout_s"] = 1.0
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "link-up"), within=20)
    assert soc_plant.relay is not None
    soc_plant.relay.faults.loss = 1.0
    await wait_until(lambda: events_at(collector, "link-down"), within=20)
    soc_plant.relay.faults.loss = 0.0
    await wait_until(lambda: len(events_at(collector, "link-up")) == 2, within=20)
    await wait_until(lambda: events_at(collector, "records-lost"), within=20)
    await on_mqtt_too(events, "link-up", "link-down", "records-lost")


class StallingProxy:
    """A TCP proxy in front of the collector that stops reading while ``paused`` is set."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        # A small window, set before listen() so the connection is born with it.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.paused = threading.Event()
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn, socket.create_connection(("127.0.0.1", self.target)) as out:
            while True:
                while self.paused.is_set():
                    threading.Event().wait(0.01)
                data = conn.recv(65536)
                if not data:
                    return
                out.sendall(data)


async def test_a_stalled_collector_never_slows_telemetry(
    soc_plant: SocPlant, collector: Rsyslog
) -> None:
    """The collector stops reading; the TCP window fills; values still flow; then all arrive."""
    proxy = StallingProxy(collector.port)
    proxy.paused.set()
    soc_plant.rx_sections["soc"]["collector_port"] = proxy.port
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    await soc_plant.start_tx()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proxy.accepted.wait, 10)
    ids = [f"id-s-{i}-" + "x" * 2000 for i in range(3000)]
    await loop.run_in_executor(None, python_5424_tcp, soc_plant.tcp_port, ids)
    counters = rx.soc.counters
    # Every message arrived or was reported lost (a busy host may overflow a socket).
    await wait_until(lambda: counters["soc_logs"] + counters["soc_logs_lost"] >= 3000, within=60)
    assert counters["soc_spool_depth"] > 500, "the collector was not stalled"
    # Values still arrive at once while the forwarder waits on the full window.
    assert soc_plant.plc is not None
    count_topic = "diode/test/plc1/count"
    values = Subscriber(soc_plant.broker_port, count_topic)
    try:
        for value in (111, 222, 333):
            soc_plant.plc.set_registers(1, "holding_register", 10, [0, value])
            await wait_until(
                lambda v=value: any(m.get("value") == v for m in values.on(count_topic)),
                within=5,
            )
    finally:
        values.close()
    assert counters["soc_spool_depth"] > 500, "the collector was not stalled"
    proxy.paused.clear()
    await wait_until(lambda: len(ids_at(collector)) + counters["soc_logs_lost"] == 3000, within=60)
    assert max(ids_at(collector).values()) == 1
    assert lost_reported(collector) == counters["soc_logs_lost"]


async def test_collector_down_then_back_loses_nothing(
    soc_plant: SocPlant, collector: Rsyslog
) -> None:
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "link-up"), within=20)
    collector.stop()
    loop = asyncio.get_running_loop()
    ids = [f"id-d-{i}" for i in range(500)]
    await loop.run_in_executor(None, python_5424_tcp, soc_plant.tcp_port, ids)
    await wait_until(lambda: rx.soc.counters["soc_logs"] >= 500, within=20)
    await wait_until(lambda: rx.soc.counters["soc_collector_errors"] > 0, within=20)
    collector.start()
    await wait_until(lambda: len(ids_at(collector)) == 500, within=30)
    assert max(ids_at(collector).values()) == 1


async def test_tls_in_and_out(tmp_path: Path, soc_plant: SocPlant) -> None:
    """A TLS syslog sender on the OT side; TLS to the collector.

    The collector here is a Python ssl server: the distribution's rsyslog has
    TLS only with its separate gnutls/openssl driver package.
    """
    ca, cert, key = make_pki(tmp_path)
    soc_plant.tx_sections["syslog"]["listeners"].append(
        {"address": "127.0.0.1", "port": free_port(), "protocol": "tls"}
    )
    soc_plant.tx_sections["syslog"]["certfile"] = str(cert)
    soc_plant.tx_sections["syslog"]["keyfile"] = str(key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    got = bytearray()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(65536):
                got.extend(data)

    threading.Thread(target=serve, daemon=True).start()
    soc_plant.rx_sections["soc"].update(
        collector_port=listener.getsockname()[1], tls=True, ca_file=str(ca)
    )
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    tls_port = next(port for _, port, proto in tx.syslog.bound if proto == "tls")
    client_ctx = ssl.create_default_context(cafile=str(ca))

    def send() -> None:
        with (
            socket.create_connection(("127.0.0.1", tls_port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"27 <13>1 - - - - - - id-tls-1\n<13>id-tls-2\n")

    await asyncio.get_running_loop().run_in_executor(None, send)
    await wait_until(lambda: b"id-tls-1" in got and b"id-tls-2" in got, within=20)
    listener.close()


def test_check_config_refuses_a_listener_on_the_link(tmp_path: Path) -> None:
    (tmp_path / "tx.key").write_text("unused")
    base = """
[transmitter]
stream_id = 1
private_key = "tx.key"
[link]
destination = "192.168.77.2"
source = "192.168.77.1"
[syslog]
allow = ["10.0.0.0/8"]
"""
    for address, needle in (("192.168.77.1", "link's source"), ("0.0.0.0", "wildcard")):
        path = tmp_path / "tx.toml"
        path.write_text(base + f'[[syslog.listeners]]\naddress = "{address}"\n')
        done = subprocess.run(
            [str(Path(__file__).parent.parent / ".venv/bin/diode"), "check-config", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr
        assert "syslog" in done.stderr
        assert "Traceback" not in done.stderr


def server_certificate(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed OPC UA server certificate and key (a reinstalled server)."""
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "diode test server",
        {},
        [
            x509.UniformResourceIdentifier("urn:freeopcua:python:server"),
            x509.DNSName(socket.gethostname()),
        ],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "server.der", folder / "server.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.DER))
    paths[1].write_bytes(cert_gen.dump_private_key_as_pem(key))
    return paths


async def test_opcua_certificate_change_and_security_downgrade(
    tmp_path: Path, soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    first = server_certificate(tmp_path / "pki-a")
    second = server_certificate(tmp_path / "pki-b")
    # Both are trusted (two servers of the plant's own CA, say): the swap still shows.
    trust = tmp_path / "trust"
    trust.mkdir()
    for i, (cert, _key) in enumerate((first, second)):
        (trust / f"server{i}.der").write_bytes(cert.read_bytes())
    secure = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
    server = OpcuaTestServer(certificate=first[0], private_key=first[1], policies=secure)
    await server.start()
    soc_plant.tx_sections["opcua"] = {
        "servers": [
            {
                "name": "scada1",
                "endpoint": server.endpoint,
                "security_policy": "Basic256Sha256",
                "security_mode": "SignAndEncrypt",
                "trust_list": str(trust),
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 1.0,
                "nodes": [{"name": "level", "node_id": node_id("Level")}],
            }
        ]
    }

    def recorded(device: str) -> list[dict[str, str]]:
        found = events_at(collector, "device-identity-recorded")
        return [e for e in found if e["device"] == device]

    try:
        await soc_plant.start_relay()
        await soc_plant.start_rx()
        await soc_plant.start_tx()
        await wait_until(lambda: recorded("scada1"), within=30)
        assert "server_certificate_sha256=" in recorded("scada1")[0]["identity"]
        # The same server, now also offering an unsecured endpoint: a downgrade.
        await server.stop()
        server.policies = [*secure, ua.SecurityPolicyType.NoSecurity]
        await server.start()
        await wait_until(lambda: events_at(collector, "opcua-security-downgrade"), within=30)
        (downgrade,) = events_at(collector, "opcua-security-downgrade")
        assert downgrade["device"] == "scada1"
        assert "None/None" in downgrade["new"]
        assert "None/None" not in downgrade["old"]
        # A reinstalled server: another certificate on the same endpoint.
        await server.stop()
        server.certificate, server.private_key = second
        await server.start()

        def cert_changed() -> list[dict[str, str]]:
            return [
                e
                for e in events_at(collector, "device-identity-changed")
                if "server_certificate_sha256" in e["changed"].split(",")
            ]

        await wait_until(cert_changed, within=30)
        assert cert_changed()[0]["device"] == "scada1"
        await wait_until(lambda: mqtt_events(events, "opcua-security-downgrade"), within=10)
    finally:
        await server.stop()


async def test_an_opcua_firmware_update_alone_is_an_identity_change(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    """The same server, the same (no) certificate, a new BuildInfo: only what changed is named."""
    server = OpcuaTestServer()
    await server.start()
    soc_plant.tx_sections["opcua"] = {
        "servers": [
            {
                "name": "scada1",
                "endpoint": server.endpoint,
                "reconnect_initial_s": 0.2,
                "reconnect_max_s": 1.0,
                "nodes": [{"name": "level", "node_id": node_id("Level")}],
            }
        ]
    }

    def scada1(action: str) -> list[dict[str, str]]:
        return [e for e in events_at(collector, action) if e["device"] == "scada1"]

    try:
        await soc_plant.start_relay()
        await soc_plant.start_rx()
        await soc_plant.start_tx()
        await wait_until(lambda: scada1("device-identity-recorded"), within=30)
        assert "software_version=1.2.3" in scada1("device-identity-recorded")[0]["identity"]
        await server.stop()
        server.build_info["software_version"] = "6.6.6"
        await server.start()
        await wait_until(lambda: scada1("device-identity-changed"), within=30)
        (changed,) = scada1("device-identity-changed")
        assert changed["changed"] == "software_version"
        assert "software_version=1.2.3" in changed["old"]
        assert "software_version=6.6.6" in changed["new"]
        await wait_until(lambda: mqtt_events(events, "device-identity-changed"), within=20)
        (doc,) = mqtt_events(events, "device-identity-changed")
        assert doc["log"]["syslog"]["severity"]["name"] == "critical"
    finally:
        await server.stop()


async def test_mqtt_spool_overflow_reaches_the_collector(
    soc_plant: SocPlant, collector: Rsyslog, mosquitto: Mosquitto
) -> None:
    """The broker is away and the spool is full: the values dropped are an event at the SOC."""
    soc_plant.rx_sections["mqtt"] = {
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "client_id": "diode-rx-test",
        "spool_path": str(soc_plant.tmp / "rx-state" / "spool.sqlite"),
        "spool_max_records": 50,
    }
    mosquitto.stop()
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    await soc_plant.start_tx()
    assert soc_plant.plc is not None
    for value in range(200):
        soc_plant.plc.set_registers(1, "holding_register", 10, [0, value])
        await asyncio.sleep(0.01)
    await wait_until(lambda: events_at(collector, "mqtt-spool-overflow"), within=20)
    assert int(events_at(collector, "mqtt-spool-overflow")[0]["count"]) > 0
    # The broker back: the event waited in the spool like the values (the newest kept).
    mosquitto.start()
    events = Subscriber(mosquitto.port, EVENTS)
    try:
        await on_mqtt_too(events, "mqtt-spool-overflow")
    finally:
        events.close()


async def test_a_full_soc_spool_is_counted_and_reported_exactly(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    """The collector away and its spool full: the oldest messages go, and what went is an
    event on ``$events``, at most one a period (each takes a place in the full spool and
    pushes out one more message); the events' counts add up to the counter exactly, and
    the collector, back, gets the newest messages, each once, and the events."""
    soc_plant.rx_sections["soc"]["spool_max_messages"] = 100  # the smallest allowed
    soc_plant.rx_sections["soc"]["rejected_report_s"] = 1.0
    await soc_plant.start_relay()
    rx = await soc_plant.start_rx()
    await soc_plant.start_tx()
    await wait_until(lambda: events_at(collector, "link-up"), within=20)
    collector.stop()
    ids = [f"id-s-{i}" for i in range(600)]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, python_5424_tcp, soc_plant.tcp_port, ids)
    await wait_until(lambda: rx.soc.counters["soc_logs"] >= 600, within=20)
    await wait_until(lambda: mqtt_events(events, "soc-spool-overflow"), within=20)
    assert rx.soc.counters["soc_spool_dropped"] >= 500, rx.soc.counters  # at most 100 kept
    await asyncio.sleep(3.0)
    assert len(mqtt_events(events, "soc-spool-overflow")) <= 5  # one a period, not a storm

    def reported() -> int:
        return sum(int(doc["labels"]["count"]) for doc in mqtt_events(events, "soc-spool-overflow"))

    collector.start()
    await wait_until(lambda: events_at(collector, "soc-spool-overflow"), within=30)
    # The collector back, the spool empties and stops dropping; the last drop is reported
    # a period later, and then the events account for every message dropped.
    await wait_until(lambda: reported() == rx.soc.counters["soc_spool_dropped"], within=20)
    got = ids_at(collector)
    assert got
    assert max(got.values()) == 1
    numbers = sorted(int(i.rsplit("-", 1)[1]) for i in got)
    # The newest kept: what reached the collector is the tail of what was sent, unbroken.
    assert numbers == list(range(numbers[0], 600)), numbers[:5]
    assert len(numbers) <= 100


async def test_a_real_reload_and_a_refused_one_are_events(
    tmp_path: Path, soc_plant: SocPlant, collector: Rsyslog, events: Subscriber
) -> None:
    """What SIGHUP runs, on a config file: a change applied, then a broken file refused."""
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    data = tx.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["modbus"]["devices"][0]["poll_interval_s"] = 0.1
    path = tmp_path / "tx.toml"
    path.write_text(to_toml(data))
    assert await tx.reload(path)
    await wait_until(lambda: events_at(collector, "config-reloaded"), within=20)
    assert events_at(collector, "config-reloaded")[0]["changed"] == "changed modbus plc1"
    path.write_text(path.read_text().replace("poll_interval_s = 0.1", "poll_interval_s = -1"))
    assert not await tx.reload(path)
    await wait_until(lambda: events_at(collector, "config-reload-failed"), within=20)
    assert "poll_interval_s" in events_at(collector, "config-reload-failed")[0]["error"]
    await on_mqtt_too(events, "config-reloaded", "config-reload-failed")


async def test_a_config_reload_is_an_event(soc_plant: SocPlant, collector: Rsyslog) -> None:
    """The hook the SIGHUP reload calls (the reload itself is another change's)."""
    await soc_plant.start_relay()
    await soc_plant.start_rx()
    tx = await soc_plant.start_tx()
    tx.config_reloaded(["modbus.devices[0].poll_interval_s", "syslog.allow"])
    await wait_until(lambda: events_at(collector, "config-reloaded"), within=20)
    (event,) = events_at(collector, "config-reloaded")
    assert event["changed"] == "modbus.devices[0].poll_interval_s,syslog.allow"


def test_a_listener_that_cannot_bind_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    write_keypair(tmp_path, "tx")
    path = tmp_path / "tx.toml"
    path.write_text(
        f"""
[transmitter]
stream_id = 1
private_key = "tx.key"
state_dir = "{tmp_path / "state"}"
[link]
destination = "127.0.0.1"
port = {free_port(socket.SOCK_DGRAM)}
[syslog]
allow = ["10.0.0.0/8"]
[[syslog.listeners]]
address = "192.0.2.1"
port = 5514
"""
    )
    done = subprocess.run(
        [str(Path(__file__).parent.parent / ".venv/bin/diode-tx"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "syslog.listeners[0].address: 192.0.2.1 is not an address of this host" in done.stderr
    assert "Traceback" not in done.stderr


async def test_sparkplug_commands_refused_are_a_rate_limited_event(
    soc_plant: SocPlant, collector: Rsyslog, events: Subscriber, mosquitto: Mosquitto
) -> None:
    """A host writes to the plant through Sparkplug (DCMD, NCMD): refused, and the SOC hears.

    One event at the first command, then one per report period with the count:
    a flood of commands is a few lines at the SOC, their counts adding up.
    """
    soc_plant.output_overrides.update(sparkplug_output())
    soc_plant.rx_sections["soc"]["rejected_report_s"] = 1.0
    host = spb.SparkplugHost(mosquitto.port, host_id="scada")
    try:
        assert host.subscribed.wait(5)
        await soc_plant.start_relay()
        rx = await soc_plant.start_rx()
        await soc_plant.start_tx()
        await wait_until(lambda: host.of("DBIRTH"), within=20)
        host.send(DCMD, spb.command("count", spb.UINT32, 5))
        await wait_until(lambda: events_at(collector, "mqtt-command-refused"), within=20)
        (first,) = events_at(collector, "mqtt-command-refused")
        assert first["topic"] == DCMD
        assert first["metrics"] == "count"
        assert first["count"] == "1"
        for value in range(40):
            host.send(DCMD if value % 2 else NCMD, spb.command("count", spb.UINT32, value))
        await wait_until(
            lambda: (
                sum(int(e["count"]) for e in events_at(collector, "mqtt-command-refused")) == 41
            ),
            within=20,
        )
        assert len(events_at(collector, "mqtt-command-refused")) <= 4, "one per period, not each"
        node = rx.sparkplug[STREAM]
        assert node.commands_refused()[0] == 41
        await wait_until(lambda: mqtt_events(events, "mqtt-command-refused"), within=10)
        doc = mqtt_events(events, "mqtt-command-refused")[0]
        assert doc["log"]["syslog"]["severity"]["name"] == "warning"
        assert doc["labels"]["topic"] == DCMD
        assert doc["event"]["dataset"] == "diode.security"
    finally:
        host.close()
