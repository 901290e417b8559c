"""Config, key and start-up hygiene: what the corpus in tests/configs/bad cannot show.

The corpus holds files; these need a moment in time or a host state: a port
another program holds, a folder this user may not write, file owners and
modes that git cannot keep. Each start-up failure a user can cause must give
one line naming the config file and the key, and exit status 2.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from diode.config import validate
from diode.config.link import FecSettings
from diode.config.rx import RxConfig
from diode.errors import ConfigError, KeyFileError
from diode.keys import (
    Keyring,
    SigningKey,
    TrustedKey,
    load_psk,
    load_signing_key,
    secret_file_problem,
    write_keypair,
    write_psk,
)
from diode.loopback import free_port

BIN = Path(sys.executable).parent


def rx_data(**receiver: object) -> dict[str, object]:
    return {
        "receiver": {"listen": "127.0.0.1", **receiver},
        "streams": [{"id": 1, "public_keys": ["tx.pub"]}],
    }


# -- everything a daemon writes goes under its state_dir ------------------------------


def test_the_spool_follows_the_receivers_state_dir(tmp_path: Path) -> None:
    config = validate(RxConfig, rx_data(state_dir="rx-a"), "rx.toml")
    resolved = config.resolve(tmp_path / "rx.toml")
    assert resolved.mqtt.spool_path == tmp_path / "rx-a" / "mqtt-spool.sqlite3"
    # two template receivers, two state dirs: two spools
    other = validate(RxConfig, rx_data(state_dir="/var/lib/diode-rx/b"), "rx.toml")
    assert other.mqtt.spool_path == Path("/var/lib/diode-rx/b/mqtt-spool.sqlite3")


def test_an_explicit_spool_path_is_kept() -> None:
    data = rx_data(state_dir="/srv/rx") | {"mqtt": {"spool_path": "/data/spool.sqlite3"}}
    config = validate(RxConfig, data, "rx.toml")
    assert config.mqtt.spool_path == Path("/data/spool.sqlite3")


def test_the_default_state_dir_holds_the_default_spool() -> None:
    config = validate(RxConfig, rx_data(), "rx.toml")
    assert config.mqtt.spool_path == config.receiver.state_dir / "mqtt-spool.sqlite3"


# -- the topic depth and the listen address ---------------------------------------------


@pytest.mark.parametrize("site", ["a/b", "plant/line/1"])
def test_a_site_is_one_topic_level(site: str) -> None:
    data = rx_data()
    data["streams"] = [{"id": 1, "public_keys": ["tx.pub"], "output": {"site": site}}]
    with pytest.raises(ConfigError, match="site is one topic level"):
        validate(RxConfig, data, "rx.toml")


def test_prefix_may_still_have_levels() -> None:
    data = rx_data()
    data["streams"] = [{"id": 1, "public_keys": ["tx.pub"], "output": {"prefix": "ot/diode"}}]
    assert validate(RxConfig, data, "rx.toml").streams[0].output.prefix == "ot/diode"


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_every_interface_needs_an_interface_to_pin_to(wildcard: str) -> None:
    with pytest.raises(ConfigError, match="every interface"):
        validate(RxConfig, rx_data(listen=wildcard), "rx.toml")
    pinned = validate(RxConfig, rx_data(listen=wildcard, interface="eth1"), "rx.toml")
    assert pinned.receiver.interface == "eth1"


# -- keys ---------------------------------------------------------------------------------


def test_the_keyring_refuses_one_key_for_two_streams() -> None:
    key = SigningKey.generate()
    public = key.private.public_key()
    ring = Keyring([TrustedKey(stream_id=1, public=public)])
    ring.add(TrustedKey(stream_id=1, public=public))  # the same stream again is harmless
    with pytest.raises(KeyFileError, match="streams 1 and 2"):
        ring.add(TrustedKey(stream_id=2, public=public))


def _secret(tmp_path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path = tmp_path / f"secret-{mode:o}-{uid}-{gid}"
    write_psk(path)
    path.chmod(mode)
    os.chown(path, uid, gid)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to other owners needs root")
def test_secret_file_modes_as_ssh_and_the_units_expect(tmp_path: Path) -> None:
    assert secret_file_problem(_secret(tmp_path, 0o600)) is None
    assert secret_file_problem(_secret(tmp_path, 0o400)) is None
    # root:diode 0640, the layout of the systemd units: the service's group reads it
    assert secret_file_problem(_secret(tmp_path, 0o640, gid=4242)) is None
    # root:root 0640: the group adds nobody on purpose
    assert "group 0 can read it" in (secret_file_problem(_secret(tmp_path, 0o640)) or "")
    # a user's own file readable by its group: what ssh refuses
    problem = secret_file_problem(_secret(tmp_path, 0o640, uid=4242, gid=4242))
    assert "too open" in (problem or "")
    for mode in (0o644, 0o604, 0o602, 0o666):
        assert "others can read it" in (secret_file_problem(_secret(tmp_path, mode)) or "")


def test_loading_refuses_a_secret_others_can_read(tmp_path: Path) -> None:
    private, _, _ = write_keypair(tmp_path, "tx")
    write_psk(tmp_path / "tx.psk")
    assert load_signing_key(private)  # 0600 from keygen
    assert len(load_psk(tmp_path / "tx.psk")) == 32
    private.chmod(0o644)
    (tmp_path / "tx.psk").chmod(0o604)
    with pytest.raises(KeyFileError, match="permissions 0644 are too open"):
        load_signing_key(private)
    with pytest.raises(KeyFileError, match="permissions 0604 are too open"):
        load_psk(tmp_path / "tx.psk")


# -- start-up failures that need a host state -----------------------------------------


def _rx_config(tmp_path: Path, **receiver: object) -> Path:
    if not (tmp_path / "tx.pub").exists():
        write_keypair(tmp_path, "tx")
    lines = [
        f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        for key, value in receiver.items()
    ]
    body = "\n".join(lines)
    path = tmp_path / "rx.toml"
    path.write_text(
        f'[receiver]\nlisten = "127.0.0.1"\nstate_dir = "state"\n{body}\n\n'
        '[mqtt]\nport = 1\n\n[[streams]]\nid = 1\npublic_keys = ["tx.pub"]\n'
    )
    return path


def _tx_config(tmp_path: Path, state_dir: str) -> Path:
    if not (tmp_path / "tx.key").exists():
        write_keypair(tmp_path, "tx")
    path = tmp_path / "tx.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [transmitter]
            stream_id = 1
            private_key = "tx.key"
            state_dir = "{state_dir}"

            [link]
            destination = "127.0.0.1"
            """
        )
    )
    return path


def _start(daemon: str, config: Path, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / daemon), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        user=user,
    )


def _one_line(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert ".toml: " in lines[0]
    for text in expected:
        assert text in lines[0]


def test_the_link_port_in_use_names_receiver_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        done = _start("diode-rx", _rx_config(tmp_path, port=port))
    _one_line(done, "receiver.port:", f"port {port} on 127.0.0.1 is already in use")


def test_the_metrics_port_in_use_names_receiver_metrics_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _rx_config(tmp_path, port=free_port(socket.SOCK_DGRAM), metrics_port=port)
        done = _start("diode-rx", config)
    _one_line(done, "receiver.metrics_port:", f"port {port} on 127.0.0.1 is already in use")


def test_a_state_dir_that_is_a_file_names_transmitter_state_dir(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder\n")
    _one_line(
        _start("diode-tx", _tx_config(tmp_path, "state")),
        "transmitter.state_dir:",
        "is a file, not a folder",
    )


def test_a_state_dir_that_cannot_be_written_names_the_setting(tmp_path: Path) -> None:
    # A read-only file system refuses even root, so the test needs no second user:
    # the daemon runs in its own mount namespace with the state dir mounted read-only.
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private read-only mount")
    config = _tx_config(tmp_path, "state")
    (tmp_path / "state").mkdir()
    script = f'mount -t tmpfs -o ro tmpfs "{tmp_path}/state" && exec "$0" --config "$1"'
    done = subprocess.run(
        [unshare, "--mount", "sh", "-c", script, str(BIN / "diode-tx"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _one_line(done, "transmitter.state_dir:", "is not writable")


# -- the first-day documents agree with each other ---------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_readme_keygen_writes_the_files_the_examples_name() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"diode keygen (\S+) --name (\S+)", readme)
    assert match is not None, "the README's install steps must name the key"
    folder, name = match.groups()
    tx = tomllib.loads((ROOT / "systemd/examples/tx.toml").read_text())
    rx = tomllib.loads((ROOT / "systemd/examples/rx.toml").read_text())
    assert tx["transmitter"]["private_key"] == f"{folder}/{name}.key"
    assert f"{folder}/{name}.pub" in rx["streams"][0]["public_keys"]


def test_the_example_fec_is_the_one_the_loss_model_was_measured_with() -> None:
    tx = tomllib.loads((ROOT / "systemd/examples/tx.toml").read_text())
    # docs/RELIABILITY.md measures the defaults against the loss model
    assert FecSettings.model_validate(tx["link"]["fec"]) == FecSettings()
