"""Free loopback ports, for the demo, the benchmarks and the tests.

A server that stops and starts again on its port (a broker restart, a
receiver killed and started) must find the port still free. Inside the
kernel's ephemeral range it may not: any outgoing connection made in the
meantime can take the port as its source port, a client retrying that very
port can even connect to itself (TCP simultaneous open), and the restart
fails with "address in use". So the ports handed out here lie outside that
range, where only an explicit bind takes them, and none is handed out twice
by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below, the ports of services that may start at any time
TRIES = 200

_handed_out: set[tuple[int, int]] = set()


def _outside_ephemeral() -> list[range]:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return []
    return [r for r in (range(LOWEST, low), range(max(high + 1, LOWEST), 65_536)) if r]


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing is bound to now, outside the ephemeral range.

    Falls back to one the kernel picks (inside the range) where the range
    leaves no room outside it.
    """
    ranges = _outside_ephemeral()
    if ranges:
        pick = random.Random()
        weights = [len(r) for r in ranges]
        for _ in range(TRIES):
            (chosen,) = pick.choices(ranges, weights)
            port = pick.choice(chosen)
            if (kind, port) not in _handed_out and _bindable(port, kind):
                _handed_out.add((kind, port))
                return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        kernel: int = s.getsockname()[1]
    _handed_out.add((kind, kernel))
    return kernel


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)
