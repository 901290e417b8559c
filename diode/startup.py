"""Start-up checks of the settings against this host: folders, addresses, ports.

A config can be valid on paper and still unusable here: a ``state_dir`` that
is a file or that the daemon may not write, a ``listen`` address that belongs
to another host, a port another program holds. Each of these becomes a
:class:`~diode.errors.SettingError` naming the key, which the daemons print as
one line with the config file's name before exiting with status 2 (never a
traceback). ``diode check-config`` runs the same checks, without creating
anything and without the port checks: a running daemon holds its own ports.

This module is shell, not core: it opens sockets and touches the file system.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
from pathlib import Path

from diode.config.mqtt import MqttBroker
from diode.config.rx import RxConfig
from diode.config.tx import TxConfig
from diode.errors import SettingError

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)  # Linux


def usable_dir(path: Path, key: str, *, create: bool) -> None:
    """``path`` is (or, with ``create``, becomes) a folder this process may write."""
    if path.exists() and not path.is_dir():
        raise SettingError(key, f"{path} is a file, not a folder")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            raise SettingError(key, f"cannot create {path}: {parent} is not a folder")
        if not create:
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SettingError(key, f"cannot create {path}: {parent} is not writable")
            return
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SettingError(key, f"cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingError(
            key, f"{path} is not writable (by uid {os.geteuid()}, or its file system is read-only)"
        )


def usable_file(path: Path, key: str, *, create: bool) -> None:
    """``path`` is a file (or can become one) in a folder this process may write."""
    if path.is_dir():
        raise SettingError(key, f"{path} is a folder, not a file")
    usable_dir(path.parent, key, create=create)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SettingError(
            key, f"{path} is not writable (by uid {os.geteuid()}, or its file system is read-only)"
        )


def usable_spool(path: Path, key: str) -> None:
    """An existing spool file is a SQLite database (read-only look: a daemon may be using it)."""
    if not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        raise SettingError(key, f"{path} is not a usable spool: {exc}") from None


def readable(path: Path | None, key: str) -> None:
    """A file the daemon reads later (at each connect) can be read now, as this user."""
    if path is None:
        return
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise SettingError(key, f"cannot read {path}: {exc.strerror}") from None


def usable_tls(broker: MqttBroker) -> None:
    """The broker's CA bundle and the client certificate and key load (they are read at connect)."""
    if not broker.tls:
        return
    try:
        context = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise SettingError("mqtt.ca_file", f"{broker.ca_file}: not a CA bundle: {exc}") from None
    if broker.certfile is not None:
        try:
            context.load_cert_chain(broker.certfile, broker.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise SettingError(
                "mqtt.certfile",
                f"{broker.certfile} with {broker.keyfile}: not a certificate and its key: {exc}",
            ) from None


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def local_address(address: str, key: str) -> None:
    """``address`` is one of this host's addresses (or the wildcard): a socket can bind it."""
    with socket.socket(_family(address), socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            raise SettingError(
                key, f"{address} is not an address of this host ({exc.strerror})"
            ) from None


def bind_error(
    exc: OSError, *, address_key: str, port_key: str, address: str, port: int
) -> SettingError:
    """The setting to blame for a failed bind, and what to do about it."""
    if exc.errno == errno.EADDRINUSE:
        return SettingError(
            port_key, f"port {port} on {address} is already in use by another program"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return SettingError(address_key, f"{address} is not an address of this host")
    if exc.errno == errno.EACCES:
        return SettingError(port_key, f"port {port} needs privileges this user does not have")
    return SettingError(address_key, f"cannot bind {address}:{port}: {exc.strerror}")


def bind_to_device(sock: socket.socket, interface: str, key: str) -> None:
    """Take datagrams from ``interface`` only (SO_BINDTODEVICE), whatever address they carry."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise SettingError(key, f"no interface named {interface!r} on this host") from None
        if exc.errno == errno.EPERM:
            raise SettingError(
                key,
                f"pinning the socket to {interface!r} needs CAP_NET_RAW on kernels before 5.7 "
                "(AmbientCapabilities=CAP_NET_RAW in the unit)",
            ) from None
        raise SettingError(key, f"cannot pin the socket to {interface!r}: {exc.strerror}") from None


def interface_addresses(interface: str) -> set[str] | None:
    """The addresses on ``interface`` (``ip -j addr``), or None when that cannot be told.

    None under the systemd sandbox (no netlink) or without iproute2: the check
    is then left to ``diode check-config``, run by an administrator.
    """
    ip = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
    if ip is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - a fixed program, the name checked by the config
            [ip, "-j", "addr", "show", "dev", interface],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        links = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {
        str(ipaddress.ip_address(info["local"]))
        for link in links
        for info in link.get("addr_info", [])
        if "local" in info
    }


def listen_on_interface(listen: str, interface: str) -> None:
    """A socket pinned to ``interface`` and bound to ``listen`` hears the link only if the
    address is on that interface: otherwise the link's datagrams are all refused."""
    if ipaddress.ip_address(listen).is_unspecified:
        return
    found = interface_addresses(interface)
    if found is not None and str(ipaddress.ip_address(listen)) not in found:
        raise SettingError(
            "receiver.listen",
            f"{listen} is not an address of interface {interface!r} "
            f"(it has {', '.join(sorted(found)) or 'none'}): pinned to {interface!r}, "
            "the receiver would hear nothing",
        )


def usable_broker_socket(path: Path | None, key: str) -> None:
    """The broker's Unix socket, if it is there yet, is a socket this user may connect to.

    Missing is fine (the broker starts later and creates it; the receiver spools
    meanwhile, as with a broker away). A file that is not a socket, or one this
    user cannot write (connecting takes write permission, unix(7)) or reach, would
    fail every connection attempt for a reason no retry fixes: said at start.
    """
    if path is None:
        return
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:  # a folder on the way this user may not search
        raise SettingError(key, f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SettingError(key, f"{path} is not a socket")
    if not os.access(path, os.W_OK):
        raise SettingError(
            key,
            f"{path}: uid {os.geteuid()} may not connect to it (connecting needs write "
            "permission: put this user in the socket's group, docs/OPERATIONS.md)",
        )


def check_rx(config: RxConfig, *, create: bool) -> None:
    """Everything about the receiver's settings this host can tell before binding its ports."""
    section = config.receiver
    usable_dir(section.state_dir, "receiver.state_dir", create=create)
    usable_file(config.mqtt.spool_path, "mqtt.spool_path", create=create)
    usable_spool(config.mqtt.spool_path, "mqtt.spool_path")
    usable_tls(config.mqtt)
    readable(config.mqtt.password_file, "mqtt.password_file")
    usable_broker_socket(config.mqtt.socket, "mqtt.socket")
    local_address(section.listen, "receiver.listen")
    if section.interface is not None and not Path("/sys/class/net", section.interface).exists():
        raise SettingError(
            "receiver.interface", f"no interface named {section.interface!r} on this host"
        )
    if section.interface is not None:
        listen_on_interface(section.listen, section.interface)
    if section.metrics_port:
        local_address(section.metrics_address, "receiver.metrics_address")


def check_tx(config: TxConfig, *, create: bool) -> None:
    """Everything about the transmitter's settings this host can tell before it starts."""
    usable_dir(config.transmitter.state_dir, "transmitter.state_dir", create=create)
    if config.link.source is not None:
        local_address(config.link.source, "link.source")
    for i, server in enumerate(config.opcua.servers):
        for key in ("password_file", "certificate", "private_key"):
            readable(getattr(server, key), f"opcua.servers[{i}].{key}")
        if server.secure and server.certificate is None and server.cert_dir is not None:
            usable_dir(server.cert_dir, f"opcua.servers[{i}].cert_dir", create=create)
