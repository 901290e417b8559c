"""The OPC UA poller against a real asyncua server on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.subscription import OverflowPolicy
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from diode.config import validate
from diode.config.opcua import OpcuaServer
from diode.errors import ConfigError, KeyFileError
from diode.records import DeviceInfo, Quality, Sample, TagInfo, ValueType
from tests.support.opcua_server import BUILD_INFO, OpcuaTestServer, node_id
from transmitter import certs
from transmitter.opcua import (
    Backoff,
    OpcuaPoller,
    _CountedSubscription,
    plain_value,
    quality_of,
)

TIMEOUT_S = 20.0  # generous: a noisy 2-core CI box; conditions end the waits early


class Collector:
    """A SampleSink that keeps everything and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.devices: list[DeviceInfo] = []
        self.tags: list[TagInfo] = []

    def sample(self, sample: Sample) -> None:
        self.samples.append(sample)

    def tag(self, info: TagInfo) -> None:
        self.tags.append(info)

    def device(self, info: DeviceInfo) -> None:
        self.devices.append(info)

    def of(self, tag_id: int) -> list[Sample]:
        return [s for s in self.samples if s.tag_id == tag_id]

    async def until(self, condition: Callable[[], Any], what: str = "condition") -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.samples[-10:]}")
            await asyncio.sleep(0.02)


TAGS: dict[tuple[str, str], int] = {}


def tag_id(device: str, name: str) -> int:
    return TAGS.setdefault((device, name), len(TAGS) + 1)


def config(endpoint: str, nodes: list[dict[str, Any]], **extra: Any) -> OpcuaServer:
    data: dict[str, Any] = {
        "name": "plc",
        "endpoint": endpoint,
        "publishing_interval_ms": 50.0,
        "sampling_interval_ms": 20.0,
        "watchdog_s": 5.0,
        "reconnect_initial_s": 0.2,
        "reconnect_max_s": 1.0,
        "timeout_s": 3.0,
        "nodes": nodes,
    }
    data.update(extra)
    return OpcuaServer.model_validate(data)


@asynccontextmanager
async def running(cfg: OpcuaServer, sink: Collector, **kw: Any) -> AsyncIterator[OpcuaPoller]:
    poller = OpcuaPoller(cfg, tag_id=tag_id, sink=sink, **kw)
    task = asyncio.create_task(poller.run())
    try:
        yield poller
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def server() -> AsyncIterator[OpcuaTestServer]:
    srv = OpcuaTestServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture(scope="session")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate and key, generated once for the whole session (RSA is slow)."""
    folder = tmp_path_factory.mktemp("server-pki")
    key = cert_gen.generate_private_key()
    host = socket.gethostname()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "diode test server",
        {},
        [x509.UniformResourceIdentifier("urn:freeopcua:python:server"), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    cert_path, key_path = folder / "server.der", folder / "server.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


def last_good(sink: Collector, tag: int, value: Any) -> Callable[[], bool]:
    return lambda: any(s.value == value and s.quality is Quality.GOOD for s in sink.of(tag))


# -- against a live server ----------------------------------------------------------


async def test_subscribed_values_arrive_with_source_timestamps(server: OpcuaTestServer) -> None:
    nodes = [
        {"name": "level", "node_id": node_id("Level"), "unit": "m"},
        {"name": "count", "node_id": node_id("Count")},
        {"name": "running", "node_id": node_id("Running")},
        {"name": "label", "node_id": node_id("Label")},
        {"name": "big", "node_id": node_id("Big")},
        {"name": "temp", "node_id": node_id("Temp"), "type": "float64"},
    ]
    sink = Collector()
    async with running(config(server.endpoint, nodes), sink) as poller:
        level, count, running_, label = (
            tag_id("plc", n) for n in ("level", "count", "running", "label")
        )
        await sink.until(last_good(sink, level, 1.5), "initial level")
        await sink.until(last_good(sink, label, "idle"), "initial label")

        ts = dt.datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
        await server.set("Level", 3.25, source_ts=ts)
        await server.set("Count", -7)
        await server.set("Running", True)
        await server.set("Label", "filling")
        await sink.until(last_good(sink, level, 3.25), "level change")
        await sink.until(last_good(sink, count, -7), "count change")
        await sink.until(last_good(sink, running_, True), "running change")
        await sink.until(last_good(sink, label, "filling"), "label change")

        changed = next(s for s in sink.of(level) if s.value == 3.25)
        assert changed.ts_ns == int(ts.timestamp()) * 1_000_000_000 + 123_456_000
        assert type(next(s for s in sink.of(count) if s.value == -7).value) is int
        assert next(s for s in sink.of(running_) if s.value is True).value is True

        types = {t.name: t.value_type for t in poller.catalogue}
        assert types == {
            "level": ValueType.FLOAT64,
            "count": ValueType.INT32,
            "running": ValueType.BOOL,
            "label": ValueType.STRING,
            "big": ValueType.UINT64,
            "temp": ValueType.FLOAT64,  # configured, not overridden by the server's Float
        }
        info = next(t for t in poller.catalogue if t.name == "level")
        assert info.source == f"opcua://127.0.0.1:{server.port}#ns=2;s=Plant.Level"
        assert info.unit == "m"
        assert info.device == "plc"
        assert sink.devices[0].protocol == "opcua"
        # BuildInfo, and the security the endpoints offer (no certificate: an unsecured server).
        assert sink.devices[0].identity == {**BUILD_INFO, "endpoints_security": "None/None"}
        assert poller.counters["connects"] == 1


async def test_absolute_deadband_suppresses_small_changes(server: OpcuaTestServer) -> None:
    nodes = [
        {
            "name": "level",
            "node_id": node_id("Level"),
            "deadband_type": "absolute",
            "deadband_value": 1.0,
            "deadband": 0.25,
        },
        {"name": "count", "node_id": node_id("Count")},
    ]
    sink = Collector()
    async with running(config(server.endpoint, nodes), sink) as poller:
        level, count = tag_id("plc", "level"), tag_id("plc", "count")
        assert poller.deadbands[level] == 0.25
        await sink.until(last_good(sink, level, 1.5), "initial level")
        for value in (1.6, 1.7, 1.9):
            await server.set("Level", value)
            await asyncio.sleep(0.1)  # longer than sampling, so each value is sampled
        await server.set("Level", 5.0)
        # Count is written after Level: once its change arrives, Level's would have too.
        await server.set("Count", 1)
        await sink.until(last_good(sink, level, 5.0), "large level change")
        await sink.until(last_good(sink, count, 1), "count change")
        assert [s.value for s in sink.of(level)] == [1.5, 5.0]


async def test_poll_mode_reads_periodically_in_one_batch(server: OpcuaTestServer) -> None:
    nodes = [
        {"name": "count", "node_id": node_id("Count"), "mode": "poll", "poll_interval_s": 0.1},
        {"name": "level", "node_id": node_id("Level"), "mode": "poll", "poll_interval_s": 0.1},
    ]
    sink = Collector()
    async with running(config(server.endpoint, nodes), sink):
        count, level = tag_id("plc", "count"), tag_id("plc", "level")
        await sink.until(lambda: len(sink.of(count)) >= 3, "three polls")
        await server.set("Count", 42)
        await sink.until(last_good(sink, count, 42), "polled change")
        assert all(s.quality is Quality.GOOD for s in sink.of(level))


async def test_status_codes_become_quality(server: OpcuaTestServer) -> None:
    nodes = [
        {"name": "level", "node_id": node_id("Level")},
        {"name": "curve", "node_id": node_id("Curve")},
        {"name": "ghost", "node_id": "ns=2;s=Plant.DoesNotExist"},
    ]
    sink = Collector()
    async with running(config(server.endpoint, nodes), sink):
        level, curve, ghost = (tag_id("plc", n) for n in ("level", "curve", "ghost"))
        await sink.until(last_good(sink, level, 1.5), "initial level")
        await server.set("Level", 2.0, status=ua.StatusCodes.UncertainLastUsableValue)
        await sink.until(
            lambda: any(s.quality is Quality.UNCERTAIN for s in sink.of(level)), "uncertain"
        )
        await server.set("Level", None, status=ua.StatusCodes.BadSensorFailure)
        await sink.until(lambda: any(s.quality is Quality.BAD for s in sink.of(level)), "bad")
        uncertain = next(s for s in sink.of(level) if s.quality is Quality.UNCERTAIN)
        assert (uncertain.value, uncertain.reason) == (2.0, "UncertainLastUsableValue")
        bad = next(s for s in sink.of(level) if s.quality is Quality.BAD)
        assert (bad.value, bad.reason) == (None, "BadSensorFailure")

        await sink.until(lambda: sink.of(curve), "array sample")
        # An array is a value like any other now (issue 14, item 6): it was BAD before.
        assert (sink.of(curve)[0].quality, sink.of(curve)[0].value) == (Quality.GOOD, (1.0, 2.0))
        await sink.until(lambda: sink.of(ghost), "unknown node sample")
        assert (sink.of(ghost)[0].quality, sink.of(ghost)[0].reason) == (
            Quality.BAD,
            "BadNodeIdUnknown",
        )


async def test_server_restart_gives_bad_once_then_values_again(server: OpcuaTestServer) -> None:
    nodes = [
        {"name": "level", "node_id": node_id("Level")},
        {"name": "count", "node_id": node_id("Count"), "mode": "poll", "poll_interval_s": 0.2},
    ]
    sink = Collector()
    async with running(config(server.endpoint, nodes), sink) as poller:
        level, count = tag_id("plc", "level"), tag_id("plc", "count")
        await sink.until(last_good(sink, level, 1.5), "initial level")
        await sink.until(last_good(sink, count, 0), "initial count")

        await server.stop()
        lost = lambda tag: [s for s in sink.of(tag) if s.reason == "disconnected"]  # noqa: E731
        await sink.until(lambda: lost(level) and lost(count), "BAD disconnected")
        await asyncio.sleep(1.5)  # several failed reconnect attempts while the server is down
        await server.start()
        await server.set("Level", 9.0)
        await server.set("Count", 5)
        await sink.until(last_good(sink, level, 9.0), "level after restart")
        await sink.until(last_good(sink, count, 5), "count after restart")

        assert len(lost(level)) == len(lost(count)) == 1
        assert lost(level)[0].quality is Quality.BAD
        assert lost(level)[0].value is None
        assert poller.counters["connects"] == 2
        assert poller.counters["sessions_lost"] == 1
        assert len(sink.devices) == 2


async def test_subscription_silence_fires_the_watchdog(server: OpcuaTestServer) -> None:
    nodes = [{"name": "level", "node_id": node_id("Level")}]
    sink = Collector()
    cfg = config(server.endpoint, nodes, watchdog_s=1.0, publishing_interval_ms=100.0)
    async with running(cfg, sink) as poller:
        level = tag_id("plc", "level")
        await sink.until(last_good(sink, level, 1.5), "initial level")
        # The server forgets the subscription while the session stays up: no data, no keepalive.
        assert server._server is not None
        service = server._server.iserver.subscription_service
        await service.delete_subscriptions(list(service.subscriptions))
        await sink.until(lambda: poller.counters["watchdog_fired"] >= 1, "watchdog")
        await server.set("Level", 4.0)
        await sink.until(last_good(sink, level, 4.0), "level after the session rebuild")
        assert [s.reason for s in sink.of(level) if s.quality is Quality.BAD] == ["disconnected"]


async def test_sign_and_encrypt_reuses_its_generated_certificate(
    server_pki: tuple[Path, Path], tmp_path: Path
) -> None:
    srv = OpcuaTestServer(certificate=server_pki[0], private_key=server_pki[1])
    await srv.start()
    try:
        nodes = [{"name": "level", "node_id": node_id("Level")}]
        cfg = config(
            srv.endpoint,
            nodes,
            security_policy="Basic256Sha256",
            security_mode="SignAndEncrypt",
            trust_list=str(server_pki[0]),
        )
        level = tag_id("plc", "level")
        for start in (1, 2):
            sink = Collector()
            async with running(cfg, sink, state_dir=tmp_path):
                await sink.until(last_good(sink, level, 1.5), f"secure value, start {start}")
            if start == 1:
                first_file = (tmp_path / certs.CERT_NAME).read_bytes()
        assert (tmp_path / certs.CERT_NAME).read_bytes() == first_file
        assert len(srv.client_certificates) >= 2
        assert set(srv.client_certificates) == {first_file}
        assert (tmp_path / certs.KEY_NAME).stat().st_mode & 0o077 == 0
    finally:
        await srv.stop()


async def test_none_client_is_refused_by_a_secure_only_server(
    server_pki: tuple[Path, Path],
) -> None:
    srv = OpcuaTestServer(certificate=server_pki[0], private_key=server_pki[1])
    await srv.start()
    try:
        sink = Collector()
        cfg = config(srv.endpoint, [{"name": "level", "node_id": node_id("Level")}])
        async with running(cfg, sink) as poller:
            await sink.until(lambda: poller.counters["connect_failures"] >= 2, "refusals")
        assert all(s.quality is Quality.BAD for s in sink.samples)
    finally:
        await srv.stop()


async def test_username_and_password_from_a_file(tmp_path: Path) -> None:
    srv = OpcuaTestServer(users={"operator": "s3cret"})
    await srv.start()
    try:
        nodes = [{"name": "level", "node_id": node_id("Level")}]
        level = tag_id("plc", "level")
        good, wrong = tmp_path / "good.pw", tmp_path / "wrong.pw"
        good.write_text("s3cret\n")
        wrong.write_text("guess\n")

        sink = Collector()
        plain = {"allow_password_without_encryption": True}
        cfg = config(srv.endpoint, nodes, username="operator", password_file=str(good), **plain)
        async with running(cfg, sink):
            await sink.until(last_good(sink, level, 1.5), "value with a user")

        sink = Collector()
        cfg = config(srv.endpoint, nodes, username="operator", password_file=str(wrong), **plain)
        async with running(cfg, sink) as poller:
            await sink.until(lambda: poller.counters["connect_failures"] >= 2, "refusals")
        assert [s.reason for s in sink.samples] == ["disconnected"]  # once, not per attempt
    finally:
        await srv.stop()


def make_cert(
    folder: Path, name: str, *, issuer: tuple[x509.Certificate, Any] | None = None, ca: bool = False
) -> tuple[Path, Path, x509.Certificate, Any]:
    """A certificate (DER) and key (PEM) for a test server, self-signed or signed by ``issuer``."""
    key = cert_gen.generate_private_key()
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("urn:freeopcua:python:server"),
                    x509.DNSName(socket.gethostname()),
                ]
            ),
            critical=False,
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path, cert, key


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate it signed, and a stranger's self-signed certificate."""
    folder = tmp_path_factory.mktemp("other-pki")
    ca_path, _, ca_cert, ca_key = make_cert(folder, "plant-ca", ca=True)
    signed, signed_key, _, _ = make_cert(folder, "signed-server", issuer=(ca_cert, ca_key))
    stranger, _, _, _ = make_cert(folder, "stranger")
    return {"ca": ca_path, "signed": signed, "signed_key": signed_key, "stranger": stranger}


async def secure_run(
    srv: OpcuaTestServer, tmp_path: Path, **trust: str
) -> tuple[Collector, OpcuaPoller]:
    """Run a SignAndEncrypt poller with ``trust`` until a value or three refusals."""
    cfg = config(
        srv.endpoint,
        [{"name": "level", "node_id": node_id("Level")}],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        username="operator",
        password_file=str(tmp_path / "pw"),
        **trust,
    )
    (tmp_path / "pw").write_text("s3cret\n")
    sink = Collector()
    level = tag_id("plc", "level")
    async with running(cfg, sink, state_dir=tmp_path) as poller:
        await sink.until(
            lambda: last_good(sink, level, 1.5)() or poller.counters["server_untrusted"] >= 3,
            "a value or refusals",
        )
    return sink, poller


async def test_server_certificate_checked_against_the_trust_list(
    server_pki: tuple[Path, Path], other_pki: dict[str, Path], tmp_path: Path
) -> None:
    srv = OpcuaTestServer(
        certificate=server_pki[0], private_key=server_pki[1], users={"operator": "s3cret"}
    )
    await srv.start()
    try:
        level = tag_id("plc", "level")
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "stranger.der").write_bytes(other_pki["stranger"].read_bytes())
        # A trust list without the server's certificate: refused before the password goes.
        sink, poller = await secure_run(srv, tmp_path, trust_list=str(trusted))
        assert poller.counters["server_untrusted"] >= 3
        assert not any(s.quality is Quality.GOOD for s in sink.of(level))
        assert poller.counters["connects"] == 0
        # The same pinned, wrongly: refused too.
        sink, poller = await secure_run(
            srv, tmp_path, server_certificate=str(other_pki["stranger"])
        )
        assert poller.counters["connects"] == 0
        assert not any(s.quality is Quality.GOOD for s in sink.of(level))
        # With the server's certificate in the folder: values flow.
        (trusted / "server.der").write_bytes(server_pki[0].read_bytes())
        sink, poller = await secure_run(srv, tmp_path, trust_list=str(trusted))
        assert poller.counters["server_untrusted"] == 0
        assert last_good(sink, level, 1.5)()
        # Pinned, rightly: values flow.
        sink, poller = await secure_run(srv, tmp_path, server_certificate=str(server_pki[0]))
        assert poller.counters["server_untrusted"] == 0
        assert last_good(sink, level, 1.5)()
    finally:
        await srv.stop()


async def test_a_server_signed_by_a_trusted_ca_is_accepted(
    other_pki: dict[str, Path], tmp_path: Path
) -> None:
    srv = OpcuaTestServer(
        certificate=other_pki["signed"],
        private_key=other_pki["signed_key"],
        users={"operator": "s3cret"},
    )
    await srv.start()
    try:
        sink, poller = await secure_run(srv, tmp_path, trust_list=str(other_pki["ca"]))
        assert poller.counters["server_untrusted"] == 0
        assert last_good(sink, tag_id("plc", "level"), 1.5)()
    finally:
        await srv.stop()


def test_why_untrusted_checks_validity_and_issuer(other_pki: dict[str, Path]) -> None:
    ca, signed, stranger = (
        certs.load_trust_list(other_pki[k])[0] for k in ("ca", "signed", "stranger")
    )
    now = dt.datetime.now(dt.UTC)
    assert certs.why_untrusted(signed, [ca], now) is None
    assert certs.why_untrusted(stranger, [stranger], now) is None
    assert "neither" in (certs.why_untrusted(stranger, [ca], now) or "")
    # a non-CA certificate whose subject happens to be the issuer's is no anchor
    assert "neither" in (certs.why_untrusted(signed, [stranger], now) or "")
    later = now + dt.timedelta(days=31)
    assert "expired" in (certs.why_untrusted(signed, [ca], later) or "")
    assert "not valid before" in (
        certs.why_untrusted(signed, [ca], now - dt.timedelta(days=1)) or ""
    )


def test_a_garbled_trust_list_entry_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.der").write_bytes(b"not a certificate")
    with pytest.raises(KeyFileError, match="not a certificate"):
        certs.load_trust_list(tmp_path)


# -- certificates ---------------------------------------------------------------------


def test_certificate_is_generated_once_and_never_half_replaced(tmp_path: Path) -> None:
    cert, key = certs.ensure_client_certificate(tmp_path / "pki", hostname="ot-box")
    first = cert.read_bytes()
    assert certs.ensure_client_certificate(tmp_path / "pki")[0].read_bytes() == first
    assert certs.application_uri_of(cert) == certs.APPLICATION_URI
    key.unlink()
    with pytest.raises(KeyFileError):
        certs.ensure_client_certificate(tmp_path / "pki")
    assert cert.read_bytes() == first


# -- config ---------------------------------------------------------------------------


def _server_dict(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "plc",
        "endpoint": "opc.tcp://10.0.0.5:4840",
        "nodes": [{"name": "level", "node_id": "ns=2;s=Tank.Level"}],
    }
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"security_policy": "Basic256Sha256"}, "does not fit security_policy"),
        ({"security_mode": "Sign"}, "does not fit security_policy"),
        ({"password": "x", "username": "u"}, "unknown key"),
        ({"username": "u"}, "username and password_file"),
        ({"username": "u", "password_file": "/p"}, "allow_password_without_encryption"),
        (
            {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt"},
            "server_certificate \\(pin it\\) or trust_list",
        ),
        ({"trust_list": "/etc/diode/trusted"}, "need a security_policy"),
        ({"certificate": "/c.der"}, "certificate and private_key"),
        ({"endpoint": "http://plc"}, "should match pattern"),
        ({"nodes": [{"name": "a", "node_id": "Tank.Level"}]}, "not a NodeId"),
        (
            {
                "nodes": [
                    {
                        "name": "a",
                        "node_id": "i=1",
                        "mode": "poll",
                        "deadband_type": "absolute",
                        "deadband_value": 1.0,
                    }
                ]
            },
            "subscribe",
        ),
        (
            {
                "nodes": [
                    {
                        "name": "a",
                        "node_id": "i=1",
                        "deadband_type": "percent",
                        "deadband_value": 150.0,
                    }
                ]
            },
            "between 0 and 100",
        ),
        (
            {"nodes": [{"name": "a", "node_id": "i=1"}, {"name": "a", "node_id": "i=2"}]},
            "used twice",
        ),
        ({"nodes": [{"name": "a", "node_id": "i=1", "type": "float128"}]}, "Input should be"),
        ({"watchdog_s": 1.0, "publishing_interval_ms": 1000.0}, "two publishing intervals"),
        ({"timeout_s": "5"}, "valid number"),
    ],
)
def test_config_rejects(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(OpcuaServer, _server_dict(**extra), "tx.toml")


def test_config_accepts_a_full_server() -> None:
    cfg = validate(
        OpcuaServer,
        _server_dict(
            security_policy="Basic256Sha256",
            security_mode="Sign",
            trust_list="/etc/diode/opcua-trusted",
            username="op",
            password_file="/etc/diode/pw",
            nodes=[
                {
                    "name": "a",
                    "node_id": "ns=2;s=A",
                    "deadband_type": "percent",
                    "deadband_value": 2.0,
                    "sampling_interval_ms": 100,
                    "queue_size": 5,
                },
                {
                    "name": "b",
                    "node_id": "ns=3;i=17",
                    "mode": "poll",
                    "poll_interval_s": 2,
                    "type": "int32",
                },
            ],
        ),
        "tx.toml",
    )
    assert cfg.password_file == Path("/etc/diode/pw")
    assert cfg.nodes[1].type is ValueType.INT32
    assert cfg.sampling_ms(cfg.nodes[0]) == 100.0
    assert cfg.queue_for(cfg.nodes[1]) == 10
    assert cfg.missing_files() == [
        ("password_file", Path("/etc/diode/pw")),
        ("trust_list", Path("/etc/diode/opcua-trusted")),
    ]


# -- pure conversions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, (True, "")),
        (-3, (-3, "")),
        (2**64 - 1, (2**64 - 1, "")),
        (2**64, (None, "unsupported type: integer out of the 64-bit range")),
        (1.25, (1.25, "")),
        ("x", ("x", "")),
        (None, (None, "")),
        (ua.LocalizedText("hello"), (("hello", ""), "")),
        (ua.LocalizedText("Hallo", "de-DE"), (("Hallo", "de-DE"), "")),
        (dt.datetime(2024, 1, 2, tzinfo=dt.UTC), ("2024-01-02T00:00:00.000000Z", "")),
        (dt.datetime(9999, 12, 31, 23, 59, 59), ("9999-12-31T23:59:59.000000Z", "")),
        ([1, 2], ((1, 2), "")),
        ([[1.5], [2.5]], (((1.5,), (2.5,)), "")),
        ([ua.LocalizedText("a", "en")], ((("a", "en"),), "")),
        (b"\x00", (b"\x00", "")),
        (
            ua.StatusCode(ua.StatusCodes.BadSensorFailure),
            ((ua.StatusCodes.BadSensorFailure, "BadSensorFailure"), ""),
        ),
        (ua.NodeId("Tank.Level", 2), ("ns=2;s=Tank.Level", "")),
        (ua.QualifiedName("Name", 3), ("3:Name", "")),
        (
            uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
            ("72962b91-fa75-4ae6-8d28-b404dc7daf63", ""),
        ),
        ([1, 2**70], (None, "unsupported type: integer out of the 64-bit range")),
        (ua.ExtensionObject(), (None, "unsupported type ExtensionObject")),
        (object(), (None, "unsupported type object")),
    ],
)
def test_plain_value(raw: Any, expected: tuple[Any, str]) -> None:
    assert plain_value(raw) == expected


def test_quality_of_status_codes() -> None:
    assert quality_of(ua.StatusCode(ua.StatusCodes.Good)) == (Quality.GOOD, "")
    assert quality_of(ua.StatusCode(ua.StatusCodes.UncertainInitialValue)) == (
        Quality.UNCERTAIN,
        "UncertainInitialValue",
    )
    assert quality_of(ua.StatusCode(ua.StatusCodes.BadNotConnected)) == (
        Quality.BAD,
        "BadNotConnected",
    )


def test_backoff_doubles_to_its_cap_with_bounded_jitter() -> None:
    backoff = Backoff(1.0, 8.0, 0.2, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    backoff.reset()
    assert backoff.next_delay() <= 1.2


@pytest.mark.parametrize(
    ("sampling_ms", "queue_size", "per_item"),
    [(1000.0, 10, 1), (500.0, 10, 2), (0.0, 4, 4), (100.0, 4, 4)],
)
def test_subscription_queue_holds_two_publishes_of_every_item(
    sampling_ms: float, queue_size: int, per_item: int
) -> None:
    # asyncua queues a whole PublishResponse at once and drops the oldest when full.
    nodes = [{"name": f"n{i}", "node_id": f"ns=2;i={i}"} for i in range(20_000)]
    cfg = config(
        "opc.tcp://127.0.0.1:4840",
        nodes,
        publishing_interval_ms=1000.0,
        sampling_interval_ms=sampling_ms,
        queue_size=queue_size,
    )
    poller = OpcuaPoller(cfg, tag_id=tag_id, sink=Collector())
    assert poller._queue_bound(poller._tags) == 2 * 20_000 * per_item


async def test_notifications_a_full_queue_drops_are_counted() -> None:
    # asyncua drops the oldest notification silently when its queue is full; each
    # drop is a lost value and must reach the heartbeat (poll_notifications_dropped).
    cfg = config("opc.tcp://127.0.0.1:4840", [{"name": "n0", "node_id": "ns=2;i=1"}])
    poller = OpcuaPoller(cfg, tag_id=tag_id, sink=Collector())
    subscription = _CountedSubscription(
        None,
        ua.CreateSubscriptionParameters(),
        None,
        queue_maxsize=2,
        overflow=OverflowPolicy.DROP_OLDEST,
        on_drop=poller._dropped,
    )
    for n in range(5):
        subscription._deliver(n)  # asyncua's own delivery path into its queue
    assert poller.counters["notifications_dropped"] == 3
    kept = [subscription._event_queue.get_nowait() for _ in range(2)]
    assert kept == [3, 4]  # the newest kept, the oldest dropped
