"""Free ports a server can stop and start again on; a broker that says why it did not start."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from diode import loopback
from diode.loopback import free_port, free_udp_port
from tests.support.mosquitto import Mosquitto


def ephemeral() -> range:
    low, high = (int(p) for p in loopback.EPHEMERAL_RANGE.read_text().split())
    return range(low, high + 1)


def test_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    tcp = [free_port() for _ in range(300)]
    udp = [free_udp_port() for _ in range(300)]
    for ports in (tcp, udp):
        assert len(set(ports)) == len(ports)
        assert not [p for p in ports if p in ephemeral()]
        assert all(loopback.LOWEST <= p < 65_536 for p in ports)


def test_a_port_something_is_bound_to_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        # The only candidate is the held port: free_port must fall back to the kernel's.
        monkeypatch.setattr(loopback, "_outside_ephemeral", lambda: [range(port, port + 1)])
        assert free_port() != port


def test_an_ephemeral_source_port_blocks_a_restart_inside_the_range(tmp_path: Path) -> None:
    """Why the ports lie outside the range: a client's source port takes a stopped server's port.

    This is what failed CI once: a broker stopped, some connection meanwhile
    took its port as source port, and the broker could not start again.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port in ephemeral()
        with socket.socket() as client:
            client.bind(("127.0.0.1", port - 1 if port - 1 in ephemeral() else port + 1))
            taken = client.getsockname()[1]
            client.connect(("127.0.0.1", port))
            broker = Mosquitto(tmp_path, port=taken)
            started = time.monotonic()
            with pytest.raises(RuntimeError, match=f"port {taken} .exited.*in use"):
                broker.start()
            assert time.monotonic() - started < 5, "a broker that exited was waited for"
