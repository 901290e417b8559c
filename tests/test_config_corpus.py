"""Malformed configs (tests/configs/bad): each daemon exits 2 with one line naming the problem.

The corpus covers wrong types, unknown keys and sections, missing keys and
files, impossible FEC/MTU settings, bad addresses, key files that are not
keys (garbage, empty, the wrong half), secrets others can read, one key under
two streams, paths that are files where a folder is needed, addresses that
are not this host's, an empty file, invalid TOML and binary garbage. ``tx_*``
files go to diode-tx, ``rx_*`` to diode-rx, run exactly as systemd runs them;
``diode check-config`` must find the same problem in each. A traceback on
stderr fails the test: an operator must get a sentence, not a stack.

Git keeps no file modes, so the corpus runs from a copy where every key and
secret is 0600, except the ``*.open.*`` ones, which stay readable by all.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BAD = Path(__file__).parent / "configs" / "bad"
BIN = Path(sys.executable).parent

# file -> what the error line must say (besides the file name)
EXPECTED = {
    "tx_empty.toml": "the file is empty",
    "tx_blank_lines.toml": "the file is empty",
    "tx_binary_garbage.toml": "not a UTF-8 text file",
    "rx_binary_garbage.toml": "not a UTF-8 text file",
    "tx_not_toml.toml": "not valid TOML",
    "tx_unknown_key.toml": "transmitter.colour: unknown key",
    "tx_unknown_section.toml": "extra: unknown key",
    "tx_stream_id_string.toml": "transmitter.stream_id: Input should be a valid integer",
    "tx_stream_id_negative.toml": "transmitter.stream_id: Input should be greater than or equal",
    "tx_stream_id_missing.toml": "transmitter.stream_id: required key is missing",
    "tx_link_missing.toml": "link: required key is missing",
    "tx_destination_hostname.toml": "link.destination: expected an IP address",
    "tx_destination_bad_ip.toml": "link.destination: expected an IP address",
    "tx_port_zero.toml": "link.port",
    "tx_port_string.toml": "link.port: Input should be a valid integer",
    "tx_rate_zero.toml": "link.rate_mbps",
    "tx_datagram_over_mtu.toml": "datagrams would be fragmented",
    "tx_datagram_tiny.toml": "link.datagram_size",
    "tx_fec_too_many_symbols.toml": "at most 255 are possible",
    "tx_fec_k_zero.toml": "link.fec.k",
    "tx_fec_negative_ratio.toml": "link.fec.repair_ratio",
    "tx_file_lane_rate_zero.toml": "file_lane.rate_mbps: Input should be greater than 0",
    "tx_key_missing.toml": "transmitter.private_key: no such file",
    "tx_key_garbage.toml": "garbage.key: not a PEM private key",
    "tx_modbus_bad_table.toml": "modbus.devices[0].units[0].tags[0].table",
    "tx_modbus_bad_type.toml": "modbus.devices[0].units[0].tags[0].type",
    "tx_modbus_duplicate_device.toml": "device names must be unique",
    "tx_modbus_no_host.toml": "modbus.devices[0].host: required key is missing",
    "tx_synthetic_negative_rate.toml": "synthetic.sources[0].rate_hz",
    "tx_log_level.toml": "log.level",
    "tx_heartbeat_zero.toml": "transmitter.heartbeat_interval_s",
    "tx_opcua_bad_policy.toml": "opcua.servers[0].security_policy",
    "rx_streams_missing.toml": "streams: required key is missing",
    "rx_streams_empty.toml": "streams: List should have at least 1 item",
    "rx_listen_interface.toml": "receiver.listen: expected an IP address",
    "rx_port_float.toml": "receiver.port: Input should be a valid integer",
    "rx_qos_2.toml": "streams[0].output.qos",
    "rx_prefix_wildcard.toml": "must not contain the MQTT wildcards",
    "rx_template_without_tag.toml": "topic_template must contain {tag}",
    "rx_pubkey_missing.toml": "streams[0].public_keys[0]: no such file",
    "rx_pubkey_garbage.toml": "garbage.key: not a PEM public key",
    "rx_duplicate_streams.toml": "stream ids must be unique",
    "rx_cafile_without_tls.toml": "need tls = true",
    "rx_rcvbuf_small.toml": "receiver.rcvbuf_bytes",
    "rx_metrics_port_big.toml": "receiver.metrics_port",
    "rx_reconnect_backwards.toml": "reconnect_max_s must be >= reconnect_initial_s",
    "tx_no_such_file.toml": "cannot read the file",
    "tx_key_is_public.toml": "good.pub: this is a public key (.pub)",
    "tx_key_empty.toml": "empty.key: the key file is empty",
    "tx_key_too_open.toml": "transmitter.private_key: good.open.key: permissions 0644 are too open",
    "tx_psk_too_open.toml": "transmitter.psk_file: link.open.psk: permissions 0644 are too open",
    "tx_state_dir_file.toml": "transmitter.state_dir: good.pub is a file, not a folder",
    "tx_source_not_local.toml": "link.source: 192.0.2.77 is not an address of this host",
    "tx_opcua_password_plain.toml": "allow_password_without_encryption = true",
    "tx_opcua_secure_unpinned.toml": "set server_certificate (pin it) or trust_list",
    "tx_opcua_trust_garbage.toml": "trust_list: garbage.key: not a certificate for the trust list",
    "tx_opcua_trust_empty.toml": "trust_list: . holds no certificate: it trusts nothing",
    "rx_listen_missing.toml": "receiver.listen: required key is missing",
    "rx_listen_wildcard.toml": "takes datagrams from every interface",
    "rx_listen_not_local.toml": "receiver.listen: 192.0.2.77 is not an address of this host",
    "rx_interface_missing.toml": "receiver.interface: no interface named 'nosuch0'",
    "rx_interface_bad_name.toml": "receiver.interface: String should match pattern",
    "rx_metrics_address_not_local.toml": "receiver.metrics_address: 192.0.2.77 is not an address",
    "rx_state_dir_file.toml": "receiver.state_dir: good.pub is a file, not a folder",
    "rx_spool_path_folder.toml": "mqtt.spool_path: /tmp is a folder, not a file",
    "rx_mqtt_ca_garbage.toml": "mqtt.ca_file: garbage.key: not a CA bundle",
    "rx_mqtt_client_cert_garbage.toml": "mqtt.certfile: good.pub with good.key: not a certificate",
    "rx_spool_garbage.toml": "mqtt.spool_path: garbage.key is not a usable spool",
    "rx_pubkey_is_private.toml": "good.key: this is a private key; the receiver takes the public",
    "rx_same_key_two_streams.toml": "streams[1].public_keys[0]: good-copy.pub is the same key as",
    "rx_psk_too_open.toml": "streams[0].psk_file: link.open.psk: permissions 0644 are too open",
    "rx_site_slash.toml": "streams[0].output.site: site is one topic level",
    "rx_mqtt_socket_tls.toml": "mqtt.socket: socket and tls = true exclude each other",
    "rx_mqtt_socket_and_host.toml": "mqtt.socket: socket excludes host",
    "rx_mqtt_socket_relative.toml": "mqtt.socket: socket must be an absolute path",
    "rx_mqtt_socket_not_a_socket.toml": "mqtt.socket: /etc/passwd is not a socket",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus with the file modes git cannot keep: secrets 0600 unless named *.open.*."""
    folder = tmp_path_factory.mktemp("corpus") / "bad"
    shutil.copytree(BAD, folder)
    for path in folder.iterdir():
        secret = path.suffix in (".key", ".psk")
        path.chmod(0o644 if not secret or ".open." in path.name else 0o600)
    return folder


def run_daemon(name: str, folder: Path) -> subprocess.CompletedProcess[str]:
    daemon = "diode-tx" if name.startswith("tx_") else "diode-rx"
    return subprocess.run(
        [str(BIN / daemon), "--config", name],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_corpus_is_large_and_every_file_has_an_expectation() -> None:
    corpus = {p.name for p in BAD.glob("*.toml")}
    assert len(corpus) >= 30
    assert corpus == set(EXPECTED) - {"tx_no_such_file.toml"}


def one_error_line(result: subprocess.CompletedProcess[str], name: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert EXPECTED[name] in lines[0]
    assert ".toml" in lines[0] or ".key" in lines[0]  # the file is named
    return lines[0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_bad_config_exits_2_naming_the_problem(name: str, corpus: Path) -> None:
    one_error_line(run_daemon(name, corpus), name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_config_finds_what_the_daemon_refuses(name: str, corpus: Path) -> None:
    result = subprocess.run(
        [str(BIN / "diode"), "check-config", name],
        cwd=corpus,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    one_error_line(result, name)
