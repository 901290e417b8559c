"""The receiver's broker connection with TLS and a password, against a real mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from diode.config.mqtt import StreamOutput
from receiver.mqtt import MqttOutput
from tests.support.mosquitto import Mosquitto
from tests.test_mqtt_output import TAGS, broker_config, running, samples, until


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diode test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths[2], key)
    return paths


async def test_tls_and_a_password_from_a_file(tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(  # noqa: ASYNC221 - a one-off setup step before anything runs
        ["mosquitto_passwd", "-b", "-c", str(passwd), "diode", "s3cret"],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"allow_anonymous false\npassword_file {passwd}\nuser root\n"
    )
    broker.start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    # A subscriber of our own over the same TLS listener, with the same password.
    import paho.mqtt.client as paho

    got: list[str] = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sub.tls_set(ca_certs=str(ca))
    sub.username_pw_set("diode", "s3cret")
    sub.on_connect = lambda c, *_: c.subscribe("diode/#", qos=1)
    sub.on_message = lambda _c, _u, m: got.append(m.topic)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        config = broker_config(
            broker.port,
            tmp_path,
            tls=True,
            ca_file=ca,
            username="diode",
            password_file=secret,
        )
        async with running(MqttOutput(config)) as out:
            await until(lambda: out.counters["connected"] == 1)
            out.publish_samples(StreamOutput(site="tls"), samples(TAGS[0], range(3)))
            await until(lambda: got.count("diode/tls/plc1/t0") == 3)
        wrong = tmp_path / "wrong-password"
        wrong.write_text("nope\n")
        bad = broker_config(
            broker.port, tmp_path, tls=True, ca_file=ca, username="diode", password_file=wrong
        )
        async with running(MqttOutput(bad)) as out:
            out.publish_samples(StreamOutput(site="tls"), samples(TAGS[1], range(2)))
            await until(lambda: out.counters["spooled"] >= 2)
            assert out.counters["connected"] == 0, "a wrong password must not connect"
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
